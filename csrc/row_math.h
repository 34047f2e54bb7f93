// Per-row formulas shared by the CPU and CUDA kernels: one source of truth.
//
// Every loss is written through the smoothed target distribution
//     q_c = a + b * t_c            (t = one-hot of the class for index targets)
// with (a, b) from smoothing_coefs(). For a row with max m, s = sum_c exp(z_c - m):
//     loss = sum_c w_c q_c (lse - z_c),   lse - z_c = log(s) - (z_c - m) >= 0,
// so no large terms cancel. See shared/design/semantics.md for the derivation.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSE_HD __host__ __device__ __forceinline__
#else
#define LSE_HD inline
#endif

namespace labelsmooth_ext {

enum SmoothingMode : int64_t { kUniform = 0, kOffTarget = 1 };
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

LSE_HD float lse_exp(float x) { return expf(x); }
LSE_HD double lse_exp(double x) { return exp(x); }
LSE_HD float lse_log(float x) { return logf(x); }
LSE_HD double lse_log(double x) { return log(x); }
LSE_HD float lse_log1p(float x) { return log1pf(x); }
LSE_HD double lse_log1p(double x) { return log1p(x); }
LSE_HD float lse_tanh(float x) { return tanhf(x); }
LSE_HD double lse_tanh(double x) { return tanh(x); }
// The smallest positive value of the accumulation type (a subnormal).
LSE_HD float smallest_positive(float) { return 1.40129846e-45f; }
LSE_HD double smallest_positive(double) { return 4.9406564584124654e-324; }
// BCE's smoothing a in the accumulation type: a positive a that rounds to 0 there (float32: below
// about 7e-46) keeps the smallest positive value, so it still smooths (long fuzz: a = 1.1e-88 with
// x = -inf and a negative pos_weight gave NaN where the exact loss is -inf).
template <typename acc_t>
LSE_HD acc_t bce_smoothing_in(double a) {
  const acc_t r = acc_t(a);
  return (a > 0.0 && r == acc_t(0)) ? smallest_positive(acc_t(0)) : r;
}

template <typename acc_t>
struct Smoothing {
  acc_t a;  // mass every class receives
  acc_t b;  // extra mass on the target class (may be negative for off_target, eps > (K-1)/K)
};

// uniform (PyTorch): q_y = 1 - eps + eps/K, q_c = eps/K.
// off_target:        q_y = 1 - eps,        q_c = eps/(K-1)   (K == 1 requires eps == 0).
template <typename acc_t>
LSE_HD Smoothing<acc_t> smoothing_coefs(double eps, int64_t K, int64_t mode) {
  Smoothing<acc_t> r;
  if (eps == 0.0) {
    r.a = acc_t(0);
    r.b = acc_t(1);
  } else if (mode == kOffTarget) {
    const double a = K > 1 ? eps / double(K - 1) : 0.0;
    r.a = acc_t(a);
    r.b = acc_t((1.0 - eps) - a);
  } else {
    r.a = acc_t(eps / double(K));
    r.b = acc_t(1.0 - eps);
  }
  // label_smoothing > 0 never rounds to no smoothing: an eps/K below the accumulation type's
  // smallest positive value (eps = 5e-324; eps < 1e-38 K for float) becomes that value, so a
  // -inf logit still gives the exact formula's loss +inf (not 0 * inf, not a finite value).
  if (eps > 0.0 && r.a == acc_t(0) && !(mode == kOffTarget && K <= 1)) r.a = smallest_positive(acc_t(0));
  return r;
}

// Merge two (max, sum of exp(x - max)) pairs. Empty partials have m = -inf, s = 0.
// A +inf max gives exp(inf - inf) = NaN, which is what PyTorch's log_softmax gives.
// max that returns NaN when either argument is NaN (fmax would drop it).
template <typename acc_t>
LSE_HD acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

template <typename acc_t>
LSE_HD void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t mn = nan_max(m, m2);
  if (mn == -INFINITY) return;
  s = s * lse_exp(m - mn) + s2 * lse_exp(m2 - mn);
  m = mn;
}

