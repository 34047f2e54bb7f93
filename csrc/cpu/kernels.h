// CPU row kernels, written once and compiled per CPU capability (kernels_default.cpp,
// kernels_avx2.cpp). Raw pointers only: the tensor plumbing lives in loss_cpu.cpp.
//
// Each row is read from memory once and the gradient written once; the passes in between run
// over a per-thread float row that stays in L2:
//   1. max                      (reads the row; 16-bit input is converted into the buffer here)
//   2. e = exp(z - m), sums     (writes e into the buffer)
//   3. g = e * kp - kw * w_c    (per L1-sized block, then stored with streaming stores: the
//                                gradient is not read back soon, and a normal store would first
//                                read every line of it from memory)
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

// A lambda always inlined (C10_ALWAYS_INLINE_ATTRIBUTE, which torch 2.4's headers lack).
#ifndef LABELSMOOTH_LAMBDA_INLINE
#if defined(__GNUC__) || defined(__clang__)
#define LABELSMOOTH_LAMBDA_INLINE __attribute__((__always_inline__))
#else
#define LABELSMOOTH_LAMBDA_INLINE
#endif
#endif

namespace labelsmooth_ext {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename acc_t>
using acc_for = std::conditional_t<std::is_same_v<acc_t, double>, double, float>;

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.map(std::exp); }

// Partial vectors at the row's end (count < V lanes) instead of scalar tails: short rows
// (segmentation: K = 21) would otherwise spend most of their time in scalar std::exp.
template <typename acc_t>
Vectorized<acc_t> load_tail(const acc_t* p, int64_t count, acc_t pad) {
  return Vectorized<acc_t>::set(Vectorized<acc_t>(pad), Vectorized<acc_t>::loadu(p, count), count);
}

template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t K) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  // four independent maxima: one chain would wait on the max's latency at every vector (the
  // row is in L2 when prefetched, so the chain, not memory, would bound this pass)
  Vec vm(ninf), vm1(ninf), vm2(ninf), vm3(ninf);
  int64_t c = 0;
  for (; c + 4 * V <= K; c += 4 * V) {
    vm = at::vec::maximum(vm, Vec::loadu(z + c));  // NaN-propagating
    vm1 = at::vec::maximum(vm1, Vec::loadu(z + c + V));
    vm2 = at::vec::maximum(vm2, Vec::loadu(z + c + 2 * V));
    vm3 = at::vec::maximum(vm3, Vec::loadu(z + c + 3 * V));
  }
  vm = at::vec::maximum(at::vec::maximum(vm, vm1), at::vec::maximum(vm2, vm3));
  for (; c + V <= K; c += V) vm = at::vec::maximum(vm, Vec::loadu(z + c));
  if (c < K) vm = at::vec::maximum(vm, load_tail(z + c, K - c, ninf));
  alignas(64) acc_t buf[V];
  vm.store(buf);
  acc_t m = ninf;
  for (int64_t i = 0; i < V; ++i) m = nan_max(m, buf[i]);
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

// Pass 1 for 16-bit input: convert the row into the float buffer and return its max.
template <typename scalar_t>
float convert_and_max(const scalar_t* src, float* dst, int64_t K) {
  using fVec = Vectorized<float>;
  using hVec = Vectorized<scalar_t>;
  constexpr int64_t H = hVec::size();
  int64_t c = 0;
  fVec vm(-std::numeric_limits<float>::infinity());
  for (; c + H <= K; c += H) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(hVec::loadu(src + c));
    a.store(dst + c);
    b.store(dst + c + fVec::size());
    vm = at::vec::maximum(vm, at::vec::maximum(a, b));
  }
  float m = -std::numeric_limits<float>::infinity();
  alignas(64) float buf[fVec::size()];
  vm.store(buf);
  for (int64_t i = 0; i < fVec::size(); ++i) m = nan_max(m, buf[i]);
  for (; c < K; ++c) {
    dst[c] = static_cast<float>(src[c]);
    m = nan_max(m, dst[c]);
  }
  return m;
}

// Rows of at least this many bytes are stored with streaming stores (AVX2 build).
constexpr int64_t kStreamMinBytes = 4096;
// exp_pass sums blocks of this many classes in vector registers, then folds them into double.
constexpr int64_t kExpBlock = 4096;

// Store n values of the accumulation type to dst in scalar_t. Where dst is 32-byte aligned the
// AVX2 build uses non-temporal (streaming) stores; the caller fences once per thread.
template <typename scalar_t, typename acc_t>
void store_out(scalar_t* dst, const acc_t* src, int64_t n) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX2)
  // Short rows (under 4 KiB) take plain stores: streaming stores to partial cache lines cost
  // more than they save.
  if (n * int64_t(sizeof(scalar_t)) >= kStreamMinBytes) {
    while ((reinterpret_cast<uintptr_t>(dst + c) & 31) != 0) {  // scalar head to 32-byte alignment
      dst[c] = static_cast<scalar_t>(src[c]);
      ++c;
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (; c + 8 <= n; c += 8) _mm256_stream_ps(dst + c, _mm256_loadu_ps(src + c));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      for (; c + 4 <= n; c += 4) _mm256_stream_pd(dst + c, _mm256_loadu_pd(src + c));
    } else {
      using fVec = Vectorized<float>;
      for (; c + 16 <= n; c += 16) {
        const Vectorized<scalar_t> h =
            at::vec::convert_from_float<scalar_t>(fVec::loadu(src + c), fVec::loadu(src + c + 8));
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + c), __m256i(h));
      }
    }
  }
#endif
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src + c, src + n, dst + c);
  } else {
    at::vec::convert(src + c, dst + c, n - c);
  }
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// The next row to read, asked for while this row's exps are computed (ce_rows): the row's
// first pass then reads from L2 instead of memory, and the memory reads overlap the exp work
// (which the separate passes otherwise serialise). `step` elements of this row per 64-byte
// line of the next; null `next`: no prefetch.
struct RowPrefetch {
  const char* next = nullptr;
  int64_t bytes = 0;  // of the next row
  int64_t elem = 1;   // bytes per element of the next row (its dtype)
};

// Rows up to this many bytes are prefetched (the row, the next row and the float buffer stay
// well inside a 1 MiB L2).
constexpr int64_t kPrefetchMaxBytes = 256 * 1024;

// The row after r that this thread reads (ignored rows are not read), to prefetch while row r's
// exps are computed; none past `end` or for rows above kPrefetchMaxBytes.
template <typename scalar_t, typename Args>
RowPrefetch next_row_prefetch(const Args& A, const scalar_t* in, int64_t r, int64_t end) {
  const int64_t bytes = A.K * int64_t(sizeof(scalar_t));
  if (bytes > kPrefetchMaxBytes) return {};
  int64_t r2 = r + 1;
  while (r2 < end && A.target[r2] == A.ignore_index) ++r2;
  if (r2 >= end) return {};
  return {reinterpret_cast<const char*>(in + r2 * A.in_row_stride), bytes, int64_t(sizeof(scalar_t))};
}

// Asks for the line of the next row that element c of this row pairs with (one line per 64 /
// elem elements): spread over the pass, so the next row arrives in L2 while this one computes.
C10_ALWAYS_INLINE void prefetch_next_row(const RowPrefetch& pf, int64_t line_mask, int64_t c) {
  if (line_mask >= 0 && (c & line_mask) == 0 && c * pf.elem < pf.bytes) __builtin_prefetch(pf.next + c * pf.elem, 0, 2);
}

inline Vectorized<float> exp_clamped(const Vectorized<float>& x);  // below (the softcap passes')

