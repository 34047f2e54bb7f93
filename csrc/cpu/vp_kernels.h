// Vocabulary-parallel row kernels (issue 14), compiled per CPU capability next to kernels.h
// (included by kernels_default.cpp / kernels_avx2.cpp), from kernels.h's vectorised helpers and
// row_math.h's formulas.
//
// vp_stats: one read of a row of this rank's slice gives its partial statistics (the local max,
//   the sum of exponentials relative to it, the linear sum the smoothing term needs, the target
//   logit and weight where the target is local); the softcap is applied while loading.
// vp_grad: once the ranks have merged the statistics into the global lse, one read of the row and
//   one write of its gradient slice (p_c = exp(z_c - lse) directly: no per-rank s needed).
#pragma once

#include "kernels.h"
#include "vp_kernel_args.h"

namespace labelsmooth_ext {
namespace cpu {
namespace CPU_CAPABILITY {

// Softcap helpers of the vocabulary-parallel rows (the row kernels of kernels.h have their own
// three-pass softcap design, ce_rows_softcap): z = cap * tanh(x / cap) of a row (src, any input
// dtype) into the accumulation-type buffer z, returning the max of z, in one pass;
// tanh(u) = 1 - 2 / (exp(2u) + 1) with the kernels' vector exp (absolute error a few ulp of 1 in
// tanh). exp(2u) = inf gives 1, 0 gives -1, NaN stays NaN.
template <typename scalar_t, typename acc_t>
acc_t vp_softcap_load(const scalar_t* src, acc_t* z, int64_t K, acc_t cap) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vc(cap), v2inv(acc_t(2) / cap), one(1), two(2);
  Vec vm(-std::numeric_limits<acc_t>::infinity());
  int64_t c = 0;
  for (; c + V <= K; c += V) {
    Vec x;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      x = Vec::loadu(src + c);
    } else {
      at::vec::load_to_float<scalar_t>(src + c, x);
    }
    const Vec zc = vc * (one - two / (vexp(x * v2inv) + one));
    zc.store(z + c);
    vm = at::vec::maximum(vm, zc);
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  alignas(64) acc_t buf[V];
  vm.store(buf);
  for (int64_t i = 0; i < V; ++i) m = nan_max(m, buf[i]);
  for (; c < K; ++c) {
    z[c] = softcap_apply<acc_t>(static_cast<acc_t>(src[c]), cap);
    m = nan_max(m, z[c]);
  }
  return m;
}

// Gradient block times dz/dx = 1 - (z / cap)^2 (softcap), in place.
template <typename acc_t>
void vp_softcap_dz(acc_t* g, const acc_t* z, int64_t n, acc_t cap) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vinv(acc_t(1) / cap), one(1);
  int64_t c = 0;
  for (; c + V <= n; c += V) {
    const Vec t = Vec::loadu(z + c) * vinv;
    (Vec::loadu(g + c) * (one - t * t)).store(g + c);
  }
  for (; c < n; ++c) g[c] *= softcap_dz_dx<acc_t>(z[c], cap);
}

template <typename scalar_t>
void vp_stats_rows(const VpStatsArgs& A) {
  using acc_t = acc_for<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t N = A.N, K = A.K;
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  acc_t* st = static_cast<acc_t*>(A.stats);
  acc_t *om = st, *os = st + N, *ozy = st + 2 * N, *olin = st + 3 * N, *owy = st + 4 * N;
  const bool weighted = A.weight != nullptr;
  const std::vector<acc_t> wacc = weights_in_acc<acc_t>(A.weight, K);
  const acc_t* w = weighted ? wacc.data() : nullptr;
  const bool capped = A.softcap > 0;
  const acc_t cap = acc_t(A.softcap);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, N, grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf((capped || !kDirect) ? K : 0);  // the row in acc_t (capped / converted)
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = A.target[r];
      if (y == A.ignore_index) {  // neutral statistics: the row's loss and gradient are 0 anyway
        om[r] = 0, os[r] = 1, ozy[r] = 0, olin[r] = 0, owy[r] = 0;
        continue;
      }
      const int64_t yl = y - A.start;
      const bool here = yl >= 0 && yl < K;
      owy[r] = here ? (weighted ? w[yl] : acc_t(1)) : acc_t(0);
      if (K == 0) {
        om[r] = ninf, os[r] = 0, ozy[r] = 0, olin[r] = 0;
        continue;
      }
      const acc_t* z;
      acc_t m;
      if (capped) {
        m = vp_softcap_load<scalar_t, acc_t>(in + r * A.in_row_stride, buf.data(), K, cap);
        z = buf.data();
      } else if constexpr (kDirect) {
        z = in + r * A.in_row_stride;
        m = row_max(z, K);
      } else {
        m = convert_and_max(in + r * A.in_row_stride, buf.data(), K);
        z = buf.data();
      }
      om[r] = m;
      ozy[r] = here ? z[yl] : acc_t(0);
      if (m != m || m == -ninf) {  // NaN or +inf in the slice: the row is NaN, as in PyTorch
        os[r] = NAN, olin[r] = NAN;
        continue;
      }
      // An all -inf slice: relative to 0, s = 0 and lin = -inf (the other ranks decide the row).
      const acc_t ref = m == ninf ? acc_t(0) : m;
      double s, S;
      exp_pass<acc_t>(z, nullptr, w, K, ref, s, S);
      os[r] = acc_t(s);
      olin[r] = acc_t(S);
    }
  });
}