// Row loss for class-index targets.
//   log_s = log(sum exp(z - m)), zy_m = z_y - m, S = sum_c w_c (z_c - m),
//   wy = w_y, W = sum_c w_c (unweighted: wy = 1, W = K, S = sum_c (z_c - m)).
// The smoothing term is skipped when a == 0, as PyTorch skips it for eps == 0
// (so a -inf logit off the target does not turn 0 * inf into NaN).
template <typename acc_t>
LSE_HD acc_t ce_row_loss(acc_t log_s, acc_t zy_m, acc_t S, Smoothing<acc_t> sm, acc_t wy, acc_t W) {
  acc_t loss = sm.b * wy * (log_s - zy_m);
  if (sm.a != acc_t(0)) loss += sm.a * (W * log_s - S);
  return loss;
}

// A row whose max is not finite (a NaN, a +inf, or every logit -inf) has a NaN loss and a
// NaN gradient: PyTorch's log_softmax computes inf - inf or -inf - (-inf) there.
template <typename acc_t>
LSE_HD bool row_max_is_finite(acc_t m) {
  return m > -acc_t(INFINITY) && m < acc_t(INFINITY);
}

// Gradient of a class-index row, already multiplied by `scale` (1/D for mean):
//   g_c = e_c * kp - kw * w_c - [c == y] * ky,   e_c = exp(z_c - m)
// (unweighted: w_c = 1). Derivation: p_c (b w_y + a W) - a w_c - b w_y [c == y].
template <typename acc_t>
struct GradCoefs {
  acc_t kp;
  acc_t kw;
  acc_t ky;
};

template <typename acc_t>
LSE_HD GradCoefs<acc_t> ce_grad_coefs(acc_t inv_s, Smoothing<acc_t> sm, acc_t scale, bool weighted,
                                      acc_t wy, acc_t W) {
  GradCoefs<acc_t> g;
  g.kp = weighted ? inv_s * (sm.b * wy + sm.a * W) * scale : inv_s * scale;
  g.kw = sm.a * scale;
  g.ky = sm.b * wy * scale;
  return g;
}

// Large-vocabulary training options (semantics.md, "Extensions"), applied per row:
//   softcap s > 0: every logit x becomes z = s tanh(x / s) before anything else; the gradient
//     with respect to x is the one with respect to z times 1 - tanh^2.
//   z_loss c >= 0: the row loss gets c lse^2 (lse of the capped logits); its gradient
//     2 c lse p_c = e_c * (2 c lse / s_sum) joins the e_c coefficient kp of ce_grad_coefs.
//   softcap_apply / softcap_factor: z and dz/dx = 1 - tanh^2 from one exp and one division
//   (on the GPU approximate, 2 ulp): E = exp(2 x / s), q = 2 / (E + 1) = 1 - tanh,
//   z = s (1 - q), 1 - tanh^2 = q (2 - q) = E q^2 (float). 2 / s is loop-invariant (hoisted
//   out of the kernels' loops). About half the instructions of tanhf(x / s) with its IEEE
//   division (cuobjdump -sass of sm_90). tanh has an absolute error of a few ulp of 1, as the
//   CPU kernels' vector version (csrc/cpu/kernels.h, softcap_vec; logits within 0.75 s take a
//   polynomial there, softcap_any); the factor E q^2 a relative error of a few ulp. (1 - t^2
//   from the rounded t loses ulp(1) / (1 - t^2) relative where |t| nears 1: 2e-5 at x = -2.8 s
//   in float, which a float64 comparison in tests/test_llm_options.py caught.) +-inf give +-s
//   and a factor 0, NaN stays NaN.
// a / b in the accumulation type; float on the GPU: the approximate division (2 ulp; b finite
// and > 0). An IEEE division here made ptxas call its out-of-line slow path, a stack frame in
// kernels that do not hoist it (the 16-bit vocabulary-parallel stats kernels on sm_80).
template <typename acc_t>
LSE_HD acc_t softcap_div(acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) return __fdividef(a, b);
#endif
  return a / b;
}