// The plain passes' exp of d = z - m, where m is the row's finite max (so d <= 0; NaN rows are
// taken out by their max before): the softcap pass's bounded exp (12 vector instructions against
// exp_u20's 19) on d clamped to kRowExpMin, and exactly 0 below (e^-86 = 4.5e-38; exp_u20 gives
// 0 below ln(FLT_MIN) = -87.3). -inf gives 0. Also exact-enough for the few ulps above 0 that a
// caller with a rounded reference (tensor parallel's lse) passes; undefined above 86. Its error
// over every float32 it is fed is measured against float64 by
// tests/test_kernel_boundaries.py::test_row_exp_error (cpu_row_exp operator): at most 2.035 ulps
// over every float in [-86, -0] (exp_u20: documented 20).
constexpr float kRowExpMin = -86.f;
inline Vectorized<float> exp_row(const Vectorized<float>& d) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 x = d, lo = _mm256_set1_ps(kRowExpMin);
  const __m256 e = exp_clamped(Vectorized<float>(_mm256_max_ps(x, lo)));  // max_ps(NaN, lo) = lo
  return Vectorized<float>(_mm256_and_ps(e, _mm256_cmp_ps(x, lo, _CMP_GE_OQ)));
#else
  return vexp(d);
#endif
}
inline Vectorized<double> exp_row(const Vectorized<double>& d) { return vexp(d); }

// log(s) for the sums of exp(z - m) over a row, s in [1, 2^24] (the max's own term is exactly 1):
// inline, against a call of Sleef's logf8_u10 (a fifth of the spatial forward's time). AVX2
// float: s = 2^k m with m in [sqrt(1/2), sqrt(2)) taken from the bits, f = m - 1, then
// log(1 + f) = f - f^2 / 2 + f^3 P(f), P of degree 8 (the Cephes logf minimax coefficients),
// and k ln2 added in two parts (a high part exact in 9 bits). Measured against float64 by
// tests/test_kernel_boundaries.py::test_row_log_error. Other builds, double: Vectorized::log.
inline Vectorized<float> log_ge1(const Vectorized<float>& s) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i off = _mm256_set1_epi32(0x3f3504f3);  // bits of sqrt(1/2)
  const __m256i d = _mm256_sub_epi32(_mm256_castps_si256(s), off);
  const __m256 k = _mm256_cvtepi32_ps(_mm256_srai_epi32(d, 23));
  const __m256 m = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(d, _mm256_set1_epi32(0x7fffff)), off));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(7.0376836292e-2f), f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);                      // f^3 P(f)
  y = _mm256_fmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), y);           // k ln2, low part
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);                     // - f^2 / 2
  return Vectorized<float>(_mm256_fmadd_ps(k, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y)));
#else
  return s.log();
#endif
}
inline Vectorized<double> log_ge1(const Vectorized<double>& s) { return s.log(); }

// Pass 2: s = sum exp(z - m), S = sum w_c (z_c - m) (w = 1 when w == nullptr); writes e to `e`
// when it is not null (e may alias z). Blocks of 4096 elements are summed in vector registers
// and folded into double, so long rows keep float32-accumulation error bounded.
template <typename acc_t>
void exp_pass(const acc_t* z, acc_t* e, const acc_t* w, int64_t K, acc_t m, double& s_out,
              double& S_out, RowPrefetch pf = {}) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m);
  // element c of this row asks for byte c * elem of the next (one line per 64 / elem elements)
  const int64_t line_mask = pf.next ? 64 / pf.elem - 1 : -1;
  double s = 0, S = 0;
  for (int64_t b0 = 0; b0 < K; b0 += kExpBlock) {
    const int64_t b1 = std::min<int64_t>(K, b0 + kExpBlock);
    Vec vs(0), vS(0);
    int64_t c = b0;
    for (; c + V <= b1; c += V) {
      prefetch_next_row(pf, line_mask, c);
      const Vec d = Vec::loadu(z + c) - vm;
      const Vec ex = exp_row(d);
      vs = vs + ex;
      vS = w ? at::vec::fmadd(Vec::loadu(w + c), d, vS) : vS + d;
      if (e) ex.store(e + c);
    }
    if (c < b1) {
      const int64_t n = b1 - c;
      const Vec d = load_tail(z + c, n, -std::numeric_limits<acc_t>::infinity()) - vm;
      const Vec ex = exp_row(d);  // padding lanes: exp(-inf) = 0
      vs = vs + ex;
      const Vec d0 = Vec::set(Vec(0), d, n);
      vS = w ? at::vec::fmadd(Vec::loadu(w + c, n), d0, vS) : vS + d0;
      if (e) ex.store(e + c, n);
    }
    s += vsum(vs);
    S += vsum(vS);
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
    if (c < K) (Vec::loadu(g + c, K - c) * vkp - vkw * Vec::loadu(w + c, K - c)).store(g + c, K - c);
  } else {
    for (; c + V <= K; c += V) (Vec::loadu(g + c) * vkp - vkw).store(g + c);
    if (c < K) (Vec::loadu(g + c, K - c) * vkp - vkw).store(g + c, K - c);
  }
}

template <typename scalar_t, typename acc_t>
void to_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// The class weights (passed in the accumulation type) as a vector (empty when unweighted).
template <typename acc_t>
std::vector<acc_t> weights_in_acc(const void* weight, int64_t K) {
  std::vector<acc_t> w(weight ? K : 0);
  if (weight) to_acc(static_cast<const acc_t*>(weight), w.data(), K);
  return w;
}

// ---- Softcap rows (softcap > 0; with or without z-loss): ce_rows_softcap below. ----
//
// tanh is monotonic, so the max of the capped logits z = cap * tanh(x / cap) is the capped max
// of the raw logits: pass 1 is the plain kernels' max over x. Pass 2 computes t = tanh(x / cap)
// once per element, then z - m and e = exp(z - m) from it, and keeps both e and the chain-rule
// factor dz/dx = 1 - t^2 in L2-resident row buffers; pass 3 (the gradient) only reads them back,
// so tanh is evaluated once per element in all (not again for the gradient). tanh itself: an odd
// polynomial for vectors whose logits are all within 0.75 cap (the usual case: 6 instructions),
// else one bounded exp and a reciprocal (softcap_any). Tried and measured slower (bench/NOTES.md):
// capping in pass 1 while the row streams in from memory, then the plain exp pass.

// The softcap pass is bound by vector-instruction throughput (two exps per element where the
// plain pass has one), so it uses an exp with no range handling of its own: its callers clamp
// the argument to [-kExpArg, kExpArg] first (float: e^-86 = 4.5e-38 is still normal, so the
// exponent arithmetic below cannot underflow; double: the kernels' std::exp, any argument).
template <typename acc_t>
constexpr acc_t kExpArg = std::is_same_v<acc_t, float> ? acc_t(86) : acc_t(700);

