// The CUDA kernels (csrc/cuda, the source nvcc compiles) run under the SIMT emulation, built by
// CMake with AddressSanitizer + UndefinedBehaviorSanitizer (ctest: simt_asan), so an
// out-of-bounds read or write of a kernel stops this test the way compute-sanitizer's memcheck
// would. Checks: the emulator's deliberately broken kernels are caught and their correct twins
// pass; the CE kernels (every row layout the dispatch picks, aligned and misaligned rows,
// ignored / out-of-range targets, weights, a -inf row) against a float64 reference; the BCE and
// scale kernels.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "../../csrc/cuda/dispatch.cuh"
#include "../../csrc/cuda/simt/simt_selftest.h"

using labelsmooth_ext::Smoothing;
using labelsmooth_ext::cuda::acc_of;
using labelsmooth_ext::cuda::CeParams;
using simt::memory::Buffer;

static int failures = 0;

#define EXPECT(cond, ...)                      \
  do {                                         \
    if (!(cond)) {                             \
      ++failures;                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                \
      std::printf("\n");                       \
    }                                          \
  } while (0)

static void selftests() {
  const char* must_raise[][2] = {
      {"rows_4_lanes_partial", "has exited"},   {"rows_8_lanes_partial", "has exited"},
      {"rows_16_lanes_partial", "has exited"},  {"race_no_barrier", "depends on the schedule"},
      {"race_blocks", "depends on the schedule"}, {"partial_syncthreads", "only part of the block"},
      {"exit_before_syncthreads", "only part of the block"}, {"caller_not_in_mask", "does not name it"},
      {"source_not_in_mask", "which the mask does not name"}, {"misaligned_pack", "misaligned 16-byte"},
      {"oob_write", "out-of-bounds write"},
  };
  for (auto& c : must_raise) {
#ifdef LSE_SIMT_MEM_ASAN
    // under ASan the guards are poisoned: the write itself stops the process (as it should);
    // the guard check is shown by the uninstrumented build (tests/test_simt_emulation.py)
    if (std::string(c[0]) == "oob_write") continue;
#endif
    std::string got;
    try {
      got = "returned " + labelsmooth_ext::simt_selftest::run(c[0]);
    } catch (const c10::Error& e) {
      got = e.what_without_backtrace();
    }
    EXPECT(got.find(c[1]) != std::string::npos, "selftest %s: expected an error with '%s', got: %s", c[0], c[1],
           got.c_str());
  }
  for (const char* name : {"shared_uninitialised", "unwritten_output"})
    EXPECT(labelsmooth_ext::simt_selftest::run(name) == "nan", "selftest %s: expected NaN in the output", name);
  for (const char* name : {"rows_32_lanes_partial", "rows_128_lanes", "rows_512_lanes", "ok_barrier",
                           "ok_shfl_width8", "ok_aligned_pack", "ok_write"}) {
    std::string got;
    try {
      got = labelsmooth_ext::simt_selftest::run(name);
    } catch (const c10::Error& e) {
      got = e.what_without_backtrace();
    }
    EXPECT(got == "ok", "selftest %s: expected ok, got %s", name, got.c_str());
  }
}

// float64 reference of one row: loss and gradient (scale 1), q = a + b [c == y], weights w.
static void ref_row(const std::vector<double>& z, int64_t y, const std::vector<double>* w, Smoothing<double> sm,
                    double& loss, std::vector<double>& grad) {
  const size_t K = z.size();
  double m = -INFINITY;
  for (double v : z) m = std::max(m, v);
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  const double lse = m + std::log(s);
  double W = 0, Q = 0;
  loss = 0;
  grad.assign(K, 0.0);
  std::vector<double> wq(K);
  for (size_t c = 0; c < K; ++c) {
    const double wc = w ? (*w)[c] : 1.0;
    const double q = sm.a + (int64_t(c) == y ? sm.b : 0.0);
    wq[c] = wc * q;
    Q += wq[c];
    W += wc;
    if (sm.a != 0 || int64_t(c) == y) loss += wq[c] * (lse - z[c]);
  }
  for (size_t c = 0; c < K; ++c) grad[c] = std::exp(z[c] - lse) * Q - wq[c];
}