template <typename acc_t>
LSE_HD acc_t softcap_two_over(acc_t cap) {
  return softcap_div(acc_t(2), cap);
}

// The forward's capped logit: z = s (1 - q).
template <typename acc_t>
LSE_HD acc_t softcap_apply(acc_t x, acc_t cap) {
  const acc_t E = lse_exp(x * softcap_two_over(cap));
  return cap * (acc_t(1) - softcap_div(acc_t(2), E + acc_t(1)));
}

// The backward's factor dz/dx of x and its capped value z. Float: E q^2 from softcap_apply's
// own E and q (the same operations on the same x: the compiler computes them once). Double:
// 1 - (z inv_cap)^2, off by ulp(1) = 1.1e-16 absolute where |tanh| nears 1; E q^2 there kept E
// live across the double division's out-of-line slow path, a stack frame in the split and
// vocabulary-parallel gradient kernels (ptxas, sm_80 / sm_90).
template <typename acc_t>
LSE_HD acc_t softcap_factor(acc_t x, acc_t z, acc_t cap, acc_t inv_cap) {
  if constexpr (sizeof(acc_t) == 4) {
    const acc_t E = lse_exp(x * softcap_two_over(cap));   // exp(2 x / cap)
    const acc_t q = softcap_div(acc_t(2), E + acc_t(1));  // 1 - tanh
    // (1 - t)(1 + t) = q (2 - q) = E q^2, taken as (E q) q (E q is in [0, 2]: q^2 does not
    // underflow); E = inf (x > 44 cap): q = 0, and the factor 0 (not inf * 0)
    return E < acc_t(INFINITY) ? (E * q) * q : acc_t(0);
  } else {
    const acc_t t = z * inv_cap;
    return acc_t(1) - t * t;
  }
}

// The backward's capped logit and factor (x itself and 1 without a cap), computed together so
// the compiler shares softcap_apply's and softcap_factor's exp and division (in separate
// branches it did not: 89 more MUFU.RCP in ce_forward_kernel<float>, cuobjdump -sass sm_90).
template <typename acc_t>
LSE_HD void softcap_grad_terms(acc_t x, acc_t cap, acc_t inv_cap, acc_t& z, acc_t& dz) {
  z = x;
  dz = acc_t(1);
  if (cap > acc_t(0)) {
    z = softcap_apply<acc_t>(x, cap);
    dz = softcap_factor<acc_t>(x, z, cap, inv_cap);
  }
}

// From the capped value, 1 - (z / cap)^2: the CPU vocabulary-parallel gradient's scalar tail
// (csrc/cpu/vp_kernels.h, which keeps z, not x; its vector code computes the factor the same
// way, with 1 - t^2's cancellation where |t| nears 1).
template <typename acc_t>
LSE_HD acc_t softcap_dz_dx(acc_t z, acc_t cap) {
  const acc_t t = z * (acc_t(1) / cap);
  return acc_t(1) - t * t;
}

template <typename acc_t>
LSE_HD acc_t z_loss_row(acc_t lse, acc_t c) {
  return c * lse * lse;
}

// Added to GradCoefs::kp (already multiplied by `scale`).
template <typename acc_t>
LSE_HD acc_t z_loss_kp(acc_t lse, acc_t inv_s, acc_t c, acc_t scale) {
  return acc_t(2) * c * lse * inv_s * scale;
}

// Probability targets: q_c = a + b t_c, loss = log_s * Q - Sq with
//   Q = sum_c w_c q_c, Sq = sum_c w_c q_c (z_c - m);
// gradient g_c = (e_c * inv_s * Q - w_c q_c) * scale.
template <typename acc_t>
LSE_HD acc_t prob_q(acc_t t, Smoothing<acc_t> sm) {
  return sm.a + sm.b * t;
}