// exp(x) for |x| <= 86: x = n ln2 + r (Cody-Waite, two-part ln2), |r| <= ln2 / 2, exp(r) by a
// degree-5 polynomial 1 + c1 r + ... + c5 r^5 (c1..c5 fitted here by iteratively reweighted
// least squares to the relative error on that interval: at most 1.7e-7 relative evaluated in
// float, 1.5 ulp), then 2^n added to the exponent bits.
// About 12 vector instructions against exp_u20's 19 (which clamps and blends itself).
inline Vectorized<float> exp_clamped(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  using Vec = Vectorized<float>;
  const Vec magic(12582912.f);  // 1.5 * 2^23: adding it rounds x log2(e) to an integer n
  const Vec t = at::vec::fmadd(x, Vec(1.44269504088896341f), magic);
  const Vec n = t - magic;
  Vec r = at::vec::fmadd(n, Vec(-0.693145751953125f), x);    // ln2, high part (exact n * hi)
  r = at::vec::fmadd(n, Vec(-1.428606765330187e-06f), r);    // ln2, low part
  Vec p = at::vec::fmadd(r, Vec(0.00829064566642046f), Vec(0.041897933930158615f));
  p = at::vec::fmadd(r, p, Vec(0.16667629778385162f));
  p = at::vec::fmadd(r, p, Vec(0.4999915063381195f));
  p = at::vec::fmadd(r, p, Vec(0.9999997019767761f));
  p = at::vec::fmadd(r, p, Vec(1.0f));  // exp(0) = 1 exactly: the row max contributes exactly 1
  // n sits in the low mantissa bits of t: (bits(t) - bits(magic)) << 23 is n in the exponent field
  const __m256i e2n = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic)), 23);
  return Vec(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e2n)));
#else
  return vexp(x);
#endif
}
inline Vectorized<double> exp_clamped(const Vectorized<double>& x) { return vexp(x); }

// 1 / d for 1 <= d < 2^126. AVX2 float: the reciprocal estimate (relative error at most
// 1.5 * 2^-12) and one Newton step r0 + r0 (1 - d r0), whose exact result is off by the estimate's
// error squared (at most 2.25 * 2^-24) and whose final fma rounds once more (2^-24): at most
// 3.25 * 2^-24 relative, three instructions against a division's 5-cycle throughput. Elsewhere
// (the baseline build, double) the division.
inline Vectorized<float> recip_ge1(const Vectorized<float>& d) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 r0 = _mm256_rcp_ps(d);
  const __m256 e = _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(1.f));  // 1 - d r0, one rounding
  return Vectorized<float>(_mm256_fmadd_ps(r0, e, r0));
#else
  return Vectorized<float>(1.f) / d;
#endif
}
inline Vectorized<double> recip_ge1(const Vectorized<double>& d) { return Vectorized<double>(1.) / d; }

// 1 - t^2 with one rounding (AVX2: one fnmadd; torch 2.4's Vectorized has no fnmadd).
inline Vectorized<float> one_minus_sq(const Vectorized<float>& t) {
#if defined(CPU_CAPABILITY_AVX2)
  return Vectorized<float>(_mm256_fnmadd_ps(t, t, _mm256_set1_ps(1.f)));
#else
  return at::vec::fmadd(Vectorized<float>(0) - t, t, Vectorized<float>(1));
#endif
}
inline Vectorized<double> one_minus_sq(const Vectorized<double>& t) {
  return at::vec::fmadd(Vectorized<double>(0) - t, t, Vectorized<double>(1));
}

// The soft-capped logit z = cap tanh(x / cap) and dz/dx = 1 - tanh^2 of a vector, sign-symmetric:
// u = min(|x| 2 / cap, kExpArg), q = 1 / (exp(u) + 1) in (0, 1/2], |tanh| = 1 - 2 q, then x's
// sign. With q <= 1/2 the reciprocal's relative error moves |tanh| by at most that error (not
// twice it, as it would for q near 1), so the estimate + Newton step keeps the division's bound.
// +-inf give +-cap (|x| clamps), -0 gives -0; a NaN logit gives an unspecified finite z (callers
// detect NaN rows separately). two_inv = 2 / cap, vcap = cap. The error is measured against
// float64 by tests/test_llm_options.py::test_softcap_tanh_error (through the row max) and
// ::test_softcap_grad_factor_error (dz/dx, through the gradient).
template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> softcap_vec(const Vectorized<acc_t>& x, const Vectorized<acc_t>& two_inv,
                              const Vectorized<acc_t>& vcap, Vectorized<acc_t>* dz) {
  using Vec = Vectorized<acc_t>;
  const Vec one(1), sign_bit(acc_t(-0.0));
  const Vec sgn = x & sign_bit;
  const Vec u = at::vec::clamp_max(x.abs() * two_inv, Vec(kExpArg<acc_t>));
  const Vec q = recip_ge1(exp_clamped(u) + one);
  const Vec ta = at::vec::fmadd(Vec(acc_t(-2)), q, one);  // |tanh| in [0, 1)
  // 1 - tanh^2 = 4 q (1 - q): q's relative error only (1 - ta^2 of the rounded ta loses
  // ulp(1) / (1 - ta^2) relative as ta nears 1)
  if (dz) {
    const Vec q4 = q * Vec(acc_t(4));
    *dz = q4 - q4 * q;
  }
  return (vcap * ta) | sgn;
}

// Small logits, |x| <= 0.75 cap (float only): tanh(u) = u P(u^2) on |u| <= 0.75, P of degree 5
// fitted here (iteratively reweighted least squares on the relative error, coefficients rounded
// to float: at most 1.6 * 2^-24 absolute and 2.6 * 2^-24 relative in tanh, evaluated in float
// with the coefficients scaled by cap as below). With q_k = p_k / cap^(2k) the capped logit is
// z = x Q(x^2): 6 instructions, against about 20 for the exp, reciprocal and sign of softcap_vec.
constexpr int kSoftcapPolyTerms = 6;
constexpr double kSoftcapPoly[kSoftcapPolyTerms] = {1.0, -0.33332958817481995, 0.1332540512084961,
                                                    -0.05334438383579254, 0.019582802429795265,
                                                    -0.004716172348707914};
constexpr double kSoftcapPolyRange = 0.75;  // |x| / cap up to which the polynomial is used

// Caps for which the polynomial is used: q_k = p_k / cap^(2k) and x^2 stay normal floats there
// (cap^10 within 2^+-80); other caps take softcap_vec for every logit.
constexpr double kSoftcapPolyMinCap = 1.0 / 256, kSoftcapPolyMaxCap = 256;

// A row's softcap constants, as vectors.
template <typename acc_t>
struct SoftcapConsts {
  using Vec = Vectorized<acc_t>;
  Vec two_inv, cap, inv_cap, lim;  // 2 / cap, cap, 1 / cap, kSoftcapPolyRange * cap
  Vec q[kSoftcapPolyTerms];        // kSoftcapPoly[k] / cap^(2k)
  bool poly;                       // float and a cap in [kSoftcapPolyMinCap, kSoftcapPolyMaxCap]
  explicit SoftcapConsts(acc_t c)
      : two_inv(acc_t(2) / c), cap(c), inv_cap(acc_t(1) / c), lim(acc_t(kSoftcapPolyRange * double(c))),
        poly(std::is_same_v<acc_t, float> && double(c) >= kSoftcapPolyMinCap && double(c) <= kSoftcapPolyMaxCap) {
    double ck = 1;
    for (int k = 0; k < kSoftcapPolyTerms; ++k) {
      q[k] = Vec(acc_t(kSoftcapPoly[k] / ck));
      ck *= double(c) * double(c);
    }
  }
};

// z = cap tanh(x / cap) and dz/dx: the polynomial when every lane is small (float, C.poly),
// else softcap_vec. A lane's z depends only on x, up to the two formulas' few-ulp difference (a
// vector with both small and large logits takes softcap_vec for all of them).
template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> softcap_any(const Vectorized<acc_t>& x, const SoftcapConsts<acc_t>& C,
                              Vectorized<acc_t>* dz) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    // every lane |x| <= lim (a NaN lane counts as small: NaN rows stop before)
#if defined(CPU_CAPABILITY_AVX2)
    const bool small = _mm256_movemask_ps(_mm256_cmp_ps(x.abs(), C.lim, _CMP_GT_OQ)) == 0;
#else
    const bool small = (x.abs() > C.lim).zero_mask() == (1 << Vec::size()) - 1;
