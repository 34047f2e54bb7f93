// CPU row kernels, written once and compiled per CPU capability (kernels_default.cpp,
// kernels_avx2.cpp). Raw pointers only: the tensor plumbing lives in loss_cpu.cpp.
//
// Each row is read from memory once; the passes after the first run over data that is
// cache-resident (the row itself, or its float copy for 16-bit input):
//   1. max                       (reads z)
//   2. e = exp(z - m), sums      (reads z, writes e into the gradient row / scratch)
//   3. g = e * kp - kw * w_c     (in place; the target class gets its extra term)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../row_math.h"
#include "kernel_args.h"

namespace labelsmooth_ext {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename acc_t>
using acc_for = std::conditional_t<std::is_same_v<acc_t, double>, double, float>;

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.map(std::exp); }

template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t K) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t c = 0;
  if (K >= V) {
    Vec vm = Vec::loadu(z);
    for (c = V; c + V <= K; c += V) vm = at::vec::maximum(vm, Vec::loadu(z + c));  // NaN-propagating
    alignas(64) acc_t buf[V];
    vm.store(buf);
    for (int64_t i = 0; i < V; ++i) m = nan_max(m, buf[i]);
  }
  for (; c < K; ++c) m = nan_max(m, z[c]);
  return m;
}

template <typename acc_t>
acc_t vsum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += buf[i];
  return s;
}

// Pass 2: s = sum exp(z - m), S = sum w_c (z_c - m) (w = 1 when w == nullptr); writes e to `e`
// when it is not null (e may alias z). Blocks of 4096 elements are summed in vector registers
// and folded into double, so long rows keep float32-accumulation error bounded.
template <typename acc_t>
void exp_pass(const acc_t* z, acc_t* e, const acc_t* w, int64_t K, acc_t m, double& s_out,
              double& S_out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m);
  double s = 0, S = 0;
  for (int64_t b0 = 0; b0 < K; b0 += 4096) {
    const int64_t b1 = std::min<int64_t>(K, b0 + 4096);
    Vec vs(0), vS(0);
    int64_t c = b0;
    for (; c + V <= b1; c += V) {
      const Vec d = Vec::loadu(z + c) - vm;
      const Vec ex = vexp(d);
      vs = vs + ex;
      vS = w ? at::vec::fmadd(Vec::loadu(w + c), d, vS) : vS + d;
      if (e) ex.store(e + c);
    }
    acc_t ts = vsum(vs), tS = vsum(vS);
    for (; c < b1; ++c) {
      const acc_t d = z[c] - m;
      const acc_t ex = std::exp(d);
      ts += ex;
      tS += w ? w[c] * d : d;
      if (e) e[c] = ex;
    }
    s += ts;
    S += tS;
  }
  s_out = s;
  S_out = S;
}

// Pass 3 for index targets: g = e * kp - kw * w_c (w_c = 1 when w == nullptr), in place.
template <typename acc_t>
void grad_pass(acc_t* g, const acc_t* w, int64_t K, acc_t kp, acc_t kw) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vkp(kp), vkw(kw);
  int64_t c = 0;
  if (w) {
    for (; c + V <= K; c += V)
      (Vec::loadu(g + c) * vkp - vkw * Vec::loadu(w + c)).store(g + c);
    for (; c < K; ++c) g[c] = g[c] * kp - kw * w[c];
  } else {
    for (; c + V <= K; c += V) (Vec::loadu(g + c) * vkp - vkw).store(g + c);
    for (; c < K; ++c) g[c] = g[c] * kp - kw;
  }
}

template <typename acc_t>
void fill(acc_t* p, int64_t n, acc_t v) {
  std::fill(p, p + n, v);
}

template <typename scalar_t, typename acc_t>
void to_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t, typename acc_t>
void from_acc(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(src, dst, n);
}

inline int64_t grain_for(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

// Class-index targets.
template <typename scalar_t>
void ce_rows(const CeRowsArgs& A) {
  using acc_t = acc_for<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t K = A.K;
  const auto sm = smoothing_coefs<acc_t>(A.eps, K, A.mode);
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  scalar_t* grad = static_cast<scalar_t*>(A.grad);
  acc_t* loss = static_cast<acc_t*>(A.loss_rows);
  const bool weighted = A.weight != nullptr;
  std::vector<acc_t> wacc;
  if (weighted) {
    wacc.resize(K);
    to_acc(static_cast<const scalar_t*>(A.weight), wacc.data(), K);
  }
  const acc_t* w = weighted ? wacc.data() : nullptr;
  const acc_t W = weighted ? acc_t(A.W) : acc_t(K);
  const acc_t scale = acc_t(A.scale);

  at::parallel_for(0, A.N, grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kDirect ? 0 : K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = A.target[r];
      scalar_t* grow = grad ? grad + r * K : nullptr;
      if (y == A.ignore_index) {
        loss[r] = 0;
        if (grow) std::fill(grow, grow + K, scalar_t(0));
        continue;
      }
      const acc_t* z;
      if constexpr (kDirect) {
        z = in + r * A.in_row_stride;
      } else {
        to_acc(in + r * A.in_row_stride, scratch.data(), K);
        z = scratch.data();
      }
      const acc_t m = row_max(z, K);
      const acc_t zy = z[y];
      const acc_t wy = weighted ? w[y] : acc_t(1);
      if (!row_max_is_finite(m)) {
        loss[r] = NAN;
        if (grow) std::fill(grow, grow + K, scalar_t(NAN));
        continue;
      }
      // e goes where the gradient will be built: the output row itself for float/double,
      // the float scratch row (overwriting z, already read) for 16-bit input.
      acc_t* e = nullptr;
      if (grow) {
        if constexpr (kDirect) e = grow; else e = scratch.data();
      }
      double s, S;
      exp_pass<acc_t>(z, e, w, K, m, s, S);
      const acc_t log_s = lse_log(acc_t(s));
      loss[r] = ce_row_loss<acc_t>(log_s, zy - m, acc_t(S), sm, wy, W);
      if (grow) {
        const auto gc = ce_grad_coefs<acc_t>(acc_t(1) / acc_t(s), sm, scale, weighted, wy, W);
        grad_pass<acc_t>(e, w, K, gc.kp, gc.kw);
        e[y] -= gc.ky;
        from_acc<scalar_t, acc_t>(e, grow, K);
      }
    }
  });
}

