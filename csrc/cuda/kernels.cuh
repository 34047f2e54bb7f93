// The CUDA kernels (device code only; compiled by nvcc in loss_cuda.cu and by the SIMT
// emulation in tests, from this one source).
//
// Kernel shape: each row is handled by ROW_THREADS threads (a warp for small K, a block for
// large K). Pass 1 reads the row once with 16-byte loads, keeping the first CACHE packs per
// thread in registers, and folds it into an online (max, sum exp) plus linear sums. Pass 2
// writes the gradient from the registers; packs beyond the cache are read again, from L2
// (the rows in flight fit in it), so HBM sees one read of the logits and one write of the
// gradient.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../row_math.h"
#include "platform.cuh"
#include "reduce.cuh"

namespace labelsmooth_ext {
namespace cuda {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// An element in the accumulation type. bfloat16 -> float is exact and is a 16-bit shift: done as
// such on sm_90, where c10's conversion (__bfloat162float) is cvt.f32.bf16 of a 16-bit register
// (each pack word first split into two 16-bit registers: 20-30 registers more than half in the
// row kernels, issue 10 item 8). Below sm_90 c10's conversion is already the bit move
// (mov.b32 {0, h}), which ptxas allocates better than the shift there (sm_80: 146 registers for
// the shift against 126 in the 128-thread kernel), so it is kept; so is the emulation's.
template <typename T>
__device__ __forceinline__ acc_of<T> widen(T v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t b = uint32_t(v.x) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
  }
#endif
  return static_cast<acc_of<T>>(v);
}

template <typename scalar_t>
struct CeParams {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* in;
  int64_t in_row_stride;
  const int64_t* target;
  const acc_t* weight;        // nullptr: unweighted (in the accumulation type)
  const acc_t* weight_sum;    // device scalar, weighted only
  const acc_t* inv_denom;     // device scalar 1/D for mean; nullptr otherwise
  scalar_t* grad;             // nullptr: no gradient wanted
  acc_t* loss_rows;
  int64_t N, K, ignore_index;
  Smoothing<acc_t> sm;
  // Backward (ce_grad): the incoming gradient (one value, or one per row when go_per_row),
  // applied in acc_t before the one rounding; nullptr in the forward.
  const acc_t* go;
  bool go_per_row;
  // The gradient the forward saved (may alias grad: in place). Rows whose incoming gradient
  // scales it exactly (exact_multiplier) reuse it; in place with a factor of 1 they are skipped.
  const scalar_t* saved;
  // Large-vocabulary options (row_math.h): softcap > 0 caps every logit first; z_loss adds
  // z_loss * lse^2 per kept row; lse_rows (nullptr: not wanted) gets lse (0 for ignored rows).
  // grad may equal in (in-place backward): each element is read by the thread that writes it,
  // and every read of another thread's element (z_y) happens before the row reduction's barrier.
  acc_t softcap;
  acc_t z_loss;
  acc_t* lse_rows;
};

template <typename scalar_t, int ROW_THREADS>
__device__ void fill_row(scalar_t* g, int64_t K, float v) {
  for (int64_t c = threadIdx.x; c < K; c += ROW_THREADS) g[c] = static_cast<scalar_t>(v);
}

// Folds logits into a thread's RowState: online max / rescaled sum of exp (one rescale per
// pack), and the linear sums around `ref`. A NaN makes the max NaN, as in PyTorch.
template <typename scalar_t>
struct RowAccum {
  using acc_t = acc_of<scalar_t>;
  static constexpr int VEC = Pack<scalar_t>::kSize;
  RowState<acc_t> st;
  acc_t ref;
  const acc_t* weight;  // nullptr: unweighted
  acc_t cap;            // softcap (0: none)

  __device__ __forceinline__ acc_t capped(acc_t x) const { return cap > acc_t(0) ? softcap_apply<acc_t>(x, cap) : x; }

  __device__ __forceinline__ void linear(acc_t x, int64_t c) {
    st.T += x - ref;
    if (weight) st.Tw += static_cast<acc_t>(weight[c]) * (x - ref);
  }