#endif
    if (C.poly && small) {
      const Vec x2 = x * x;
      Vec p = at::vec::fmadd(C.q[kSoftcapPolyTerms - 1], x2, C.q[kSoftcapPolyTerms - 2]);
      for (int k = kSoftcapPolyTerms - 3; k >= 0; --k) p = at::vec::fmadd(p, x2, C.q[k]);
      const Vec z = x * p;
      if (dz) *dz = one_minus_sq(z * C.inv_cap);
      return z;
    }
  }
  return softcap_vec<acc_t>(x, C.two_inv, C.cap, dz);
}

// cap * tanh(x / cap) of one value, by softcap_any (so the row max and the target's capped
// logit are the values pass 2 computes, bit for bit unless x's vector there mixes small and
// large logits: then within the two formulas' few ulp).
template <typename acc_t>
acc_t softcap_scalar(acc_t x, acc_t cap) {
  using Vec = Vectorized<acc_t>;
  alignas(64) acc_t buf[Vec::size()];
  softcap_any<acc_t>(Vec(x), SoftcapConsts<acc_t>(cap), nullptr).store(buf);
  return buf[0];
}

// Pass 2 of a softcap row: from the raw logits x (accumulation type), with m the capped row max,
// writes e_c = exp(z_c - m) to e (may alias x) and dz_c = 1 - t_c^2 to dz; returns
// s = sum e and S = sum w_c (z_c - m) (w = 1 when w == nullptr), folded into double per block
// as exp_pass does.
template <typename acc_t>
void softcap_exp_pass(const acc_t* x, acc_t* e, acc_t* dz, const acc_t* w, int64_t K, acc_t m, acc_t cap,
                      double& s_out, double& S_out, RowPrefetch pf = {}) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m);
  const int64_t line_mask = pf.next ? 64 / pf.elem - 1 : -1;
  const SoftcapConsts<acc_t> C(cap);
  // e below e^-kExpArg (caps above 43 in float) is taken as e^-kExpArg: at most K * 4.5e-38
  // added to s >= 1
  const Vec vlo(-kExpArg<acc_t>);
  double s = 0, S = 0;
  // weighted or not as a compile-time constant: no test of w inside the loop
  auto blocks = [&](auto weighted) {
    constexpr bool kW = decltype(weighted)::value;
    for (int64_t b0 = 0; b0 < K; b0 += kExpBlock) {
      const int64_t b1 = std::min<int64_t>(K, b0 + kExpBlock);
      Vec vs(0), vS(0);
      int64_t c = b0;
      for (; c + V <= b1; c += V) {
        prefetch_next_row(pf, line_mask, c);
        Vec g;
        const Vec d = softcap_any<acc_t>(Vec::loadu(x + c), C, &g) - vm;  // z - m, in [-2 cap, 0]
        const Vec ex = exp_clamped(at::vec::clamp_min(d, vlo));  // d is never NaN (NaN rows stop before)
        vs = vs + ex;
        if constexpr (kW) {
          vS = at::vec::fmadd(Vec::loadu(w + c), d, vS);
        } else {
          vS = vS + d;
        }
        ex.store(e + c);
        g.store(dz + c);
      }
      if (c < b1) {
        const int64_t n = b1 - c;
        Vec g;
        const Vec d = Vec::set(Vec(0), softcap_any<acc_t>(Vec::loadu(x + c, n), C, &g) - vm, n);
        const Vec ex = Vec::set(Vec(0), exp_clamped(at::vec::clamp_min(d, vlo)), n);
        vs = vs + ex;
        if constexpr (kW) {
          vS = at::vec::fmadd(Vec::loadu(w + c, n), d, vS);
        } else {
          vS = vS + d;
        }
        ex.store(e + c, n);
        g.store(dz + c, n);
      }
      s += vsum(vs);
      S += vsum(vS);
    }
  };
  if (w) {
    blocks(std::true_type{});
  } else {
    blocks(std::false_type{});
  }
  s_out = s;
  S_out = S;
}

// Pass 3 of a softcap row, one block: g = (e * kp - kw * w_c) * dz in place (w_c = 1 when
// w == nullptr).
template <typename acc_t>
void softcap_grad_pass(acc_t* g, const acc_t* dz, const acc_t* w, int64_t n, acc_t kp, acc_t kw) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vkp(kp), vkw(kw);
  int64_t c = 0;
  for (; c + V <= n; c += V) {
    const Vec wc = w ? Vec::loadu(w + c) : Vec(1);
    ((Vec::loadu(g + c) * vkp - vkw * wc) * Vec::loadu(dz + c)).store(g + c);
  }
  if (c < n) {
    const int64_t r = n - c;
    const Vec wc = w ? Vec::loadu(w + c, r) : Vec(1);
    ((Vec::loadu(g + c, r) * vkp - vkw * wc) * Vec::loadu(dz + c, r)).store(g + c, r);
  }
}

constexpr int64_t kStoreBlock = 2048;

inline int64_t grain_for(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

template <typename scalar_t>
void ce_rows_softcap(const CeRowsArgs& A);

// Class-index targets.
template <typename scalar_t>
void ce_rows(const CeRowsArgs& A) {
  if (A.softcap > 0) return ce_rows_softcap<scalar_t>(A);
  using acc_t = acc_for<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t K = A.K;
  const auto sm = smoothing_coefs<acc_t>(A.eps, K, A.mode);
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  scalar_t* grad = static_cast<scalar_t*>(A.grad);
  acc_t* loss = static_cast<acc_t*>(A.loss_rows);
  const bool weighted = A.weight != nullptr;
  const std::vector<acc_t> wacc = weights_in_acc<acc_t>(A.weight, K);
  const acc_t* w = weighted ? wacc.data() : nullptr;
  const acc_t W = weighted ? acc_t(A.W) : acc_t(K);
  const acc_t scale = acc_t(A.scale);

  const acc_t zc = acc_t(A.z_loss);
  acc_t* lse_out = static_cast<acc_t*>(A.lse_rows);

  at::parallel_for(0, A.N, grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(K);  // the row's e, then g: stays in L2
    acc_t* buf = scratch.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = A.target[r];
      scalar_t* grow = grad ? grad + r * K : nullptr;
      if (y == A.ignore_index) {
        loss[r] = 0;
        if (lse_out) lse_out[r] = 0;
        if (grow) std::fill(grow, grow + K, scalar_t(0));
        continue;
      }
      const acc_t* z;
      acc_t m;
      if constexpr (kDirect) {
        z = in + r * A.in_row_stride;
        m = row_max(z, K);
      } else {
        m = convert_and_max(in + r * A.in_row_stride, buf, K);
        z = buf;
      }
      const acc_t zy = z[y];
      const acc_t wy = weighted ? w[y] : acc_t(1);
      if (!row_max_is_finite(m)) {
        loss[r] = NAN;
        if (lse_out) lse_out[r] = NAN;
        if (grow) std::fill(grow, grow + K, scalar_t(NAN));
        continue;
      }
      double s, S;
      const RowPrefetch pf = next_row_prefetch(A, in, r, end);
      exp_pass<acc_t>(z, grow ? buf : nullptr, w, K, m, s, S, pf);  // e may overwrite z (16-bit)
      const acc_t log_s = lse_log(acc_t(s));
      const acc_t lse = m + log_s;
      loss[r] = ce_row_loss<acc_t>(log_s, zy - m, acc_t(S), sm, wy, W);
      if (zc != acc_t(0)) loss[r] += z_loss_row<acc_t>(lse, zc);
      if (lse_out) lse_out[r] = lse;
      if (!grow) continue;
      const acc_t sc = A.row_scale ? acc_t(A.row_scale[r]) : scale;
      const acc_t inv_s = acc_t(1) / acc_t(s);
      auto gc = ce_grad_coefs<acc_t>(inv_s, sm, sc, weighted, wy, W);
      if (zc != acc_t(0)) gc.kp += z_loss_kp<acc_t>(lse, inv_s, zc, sc);
      for (int64_t b0 = 0; b0 < K; b0 += kStoreBlock) {  // L1-sized blocks: compute, then stream out
        const int64_t n = std::min<int64_t>(kStoreBlock, K - b0);
        grad_pass<acc_t>(buf + b0, w ? w + b0 : nullptr, n, gc.kp, gc.kw);
        if (y >= b0 && y < b0 + n) buf[y] -= gc.ky;  // in acc_t, before the single rounding
        store_out<scalar_t, acc_t>(grow + b0, buf + b0, n);
      }
    }
    store_fence();
  });
}

