// Host-side launch of the kernels: which kernel instance runs for a row size / dtype, its grid
// and block (shared by the nvcc build and the SIMT emulation).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "kernels.cuh"
#include "platform.cuh"

namespace labelsmooth_ext {
namespace cuda {

template <typename scalar_t, int ROW_THREADS, int ROWS_PER_BLOCK, int CACHE>
void launch_forward(const CeParams<scalar_t>& p, stream_t stream) {
  const dim3 block(ROW_THREADS, ROWS_PER_BLOCK);
  const int64_t blocks = (p.N + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "labelsmooth_ext: too many rows (", p.N, ")");
  auto* kernel = &ce_forward_kernel<scalar_t, ROW_THREADS, ROWS_PER_BLOCK, CACHE>;
  LSE_LAUNCH(kernel, unsigned(blocks), block, 0, stream)(p);
  LSE_LAUNCH_CHECK();
}

// Register-cache packs of the 256- and 512-thread kernels (128-register cap): 6 for float, half
// and bfloat16; double spills with 6 on sm_90 next to pass 1's four-pack load buffer, so 4.
// (bfloat16 took 4 too until its elements were widened by a shift, `widen` in kernels.cuh: c10's
// conversion is cvt.f32.bf16 of 16-bit registers on sm_90, which cost it 20-30 registers.)
// bench/sass_report.py reads the types named here.
template <typename scalar_t>
constexpr int big_row_cache() {
  return std::is_same_v<scalar_t, double> ? 4 : 6;
}

// The row kernels by row size: the largest row (bytes) each takes, for a 4-pack and a 6-pack
// big_row_cache; larger rows take the 512-thread kernel. bench/sass_report.py reads this table
// (its thresholds live only here): keep one {threads per row, bytes, bytes} entry per line.
struct RowKernelLimit {
  int row_threads;
  int64_t max_bytes_cache4, max_bytes_cache6;
};
inline constexpr RowKernelLimit kRowKernelLimits[] = {
    {8, 512, 512},        // 8 lanes x 4 packs (16 rows per block)
    {32, 2048, 2048},     // a warp x 4 packs (4 rows per block)
    {128, 16384, 16384},  // 128 threads x 8 packs
    {256, 65536, 98304},  // 256 threads x big_row_cache x 4, two blocks per SM
};

template <typename scalar_t>
constexpr int64_t row_limit(int i) {
  return big_row_cache<scalar_t>() == 4 ? kRowKernelLimits[i].max_bytes_cache4 : kRowKernelLimits[i].max_bytes_cache6;
}
static_assert(kRowKernelLimits[0].max_bytes_cache4 == 8 * 16 * 4 && kRowKernelLimits[1].max_bytes_cache4 == 32 * 16 * 4 &&
                  kRowKernelLimits[2].max_bytes_cache4 == 128 * 16 * 8 &&
                  kRowKernelLimits[3].max_bytes_cache4 == 256 * 16 * 4 * 4 &&
                  kRowKernelLimits[3].max_bytes_cache6 == 256 * 16 * 6 * 4,
              "each kernel's limit is its threads x cached packs (x 4 for the 256-thread kernel)");

// Threads per row from the row's size in bytes: keep up to CACHE 16-byte packs per thread.
template <typename scalar_t>
void dispatch_forward(const CeParams<scalar_t>& p, stream_t stream) {
  constexpr int kBig = big_row_cache<scalar_t>();
  const int64_t bytes = p.K * int64_t(sizeof(scalar_t));
  if (bytes <= row_limit<scalar_t>(0)) {
    // small rows (fp32 K <= 128, 16-bit K <= 256): 8 lanes per row, 16 rows per block, 3
    // shuffle levels instead of 5 and no lane without a pack for K >= 8 x pack size
    launch_forward<scalar_t, 8, 16, 4>(p, stream);
  } else if (bytes <= row_limit<scalar_t>(1)) {
    launch_forward<scalar_t, 32, 4, 4>(p, stream);
  } else if (bytes <= row_limit<scalar_t>(2)) {
    launch_forward<scalar_t, 128, 1, 8>(p, stream);
  } else if (bytes <= row_limit<scalar_t>(3)) {
    // Rows up to 96 KiB (bfloat16, double: 64 KiB): 256 threads per row and two blocks per SM (__launch_bounds__ min 2:
    // the same 128-register cap), so one block's reduction, barrier and exit overlap the other's
    // loads. Rows in flight x uncached part stays far below the L2 (at most 264 x 72 KiB).
    launch_forward<scalar_t, 256, 1, kBig>(p, stream);
  } else {
    // Larger rows: one 512-thread block per SM (two blocks of 256 would double the rows in
    // flight: bfloat16 K = 128256 would hold 264 x 226 KiB in L2, more than its 50 MB).
    // Up to 48 KiB of the row in registers (32 KiB: bfloat16, double); the rest is read again
    // in pass 2 (from L2). Not eight packs: with pass 1's four-pack load buffer they spill under
    // the 128-register cap of a 512-thread block. (1024 threads x 4 packs spills under 64.)
    launch_forward<scalar_t, 512, 1, kBig>(p, stream);
  }
}

// Few rows, large rows (issue 10 item 4): with fewer rows than multiprocessors, a row of at least
// two chunks is split over several blocks, enough for about two blocks per multiprocessor over
// the grid, each chunk at least 16 KiB (256 threads x 4 packs, loaded back to back).
constexpr int kSplitThreads = 256;
constexpr int64_t kSplitChunkBytes = int64_t(kSplitThreads) * 16 * 4;

inline int split_count(int64_t N, int64_t row_bytes, int sms) {
  if (N <= 0 || N >= sms || row_bytes < 2 * kSplitChunkBytes) return 1;
  const int64_t want = (2 * int64_t(sms) + N - 1) / N;
  const int64_t most = row_bytes / kSplitChunkBytes;
  return int(std::max<int64_t>(1, std::min<int64_t>(std::min(want, most), 1024)));
}

// The two kernels of a split row; `partial` holds N x splits RowStates (device memory).
template <typename scalar_t>
void launch_split(const CeParams<scalar_t>& p, int splits, RowState<acc_of<scalar_t>>* partial, stream_t stream) {
  const dim3 grid(unsigned(splits), unsigned(p.N));
  constexpr int64_t VEC = Pack<scalar_t>::kSize;
  const int64_t per = ((p.K + VEC - 1) / VEC + splits - 1) / splits;  // packs per chunk
  auto* stats = &ce_split_stats_kernel<scalar_t, kSplitThreads>;
  LSE_LAUNCH(stats, grid, kSplitThreads, 0, stream)(p, partial, per);
  LSE_LAUNCH_CHECK();
  auto* grad = &ce_split_grad_kernel<scalar_t, kSplitThreads>;
  LSE_LAUNCH(grad, grid, kSplitThreads, 0, stream)(p, partial, per);
  LSE_LAUNCH_CHECK();
}

// The elementwise kernels: 256 threads per block, at most `blocks_per_sm` blocks per multiprocessor
// (grid-stride loops cover the rest).
template <typename scalar_t>
void launch_bce(const scalar_t* x, const scalar_t* t, const scalar_t* w, int64_t nw, const scalar_t* pw,
                int64_t np, acc_of<scalar_t> a, const acc_of<scalar_t>* inv_n, acc_of<scalar_t>* loss,
                scalar_t* grad, int64_t n, int sms, stream_t stream) {
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, int64_t(sms) * 8);
  auto* kernel = &bce_kernel<scalar_t>;
  LSE_LAUNCH(kernel, unsigned(blocks), 256, 0, stream)(x, t, w, nw, pw, np, a, inv_n, loss, grad, n);
  LSE_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_scale(scalar_t* g, const acc_of<scalar_t>* go, int64_t N, int64_t K, bool per_row, int sms,
                  stream_t stream) {
  // per row: one block per row up to 8 blocks per multiprocessor; scalar: 8 blocks per multiprocessor
  const int64_t blocks = per_row ? std::min<int64_t>(N, int64_t(sms) * 8) : int64_t(sms) * 8;
  auto* kernel = &scale_kernel<scalar_t>;
  LSE_LAUNCH(kernel, unsigned(std::max<int64_t>(blocks, 1)), 256, 0, stream)(g, go, N, K, per_row);
  LSE_LAUNCH_CHECK();
}

template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, "labelsmooth_ext: unsupported dtype ", t);
  }
}

}  // namespace cuda
}  // namespace labelsmooth_ext