  __device__ __forceinline__ void add(acc_t x, int64_t c) {
    linear(x, c);
    const acc_t mn = nan_max(st.m, x);
    if (mn == acc_t(-INFINITY)) return;  // everything so far is -inf
    st.s = st.s * fast_exp(st.m - mn) + fast_exp(x - mn);
    st.m = mn;
  }

  __device__ __forceinline__ void add_pack(const Pack<scalar_t>& pk, int64_t c0) {
    acc_t v[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[i] = capped(widen(pk.v[i]));
      linear(v[i], c0 + i);
    }
    acc_t vm = v[0];
#pragma unroll
    for (int i = 1; i < VEC; ++i) vm = nan_max(vm, v[i]);
    const acc_t mn = nan_max(st.m, vm);
    if (mn == acc_t(-INFINITY)) return;
    acc_t s = st.s * fast_exp(st.m - mn);
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += fast_exp(v[i] - mn);
    st.s = s;
    st.m = mn;
  }
};

// 16-byte loads issued back to back in the loops over the packs beyond the register cache.
constexpr int kUnroll = 4;

// g[c] = s[c] * f over one row (g may equal s; every element is read and written by one thread),
// multiplied in acc_t and rounded once: 16-byte packs, kUnroll in flight per thread, when both
// rows have the same 16-byte alignment (the saved gradient and the new one: both allocated like
// the input), element by element otherwise (issue 10 item 8: this was element by element always).
template <typename scalar_t, int ROW_THREADS>
__device__ __forceinline__ void scale_row(scalar_t* g, const scalar_t* s, int64_t K, acc_of<scalar_t> f) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int VEC = P::kSize;
  const int tid = threadIdx.x;
  const int a = int(reinterpret_cast<uintptr_t>(s) % 16);
  int64_t head = K, nvec = 0;
  if (a == int(reinterpret_cast<uintptr_t>(g) % 16) && a % int(sizeof(scalar_t)) == 0) {
    const int mis = a / int(sizeof(scalar_t));
    head = mis ? std::min<int64_t>(VEC - mis, K) : 0;
    nvec = (K - head) / VEC;
  }
  auto one = [&](int64_t c) { g[c] = static_cast<scalar_t>(static_cast<acc_t>(s[c]) * f); };
  for (int64_t c = tid; c < head; c += ROW_THREADS) one(c);
  for (int64_t v0 = tid; v0 < nvec; v0 += int64_t(kUnroll) * ROW_THREADS) {
    P buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nvec) buf[u] = load_pack(s + head + v * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nvec) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) buf[u].v[i] = static_cast<scalar_t>(widen(buf[u].v[i]) * f);
        store_pack(g + head + v * VEC, buf[u]);
      }
    }
  }
  for (int64_t c = head + nvec * VEC + tid; c < K; c += ROW_THREADS) one(c);
}

// Resident blocks per SM asked of ptxas: two for the 256-thread row kernel (so one block's
// reduction and exit overlap the other's loads), one otherwise (the 512-thread kernel needs
// its 128 registers; the smaller blocks reach several per SM anyway).
template <int THREADS>
constexpr int min_blocks_of() { return THREADS == 256 ? 2 : 1; }