// Class-index targets with softcap > 0 (and any z_loss): the three passes described above
// ce_rows' softcap helpers. 2-d rows only.
template <typename scalar_t>
void ce_rows_softcap(const CeRowsArgs& A) {
  using acc_t = acc_for<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t K = A.K;
  const auto sm = smoothing_coefs<acc_t>(A.eps, K, A.mode);
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  scalar_t* grad = static_cast<scalar_t*>(A.grad);
  acc_t* loss = static_cast<acc_t*>(A.loss_rows);
  acc_t* lse_out = static_cast<acc_t*>(A.lse_rows);
  const bool weighted = A.weight != nullptr;
  const std::vector<acc_t> wacc = weights_in_acc<acc_t>(A.weight, K);
  const acc_t* w = weighted ? wacc.data() : nullptr;
  const acc_t W = weighted ? acc_t(A.W) : acc_t(K);
  const acc_t scale = acc_t(A.scale);
  const acc_t cap = acc_t(A.softcap), zc = acc_t(A.z_loss);

  at::parallel_for(0, A.N, grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(K), dzbuf(K);  // x (16-bit input), then e, then g; and dz/dx
    acc_t* buf = scratch.data();
    acc_t* dz = dzbuf.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = A.target[r];
      scalar_t* grow = grad ? grad + r * K : nullptr;
      if (y == A.ignore_index) {
        loss[r] = 0;
        if (lse_out) lse_out[r] = 0;
        if (grow) std::fill(grow, grow + K, scalar_t(0));
        continue;
      }
      const acc_t* x;
      acc_t mx;
      if constexpr (kDirect) {
        x = in + r * A.in_row_stride;
        mx = row_max(x, K);
      } else {
        mx = convert_and_max(in + r * A.in_row_stride, buf, K);
        x = buf;
      }
      if (mx != mx) {  // a NaN logit; +-inf logits are capped to +-cap, so finite
        loss[r] = NAN;
        if (lse_out) lse_out[r] = NAN;
        if (grow) std::fill(grow, grow + K, scalar_t(NAN));
        continue;
      }
      const acc_t m = softcap_scalar<acc_t>(mx, cap);
      const acc_t zy = softcap_scalar<acc_t>(x[y], cap);
      const acc_t wy = weighted ? w[y] : acc_t(1);
      double s, S;
      softcap_exp_pass<acc_t>(x, buf, dz, w, K, m, cap, s, S, next_row_prefetch(A, in, r, end));  // e may overwrite x
      const acc_t log_s = lse_log(acc_t(s));
      const acc_t lse = m + log_s;
      loss[r] = ce_row_loss<acc_t>(log_s, zy - m, acc_t(S), sm, wy, W);
      if (zc != acc_t(0)) loss[r] += z_loss_row<acc_t>(lse, zc);
      if (lse_out) lse_out[r] = lse;
      if (!grow) continue;
      const acc_t sc = A.row_scale ? acc_t(A.row_scale[r]) : scale;
      const acc_t inv_s = acc_t(1) / acc_t(s);
      auto gc = ce_grad_coefs<acc_t>(inv_s, sm, sc, weighted, wy, W);
      if (zc != acc_t(0)) gc.kp += z_loss_kp<acc_t>(lse, inv_s, zc, sc);
      for (int64_t b0 = 0; b0 < K; b0 += kStoreBlock) {
        const int64_t n = std::min<int64_t>(kStoreBlock, K - b0);
        softcap_grad_pass<acc_t>(buf + b0, dz + b0, w ? w + b0 : nullptr, n, gc.kp, gc.kw);
        if (y >= b0 && y < b0 + n) buf[y] -= gc.ky * dz[y];
        store_out<scalar_t, acc_t>(grow + b0, buf + b0, n);
      }
    }
    store_fence();
  });
}

// A full vector's worth of scalar_t as the accumulation type.
template <typename scalar_t, typename acc_t = acc_for<scalar_t>>
C10_ALWAYS_INLINE Vectorized<acc_t> load_full(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // the 8 values in both 128-bit lanes (a load-port broadcast), then one byte shuffle puts
      // value l in the high half of lane l's word and zeros in the low half: no shift
      const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256i idx = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,
                                           -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
      return Vectorized<float>(_mm256_castsi256_ps(_mm256_shuffle_epi8(x, idx)));
    }
#endif
    Vectorized<float> out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
}

// `lanes` consecutive values of scalar_t to / from one accumulation-type vector, converting
// 16-bit types with vector instructions (the spatial kernel's position tiles).
// (Always inlined: a call per class row of a tile, through the PLT, cost 40% of the 16-bit
// gradient's time when the compiler stopped inlining store_lanes.)
template <typename scalar_t, typename acc_t = acc_for<scalar_t>>
C10_ALWAYS_INLINE Vectorized<acc_t> load_lanes(const scalar_t* p, int64_t lanes) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p, lanes);
  } else {
    if (lanes == Vectorized<float>::size()) return load_full(p);  // the common case: a full tile row
    alignas(64) float buf[Vectorized<float>::size()] = {};
    for (int64_t l = 0; l < lanes; ++l) buf[l] = static_cast<float>(p[l]);
    return Vectorized<float>::loadu(buf);
  }
}

template <typename scalar_t, typename acc_t = acc_for<scalar_t>>
C10_ALWAYS_INLINE void store_lanes(scalar_t* p, const Vectorized<acc_t>& v, int64_t lanes) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, lanes);
  } else {
    const Vectorized<scalar_t> h = at::vec::convert_from_float<scalar_t>(v, Vectorized<float>(0));
#if defined(CPU_CAPABILITY_AVX2)
    if (lanes == Vectorized<float>::size()) {  // the low 8 of 16 lanes: one 128-bit store
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(__m256i(h)));
      return;
    }
#endif
    alignas(64) scalar_t buf[Vectorized<scalar_t>::size()];
    h.store(buf);
    for (int64_t l = 0; l < lanes; ++l) p[l] = buf[l];
  }
}

// The spatial kernel's software prefetch: 256 bytes (4 cache lines) ahead of a tile row.
template <typename scalar_t>
inline void spatial_prefetch(const scalar_t* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + 256, 0, 3);
}

// The running max of a spatial tile. kFast (AVX2 float): maxps, which may drop a NaN (it
// returns its second operand when either is NaN), for callers that detect NaN logits another
// way; else NaN-propagating (two more instructions).
template <bool kFast, typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> tile_max(const Vectorized<acc_t>& m, const Vectorized<acc_t>& z) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kFast && std::is_same_v<acc_t, float>) return Vectorized<acc_t>(_mm256_max_ps(m, z));
#endif
  return at::vec::maximum(m, z);
}