// Probability targets (same shape as the input; any row strides, unit class stride).
template <typename scalar_t>
void prob_rows(const ProbRowsArgs& A) {
  using acc_t = acc_for<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t K = A.K;
  const auto sm = smoothing_coefs<acc_t>(A.eps, K, A.mode);
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  const scalar_t* tg = static_cast<const scalar_t*>(A.target);
  scalar_t* grad = static_cast<scalar_t*>(A.grad);
  acc_t* loss = static_cast<acc_t*>(A.loss_rows);
  const bool weighted = A.weight != nullptr;
  std::vector<acc_t> wacc(weighted ? K : 0);
  if (weighted) to_acc(static_cast<const scalar_t*>(A.weight), wacc.data(), K);
  const acc_t scale = acc_t(A.scale);
  const Vec va(sm.a), vb(sm.b);

  at::parallel_for(0, A.N, grain_for(K), [&](int64_t begin, int64_t end) {
    // z (then e, then g), and wq = w_c * q_c, both in the accumulation type.
    std::vector<acc_t> zbuf(K), wq(K);
    for (int64_t r = begin; r < end; ++r) {
      to_acc(in + r * A.in_row_stride, zbuf.data(), K);
      to_acc(tg + r * A.t_row_stride, wq.data(), K);
      int64_t c = 0;
      for (; c + V <= K; c += V) {
        Vec q = at::vec::fmadd(vb, Vec::loadu(wq.data() + c), va);
        if (weighted) q = q * Vec::loadu(wacc.data() + c);
        q.store(wq.data() + c);
      }
      for (; c < K; ++c) wq[c] = prob_q<acc_t>(wq[c], sm) * (weighted ? wacc[c] : acc_t(1));
      double Q = 0;
      for (int64_t i = 0; i < K; ++i) Q += wq[i];
      acc_t* z = zbuf.data();
      const acc_t m = row_max(z, K);
      scalar_t* grow = grad ? grad + r * K : nullptr;
      if (!row_max_is_finite(m)) {
        loss[r] = NAN;
        if (grow) std::fill(grow, grow + K, scalar_t(NAN));
        continue;
      }
      double s, Sq;
      exp_pass<acc_t>(z, z, wq.data(), K, m, s, Sq);
      loss[r] = prob_row_loss<acc_t>(lse_log(acc_t(s)), acc_t(Q), acc_t(Sq));
      if (grow) {
        grad_pass<acc_t>(z, wq.data(), K, acc_t(Q / s) * scale, scale);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::copy(z, z + K, grow);
        } else {
          from_acc<scalar_t, acc_t>(z, grow, K);
        }
      }
    }
  });
}

template <template <typename> class F, typename Args>
void dispatch(ScalarKind kind, const Args& a) {
  switch (kind) {
    case ScalarKind::kFloat: return F<float>::run(a);
    case ScalarKind::kDouble: return F<double>::run(a);
    case ScalarKind::kBFloat16: return F<c10::BFloat16>::run(a);
    case ScalarKind::kHalf: return F<c10::Half>::run(a);
  }
}

template <typename T>
struct CeRun {
  static void run(const CeRowsArgs& a) { ce_rows<T>(a); }
};
template <typename T>
struct ProbRun {
  static void run(const ProbRowsArgs& a) { prob_rows<T>(a); }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace labelsmooth_ext

// Defines the entry points of one capability; used once per kernels_<cap>.cpp.
#define LSE_DEFINE_CPU_ENTRY_POINTS(cap)                                                   \
  namespace labelsmooth_ext {                                                              \
  namespace cpu {                                                                          \
  void ce_rows_##cap(ScalarKind k, const CeRowsArgs& a) {                                  \
    CPU_CAPABILITY::dispatch<CPU_CAPABILITY::CeRun>(k, a);                                 \
  }                                                                                        \
  void prob_rows_##cap(ScalarKind k, const ProbRowsArgs& a) {                              \
    CPU_CAPABILITY::dispatch<CPU_CAPABILITY::ProbRun>(k, a);                               \
  }                                                                                        \
  }                                                                                        \
  }