template <typename scalar_t, int ROW_THREADS, int ROWS_PER_BLOCK, int CACHE>
__global__ void __launch_bounds__(ROW_THREADS * ROWS_PER_BLOCK, min_blocks_of<ROW_THREADS * ROWS_PER_BLOCK>())
    ce_forward_kernel(const CeParams<scalar_t> p) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int VEC = P::kSize;
  // A row with nothing (more) to compute clears `live` instead of returning: rows of fewer than
  // 32 threads share a warp, and every lane of it must reach row_reduce's full-mask shuffles.
  // Such a row loads nothing more and reduces a neutral state; it returns after the reduction.
  const int64_t row_id = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
  bool live = row_id < p.N;
  const int64_t row = live ? row_id : 0;  // addresses stay inside the tensors
  const int tid = threadIdx.x;
  const int64_t K = p.K;
  scalar_t* grow = p.grad ? p.grad + row * K : nullptr;
  if (live && p.saved) {  // backward: scale the saved row when that is exact
    const acc_t f = p.go[p.go_per_row ? row : 0];
    if (exact_multiplier<acc_t>(f, std::is_same_v<scalar_t, c10::Half>)) {
      const scalar_t* srow = p.saved + row * K;
      if (!(srow == grow && f == acc_t(1))) scale_row<scalar_t, ROW_THREADS>(grow, srow, K, f);
      live = false;
    }
  }
  const scalar_t* __restrict__ z = p.in + row * p.in_row_stride;
  const bool weighted = p.weight != nullptr;
  const acc_t cap = p.softcap;

  // Scalar head up to the input row's 16-byte boundary, packs, scalar tail. The packs follow
  // the input's alignment; a gradient row aligned differently (a view with an offset, a padded
  // vocabulary sliced) stores each pack in the widest pieces its address allows (g_align:
  // 16, 8, 4 or 2 bytes, uniform over the row).
  const int mis = int((reinterpret_cast<uintptr_t>(z) % 16) / sizeof(scalar_t));
  int64_t head = mis ? VEC - mis : 0;
  if (head > K) head = K;
  if (!live) head = 0;
  const int g_align = grow ? address_alignment(grow + head) : 16;
  const int64_t nvec = live ? (K - head) / VEC : 0;
  const int64_t tail = head + nvec * VEC;

  // Loads in flight (Little's law): the register cache's CACHE loads are all issued, together
  // with the target's, before any of them is used; a row whose target turns out to be ignored
  // or out of range drops them (they read inside the row, never out of bounds).
  const int64_t y = live ? p.target[row] : 0;
  P cache[CACHE];
#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int64_t v = tid + int64_t(i) * ROW_THREADS;
    if (v < nvec) cache[i] = load_pack(z + head + v * VEC);
  }
  if (live && y == p.ignore_index) {
    if (tid == 0) p.loss_rows[row] = acc_t(0);
    if (tid == 0 && p.lse_rows) p.lse_rows[row] = acc_t(0);
    if (grow) fill_row<scalar_t, ROW_THREADS>(grow, K, 0.f);
    live = false;
  }
  if (live && (y < 0 || y >= K)) {  // no host check on this path: poison the row, never read out of bounds
    if (tid == 0) p.loss_rows[row] = acc_t(NAN);
    if (tid == 0 && p.lse_rows) p.lse_rows[row] = acc_t(NAN);
    if (grow) fill_row<scalar_t, ROW_THREADS>(grow, K, NAN);
    live = false;
  }
  // from here a row that is not live loads nothing (its loops are empty)
  const int64_t nv = live ? nvec : 0, hd = live ? head : 0, Kl = live ? K : 0;
  const acc_t zy = !live ? acc_t(0)
                   : cap > acc_t(0) ? softcap_apply<acc_t>(widen(z[y]), cap)
                                    : widen(z[y]);
  const acc_t ref = (zy > acc_t(-INFINITY) && zy < acc_t(INFINITY)) ? zy : acc_t(0);

  RowAccum<scalar_t> acc{{acc_t(-INFINITY), acc_t(0), acc_t(0), acc_t(0)}, ref, p.weight, cap};
  auto absorb_scalar = [&](int64_t c) { acc.add(acc.capped(widen(z[c])), c); };
  auto absorb_pack = [&](const P& pk, int64_t c0) { acc.add_pack(pk, c0); };

  for (int64_t c = tid; c < hd; c += ROW_THREADS) absorb_scalar(c);