// One tile's targets: each lane's class as a float (exact below 2^24 classes; -1 for ignored
// and padding lanes), its logit z_y (in the accumulation type) and its weight w_y (1 when
// unweighted). AVX2 float accumulation, full tile, C * S < 2^31: vector compares and gathers, so
// the lanes' values never go through memory lane by lane (a store-forwarding stall per tile);
// returns false when z_y is left to the caller (16-bit input): it picks z_y out of the converted
// tile. Else lane by lane.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE bool tile_targets(const int64_t* tgt, int64_t lanes, int64_t ignore_index, const scalar_t* base,
                                    int64_t S, bool gather_ok, const acc_t* w,
                                    Vectorized<acc_t>& cls, Vectorized<acc_t>& zy, Vectorized<acc_t>& wy) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (lanes == V && gather_ok) {
      const __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tgt));
      const __m256i t1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tgt + 4));
      const __m256i vii = _mm256_set1_epi64x(ignore_index);
      // the low 32 bits of the 8 targets (and of the 8 ignore masks), in lane order
      const __m256i lo = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
      const __m256i y32 = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(t0, lo),
                                             _mm256_permutevar8x32_epi32(t1, lo), 0xF0);
      const __m256i ign = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(_mm256_cmpeq_epi64(t0, vii), lo),
                                             _mm256_permutevar8x32_epi32(_mm256_cmpeq_epi64(t1, vii), lo), 0xF0);
      const __m256 ignf = _mm256_castsi256_ps(ign);
      cls = Vec(_mm256_blendv_ps(_mm256_cvtepi32_ps(y32), _mm256_set1_ps(-1.f), ignf));
      // ignored lanes read class 0 of their own position (in bounds), never used
      const __m256i ycl = _mm256_andnot_si256(ign, y32);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i idx = _mm256_add_epi32(_mm256_mullo_epi32(ycl, _mm256_set1_epi32(int32_t(S))), lane);
      wy = w ? Vec(_mm256_i32gather_ps(w, ycl, 4)) : Vec(1);
      if constexpr (std::is_same_v<scalar_t, float>) {
        zy = Vec(_mm256_i32gather_ps(base, idx, 4));
        return true;
      }
      zy = Vec(0);
      return false;
    }
  }
#endif
  alignas(64) acc_t lane_cls[V], lane_zy[V], lane_wy[V];
  for (int64_t l = 0; l < V; ++l) {
    const int64_t y = l < lanes ? tgt[l] : ignore_index;
    const bool kept = y != ignore_index;
    lane_cls[l] = kept ? acc_t(y) : acc_t(-1);
    lane_zy[l] = kept ? static_cast<acc_t>(base[y * S + l]) : acc_t(0);
    lane_wy[l] = kept && w ? w[y] : acc_t(1);
  }
  cls = Vec::loadu(lane_cls);
  zy = Vec::loadu(lane_zy);
  wy = Vec::loadu(lane_wy);
  return true;
}

