// C++ use without Python: load the operator library, call labelsmooth_ext::ce_forward through
// the dispatcher, and check the loss and gradient against the formulas computed with ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>

int main() {
  if (!dlopen(LSE_OPS_LIBRARY, RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
    return 1;
  }
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("labelsmooth_ext::ce_forward", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&, int64_t,
                                                          double, int64_t, int64_t, bool)>();
  at::manual_seed(0);
  const int64_t N = 64, K = 1000;
  const double eps = 0.1;
  at::Tensor x = at::randn({N, K}, at::kDouble);
  at::Tensor t = at::randint(0, K, {N}, at::kLong);
  auto [loss, grad] = op.call(x, t, std::nullopt, -100, eps, 0, /*mean*/ 1, true);

  // Reference from the formulas: q = eps/K + (1-eps) onehot; loss = -sum q log p; grad = (p - q)/N.
  at::Tensor logp = at::log_softmax(x, 1);
  at::Tensor q = at::full({N, K}, eps / K, at::kDouble);
  q.scatter_add_(1, t.unsqueeze(1), at::full({N, 1}, 1.0 - eps, at::kDouble));
  const double ref = -(q * logp).sum().item<double>() / N;
  const double gerr = (grad - (logp.exp() - q) / N).abs().max().item<double>();
  const double lerr = std::abs(loss.item<double>() - ref);
  std::printf("loss %.12f ref %.12f |dloss| %.3g |dgrad| %.3g\n", loss.item<double>(), ref, lerr, gerr);
  if (!(lerr < 1e-10 && gerr < 1e-12)) {
    std::fprintf(stderr, "mismatch\n");
    return 1;
  }
  return 0;
}
