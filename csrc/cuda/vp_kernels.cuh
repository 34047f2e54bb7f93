// Vocabulary-parallel kernels (issue 14: the tensor-parallel loss of labelsmooth_ext/distributed.py),
// device code and launch, shared by the nvcc build and the SIMT emulation. They reuse the forward
// kernel's row accumulator (kernels.cuh RowAccum: online max / rescaled sum of exp, linear sums),
// row reduction and packs (reduce.cuh), and row_math.h's formulas.
//
// vp_stats_kernel: one read of a row of this rank's slice (16-byte loads, kUnroll in flight per
//   thread) gives (m, s, zy, lin, wy); the softcap is applied while loading.
// vp_grad_kernel: after the ranks merged the statistics into the global lse, one read of the row
//   and one write of its gradient slice, elementwise (p_c = exp(z_c - lse); no reduction).
#pragma once

#include "kernels.cuh"

namespace labelsmooth_ext {
namespace cuda {

template <typename scalar_t>
struct VpParams {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* in;
  int64_t in_row_stride;
  const int64_t* target;      // global class indices
  const acc_t* weight;        // the slice's weights (accumulation type); nullptr: unweighted
  const acc_t* weight_sum;    // device scalar: their sum (weighted only)
  const acc_t* coefs;         // vp_grad: (4, N) lse, kp, kw, ky
  acc_t* stats;               // vp_stats: (5, N) m, s, zy, lin, wy
  scalar_t* grad;             // vp_grad: (N, K) contiguous
  int64_t N, K, start, ignore_index;
  acc_t softcap;      // > 0: z = softcap * tanh(x / softcap)
  acc_t inv_softcap;  // 1 / softcap (0 without), from the host: no double division in vp_grad
};

template <typename scalar_t, int ROW_THREADS, int ROWS_PER_BLOCK>
__global__ void __launch_bounds__(ROW_THREADS * ROWS_PER_BLOCK)
    vp_stats_kernel(const VpParams<scalar_t> p) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int VEC = P::kSize;
  // As ce_forward_kernel: a row with nothing to read clears `live` instead of returning, so every
  // lane of a shared warp reaches row_reduce's full-mask shuffles.
  const int64_t row_id = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
  const bool in_grid = row_id < p.N;
  const int64_t row = in_grid ? row_id : 0;
  const int tid = threadIdx.x;
  const int64_t K = p.K, N = p.N;
  const int64_t y = p.target[row];
  const bool ignored = y == p.ignore_index;
  const bool live = in_grid && !ignored;
  const int64_t yl = y - p.start;
  const bool here = live && yl >= 0 && yl < K;
  const scalar_t* __restrict__ z = p.in + row * p.in_row_stride;
  const acc_t cap = p.softcap;
  const bool weighted = p.weight != nullptr;

  const int mis = int((reinterpret_cast<uintptr_t>(z) % 16) / sizeof(scalar_t));
  int64_t head = mis ? VEC - mis : 0;
  if (head > K) head = K;
  const int64_t nvec = (K - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const int64_t nv = live ? nvec : 0, hd = live ? head : 0, Kl = live ? K : 0;

  // The linear sums are taken around a value of the row (its first capped logit) so that large
  // logits do not cancel; moved to the max at the end.
  acc_t ref = acc_t(0);
  if (live && K > 0) {
    const acc_t x0 = static_cast<acc_t>(z[0]);
    const acc_t z0 = cap > acc_t(0) ? softcap_apply<acc_t>(x0, cap) : x0;
    if (z0 > acc_t(-INFINITY) && z0 < acc_t(INFINITY)) ref = z0;
  }
  RowAccum<scalar_t> acc{{acc_t(-INFINITY), acc_t(0), acc_t(0), acc_t(0)}, ref, p.weight, cap};
  for (int64_t c = tid; c < hd; c += ROW_THREADS) acc.add(acc.capped(static_cast<acc_t>(z[c])), c);
  for (int64_t v0 = tid; v0 < nv; v0 += int64_t(kUnroll) * ROW_THREADS) {
    P buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nv) buf[u] = load_pack(z + head + v * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nv) acc.add_pack(buf[u], head + v * VEC);
    }
  }
  for (int64_t c = tail + tid; c < Kl; c += ROW_THREADS) acc.add(acc.capped(static_cast<acc_t>(z[c])), c);

  const RowState<acc_t> st = row_reduce<acc_t, ROW_THREADS>(acc.st);
  if (!in_grid || tid != 0) return;  // after the row's last collective
  acc_t* o = p.stats;
  if (ignored) {  // neutral statistics: the row's loss and gradient are 0 anyway
    o[row] = acc_t(0), o[N + row] = acc_t(1), o[2 * N + row] = acc_t(0), o[3 * N + row] = acc_t(0),
    o[4 * N + row] = acc_t(0);
    return;
  }
  const acc_t m = st.m;
  o[row] = m;
  o[2 * N + row] = here ? acc.capped(static_cast<acc_t>(z[yl])) : acc_t(0);
  o[4 * N + row] = here ? (weighted ? p.weight[yl] : acc_t(1)) : acc_t(0);
  if (m != m || m == acc_t(INFINITY)) {  // NaN or +inf in the slice: the row is NaN, as in PyTorch
    o[N + row] = acc_t(NAN), o[3 * N + row] = acc_t(NAN);
    return;
  }
  // An empty or all -inf slice: m = -inf, s = 0, lin relative to 0 (-inf; 0 when empty).
  const acc_t m0 = m == acc_t(-INFINITY) ? acc_t(0) : m;
  o[N + row] = st.s;
  o[3 * N + row] = weighted ? st.Tw + *p.weight_sum * (ref - m0) : st.T + acc_t(K) * (ref - m0);
}