#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int64_t v = tid + int64_t(i) * ROW_THREADS;
    if (v < nv) absorb_pack(cache[i], head + v * VEC);
  }
  // Beyond the cache: kUnroll loads issued back to back per iteration, then folded. When a
  // gradient is written these packs are read again in pass 2: ask the L2 to keep them (item 3
  // of issue 10: fp32 rows of 128k classes x 132 rows in flight are more than the L2). One loop
  // per case (no branch per load).
  auto beyond_cache = [&](auto keep) {
    for (int64_t v0 = tid + int64_t(CACHE) * ROW_THREADS; v0 < nv; v0 += int64_t(kUnroll) * ROW_THREADS) {
      P buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * ROW_THREADS;
        if (v < nv) {
          if constexpr (decltype(keep)::value) {
            buf[u] = load_pack_keep(z + head + v * VEC);
          } else {
            buf[u] = load_pack(z + head + v * VEC);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * ROW_THREADS;
        if (v < nv) absorb_pack(buf[u], head + v * VEC);
      }
    }
  };
  if constexpr (std::is_same_v<scalar_t, double>) {
    beyond_cache(std::false_type{});  // two copies of the loop spill double on sm_90
  } else if (grow) {
    beyond_cache(std::true_type{});
  } else {
    beyond_cache(std::false_type{});
  }
  for (int64_t c = tail + tid; c < Kl; c += ROW_THREADS) absorb_scalar(c);

  const RowState<acc_t> st = row_reduce<acc_t, ROW_THREADS>(acc.st);
  if (!live) return;  // after the row's last collective
  const acc_t m = st.m;
  const acc_t wy = weighted ? static_cast<acc_t>(p.weight[y]) : acc_t(1);
  const acc_t W = weighted ? *p.weight_sum : acc_t(K);
  if (!row_max_is_finite(m)) {
    if (tid == 0) p.loss_rows[row] = acc_t(NAN);
    if (tid == 0 && p.lse_rows) p.lse_rows[row] = acc_t(NAN);
    if (grow) fill_row<scalar_t, ROW_THREADS>(grow, K, NAN);
    return;
  }
  const acc_t log_s = lse_log(st.s);
  const acc_t lse = m + log_s;
  // Linear sums moved from the reference to the max: sum w (z - m) = Tw + W (ref - m).
  const acc_t S = weighted ? st.Tw + W * (ref - m) : st.T + acc_t(K) * (ref - m);
  if (tid == 0) {
    p.loss_rows[row] = ce_row_loss<acc_t>(log_s, zy - m, S, p.sm, wy, W) + z_loss_row<acc_t>(lse, p.z_loss);
    if (p.lse_rows) p.lse_rows[row] = lse;
  }
  if (!grow) return;
  // The in-place backward (ce_grad_ext_) writes the gradient over the input: every element is
  // read by the thread that writes it, before it writes it, so what __restrict__ lets the
  // compiler reorder cannot change a result.
  scalar_t* __restrict__ g = grow;

  acc_t scale = p.inv_denom ? *p.inv_denom : acc_t(1);
  if (p.go) scale *= p.go[p.go_per_row ? row : 0];  // backward: before the one rounding
  const acc_t inv_s = acc_t(1) / st.s;
  GradCoefs<acc_t> gc = ce_grad_coefs<acc_t>(inv_s, p.sm, scale, weighted, wy, W);
  gc.kp += z_loss_kp<acc_t>(lse, inv_s, p.z_loss, scale);
  auto grad_of = [&](acc_t xc, int64_t c) -> scalar_t {
    acc_t zc, dz;
    softcap_grad_terms<acc_t>(xc, cap, acc_t(1) / cap, zc, dz);
    acc_t gv = fast_exp(zc - m) * gc.kp - gc.kw * (weighted ? static_cast<acc_t>(p.weight[c]) : acc_t(1));
    if (c == y) gv -= gc.ky;
    if (cap > acc_t(0)) gv *= dz;
    return static_cast<scalar_t>(gv);  // computed in acc_t, rounded once
  };
  auto emit_pack = [&](const P& pk, int64_t c0) {
    P out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = grad_of(widen(pk.v[i]), c0 + i);
    if (g_align == 16) {
      store_pack_stream(g + c0, out);
    } else {
      store_pack_split(g + c0, out, g_align);
    }
  };
  for (int64_t c = tid; c < head; c += ROW_THREADS) g[c] = grad_of(widen(z[c]), c);
#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int64_t v = tid + int64_t(i) * ROW_THREADS;
    if (v < nvec) emit_pack(cache[i], head + v * VEC);
  }
  // Re-read beyond the cache (from L2): kUnroll loads back to back, then their stores (z and g
  // are __restrict__: the reloads need not wait for the stores).
  for (int64_t v0 = tid + int64_t(CACHE) * ROW_THREADS; v0 < nvec; v0 += int64_t(kUnroll) * ROW_THREADS) {
    P buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nvec) buf[u] = load_pack_last(z + head + v * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nvec) emit_pack(buf[u], head + v * VEC);
    }
  }
  for (int64_t c = tail + tid; c < K; c += ROW_THREADS) g[c] = grad_of(widen(z[c]), c);
}