// K-dimensional input (N, C, S): V positions at a time, one vector lane per position. With a
// gradient (or a partial tile) the C x V tile of logits is converted into a float tile once,
// then max, exp and sums, and the gradient run over the tile across classes; the forward of a
// full tile reads (and converts) the logits in both passes instead. The loss and the
// gradient's coefficients of all V lanes at once in between. kGrad, kWeighted: compile-time,
// so no test of either inside the class loops.
template <typename scalar_t, bool kGrad, bool kWeighted>
void ce_spatial_impl(const CeRowsArgs& A) {
  using acc_t = acc_for<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = A.K, S = A.S, samples = A.N / A.S;
  const auto sm = smoothing_coefs<acc_t>(A.eps, C, A.mode);
  const std::vector<acc_t> wacc = weights_in_acc<acc_t>(A.weight, C);
  const int64_t chunks = (S + V - 1) / V;

  at::parallel_for(0, samples * chunks, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    // everything the loops read, as locals: vector stores may alias anything (__m256 is
    // may_alias), so values read through the lambda's references would be loaded again after
    // every store
    const int64_t C_ = C, S_ = S, chunks_ = chunks, ii = A.ignore_index;
    const scalar_t* in = static_cast<const scalar_t*>(A.input);
    scalar_t* grad = static_cast<scalar_t*>(A.grad);
    acc_t* loss = static_cast<acc_t*>(A.loss_rows);
    const int64_t* target = A.target;
    const double* row_scale = A.row_scale;
    const acc_t* w = kWeighted ? wacc.data() : nullptr;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const Vec vnan(acc_t(NAN)), vzero(0), vone(1), va(sm.a), vb(sm.b), vsc0(acc_t(A.scale)), vninf(ninf),
        vinf(-ninf), vW(kWeighted ? acc_t(A.W) : acc_t(C_));
    const bool smooth = sm.a != acc_t(0);
    // the gathers' indices y * S + lane are int32
    const bool gather_ok = C_ * S_ < (int64_t(1) << 31) - V;
    std::vector<acc_t> tile(C_ * V);
    acc_t* tl = tile.data();
    alignas(64) acc_t lane_sc[V];
    // forward of a full tile: pass 2 reads (and converts) the logits again where pass 1 read
    // them (L1) instead of through a tile copy
    constexpr bool kDirect = !kGrad;
    // The lanes whose max is finite.
    auto tile_finite = [&](const Vec& vm, const Vec& vS) LABELSMOOTH_LAMBDA_INLINE {
      Vec finite = (vm > vninf) & (vm < vinf);
      // unweighted: a NaN logit that tile_max let through made S = sum (z - m) NaN (never
      // otherwise: z - m <= 0 with m finite, so no inf - inf)
      if constexpr (!kWeighted) finite = finite & (vS == vS);
      return finite;
    };
    // The loss of V lanes from their sums (the formulas of ce_row_loss and ce_grad_coefs,
    // operation for operation); 0 in lanes without a class target. z_y - m from z_y itself (not
    // log(e_y), which loses precision for tiny e_y).
    auto tile_loss = [&](const Vec& vm, const Vec& vs, const Vec& vS, const Vec& vzy, const Vec& vcls,
                         const Vec& vwy) LABELSMOOTH_LAMBDA_INLINE {
      const Vec finite = tile_finite(vm, vS);
      const Vec log_s = log_ge1(vs);  // padding lanes (s = 0): any value, never stored
      Vec lv = (vb * vwy) * (log_s - (vzy - vm));
      if (smooth) lv = lv + va * (vW * log_s - vS);
      lv = Vec::blendv(vnan, lv, finite);  // log_softmax's inf - inf
      return Vec::blendv(vzero, lv, vcls >= vzero);
    };
    struct Held {
      Vec m, s, S, zy, cls, wy;
      acc_t* out;
      int64_t lanes;
      bool valid;
    } held{};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks_, s0 = (task % chunks_) * V;
      const int64_t lanes = std::min<int64_t>(V, S_ - s0);
      const scalar_t* base = in + n * C_ * S_ + s0;
      Vec vcls, vzy, vwy;
      const bool zy_known =
          tile_targets<scalar_t, acc_t>(target + n * S_ + s0, lanes, ii, base, S_, gather_ok, w, vcls, vzy, vwy);
      // 1. max (and the tile, when not direct). Each class row of the tile is a short piece of
      // a different stream (stride S): no hardware prefetcher follows C streams, so the lines a
      // few tiles ahead are asked for here. Even and odd classes go to two accumulators (max,
      // z_y, and the sums below): one chain's latency per class was the loop's limit.
      // 2. e = exp(z - m) (kept in the tile for the gradient), sums.
      // Both passes compiled twice (direct or not), so no test of it inside the class loops.
      Vec vm, vs, vS;
      auto passes = [&](auto direct_c) LABELSMOOTH_LAMBDA_INLINE {
        constexpr bool dir = decltype(direct_c)::value;
        auto logits = [&](int64_t c) LABELSMOOTH_LAMBDA_INLINE {
          spatial_prefetch(base + c * S_);
          if constexpr (dir) {
            return load_full(base + c * S_);
          } else {
            Vec z = load_lanes(base + c * S_, lanes);
            if (lanes < V) z = Vec::set(vninf, z, lanes);
            z.store(tl + c * V);
            return z;
          }
        };
        // z_y not gathered (16-bit input): from the converted logits (the value tile_targets'
        // scalar path reads), bit for bit: the lanes of class c (vc: c in every lane)
        constexpr bool kPick = !std::is_same_v<scalar_t, acc_t>;
        const bool pick = kPick && !zy_known;
        Vec m0(ninf), m1(ninf), zy0(0), zy1(0), vc(0);
        const Vec vtwo(2);
        int64_t c = 0;
        for (; c + 2 <= C_; c += 2) {
          const Vec z0 = logits(c), z1 = logits(c + 1);
          m0 = tile_max<!kWeighted>(m0, z0);
          m1 = tile_max<!kWeighted>(m1, z1);
          if (kPick && pick) {
            zy0 = zy0 | (z0 & (vcls == vc));
            zy1 = zy1 | (z1 & (vcls == vc + vone));
            vc = vc + vtwo;
          }
        }
        if (c < C_) {
          const Vec z0 = logits(c);
          m0 = tile_max<!kWeighted>(m0, z0);
          if (kPick && pick) zy0 = zy0 | (z0 & (vcls == vc));
        }
        vm = tile_max<!kWeighted>(m0, m1);
        if (kPick && pick) vzy = zy0 | zy1;
        Vec s0(0), s1(0), S0(0), S1(0);
        auto exps = [&](int64_t c, Vec& s_acc, Vec& S_acc) LABELSMOOTH_LAMBDA_INLINE {
          const Vec d = (dir ? load_full(base + c * S_) : Vec::loadu(tl + c * V)) - vm;
          const Vec e = exp_row(d);  // padding lanes: -inf - m, exp 0
          s_acc = s_acc + e;
          if constexpr (kWeighted) {
            S_acc = at::vec::fmadd(Vec(w[c]), d, S_acc);
          } else {
            S_acc = S_acc + d;
          }
          if constexpr (kGrad) e.store(tl + c * V);
        };
        // backwards: the class rows pass 1 read last are still in L1 when their 64-byte lines
        // share an L1 set (a row stride of a multiple of 4 KiB)
        for (c = C_ - 1; c >= 1; c -= 2) {
          exps(c, s0, S0);
          exps(c - 1, s1, S1);
        }
        if (c == 0) exps(0, s0, S0);
        vs = s0 + s1;
        vS = S0 + S1;
      };
      if (kDirect && lanes == V) {
        passes(std::integral_constant<bool, kDirect>{});
      } else {
        passes(std::false_type{});
      }
      // 3. every lane's loss and gradient coefficients at once (tile_loss). The forward keeps
      // one tile's sums until the next tile's are ready, then evaluates both tiles' losses
      // together: two independent chains (the log's polynomial) in flight instead of one.
      if constexpr (!kGrad) {
        if (!held.valid) {
          held = {vm, vs, vS, vzy, vcls, vwy, loss + n * S_ + s0, lanes, true};
          continue;
        }
        const Vec l0 = tile_loss(held.m, held.s, held.S, held.zy, held.cls, held.wy);
        const Vec l1 = tile_loss(vm, vs, vS, vzy, vcls, vwy);
        l0.store(held.out, held.lanes);
        l1.store(loss + n * S_ + s0, lanes);
        held.valid = false;
      } else {
        tile_loss(vm, vs, vS, vzy, vcls, vwy).store(loss + n * S_ + s0, lanes);
        const Vec finite = tile_finite(vm, vS);
        const Vec valid = vcls >= vzero;
        Vec vsc = vsc0;
        if (row_scale) {
          for (int64_t l = 0; l < V; ++l) lane_sc[l] = l < lanes ? acc_t(row_scale[n * S_ + s0 + l]) : acc_t(0);
          vsc = Vec::loadu(lane_sc);
        }
        const Vec inv_s = vone / vs;
        const Vec vkp = kWeighted ? inv_s * (vb * vwy + va * vW) * vsc : inv_s * vsc;
        const Vec vkw = va * vsc, vky = vb * vwy * vsc;
        // keep: 0 -> the gradient is exactly 0 (ignored or padding, even for NaN logits); NaN
        // -> NaN (a non-finite max); 1 -> computed
        const Vec vkeep = Vec::blendv(vzero, Vec::blendv(vnan, vone, finite), valid);
        const Vec keep0 = vkeep == vzero;
        scalar_t* gbase = grad + n * C_ * S_ + s0;
        for (int64_t c = 0; c < C_; ++c) {
          const Vec e = Vec::loadu(tl + c * V);
          Vec g = e * vkp - vkw * (kWeighted ? Vec(w[c]) : vone);
          g = g - Vec::blendv(vzero, vky, vcls == Vec(acc_t(c)));
          g = Vec::blendv(g * vkeep, vzero, keep0);
          store_lanes(gbase + c * S_, g, lanes);
        }
      }
    }
    if (held.valid) tile_loss(held.m, held.s, held.S, held.zy, held.cls, held.wy).store(held.out, held.lanes);
  });
}

template <typename scalar_t>
void ce_spatial(const CeRowsArgs& A) {
  const bool weighted = A.weight != nullptr;
  if (A.grad) {
    if (weighted) return ce_spatial_impl<scalar_t, true, true>(A);
    return ce_spatial_impl<scalar_t, true, false>(A);
  }
  if (weighted) return ce_spatial_impl<scalar_t, false, true>(A);
  return ce_spatial_impl<scalar_t, false, false>(A);
}

// y = f(x) elementwise, a vector at a time (the tests' view of the kernels' exp and log).
template <typename F>
void map_floats(const float* x, float* y, int64_t n, F f) {
  using Vec = Vectorized<float>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) f(Vec::loadu(x + i)).store(y + i);
  if (i < n) f(Vec::loadu(x + i, n - i)).store(y + i, n - i);
}

// The number of targets other than ignore_index, or -1 when one is out of range (0..K-1):
// branch-free, so the compiler vectorises it (4 targets per AVX2 compare).
inline int64_t count_kept_targets(const int64_t* t, int64_t N, int64_t K, int64_t ignore_index) {
  int64_t kept = 0, bad = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t y = t[r];
    const int64_t k = y != ignore_index;
    kept += k;
    bad |= k & ((y < 0) | (y >= K));
  }
  return bad ? -1 : kept;
}

template <typename scalar_t>
void prob_rows_ext(const ProbRowsArgs& A);