template <typename acc_t>
LSE_HD acc_t prob_row_loss(acc_t log_s, acc_t Q, acc_t Sq) {
  return log_s * Q - Sq;
}

// Binary cross-entropy with logits on the smoothed target t' = t (1 - 2a) + a, with weight w
// and positive-class weight p (PyTorch's binary_cross_entropy_with_logits otherwise):
//   loss = w [ (1 - t') x + L softplus(-x) ],     L = 1 + (p - 1) t'
//   dloss/dx = w (L sigmoid(x) - p t')
// softplus(-x) = max(-x, 0) + log1p(exp(-|x|)) and sigmoid from the same exp(-|x|): stable
// for any |x|.
template <typename acc_t>
LSE_HD void bce_elem(acc_t x, acc_t t, acc_t w, acc_t p, acc_t a, acc_t& loss, acc_t& grad) {
  const acc_t ts = t * (acc_t(1) - acc_t(2) * a) + a;
  // 1 - t' formed directly: (1 - t)(1 - 2a) + a keeps a small a where t' rounds to 1 (float32:
  // t = 1, a = 2.2e-16 gave (1 - t') x = 0 * -inf = NaN for the exact loss -inf; long fuzz)
  const acc_t ts1 = (acc_t(1) - t) * (acc_t(1) - acc_t(2) * a) + a;
  const acc_t L = acc_t(1) + (p - acc_t(1)) * ts;
  const acc_t e = lse_exp(x < acc_t(0) ? x : -x);
  const acc_t sp_neg = (x < acc_t(0) ? -x : acc_t(0)) + lse_log1p(e);
  // (1 - t') x + L max(-x, 0) is -p t' x for x < 0: summed as such, it does not cancel against
  // L max(-x, 0) (a confident logit with t' = 0 kept only float rounding of |x| for the loss,
  // e.g. 0 instead of 9e-7 at x = -14 in float32). At +-inf as PyTorch (NaN for x = -inf).
  const bool finite_x = x > -acc_t(INFINITY) && x < acc_t(INFINITY);
  loss = finite_x ? w * ((x < acc_t(0) ? -(p * ts) * x : ts1 * x) + L * lse_log1p(e))
                  : w * (ts1 * x + L * sp_neg);
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  // x >= 0: L sigmoid(x) - p t' = ((1 - t') - p t' e) / (1 + e), without the cancellation of
  // sigmoid(x) - 1 (a confident, correct logit: the gradient -e would round to 0).
  grad = x >= acc_t(0) ? w * ((ts1 - p * ts * e) * inv) : w * (L * e * inv - p * ts);
}

// Whether a gradient already rounded to its 16-bit (or float32) dtype, multiplied by the
// incoming gradient `go`, equals one rounding of the exact product: go = 0 or +-2^k with
// k >= 0 (a power-of-two factor changes only the exponent, and k >= 0 makes no new subnormals).
// float16 only for go == 1: its saved gradient may already have underflowed before go arrived.
template <typename acc_t>
LSE_HD bool exact_multiplier(acc_t go, bool is_half) {
  if (go == acc_t(1)) return true;
  if (is_half) return false;
  if (go == acc_t(0)) return true;
  const acc_t a = go < acc_t(0) ? -go : go;
  if (!(a >= acc_t(1)) || a == acc_t(INFINITY)) return false;  // also NaN
  // a normal power of two: all mantissa bits zero
  if constexpr (sizeof(acc_t) == 4) {
    uint32_t b;
    memcpy(&b, &a, 4);
    return (b & 0x7FFFFFu) == 0;
  } else {
    uint64_t b;
    memcpy(&b, &a, 8);
    return (b & 0xFFFFFFFFFFFFFull) == 0;
  }
}

// True for a target that is neither ignored nor a valid class.
LSE_HD bool target_out_of_range(int64_t y, int64_t K, int64_t ignore_index) {
  return y != ignore_index && (y < 0 || y >= K);
}

}  // namespace labelsmooth_ext