// ---- Few rows, large rows (issue 10 item 4): a row split over several blocks ----------------
// With fewer rows than multiprocessors, one block per row leaves most SMs idle. The row is cut
// into gridDim.x chunks of whole 16-byte packs (the scalar head goes with chunk 0, the scalar tail
// with the last). ce_split_stats_kernel (grid: chunks x rows) folds each chunk into a RowState
// around the row's reference z_y (the same in every chunk, so the partials merge exactly as the
// threads of one block do); ce_split_grad_kernel (same grid) merges a row's partials in a fixed
// order, writes the row's loss / lse (chunk 0) and the gradient of its chunk, re-reading the
// chunk (from L2: few rows are in flight). Forward and the recomputing backward (no saved
// gradient); the same row formulas as ce_forward_kernel.

// The packs [v0, v1) of chunk b, and its scalar element ranges.
struct SplitChunk {
  int64_t head, nvec, v0, v1;
  bool first, last;
};

// `per` (packs per chunk, from the host: ceil(ceil(K / VEC) / chunks), so the chunks cover every
// row's packs) keeps a 64-bit division out of the kernel.
template <typename scalar_t>
__device__ __forceinline__ SplitChunk split_chunk(const scalar_t* z, int64_t K, int64_t per) {
  constexpr int VEC = Pack<scalar_t>::kSize;
  SplitChunk ch;
  const int mis = int((reinterpret_cast<uintptr_t>(z) % 16) / sizeof(scalar_t));
  ch.head = mis ? VEC - mis : 0;
  if (ch.head > K) ch.head = K;
  ch.nvec = (K - ch.head) / VEC;
  ch.v0 = std::min<int64_t>(ch.nvec, int64_t(blockIdx.x) * per);
  ch.v1 = std::min<int64_t>(ch.nvec, ch.v0 + per);
  ch.first = blockIdx.x == 0;
  ch.last = blockIdx.x == gridDim.x - 1;
  return ch;
}

template <typename scalar_t, int THREADS>
__global__ void __launch_bounds__(THREADS)
    ce_split_stats_kernel(const CeParams<scalar_t> p, RowState<acc_of<scalar_t>>* partial, int64_t per) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int VEC = P::kSize;
  const int64_t row = blockIdx.y;
  const int tid = threadIdx.x;
  const int64_t K = p.K;
  const scalar_t* __restrict__ z = p.in + row * p.in_row_stride;
  const SplitChunk ch = split_chunk(z, K, per);
  const int64_t y = p.target[row];
  const bool live = y != p.ignore_index && y >= 0 && y < K;
  const acc_t cap = p.softcap;
  const acc_t zy = !live ? acc_t(0)
                   : cap > acc_t(0) ? softcap_apply<acc_t>(widen(z[y]), cap)
                                    : widen(z[y]);
  const acc_t ref = (zy > acc_t(-INFINITY) && zy < acc_t(INFINITY)) ? zy : acc_t(0);
  RowAccum<scalar_t> acc{{acc_t(-INFINITY), acc_t(0), acc_t(0), acc_t(0)}, ref, p.weight, cap};
  if (live) {
    if (ch.first)
      for (int64_t c = tid; c < ch.head; c += THREADS) acc.add(acc.capped(widen(z[c])), c);
    for (int64_t v0 = ch.v0 + tid; v0 < ch.v1; v0 += int64_t(kUnroll) * THREADS) {
      P buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * THREADS;
        if (v < ch.v1) buf[u] = load_pack_keep(z + ch.head + v * VEC);  // read again by the grad kernel
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * THREADS;
        if (v < ch.v1) acc.add_pack(buf[u], ch.head + v * VEC);
      }
    }
    if (ch.last)
      for (int64_t c = ch.head + ch.nvec * VEC + tid; c < K; c += THREADS)
        acc.add(acc.capped(widen(z[c])), c);
  }
  const RowState<acc_t> st = row_reduce<acc_t, THREADS>(acc.st);
  if (tid == 0) partial[row * gridDim.x + blockIdx.x] = st;
}