template <typename scalar_t>
void vp_grad_rows(const VpGradArgs& A) {
  using acc_t = acc_for<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t N = A.N, K = A.K;
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  scalar_t* grad = static_cast<scalar_t*>(A.grad);
  const acc_t* co = static_cast<const acc_t*>(A.coefs);
  const acc_t *clse = co, *ckp = co + N, *ckw = co + 2 * N, *cky = co + 3 * N;
  const bool weighted = A.weight != nullptr;
  const std::vector<acc_t> wacc = weights_in_acc<acc_t>(A.weight, K);
  const acc_t* w = weighted ? wacc.data() : nullptr;
  const bool capped = A.softcap > 0;
  const acc_t cap = acc_t(A.softcap);
  if (K == 0) return;

  at::parallel_for(0, N, grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(K);                  // e = p, then g: stays in L2
    std::vector<acc_t> capped_row(capped ? K : 0);  // softcap: the capped logits
    acc_t* buf = scratch.data();
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* grow = grad + r * K;
      const int64_t y = A.target[r];
      if (y == A.ignore_index) {
        std::fill(grow, grow + K, scalar_t(0));
        continue;
      }
      const acc_t lse = clse[r];
      if (!row_max_is_finite(lse)) {
        std::fill(grow, grow + K, scalar_t(NAN));
        continue;
      }
      const acc_t* z;
      if (capped) {
        vp_softcap_load<scalar_t, acc_t>(in + r * A.in_row_stride, capped_row.data(), K, cap);
        z = capped_row.data();
      } else if constexpr (kDirect) {
        z = in + r * A.in_row_stride;
      } else {
        to_acc(in + r * A.in_row_stride, buf, K);
        z = buf;
      }
      double s_unused, S_unused;
      exp_pass<acc_t>(z, buf, nullptr, K, lse, s_unused, S_unused);  // buf = exp(z - lse) = p
      const int64_t yl = y - A.start;
      for (int64_t b0 = 0; b0 < K; b0 += kStoreBlock) {  // L1-sized blocks: compute, then store
        const int64_t n = std::min<int64_t>(kStoreBlock, K - b0);
        grad_pass<acc_t>(buf + b0, w ? w + b0 : nullptr, n, ckp[r], ckw[r]);
        if (yl >= b0 && yl < b0 + n) buf[yl] -= cky[r];  // in acc_t, before the one rounding
        if (capped) vp_softcap_dz<acc_t>(buf + b0, z + b0, n, cap);
        store_out<scalar_t, acc_t>(grow + b0, buf + b0, n);
      }
    }
    store_fence();
  });
}

template <typename T>
struct VpStatsRun {
  static void run(const VpStatsArgs& a) { vp_stats_rows<T>(a); }
};
template <typename T>
struct VpGradRun {
  static void run(const VpGradArgs& a) { vp_grad_rows<T>(a); }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace labelsmooth_ext

#define LSE_DEFINE_VP_ENTRY_POINTS(cap)                                  \
  namespace labelsmooth_ext {                                            \
  namespace cpu {                                                        \
  void vp_stats_##cap(ScalarKind k, const VpStatsArgs& a) {              \
    CPU_CAPABILITY::dispatch<CPU_CAPABILITY::VpStatsRun>(k, a);          \
  }                                                                      \
  void vp_grad_##cap(ScalarKind k, const VpGradArgs& a) {                \
    CPU_CAPABILITY::dispatch<CPU_CAPABILITY::VpGradRun>(k, a);           \
  }                                                                      \
  }                                                                      \
  }
