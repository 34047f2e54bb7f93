// The emulator's own tests: deliberately broken kernels (each must be caught) and their
// correct twins (each must pass). Run by name from the C++ test binary (tests/cpp/simt_test.cpp,
// also under ASan + UBSan) and from Python (labelsmooth_simt::selftest, tests/test_simt_emulator.py).
//
// run(name) returns "nan" when the kernel's output holds a NaN (an unwritten element or a read
// of never-written shared memory), "ok" otherwise; a rule the emulator enforces throws c10::Error.
#pragma once

#include <cmath>
#include <string>

#include "../reduce.cuh"
#include "simt.h"

namespace labelsmooth_ext {
namespace simt_selftest {

using cuda::load_pack;
using cuda::Pack;
using cuda::row_reduce;
using cuda::RowState;
using simt::memory::Buffer;

// One row of ROW_THREADS lanes per threadIdx.y; rows >= n return at once (as the CE kernel
// does); the rest reduce their lane numbers with the kernels' own row_reduce.
template <int ROW_THREADS>
__global__ void rows_kernel(float* out, int n) {
  const int row = int(blockIdx.x * blockDim.y + threadIdx.y);
  if (row >= n) return;
  RowState<float> st{float(threadIdx.x), 1.f, float(threadIdx.x), 0.f};
  st = row_reduce<float, ROW_THREADS>(st);
  if (threadIdx.x == 0) out[row] = st.T;
}

// Every thread writes its slot of a shared array; with the barrier it reads its neighbour's.
template <bool BARRIER>
__global__ void neighbour_kernel(float* out) {
  LSE_SHARED(float, s, 64);
  const int t = int(threadIdx.x);
  s[t] = float(t);
  if (BARRIER) __syncthreads();
  out[t] = s[(t + 1) % 64];
}

// Thread 0 writes slot 0 only; everyone reads their own slot after the barrier.
__global__ void uninitialised_shared_kernel(float* out) {
  LSE_SHARED(float, s, 32);
  if (threadIdx.x == 0) s[0] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Every block writes the same element: the last block to run wins.
__global__ void block_race_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);
}

__global__ void partial_sync_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void exit_before_sync_kernel(float* out) {
  if (threadIdx.x >= 48) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Lane 20 calls with a mask of lanes 0..15.
__global__ void caller_not_in_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1, 32);
}

// Lanes 0..15 shuffle among themselves with xor 16: the source lane is outside the mask.
__global__ void source_not_in_mask_kernel(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, float(threadIdx.x), 16, 32);
}

// Width-8 butterfly sums: every lane ends with the sum of its group of 8.
__global__ void shfl_width8_kernel(float* out) {
  float v = float(threadIdx.x);
  for (int off = 4; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, 8);
  out[threadIdx.x] = v;
}

template <int OFFSET>
__global__ void pack_kernel(const float* in, float* out) {
  const Pack<float> p = load_pack(in + OFFSET);
  out[threadIdx.x] = p.v[threadIdx.x % 4];
}

template <int EXTRA>
__global__ void write_kernel(float* out, int n) {
  for (int i = int(threadIdx.x); i < n + EXTRA; i += int(blockDim.x)) out[i] = 2.f;
}

inline std::string verdict(const float* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::isnan(p[i])) return "nan";
  return "ok";
}

template <int ROW_THREADS>
std::string run_rows(int n_rows) {
  constexpr int kRowsPerBlock = 128 / ROW_THREADS > 0 ? (ROW_THREADS >= 128 ? 1 : 128 / ROW_THREADS) : 1;
  Buffer<float> out{size_t(n_rows)};
  auto* k = &rows_kernel<ROW_THREADS>;
  const unsigned blocks = unsigned((n_rows + kRowsPerBlock - 1) / kRowsPerBlock);
  LSE_LAUNCH(k, blocks, dim3(ROW_THREADS, kRowsPerBlock), 0, 0)(out.p, n_rows);
  const float want = float(ROW_THREADS * (ROW_THREADS - 1) / 2);
  for (int i = 0; i < n_rows; ++i)
    if (out[size_t(i)] != want) return "wrong sum " + std::to_string(out[size_t(i)]);
  return verdict(out.p, size_t(n_rows));
}