template <typename scalar_t>
static void ce_case(int64_t N, int64_t K, int64_t offset, bool weighted, double eps, double tol) {
  using acc_t = acc_of<scalar_t>;
  const int64_t stride = K + offset + 3;  // odd row strides, rows start `offset` elements in
  Buffer<scalar_t> in{size_t(N * stride + offset + 1)};
  Buffer<int64_t> target{size_t(N)};
  Buffer<acc_t> weight{size_t(K)};  // the kernels read class weights in the accumulation type
  Buffer<acc_t> wsum(1);
  Buffer<scalar_t> grad{size_t(N * K)};
  Buffer<acc_t> rows{size_t(N)};
  unsigned seed = unsigned(K * 31 + N);
  auto rnd = [&]() {
    seed = seed * 1664525u + 1013904223u;
    return double(seed >> 8) / double(1u << 24);
  };
  for (size_t i = 0; i < in.n; ++i) in[i] = scalar_t(float(4 * rnd() - 2));
  double ws = 0;
  for (int64_t c = 0; c < K; ++c) {
    weight[size_t(c)] = static_cast<acc_t>(scalar_t(float(0.5 + rnd())));  // a value of the input dtype
    ws += double(static_cast<acc_t>(weight[size_t(c)]));
  }
  wsum[0] = acc_t(ws);
  for (int64_t r = 0; r < N; ++r) target[size_t(r)] = int64_t(rnd() * double(K)) % K;
  if (N > 1) target[1] = -100;        // ignored
  if (N > 2) target[2] = K;           // out of range: NaN row
  if (N > 3)                          // an all -inf row: NaN row
    for (int64_t c = 0; c < K; ++c) in[size_t(3 * stride + offset + c)] = scalar_t(-INFINITY);
  CeParams<scalar_t> p{};
  p.in = in.p + offset;
  p.in_row_stride = stride;
  p.target = target.p;
  p.weight = weighted ? weight.p : nullptr;
  p.weight_sum = weighted ? wsum.p : nullptr;
  p.inv_denom = nullptr;
  p.grad = grad.p;
  p.loss_rows = rows.p;
  p.N = N;
  p.K = K;
  p.ignore_index = -100;
  p.sm = labelsmooth_ext::smoothing_coefs<acc_t>(eps, K, 0);
  labelsmooth_ext::cuda::dispatch_forward<scalar_t>(p, 0);
  const auto smd = labelsmooth_ext::smoothing_coefs<double>(eps, K, 0);
  for (int64_t r = 0; r < N; ++r) {
    const int64_t y = target[size_t(r)];
    const double got = double(rows[size_t(r)]);
    if (y == -100) {
      EXPECT(got == 0.0, "K=%ld row %ld ignored: loss %g", long(K), long(r), got);
      for (int64_t c = 0; c < K; ++c) EXPECT(double(static_cast<acc_t>(grad[size_t(r * K + c)])) == 0.0, "ignored grad");
      continue;
    }
    if (y < 0 || y >= K || r == 3) {
      EXPECT(std::isnan(got), "K=%ld row %ld: expected a NaN row, got %g", long(K), long(r), got);
      for (int64_t c = 0; c < K; ++c) EXPECT(std::isnan(double(static_cast<acc_t>(grad[size_t(r * K + c)]))), "NaN grad");
      continue;
    }
    std::vector<double> z(static_cast<size_t>(K)), w(static_cast<size_t>(K)), g;
    for (int64_t c = 0; c < K; ++c) {
      z[size_t(c)] = double(static_cast<acc_t>(in[size_t(r * stride + offset + c)]));
      w[size_t(c)] = double(static_cast<acc_t>(weight[size_t(c)]));
    }
    double loss;
    ref_row(z, y, weighted ? &w : nullptr, smd, loss, g);
    EXPECT(std::fabs(got - loss) <= tol * std::max(1.0, std::fabs(loss)), "K=%ld row %ld: loss %.9g vs %.9g",
           long(K), long(r), got, loss);
    double err = 0, mx = 0;
    for (int64_t c = 0; c < K; ++c) {
      err = std::max(err, std::fabs(double(static_cast<acc_t>(grad[size_t(r * K + c)])) - g[size_t(c)]));
      mx = std::max(mx, std::fabs(g[size_t(c)]));
    }
    EXPECT(err <= tol * std::max(mx, 1e-2), "K=%ld row %ld: grad error %g", long(K), long(r), err);
  }
}