template <typename scalar_t, int THREADS>
__global__ void __launch_bounds__(THREADS)
    ce_split_grad_kernel(const CeParams<scalar_t> p, const RowState<acc_of<scalar_t>>* partial, int64_t per) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int VEC = P::kSize;
  const int64_t row = blockIdx.y;
  const int tid = threadIdx.x;
  const int64_t K = p.K;
  const scalar_t* __restrict__ z = p.in + row * p.in_row_stride;
  const SplitChunk ch = split_chunk(z, K, per);
  scalar_t* grow = p.grad ? p.grad + row * K : nullptr;
  // this chunk's elements, for the rows filled with one value
  const int64_t e0 = ch.first ? 0 : ch.head + ch.v0 * VEC;
  const int64_t e1 = ch.last ? K : ch.head + ch.v1 * VEC;
  auto fill_chunk = [&](acc_t v) {
    if (grow)
      for (int64_t c = e0 + tid; c < e1; c += THREADS) grow[c] = static_cast<scalar_t>(v);
  };
  auto write_row = [&](acc_t loss, acc_t lse) {
    if (ch.first && tid == 0) {
      p.loss_rows[row] = loss;
      if (p.lse_rows) p.lse_rows[row] = lse;
    }
  };
  const int64_t y = p.target[row];
  if (y == p.ignore_index) {
    write_row(acc_t(0), acc_t(0));
    fill_chunk(acc_t(0));
    return;
  }
  if (y < 0 || y >= K) {
    write_row(acc_t(NAN), acc_t(NAN));
    fill_chunk(acc_t(NAN));
    return;
  }
  RowState<acc_t> st = partial[row * gridDim.x];
  for (unsigned j = 1; j < gridDim.x; ++j) merge(st, partial[row * gridDim.x + j]);
  const acc_t m = st.m;
  if (!row_max_is_finite(m)) {
    write_row(acc_t(NAN), acc_t(NAN));
    fill_chunk(acc_t(NAN));
    return;
  }
  const acc_t cap = p.softcap;
  auto capped = [&](acc_t x) { return cap > acc_t(0) ? softcap_apply<acc_t>(x, cap) : x; };
  const acc_t zy = capped(widen(z[y]));
  const acc_t ref = (zy > acc_t(-INFINITY) && zy < acc_t(INFINITY)) ? zy : acc_t(0);
  const bool weighted = p.weight != nullptr;
  const acc_t wy = weighted ? static_cast<acc_t>(p.weight[y]) : acc_t(1);
  const acc_t W = weighted ? *p.weight_sum : acc_t(K);
  const acc_t log_s = lse_log(st.s);
  const acc_t lse = m + log_s;
  const acc_t S = weighted ? st.Tw + W * (ref - m) : st.T + acc_t(K) * (ref - m);
  write_row(ce_row_loss<acc_t>(log_s, zy - m, S, p.sm, wy, W) + z_loss_row<acc_t>(lse, p.z_loss), lse);
  if (!grow) return;
  scalar_t* __restrict__ g = grow;
  acc_t scale = p.inv_denom ? *p.inv_denom : acc_t(1);
  if (p.go) scale *= p.go[p.go_per_row ? row : 0];
  const acc_t inv_s = rcp_normal(st.s);  // st.s >= 1
  GradCoefs<acc_t> gc = ce_grad_coefs<acc_t>(inv_s, p.sm, scale, weighted, wy, W);
  gc.kp += z_loss_kp<acc_t>(lse, inv_s, p.z_loss, scale);
  auto grad_of = [&](acc_t xc, int64_t c) -> scalar_t {
    acc_t zc, dz;
    softcap_grad_terms<acc_t>(xc, cap, acc_t(1) / cap, zc, dz);
    acc_t gv = fast_exp(zc - m) * gc.kp - gc.kw * (weighted ? static_cast<acc_t>(p.weight[c]) : acc_t(1));
    if (c == y) gv -= gc.ky;
    if (cap > acc_t(0)) gv *= dz;
    return static_cast<scalar_t>(gv);
  };
  const int g_align = address_alignment(g + ch.head);
  if (ch.first)
    for (int64_t c = tid; c < ch.head; c += THREADS) g[c] = grad_of(widen(z[c]), c);
  for (int64_t v0 = ch.v0 + tid; v0 < ch.v1; v0 += int64_t(kUnroll) * THREADS) {
    P buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * THREADS;
      if (v < ch.v1) buf[u] = load_pack_last(z + ch.head + v * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * THREADS;
      if (v < ch.v1) {
        const int64_t c0 = ch.head + v * VEC;
        P out;
#pragma unroll
        for (int i = 0; i < VEC; ++i) out.v[i] = grad_of(widen(buf[u].v[i]), c0 + i);
        if (g_align == 16) {
          store_pack_stream(g + c0, out);
        } else {
          store_pack_split(g + c0, out, g_align);
        }
      }
    }
  }
  if (ch.last)
    for (int64_t c = ch.head + ch.nvec * VEC + tid; c < K; c += THREADS) g[c] = grad_of(widen(z[c]), c);
}