// Probability targets (same shape as the input; any row strides, unit class stride).
template <typename scalar_t>
void prob_rows(const ProbRowsArgs& A) {
  if (A.softcap > 0 || A.z_loss != 0 || A.lse_rows || A.row_scale) return prob_rows_ext<scalar_t>(A);
  using acc_t = acc_for<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t K = A.K;
  const auto sm = smoothing_coefs<acc_t>(A.eps, K, A.mode);
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  const scalar_t* tg = static_cast<const scalar_t*>(A.target);
  const acc_t* tg_acc = static_cast<const acc_t*>(A.target);  // when A.target_is_acc
  scalar_t* grad = static_cast<scalar_t*>(A.grad);
  acc_t* loss = static_cast<acc_t*>(A.loss_rows);
  const bool weighted = A.weight != nullptr;
  const std::vector<acc_t> wacc = weights_in_acc<acc_t>(A.weight, K);
  const acc_t scale = acc_t(A.scale);
  const Vec va(sm.a), vb(sm.b);

  at::parallel_for(0, A.N, grain_for(K), [&](int64_t begin, int64_t end) {
    // z (then e, then g), and wq = w_c * q_c, both in the accumulation type.
    std::vector<acc_t> zbuf(K), wq(K);
    for (int64_t r = begin; r < end; ++r) {
      to_acc(in + r * A.in_row_stride, zbuf.data(), K);
      if (A.target_is_acc) {
        to_acc(tg_acc + r * A.t_row_stride, wq.data(), K);
      } else {
        to_acc(tg + r * A.t_row_stride, wq.data(), K);
      }
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
        store_out<scalar_t, acc_t>(grow, z, K);
      }
    }
    store_fence();
  });
}

// Probability targets with the large-vocabulary options (softcap, z_loss, the lse output) or
// per-row gradient multipliers (the recomputing backward): prob_rows' passes, with the softcap
// passes of ce_rows_softcap when capped, and z-loss's 2 c lse / s joining the e coefficient.
//   loss = log_s Q - Sq + c lse^2,   g_c = (e_c (Q + 2 c lse) / s - w_c q_c) * scale [* dz/dx].
template <typename scalar_t>
void prob_rows_ext(const ProbRowsArgs& A) {
  using acc_t = acc_for<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t K = A.K;
  const auto sm = smoothing_coefs<acc_t>(A.eps, K, A.mode);
  const scalar_t* in = static_cast<const scalar_t*>(A.input);
  const scalar_t* tg = static_cast<const scalar_t*>(A.target);
  const acc_t* tg_acc = static_cast<const acc_t*>(A.target);  // when A.target_is_acc
  scalar_t* grad = static_cast<scalar_t*>(A.grad);
  acc_t* loss = static_cast<acc_t*>(A.loss_rows);
  acc_t* lse_out = static_cast<acc_t*>(A.lse_rows);
  const bool weighted = A.weight != nullptr;
  const std::vector<acc_t> wacc = weights_in_acc<acc_t>(A.weight, K);
  const acc_t scale = acc_t(A.scale);
  const Vec va(sm.a), vb(sm.b);
  const bool capped = A.softcap > 0;
  const acc_t cap = acc_t(A.softcap), zc = acc_t(A.z_loss);

  at::parallel_for(0, A.N, grain_for(K), [&](int64_t begin, int64_t end) {
    // x (then e, then g), wq = w_c * q_c, and (softcap) dz/dx, in the accumulation type.
    std::vector<acc_t> zbuf(K), wq(K), dzbuf(capped ? K : 0);
    acc_t* z = zbuf.data();
    for (int64_t r = begin; r < end; ++r) {
      to_acc(in + r * A.in_row_stride, z, K);  // the whole row before grad (may be input) is written
      if (A.target_is_acc) {
        to_acc(tg_acc + r * A.t_row_stride, wq.data(), K);
      } else {
        to_acc(tg + r * A.t_row_stride, wq.data(), K);
      }
      int64_t c = 0;
      for (; c + V <= K; c += V) {
        Vec q = at::vec::fmadd(vb, Vec::loadu(wq.data() + c), va);
        if (weighted) q = q * Vec::loadu(wacc.data() + c);
        q.store(wq.data() + c);
      }
      for (; c < K; ++c) wq[c] = prob_q<acc_t>(wq[c], sm) * (weighted ? wacc[c] : acc_t(1));
      double Q = 0;
      for (int64_t i = 0; i < K; ++i) Q += wq[i];
      const acc_t mx = row_max(z, K);
      scalar_t* grow = grad ? grad + r * K : nullptr;
      // softcap: +-inf logits are capped (finite), only NaN poisons the row
      if (capped ? mx != mx : !row_max_is_finite(mx)) {
        loss[r] = NAN;
        if (lse_out) lse_out[r] = NAN;
        if (grow) std::fill(grow, grow + K, scalar_t(NAN));
        continue;
      }
      const acc_t m = capped ? softcap_scalar<acc_t>(mx, cap) : mx;
      double s, Sq;
      if (capped) {
        softcap_exp_pass<acc_t>(z, z, dzbuf.data(), wq.data(), K, m, cap, s, Sq);
      } else {
        exp_pass<acc_t>(z, z, wq.data(), K, m, s, Sq);
      }
      const acc_t log_s = lse_log(acc_t(s));
      const acc_t lse = m + log_s;
      loss[r] = prob_row_loss<acc_t>(log_s, acc_t(Q), acc_t(Sq));
      if (zc != acc_t(0)) loss[r] += z_loss_row<acc_t>(lse, zc);
      if (lse_out) lse_out[r] = lse;
      if (!grow) continue;
      const acc_t sc = A.row_scale ? acc_t(A.row_scale[r]) : scale;
      const acc_t inv_s = acc_t(1) / acc_t(s);
      acc_t kp = acc_t(Q) * inv_s * sc;
      if (zc != acc_t(0)) kp += z_loss_kp<acc_t>(lse, inv_s, zc, sc);
      for (int64_t b0 = 0; b0 < K; b0 += kStoreBlock) {
        const int64_t n = std::min<int64_t>(kStoreBlock, K - b0);
        if (capped) {
          softcap_grad_pass<acc_t>(z + b0, dzbuf.data() + b0, wq.data() + b0, n, kp, sc);
        } else {
          grad_pass<acc_t>(z + b0, wq.data() + b0, n, kp, sc);
        }
        store_out<scalar_t, acc_t>(grow + b0, z + b0, n);
      }
    }
    store_fence();
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
struct SpatialRun {
  static void run(const CeRowsArgs& a) { ce_spatial<T>(a); }
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
  void ce_spatial_##cap(ScalarKind k, const CeRowsArgs& a) {                               \
    CPU_CAPABILITY::dispatch<CPU_CAPABILITY::SpatialRun>(k, a);                            \
  }                                                                                        \
  void prob_rows_##cap(ScalarKind k, const ProbRowsArgs& a) {                              \
    CPU_CAPABILITY::dispatch<CPU_CAPABILITY::ProbRun>(k, a);                               \
  }                                                                                        \
  void exp_row_##cap(const float* x, float* y, int64_t n) {                                \
    CPU_CAPABILITY::map_floats(x, y, n, [](const auto& v) { return CPU_CAPABILITY::exp_row(v); }); \
  }                                                                                        \
  void log_row_##cap(const float* x, float* y, int64_t n) {                                 \
    CPU_CAPABILITY::map_floats(x, y, n, [](const auto& v) { return CPU_CAPABILITY::log_ge1(v); }); \
  }                                                                                        \
  int64_t count_kept_##cap(const int64_t* t, int64_t N, int64_t K, int64_t ignore_index) { \
    return CPU_CAPABILITY::count_kept_targets(t, N, K, ignore_index);                     \
  }                                                                                        \
  KernelConstants constants_##cap() {                                                     \
    using namespace CPU_CAPABILITY;                                                        \
    return {kStoreBlock, kExpBlock, kStreamMinBytes,                                       \
            int64_t(Vectorized<float>::size()), int64_t(Vectorized<double>::size()),       \
            int64_t(Vectorized<c10::BFloat16>::size()), int64_t(Vectorized<c10::Half>::size())}; \
  }                                                                                        \
  }                                                                                        \
  }