template <typename scalar_t>
static void ce_cases(double tol) {
  // K picks the row layout: 32 lanes x 4 rows, 128 lanes, 512 lanes (by row bytes).
  for (int64_t K : {1, 7, 33, 1000, 4097, 9001})
    for (int64_t offset : {0, 1})
      for (bool weighted : {false, true}) {
        try {
          ce_case<scalar_t>(5, K, offset, weighted, 0.1, tol);
        } catch (const c10::Error& e) {
          EXPECT(false, "K=%ld offset=%ld weighted=%d: %s", long(K), long(offset), int(weighted),
                 e.what_without_backtrace());
        }
      }
}

template <typename scalar_t>
static void bce_and_scale(double tol) {
  using acc_t = acc_of<scalar_t>;
  const int64_t n = 1001;
  Buffer<scalar_t> x(n), t(n), grad(n), w(7);
  Buffer<acc_t> loss(n), inv(1);
  for (int64_t i = 0; i < n; ++i) {
    x[size_t(i)] = scalar_t(float((i % 17) - 8) * 0.5f);
    t[size_t(i)] = scalar_t(float(i % 2));
  }
  for (int i = 0; i < 7; ++i) w[size_t(i)] = scalar_t(float(i + 1) * 0.25f);
  inv[0] = acc_t(1.0 / double(n));
  labelsmooth_ext::cuda::launch_bce<scalar_t>(x.p, t.p, w.p, 7, nullptr, 1, acc_t(0.1), inv.p, loss.p, grad.p, n,
                                              labelsmooth_ext::cuda::sm_count(0), 0);
  for (int64_t i = 0; i < n; ++i) {
    double l, g;
    labelsmooth_ext::bce_elem<double>(double(static_cast<acc_t>(x[size_t(i)])), double(static_cast<acc_t>(t[size_t(i)])),
                                      double(static_cast<acc_t>(w[size_t(i % 7)])), 1.0, 0.1, l, g);
    EXPECT(std::fabs(double(loss[size_t(i)]) - l) <= tol * std::max(1.0, std::fabs(l)), "bce loss %ld", long(i));
    EXPECT(std::fabs(double(static_cast<acc_t>(grad[size_t(i)])) - g / double(n)) <= tol * 1e-2, "bce grad %ld",
           long(i));
  }
  // scale: per row (N = 7 rows of 143) and by one scalar, on an odd-sized buffer
  Buffer<acc_t> go(7);
  for (int r = 0; r < 7; ++r) go[size_t(r)] = acc_t(r == 3 ? 1.0 : 0.5 * (r + 1));
  std::vector<double> before(n);
  for (int64_t i = 0; i < n; ++i) before[size_t(i)] = double(static_cast<acc_t>(grad[size_t(i)]));
  labelsmooth_ext::cuda::launch_scale<scalar_t>(grad.p, go.p, 7, 143, true, labelsmooth_ext::cuda::sm_count(0), 0);
  for (int64_t i = 0; i < n; ++i) {
    const double want = double(static_cast<scalar_t>(acc_t(before[size_t(i)]) * go[size_t(i / 143)]));
    EXPECT(double(static_cast<acc_t>(grad[size_t(i)])) == want, "scale per row %ld", long(i));
  }
  labelsmooth_ext::cuda::launch_scale<scalar_t>(grad.p, go.p + 1, 7, 143, false, labelsmooth_ext::cuda::sm_count(0), 0);
}

int main() {
  selftests();
  try {
    bce_and_scale<float>(1e-5);
    bce_and_scale<double>(1e-10);
    bce_and_scale<c10::BFloat16>(2e-2);
  } catch (const c10::Error& e) {
    EXPECT(false, "bce/scale: %s", e.what_without_backtrace());
  }
  ce_cases<float>(2e-5);
  ce_cases<double>(1e-10);
  ce_cases<c10::Half>(4e-3);
  ce_cases<c10::BFloat16>(3e-2);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("simt_test: all passed\n");
  return 0;
}