template <typename scalar_t>
__global__ void bce_kernel(const scalar_t* x, const scalar_t* t, const scalar_t* w, int64_t nw,
                           const scalar_t* pw, int64_t np, acc_of<scalar_t> a,
                           const acc_of<scalar_t>* inv_n, acc_of<scalar_t>* loss, scalar_t* grad,
                           int64_t n) {
  using acc_t = acc_of<scalar_t>;
  const acc_t scale = inv_n ? *inv_n : acc_t(1);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    acc_t l, g;
    bce_elem<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(t[i]),
                    w ? static_cast<acc_t>(w[i % nw]) : acc_t(1),
                    pw ? static_cast<acc_t>(pw[i % np]) : acc_t(1), a, l, g);
    loss[i] = l;
    if (grad) grad[i] = static_cast<scalar_t>(g * scale);
  }
}

// grad *= grad_output in place, multiplied in the accumulation type.
// Scalar grad_output: a grid-stride loop over 16-byte packs (kUnroll in flight per thread); the
// whole grid returns at once where it is exactly 1.
// per_row ("none": one value per row): grid-stride over rows, one block per row; the factor is
// read once per row (no division by K per element) and a row whose factor is exactly 1 is
// skipped (reduction="none" followed by .sum() touches nothing).
template <typename scalar_t>
__global__ void scale_kernel(scalar_t* __restrict__ g, const acc_of<scalar_t>* __restrict__ go, int64_t N,
                             int64_t K, bool per_row) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int VEC = P::kSize;
  auto scale_pack = [](P& pk, acc_t f) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(widen(pk.v[i]) * f);
  };
  if (!per_row) {
    const acc_t f = go[0];
    if (f == acc_t(1)) return;
    const int64_t n = N * K;
    const int64_t nvec = (reinterpret_cast<uintptr_t>(g) % 16 == 0) ? n / VEC : 0;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t v0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v0 < nvec; v0 += kUnroll * stride) {
      P buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (v0 + u * stride < nvec) buf[u] = load_pack(g + (v0 + u * stride) * VEC);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v0 + u * stride < nvec) {
          scale_pack(buf[u], f);
          store_pack(g + (v0 + u * stride) * VEC, buf[u]);
        }
      }
    }
    for (int64_t c = nvec * VEC + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < n; c += stride)
      g[c] = static_cast<scalar_t>(static_cast<acc_t>(g[c]) * f);
    return;
  }
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const acc_t f = go[row];
    if (f == acc_t(1)) continue;  // uniform over the block
    scalar_t* r = g + row * K;
    const int mis = int((reinterpret_cast<uintptr_t>(r) % 16) / sizeof(scalar_t));
    const int64_t head = mis ? std::min<int64_t>(VEC - mis, K) : 0;
    const int64_t nvec = (K - head) / VEC;
    for (int64_t c = tid; c < head; c += nt) r[c] = static_cast<scalar_t>(static_cast<acc_t>(r[c]) * f);
    for (int64_t v0 = tid; v0 < nvec; v0 += int64_t(kUnroll) * nt) {
      P buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (v0 + u * nt < nvec) buf[u] = load_pack(r + head + (v0 + u * nt) * VEC);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v0 + u * nt < nvec) {
          scale_pack(buf[u], f);
          store_pack(r + head + (v0 + u * nt) * VEC, buf[u]);
        }
      }
    }
    for (int64_t c = head + nvec * VEC + tid; c < K; c += nt)
      r[c] = static_cast<scalar_t>(static_cast<acc_t>(r[c]) * f);
  }
}

}  // namespace cuda
}  // namespace labelsmooth_ext