inline std::string run(const std::string& name) {
  Buffer<float> out(64);
  Buffer<float> in(64);
  for (int i = 0; i < 64; ++i) in[size_t(i)] = float(i);
  auto launch1 = [&](auto* kernel, unsigned threads) { LSE_LAUNCH(kernel, 1u, threads, 0, 0)(out.p); };
  auto launch_grid = [&](auto* kernel, unsigned blocks, unsigned threads) {
    LSE_LAUNCH(kernel, blocks, threads, 0, 0)(out.p);
  };
  // warp_reduce's full mask with rows narrower than a warp (one row exits): must fail
  if (name == "rows_4_lanes_partial") return run_rows<4>(7);
  if (name == "rows_8_lanes_partial") return run_rows<8>(3);
  if (name == "rows_16_lanes_partial") return run_rows<16>(1);
  // the row layouts the CE kernel uses (32, 128, 512 lanes), with rows exiting: must pass
  if (name == "rows_32_lanes_partial") return run_rows<32>(3);
  if (name == "rows_128_lanes") return run_rows<128>(2);
  if (name == "rows_512_lanes") return run_rows<512>(2);
  if (name == "race_no_barrier") {
    launch1(&neighbour_kernel<false>, 64);
    return verdict(out.p, 64);
  }
  if (name == "ok_barrier") {
    launch1(&neighbour_kernel<true>, 64);
    return verdict(out.p, 64);
  }
  if (name == "shared_uninitialised") {
    launch1(&uninitialised_shared_kernel, 32);
    return verdict(out.p, 32);
  }
  if (name == "race_blocks") {
    launch_grid(&block_race_kernel, 4, 32);
    return verdict(out.p, 1);
  }
  if (name == "partial_syncthreads") {
    launch1(&partial_sync_kernel, 64);
    return verdict(out.p, 64);
  }
  if (name == "exit_before_syncthreads") {
    launch1(&exit_before_sync_kernel, 64);
    return verdict(out.p, 48);
  }
  if (name == "caller_not_in_mask") {
    launch1(&caller_not_in_mask_kernel, 32);
    return verdict(out.p, 32);
  }
  if (name == "source_not_in_mask") {
    launch1(&source_not_in_mask_kernel, 32);
    return verdict(out.p, 16);
  }
  if (name == "ok_shfl_width8") {
    launch1(&shfl_width8_kernel, 32);
    for (int i = 0; i < 32; ++i) {
      const int g = i / 8 * 8;
      if (out[size_t(i)] != float(8 * g + 28)) return "wrong shuffle result at lane " + std::to_string(i);
    }
    return "ok";
  }
  if (name == "misaligned_pack") {
    LSE_LAUNCH(&pack_kernel<1>, 1u, 4u, 0, 0)(in.p, out.p);
    return verdict(out.p, 4);
  }
  if (name == "ok_aligned_pack") {
    LSE_LAUNCH(&pack_kernel<4>, 1u, 4u, 0, 0)(in.p, out.p);
    return out[0] == 4.f && out[3] == 7.f ? verdict(out.p, 4) : "wrong pack";
  }
  if (name == "oob_write") {
    LSE_LAUNCH(&write_kernel<1>, 1u, 32u, 0, 0)(out.p, 64);
    return verdict(out.p, 64);
  }
  if (name == "unwritten_output") {
    LSE_LAUNCH(&write_kernel<-1>, 1u, 32u, 0, 0)(out.p, 64);
    return verdict(out.p, 64);
  }
  if (name == "ok_write") {
    LSE_LAUNCH(&write_kernel<0>, 1u, 32u, 0, 0)(out.p, 64);
    return verdict(out.p, 64);
  }
  TORCH_CHECK(false, "simt selftest: unknown case '", name, "'");
}

}  // namespace simt_selftest
}  // namespace labelsmooth_ext
