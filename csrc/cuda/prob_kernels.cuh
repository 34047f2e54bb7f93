// Probability targets on CUDA (issue 10 item 9): one fused kernel, no N x K temporaries, with
// every option of the class-index kernel (weights, both smoothing modes, every reduction, the
// incoming gradient of the recomputing backward, in place over the logits, softcap, z_loss, the
// per-row lse). Each row (ROW_THREADS threads) reads its logits and targets once in pass 1
// (16-byte packs aligned to the input, kUnroll in flight; the target as packs too when its row is
// aligned like the input's), folding them into the online (max, sum exp), Q = sum w q and
// T = sum w q (z - ref); pass 2 (only when a gradient is wanted) reads both again, from L2 for the
// rows in flight, and writes g_c = (e_c (Q + 2 c lse) / s - w_c q_c) * scale [* (1 - (z_c / cap)^2)].
// The loss and gradient formulas are the CPU's prob_rows / prob_rows_ext (row_math.h).
// Compiled by nvcc (loss_cuda.cu, through host.cuh) and by the SIMT emulation from this source.
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "kernels.cuh"
#include "platform.cuh"
#include "reduce.cuh"

namespace labelsmooth_ext {
namespace cuda {

template <typename scalar_t, typename tgt_t>
struct CeProbParams {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* in;
  int64_t in_row_stride;
  const tgt_t* target;  // the input's dtype, or float32 for a 16-bit input
  int64_t t_row_stride;
  const acc_t* weight;  // nullptr: unweighted (in the accumulation type)
  // nullptr: no gradient wanted; else N x K rows of stride K, which may be `in` itself (the
  // in-place backward: each element is read by the thread that writes it, before it writes it,
  // and every read of another thread's element, z[0], happens before the row reduction).
  scalar_t* grad;
  acc_t* loss_rows;
  acc_t* lse_rows;  // nullptr: not wanted
  int64_t N, K;     // K >= 1
  Smoothing<acc_t> sm;
  acc_t scale;       // 1/N for mean, 1 otherwise
  const acc_t* go;   // the incoming gradient (backward), nullptr in the forward
  bool go_per_row;   // one value per row (reduction none) or one in all
  acc_t softcap;     // 0: none
  acc_t inv_softcap; // 1 / softcap in acc_t (from the host: no division in the kernel)
  acc_t z_loss;
};

// The targets of one input pack's VEC classes, kept as loaded (the target dtype; a float32 target
// of a 16-bit input takes two 16-byte packs): PACKED when the target row is 16-byte aligned at the
// pack's first class, else element by element.
template <typename scalar_t, typename tgt_t>
struct TargetPacks {
  static constexpr int TV = Pack<tgt_t>::kSize;
  static constexpr int R = Pack<scalar_t>::kSize / TV;
  static_assert(R * TV == Pack<scalar_t>::kSize, "target packs cover an input pack");
  Pack<tgt_t> p[R];
  template <bool PACKED>
  __device__ __forceinline__ void load(const tgt_t* t) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if constexpr (PACKED) {
        p[j] = load_pack(t + j * TV);
      } else {
#pragma unroll
        for (int i = 0; i < TV; ++i) p[j].v[i] = t[j * TV + i];
      }
    }
  }
  __device__ __forceinline__ acc_of<scalar_t> at(int i) const {
    return static_cast<acc_of<scalar_t>>(p[i / TV].v[i % TV]);
  }
};