template <typename scalar_t, int ROW_THREADS, int ROWS_PER_BLOCK>
__global__ void __launch_bounds__(ROW_THREADS * ROWS_PER_BLOCK)
    vp_grad_kernel(const VpParams<scalar_t> p) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int VEC = P::kSize;
  const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
  if (row >= p.N) return;  // no collective in this kernel: rows may leave early
  const int tid = threadIdx.x;
  const int64_t K = p.K, N = p.N;
  scalar_t* __restrict__ g = p.grad + row * K;
  const int64_t y = p.target[row];
  if (y == p.ignore_index) {
    fill_row<scalar_t, ROW_THREADS>(g, K, 0.f);
    return;
  }
  const acc_t lse = p.coefs[row];
  if (!row_max_is_finite(lse)) {
    fill_row<scalar_t, ROW_THREADS>(g, K, NAN);
    return;
  }
  const acc_t kp = p.coefs[N + row], kw = p.coefs[2 * N + row], ky = p.coefs[3 * N + row];
  const int64_t yl = y - p.start;
  const acc_t cap = p.softcap;
  const bool weighted = p.weight != nullptr;
  const scalar_t* __restrict__ z = p.in + row * p.in_row_stride;
  // Double: tanh(x * (1 / cap)), 1 - t^2 (a double division per element makes ptxas call its
  // out-of-line slow path, which costs a stack frame on sm_90). Float: softcap_grad_terms
  // (row_math.h), whose divisions are approximate.
  const acc_t inv_cap = p.inv_softcap;
  auto grad_of = [&](acc_t xc, int64_t c) -> scalar_t {
    acc_t zc = xc, dz = acc_t(1);
    if constexpr (sizeof(acc_t) == 4) {
      softcap_grad_terms<acc_t>(xc, cap, inv_cap, zc, dz);
    } else if (cap > acc_t(0)) {
      const acc_t t = lse_tanh(xc * inv_cap);
      zc = cap * t;
      dz = acc_t(1) - t * t;
    }
    acc_t gv = fast_exp(zc - lse) * kp - kw * (weighted ? p.weight[c] : acc_t(1));
    if (c == yl) gv -= ky;
    if (cap > acc_t(0)) gv *= dz;
    return static_cast<scalar_t>(gv);  // computed in acc_t, rounded once
  };
  // Scalar head to 16-byte alignment, packs, scalar tail; a gradient row aligned differently
  // from the input row takes the scalar path.
  const int mis = int((reinterpret_cast<uintptr_t>(z) % 16) / sizeof(scalar_t));
  int64_t head = mis ? VEC - mis : 0;
  if (int((reinterpret_cast<uintptr_t>(g) % 16) / sizeof(scalar_t)) != mis) head = K;
  if (head > K) head = K;
  const int64_t nvec = (K - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  for (int64_t c = tid; c < head; c += ROW_THREADS) g[c] = grad_of(static_cast<acc_t>(z[c]), c);
  for (int64_t v0 = tid; v0 < nvec; v0 += int64_t(kUnroll) * ROW_THREADS) {
    P buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nvec) buf[u] = load_pack(z + head + v * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * ROW_THREADS;
      if (v < nvec) {
        P out;
#pragma unroll
        for (int i = 0; i < VEC; ++i) out.v[i] = grad_of(static_cast<acc_t>(buf[u].v[i]), head + v * VEC + i);
        store_pack_stream(g + head + v * VEC, out);
      }
    }
  }
  for (int64_t c = tail + tid; c < K; c += ROW_THREADS) g[c] = grad_of(static_cast<acc_t>(z[c]), c);
}

template <typename scalar_t, int ROW_THREADS, int ROWS_PER_BLOCK>
void launch_vp(const VpParams<scalar_t>& p, bool grad, stream_t stream) {
  const dim3 block(ROW_THREADS, ROWS_PER_BLOCK);
  const int64_t blocks = (p.N + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "labelsmooth_ext: too many rows (", p.N, ")");
  if (grad) {
    auto* kernel = &vp_grad_kernel<scalar_t, ROW_THREADS, ROWS_PER_BLOCK>;
    LSE_LAUNCH(kernel, unsigned(blocks), block, 0, stream)(p);
  } else {
    auto* kernel = &vp_stats_kernel<scalar_t, ROW_THREADS, ROWS_PER_BLOCK>;
    LSE_LAUNCH(kernel, unsigned(blocks), block, 0, stream)(p);
  }
  LSE_LAUNCH_CHECK();
}

// Threads per row from the slice's row size in bytes (as dispatch_forward, without its register
// cache: each pass reads the row once).
template <typename scalar_t>
void dispatch_vp(const VpParams<scalar_t>& p, bool grad, stream_t stream) {
  const int64_t bytes = p.K * int64_t(sizeof(scalar_t));
  // double rows take 32 threads from the start: its 8-thread stats kernel spills on sm_90
  constexpr bool kNarrow = !std::is_same_v<scalar_t, double>;
  if (kNarrow && bytes <= 8 * 16 * 4) {
    if constexpr (kNarrow) launch_vp<scalar_t, 8, 16>(p, grad, stream);
  } else if (bytes <= 32 * 16 * 4) {
    launch_vp<scalar_t, 32, 4>(p, grad, stream);
  } else if (bytes <= 128 * 16 * 8) {
    launch_vp<scalar_t, 128, 1>(p, grad, stream);
  } else {
    launch_vp<scalar_t, 256, 1>(p, grad, stream);
  }
}

}  // namespace cuda
}  // namespace labelsmooth_ext