template <typename scalar_t, typename tgt_t, int ROW_THREADS, int ROWS_PER_BLOCK>
__global__ void __launch_bounds__(ROW_THREADS * ROWS_PER_BLOCK, 1)
    ce_prob_kernel(const CeProbParams<scalar_t, tgt_t> p) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t>;
  using TP = TargetPacks<scalar_t, tgt_t>;
  constexpr int VEC = P::kSize;
  // A row is a whole warp (32 threads) or a whole block (256): a row past N returns at once,
  // leaving no collective behind (no `live` flag kept across the reduction).
  static_assert(ROW_THREADS >= 32, "rows narrower than a warp would need ce_forward_kernel's live flag");
  const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
  if (row >= p.N) return;
  const int tid = threadIdx.x;
  const int64_t K = p.K;
  const scalar_t* __restrict__ z = p.in + row * p.in_row_stride;
  const tgt_t* __restrict__ tr = p.target + row * p.t_row_stride;
  const int mis = int((reinterpret_cast<uintptr_t>(z) % 16) / sizeof(scalar_t));
  int64_t head = mis ? VEC - mis : 0;
  if (head > K) head = K;
  const int64_t nvec = (K - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const bool t_packed = address_alignment(tr + head) == 16;
  const acc_t* __restrict__ w = p.weight;
  const Smoothing<acc_t> sm = p.sm;
  const acc_t cap = p.softcap;
  auto capped = [&](acc_t x) -> acc_t { return cap > acc_t(0) ? softcap_apply<acc_t>(x, cap) : x; };
  auto wq_of = [&](acc_t t, int64_t c) -> acc_t {
    const acc_t q = prob_q<acc_t>(t, sm);
    return w ? q * w[c] : q;
  };
  // linear sums around a reference logit (the row's first, capped, when finite)
  const acc_t z0 = capped(static_cast<acc_t>(z[0]));
  const acc_t ref = (z0 > acc_t(-INFINITY) && z0 < acc_t(INFINITY)) ? z0 : acc_t(0);

  // st.T = sum w q (z - ref), st.Tw = Q = sum w q
  RowState<acc_t> st{acc_t(-INFINITY), acc_t(0), acc_t(0), acc_t(0)};
  auto absorb = [&](acc_t x, acc_t q) {
    st.T += q * (x - ref);
    st.Tw += q;
    const acc_t mn = nan_max(st.m, x);
    if (mn == acc_t(-INFINITY)) return;
    st.s = st.s * fast_exp(st.m - mn) + fast_exp(x - mn);
    st.m = mn;
  };
  // a pack: one rescale of the running sum (not one per element)
  auto absorb_pack = [&](const P& zp, const TP& tp, int64_t c0) {
    acc_t v[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[i] = capped(static_cast<acc_t>(zp.v[i]));
      const acc_t q = wq_of(tp.at(i), c0 + i);
      st.T += q * (v[i] - ref);
      st.Tw += q;
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
  };
  // kUnroll logit packs and their targets loaded back to back, then used; one loop per target
  // layout (uniform over the row)
  auto packs = [&](auto packed, auto&& use) {
    for (int64_t v0 = tid; v0 < nvec; v0 += int64_t(kUnroll) * ROW_THREADS) {
      P buf[kUnroll];
      TP tb[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * ROW_THREADS;
        if (v < nvec) {
          buf[u] = load_pack(z + head + v * VEC);
          tb[u].template load<decltype(packed)::value>(tr + head + v * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * ROW_THREADS;
        if (v < nvec) use(buf[u], tb[u], head + v * VEC);
      }
    }
  };
  for (int64_t c = tid; c < head; c += ROW_THREADS)
    absorb(capped(static_cast<acc_t>(z[c])), wq_of(static_cast<acc_t>(tr[c]), c));
  if (t_packed) {
    packs(std::true_type{}, absorb_pack);
  } else {
    packs(std::false_type{}, absorb_pack);
  }
  for (int64_t c = tail + tid; c < K; c += ROW_THREADS)
    absorb(capped(static_cast<acc_t>(z[c])), wq_of(static_cast<acc_t>(tr[c]), c));

  const RowState<acc_t> r = row_reduce<acc_t, ROW_THREADS>(st);
  scalar_t* grow = p.grad ? p.grad + row * K : nullptr;
  const acc_t m = r.m;
  // capped logits are finite: only a NaN makes the max non-finite then (as the CPU's prob_rows_ext)
  if (!row_max_is_finite(m)) {
    if (tid == 0) {
      p.loss_rows[row] = acc_t(NAN);
      if (p.lse_rows) p.lse_rows[row] = acc_t(NAN);
    }
    if (grow) fill_row<scalar_t, ROW_THREADS>(grow, K, NAN);
    return;
  }
  const acc_t Q = r.Tw;
  const acc_t Sq = r.T + Q * (ref - m);
  const acc_t log_s = lse_log(r.s);
  const acc_t lse = m + log_s;
  if (tid == 0) {
    p.loss_rows[row] = prob_row_loss<acc_t>(log_s, Q, Sq) + z_loss_row<acc_t>(lse, p.z_loss);
    if (p.lse_rows) p.lse_rows[row] = lse;
  }
  if (!grow) return;
  scalar_t* __restrict__ g = grow;
  const int g_align = address_alignment(g + head);
  acc_t scale = p.scale;
  if (p.go) scale *= p.go[p.go_per_row ? row : 0];  // backward: before the one rounding
  const acc_t inv_s = rcp_normal(r.s);               // r.s >= 1
  const acc_t kp = Q * inv_s * scale + z_loss_kp<acc_t>(lse, inv_s, p.z_loss, scale);
  const acc_t inv_cap = p.inv_softcap;
  auto grad_of = [&](acc_t x, acc_t t, int64_t c) -> scalar_t {
    acc_t zc, dz;
    softcap_grad_terms<acc_t>(x, cap, inv_cap, zc, dz);
    acc_t gv = fast_exp(zc - m) * kp - scale * wq_of(t, c);
    if (cap > acc_t(0)) gv *= dz;
    return static_cast<scalar_t>(gv);  // computed in acc_t, rounded once
  };
  auto emit_pack = [&](const P& zp, const TP& tp, int64_t c0) {
    P out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = grad_of(static_cast<acc_t>(zp.v[i]), tp.at(i), c0 + i);
    if (g_align == 16) {
      store_pack_stream(g + c0, out);
    } else {
      store_pack_split(g + c0, out, g_align);
    }
  };
  for (int64_t c = tid; c < head; c += ROW_THREADS)
    g[c] = grad_of(static_cast<acc_t>(z[c]), static_cast<acc_t>(tr[c]), c);
  if (t_packed) {
    packs(std::true_type{}, emit_pack);
  } else {
    packs(std::false_type{}, emit_pack);
  }
  for (int64_t c = tail + tid; c < K; c += ROW_THREADS)
    g[c] = grad_of(static_cast<acc_t>(z[c]), static_cast<acc_t>(tr[c]), c);
}

// A warp per row (4 rows per block) for rows up to 2 KiB of logits, else a 256-thread block per
// row. bench/sass_report.py reads the 2048 (keep it on the `kProbWarpRowBytes` line).
inline constexpr int64_t kProbWarpRowBytes = 2048;

template <typename scalar_t, typename tgt_t>
void dispatch_prob(const CeProbParams<scalar_t, tgt_t>& p, stream_t stream) {
  if (p.K * int64_t(sizeof(scalar_t)) <= kProbWarpRowBytes) {
    const int64_t blocks = (p.N + 3) / 4;
    TORCH_CHECK(blocks <= int64_t(INT32_MAX), "labelsmooth_ext: too many rows (", p.N, ")");
    auto* kernel = &ce_prob_kernel<scalar_t, tgt_t, 32, 4>;
    LSE_LAUNCH(kernel, unsigned(blocks), dim3(32, 4), 0, stream)(p);
  } else {
    TORCH_CHECK(p.N <= int64_t(INT32_MAX), "labelsmooth_ext: too many rows (", p.N, ")");
    auto* kernel = &ce_prob_kernel<scalar_t, tgt_t, 256, 1>;
    LSE_LAUNCH(kernel, unsigned(p.N), dim3(256, 1), 0, stream)(p);
  }
  LSE_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace labelsmooth_ext
