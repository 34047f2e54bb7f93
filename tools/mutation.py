"""Mutation testing: plant one small bug at a time and check that the test-suite catches it.

    python tools/mutation.py                 # every mutant, report to docs/mutation_report.md
    python tools/mutation.py --list          # the mutant list
    python tools/mutation.py --only 3 7-9    # some mutants (ids from --list)
    python tools/mutation.py --workdir DIR --tests "tests/test_parity.py ..." --report PATH

Each mutant is one textual replacement in one file (the `old` text must occur exactly once, so
a change of the code that removes it is reported instead of silently skipped). The tool copies
the source tree into a scratch directory once, builds it CPU-only once (ninja then recompiles
only the translation units a mutant touches), and for every mutant: applies it, rebuilds (C++
only), runs the tests in two stages, restores the file:

  stage 1: the test files most likely to kill a mutant of that source file (STAGE1_TESTS),
           with -x (stops at the first failure);
  stage 2: only if stage 1 passed, the whole CPU suite (FULL_SUITE, -x) minus what stage 1 ran.

Caught = the build or a test fails; survived = both stages pass (each survivor must be killed by
a new test or explained as equivalent in the report). Results are kept, per mutant text, in
docs/mutation_results.json, so runs of parts (--only) add up to one report. Slow (a rebuild and
a test run per mutant): run it with `nice`, not in CI.

CUDA kernels (build="simt"): csrc/cuda/kernels.cuh / reduce.cuh mutants run the CUDA kernels
under the SIMT emulation (tests/simt_ext.py builds them into build/simt of the scratch copy on
first use, ninja rebuilds after a mutant), with the tests' simt-device cases (-k simt).
"""
import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

Mutant = collections.namedtuple("Mutant", "path old new what build", defaults=("cpu",))


def _key(m):
    """A mutant's identity in the results file: its file and text (ids shift when the list grows)."""
    return hashlib.sha1(repr((m.path, m.old, m.new)).encode()).hexdigest()[:16]

# Why a mutant that survives cannot be caught by any test of values (an equivalent mutant):
# shown in the report next to it. Keyed by the mutant's description.
EQUIVALENT = {
    "store_out: streaming-store path never taken (equivalent: same values)":
        "streaming and plain stores write the same values; only speed differs",
    "store_out: 16-bit streaming loop stops one vector early (tail takes it: equivalent)":
        "the elements the loop leaves are written by the plain-store tail after it",
    "kStoreBlock changed (equivalent: any block size gives the same values)":
        "the block size only decides where the gradient is computed and stored in pieces; every "
        "element is computed by the same formula (a target on the new boundary is tested)",
    "ce_spatial: padding lanes 0 instead of -inf (equivalent unless read)":
        "padding lanes are positions past the end: their results are never stored; a 0 instead of "
        "-inf only changes those lanes' own max and sums",
    "row_max: full-vector loop stops one vector early":
        "the partial-vector tail after the loop loads K - c lanes: a full vector when the loop "
        "stopped one early, so the same maximum is taken",
    "cpu autograd: 16-bit backward never uses the saved gradient (recomputes: equivalent values)":
        "the recomputation (ce_grad) gives the same values as the saved gradient times an exact "
        "incoming gradient; only the time differs",
    "row of all -inf treated as finite":
        "a row whose logits are all -inf has m = -inf; past the early exit every class computes "
        "z - m = -inf - (-inf) = NaN, so s, the loss, lse and every gradient element are NaN, what "
        "the early exit writes (the tensor-parallel backward likewise, with lse = -inf); a NaN max "
        "is refused by both versions",
    "capability switch inverted (equivalent when both builds agree)":
        "both CPU builds give the same values (tested); the tests that force one build check the "
        "`active` field, which reports the switch's own decision",
}

K = "csrc/cpu/kernels.h"
LC = "csrc/cpu/loss_cpu.cpp"
RM = "csrc/row_math.h"
OPS = "csrc/ops.cpp"
FN = "labelsmooth_ext/functional.py"
PO = "labelsmooth_ext/_ops.py"
MOD = "labelsmooth_ext/modules.py"
CK = "csrc/cuda/kernels.cuh"
CR = "csrc/cuda/reduce.cuh"
AC = "csrc/cpu/autograd_cpu.cpp"
VP = "csrc/cpu/vp_cpu.cpp"

# prob_rows (not prob_rows_ext, which repeats its q loop): from the row's input load to the q loop
_PROB_TARGETS_AND_Q = ("      if (A.target_is_acc) {\n        to_acc(tg_acc + r * A.t_row_stride, wq.data(), K);\n"
                       "      } else {\n        to_acc(tg + r * A.t_row_stride, wq.data(), K);\n      }\n"
                       "      int64_t c = 0;\n      for (; c + V <= K; c += V) {\n"
                       "        Vec q = at::vec::fmadd(vb, Vec::loadu(wq.data() + c), va);\n")

MUTANTS = [
    # --- CPU kernels (csrc/cpu/kernels.h) ---
    Mutant(K, "for (; c + V <= K; c += V) vm = at::vec::maximum(vm, Vec::loadu(z + c));",
           "for (; c + V < K; c += V) vm = at::vec::maximum(vm, Vec::loadu(z + c));",
           "row_max: full-vector loop stops one vector early"),
    Mutant(K, "if (c < K) vm = at::vec::maximum(vm, load_tail(z + c, K - c, ninf));",
           "if (c + 1 < K) vm = at::vec::maximum(vm, load_tail(z + c, K - c, ninf));",
           "row_max: a 1-element tail is skipped"),
    Mutant(K, "  for (int64_t i = 0; i < V; ++i) m = nan_max(m, buf[i]);\n  return m;",
           "  for (int64_t i = 1; i < V; ++i) m = nan_max(m, buf[i]);\n  return m;",
           "row_max: lane 0 left out of the horizontal max"),
    Mutant(K, "for (int64_t i = 0; i < fVec::size(); ++i) m = nan_max(m, buf[i]);\n  for (; c < K; ++c) {",
           "for (int64_t i = 0; i < fVec::size(); ++i) m = std::max(m, buf[i]);\n  for (; c < K; ++c) {",
           "convert_and_max: horizontal max drops NaN (std::max)"),
    Mutant(K, "    dst[c] = static_cast<float>(src[c]);\n    m = nan_max(m, dst[c]);",
           "    dst[c] = static_cast<float>(src[c]);\n    m = std::max(m, dst[c]);",
           "convert_and_max: scalar tail drops NaN"),
    Mutant(K, "if (n * int64_t(sizeof(scalar_t)) >= kStreamMinBytes) {",
           "if (n * int64_t(sizeof(scalar_t)) >= kStreamMinBytes && n > 1000000) {",
           "store_out: streaming-store path never taken (equivalent: same values)"),
    Mutant(K, "for (; c + 16 <= n; c += 16) {",
           "for (; c + 16 < n; c += 16) {",
           "store_out: 16-bit streaming loop stops one vector early (tail takes it: equivalent)"),
    Mutant(K, "    const int64_t b1 = std::min<int64_t>(K, b0 + kExpBlock);\n    Vec vs(0), vS(0);\n    int64_t c = b0;\n"
              "    for (; c + V <= b1; c += V) {\n      prefetch_next_row(",
           "    const int64_t b1 = std::min<int64_t>(K, b0 + kExpBlock - 1);\n    Vec vs(0), vS(0);\n    int64_t c = b0;\n"
           "    for (; c + V <= b1; c += V) {\n      prefetch_next_row(",
           "exp_pass: a class per 4096-block skipped"),
    Mutant(K, "      const Vec d0 = Vec::set(Vec(0), d, n);",
           "      const Vec d0 = d;",
           "exp_pass: padding lanes (-inf) added to the sum S"),
    Mutant(K, "      const Vec ex = exp_row(d);\n      vs = vs + ex;\n      vS = w ? at::vec::fmadd(Vec::loadu(w + c), d, vS) : vS + d;",
           "      const Vec ex = exp_row(d);\n      vs = vs + ex;\n      vS = w ? at::vec::fmadd(Vec::loadu(w + c), d, vS) : vS + d + d;",
           "exp_pass: unweighted S doubled in the vector loop"),
    Mutant(K, "      if (e) ex.store(e + c, n);\n    }\n    s += vsum(vs);\n    S += vsum(vS);",
           "      if (e) ex.store(e + c, n);\n    }\n    s += vsum(vs);\n    S = vsum(vS);",
           "exp_pass: S keeps only the last 4096-block"),
    Mutant(K, "      (Vec::loadu(g + c) * vkp - vkw * Vec::loadu(w + c)).store(g + c);",
           "      (Vec::loadu(g + c) * vkp - vkw).store(g + c);",
           "grad_pass: weight dropped in the full-vector loop"),
    Mutant(K, "if (c < K) (Vec::loadu(g + c, K - c) * vkp - vkw).store(g + c, K - c);",
           "if (c < K) (Vec::loadu(g + c, K - c) * vkp).store(g + c, K - c);",
           "grad_pass: unweighted tail without the smoothing term"),
    Mutant(K, "constexpr int64_t kStoreBlock = 2048;", "constexpr int64_t kStoreBlock = 2047;",
           "kStoreBlock changed (equivalent: any block size gives the same values)"),
    Mutant(K, "if (y >= b0 && y < b0 + n) buf[y] -= gc.ky;",
           "if (y > b0 && y < b0 + n) buf[y] -= gc.ky;",
           "ce_rows: target on a store-block boundary misses -ky"),
    Mutant(K, "if (y >= b0 && y < b0 + n) buf[y] -= gc.ky;",
           "if (y >= b0 && y < b0 + n) buf[y + (y + 1 == b0 + n && b0 + n < K)] -= gc.ky;",
           "ce_rows: off by one for a target at the end of a store block"),
    Mutant(K, "if (y >= b0 && y < b0 + n) buf[y] -= gc.ky;",
           "if (y >= b0 && y < b0 + n) buf[y] = acc_t(scalar_t(buf[y])) - gc.ky;",
           "ce_rows: target gradient rounded twice (16-bit)"),
    Mutant(K, "        if (grow) std::fill(grow, grow + K, scalar_t(0));\n        continue;\n      }\n      const acc_t* z;",
           "        if (grow) std::fill(grow, grow + K - 1, scalar_t(0));\n        continue;\n      }\n      const acc_t* z;",
           "ce_rows: ignored row's last gradient element not zeroed"),
    Mutant(K, "        if (grow) std::fill(grow, grow + K, scalar_t(NAN));\n        continue;\n      }\n      double s, S;",
           "        if (grow) std::fill(grow, grow + K, scalar_t(0));\n        continue;\n      }\n      double s, S;",
           "ce_rows: non-finite row gets a zero gradient instead of NaN"),
    Mutant(K, "      const acc_t wy = weighted ? w[y] : acc_t(1);\n      if (!row_max_is_finite(m)) {",
           "      const acc_t wy = weighted ? w[y > 0 ? y - 1 : 0] : acc_t(1);\n      if (!row_max_is_finite(m)) {",
           "ce_rows: w_y of the wrong class"),
    Mutant(K, "  const acc_t W = weighted ? acc_t(A.W) : acc_t(K);\n  const acc_t scale = acc_t(A.scale);\n\n  const acc_t zc = acc_t(A.z_loss);",
           "  const acc_t W = weighted ? acc_t(A.W) : acc_t(K - 1);\n  const acc_t scale = acc_t(A.scale);\n\n  const acc_t zc = acc_t(A.z_loss);",
           "ce_rows: unweighted W = K - 1"),
    Mutant(K, "          if (lanes < V) z = Vec::set(vninf, z, lanes);",
           "          if (lanes < V) z = Vec::set(vzero, z, lanes);",
           "ce_spatial: padding lanes 0 instead of -inf (equivalent unless read)"),
    Mutant(K, "          } else {\n            S_acc = S_acc + d;\n          }",
           "          } else {\n            S_acc = S_acc - d;\n          }",
           "ce_spatial: unweighted S sign"),
    Mutant(K, "      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);",
           "      const __m256i lane = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0);",
           "ce_spatial: z_y of the neighbouring position"),
    Mutant(K, "          g = g - Vec::blendv(vzero, vky, vcls == Vec(acc_t(c)));",
           "          g = g - Vec::blendv(vzero, vky, vcls == Vec(acc_t(c + 1)));",
           "ce_spatial: -ky on the class after the target"),
    Mutant(K, "          g = Vec::blendv(g * vkeep, vzero, keep0);",
           "          g = g * vkeep;",
           "ce_spatial: ignored position with NaN logits gets NaN gradient"),
    Mutant(K, "Vec::blendv(vzero, Vec::blendv(vnan, vone, finite), valid);",
           "Vec::blendv(vzero, Vec::blendv(vzero, vone, finite), valid);",
           "ce_spatial: non-finite position gets zero gradient"),
    Mutant(K, "      for (; c < K; ++c) wq[c] = prob_q<acc_t>(wq[c], sm) * (weighted ? wacc[c] : acc_t(1));\n"
              "      double Q = 0;\n      for (int64_t i = 0; i < K; ++i) Q += wq[i];\n      acc_t* z = zbuf.data();",
           "      for (; c < K; ++c) wq[c] = wq[c] * (weighted ? wacc[c] : acc_t(1));\n"
           "      double Q = 0;\n      for (int64_t i = 0; i < K; ++i) Q += wq[i];\n      acc_t* z = zbuf.data();",
           "prob_rows: scalar tail ignores smoothing (smoothing_mode ignored there)"),
    Mutant(K, "      to_acc(in + r * A.in_row_stride, zbuf.data(), K);\n" + _PROB_TARGETS_AND_Q + "        if (weighted) q = q * Vec::loadu(wacc.data() + c);",
           "      to_acc(in + r * A.in_row_stride, zbuf.data(), K);\n" + _PROB_TARGETS_AND_Q + "        if (weighted && c > 0) q = q * Vec::loadu(wacc.data() + c);",
           "prob_rows: first vector of classes unweighted"),
    Mutant(K, "grad_pass<acc_t>(z, wq.data(), K, acc_t(Q / s) * scale, scale);",
           "grad_pass<acc_t>(z, wq.data(), K, acc_t(1 / s) * scale, scale);",
           "prob_rows: gradient assumes sum of w q = 1"),
    # --- CPU operator layer (csrc/cpu/loss_cpu.cpp) ---
    Mutant(LC, "    D += w.empty() ? 1.0 : w[y];", "    D += 1.0;", "mean denominator ignores weights"),
    Mutant(LC, "  for (double v : w) W += v;", "  for (double v : w) W += v * v;", "W = sum of squared weights"),
    Mutant(LC, "  a.scale = reduction == kMean ? 1.0 / D : 1.0;", "  a.scale = reduction == kMean ? 1.0 / double(N) : 1.0;",
           "mean gradient divides by the row count"),
    Mutant(LC, "    row_scale[r] = reduction == kMean ? f / D : f;", "    row_scale[r] = f;",
           "backward (incoming gradient) with 'mean' not divided by D"),
    Mutant(LC, "    a.scale = reduction == kMean ? 1.0 / double(N) : 1.0;", "    a.scale = reduction == kMean ? 1.0 / double(N + 1) : 1.0;",
           "prob mean gradient scale off by one row"),
    Mutant(LC, "  if (grad_output.item<double>() == 1.0) return;", "  if (grad_output.item<double>() > 0.5) return;",
           "ce_scale_: skips any incoming gradient above 0.5"),
    Mutant(LC, "    grad.mul_(per_row_view(grad_output, grad));\n    return;", "    grad.mul_(grad_output.mean());\n    return;",
           "ce_scale_ 'none': one scalar instead of per row"),
    Mutant(LC, "      if (gp) gp[i] = scalar_t(g * sc);", "      if (gp) gp[i] = scalar_t(g);", "bce: mean gradient not divided by n"),
    Mutant(LC, "wp ? acc_t(wp[i % nw]) : acc_t(1),", "wp ? acc_t(wp[i % nw]) : acc_t(1) + acc_t(i == 0),", "bce: first element weighted 2 without weight"),
    Mutant(LC, "    rows.zero_();\n", "    rows.fill_(1);\n", "prob: K = 0 rows give 1"),
    Mutant(LC, "return cpu_has && !(env && (std::strcmp(env, \"default\") == 0",
           "return cpu_has && (env && (std::strcmp(env, \"default\") == 0",
           "capability switch inverted (equivalent when both builds agree)"),
    # --- shared row formulas (csrc/row_math.h) ---
    Mutant(RM, "    r.a = acc_t(eps / double(K));", "    r.a = acc_t(eps / double(K - 1));", "uniform: eps/(K-1)"),
    Mutant(RM, "    r.b = acc_t((1.0 - eps) - a);", "    r.b = acc_t(1.0 - eps);", "off_target: b without -a"),
    Mutant(RM, "  if (sm.a != acc_t(0)) loss += sm.a * (W * log_s - S);", "  loss += sm.a * (W * log_s - S);",
           "smoothing term not skipped for eps = 0 (-inf logit gives NaN)"),
    Mutant(RM, "  return (a != a || a > b) ? a : b;", "  return (a > b) ? a : b;", "nan_max drops a NaN in the first argument"),
    Mutant(RM, "  return m > -acc_t(INFINITY) && m < acc_t(INFINITY);", "  return m < acc_t(INFINITY);",
           "row of all -inf treated as finite"),
    Mutant(RM, "  g.kw = sm.a * scale;", "  g.kw = sm.a;", "gradient smoothing term not scaled by 1/D"),
    Mutant(RM, "  const acc_t ts = t * (acc_t(1) - acc_t(2) * a) + a;", "  const acc_t ts = t * (acc_t(1) - a) + a;",
           "bce: smoothed target t(1-a)+a"),
    Mutant(RM, "w * (L * e * inv - p * ts);", "w * (e * inv - p * ts);", "bce gradient (x < 0) without the pos_weight factor L"),
    Mutant(RM, "w * ((ts1 - p * ts * e) * inv)", "w * (inv - p * ts)",
           "bce gradient (x >= 0) as sigmoid - p t' (cancels for a confident logit)"),
    Mutant(RM, "  return y != ignore_index && (y < 0 || y >= K);", "  return y != ignore_index && (y < 0 || y > K);",
           "target == K accepted"),
    # --- operator schemas and shared checks (csrc/ops.cpp) ---
    Mutant(OPS, "at::where(denom.eq(0), at::full({}, NAN, total.options()), total.div(denom));",
           "total.div(denom);", "mean with a zero weight sum and eps > 0: inf instead of NaN"),
    Mutant(OPS, "  if (reduction == kNone) return at::mul_out(out, grad, per_row_view(grad_output, grad));",
           "  if (reduction == kNone) return at::mul_out(out, grad, grad_output.mean());", "ce_backward 'none': scalar instead of per row"),
    Mutant(OPS, "  return at::mul_out(out, grad, grad_output.reshape({}));", "  return out.copy_(grad);", "ce_backward ignores the incoming gradient"),
    Mutant(OPS, "  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 1.0, fn, \": label_smoothing must be in [0, 1], got \", eps);\n  TORCH_CHECK_VALUE(mode ==",
           "  TORCH_CHECK_VALUE(eps >= 0.0, fn, \": label_smoothing must be in [0, 1], got \", eps);\n  TORCH_CHECK_VALUE(mode ==",
           "C++ check: label_smoothing > 1 accepted"),
    Mutant(OPS, "  if (t.size(1) <= 1 || t.stride(1) == 1) return t;", "  return t;", "class stride != 1 not made contiguous"),
    # --- Python argument handling ---
    Mutant(FN, "    if size_average and reduce:\n        return \"mean\"", "    if size_average or reduce:\n        return \"mean\"",
           "legacy: size_average or reduce -> mean"),
    Mutant(FN, "    size_average = True if size_average is None else size_average", "    size_average = False if size_average is None else size_average",
           "legacy: size_average=None means False"),
    Mutant(FN, "    if not 0.0 <= eps <= 1.0:", "    if not 0.0 <= eps <= 1.5:", "label_smoothing up to 1.5 accepted (C++ check then raises)"),
    Mutant(FN, "    one_row = input.dim() == 1 and tuple(target.shape) == (1,)", "    one_row = False",
           "(C,) input with a (1,) target rejected"),
    Mutant(FN, "    need_grad = input.requires_grad and torch.is_grad_enabled()\n    if llm is not None:",
           "    need_grad = input.requires_grad\n    if llm is not None:", "gradient computed under no_grad"),
    Mutant(FN, "                                       reduction=reduction, label_smoothing=eps,\n                                       smoothing_mode=smoothing_mode)",
           "                                       reduction=reduction, label_smoothing=eps)",
           "soft targets with a gradient ignore smoothing_mode"),
    Mutant(FN, "    return t.movedim(1, -1).reshape(-1, t.shape[1])", "    return t.reshape(-1, t.shape[1])",
           "probability targets K-dim: rows without moving the class dim"),
    Mutant(FN, "    if all(padded[j] == shape[j] for j in range(k, len(shape))):", "    if True:",
           "bce: non-periodic weight layouts not expanded"),
    Mutant(PO, "        if reduction != REDUCTIONS[\"none\"] and float(grad_output) == 1.0 and not _graph_kept():",
           "        if float(grad_output.reshape(-1)[0]) == 1.0 and not _graph_kept():", "'none': first incoming gradient 1 skips the scaling"),
    Mutant(PO, "    return True if keep is None else bool(keep())", "    return False",
           "retain_graph=True hands out the saved gradient"),
    Mutant(PO, "        grad_output = grad_output.reshape(-1)\n", "        grad_output = grad_output.reshape(-1).flip(0)\n",
           "'none': incoming gradients in reverse row order"),
    Mutant(MOD, "                               smoothing_mode=self.smoothing_mode, z_loss=self.z_loss,",
           "                               z_loss=self.z_loss,",
           "module ignores smoothing_mode"),
    Mutant(MOD, "        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,",
           "        return F.cross_entropy(input, target, weight=self.weight,", "module ignores ignore_index"),
    # --- CUDA kernels, run under the SIMT emulation (csrc/cuda/kernels.cuh, reduce.cuh) ---
    Mutant(CK, "  for (int64_t c = tail + tid; c < Kl; c += ROW_THREADS) absorb_scalar(c);",
           "  for (int64_t c = tail + tid; c + 1 < Kl; c += ROW_THREADS) absorb_scalar(c);",
           "cuda ce_forward: last element of the scalar tail not folded into the row", "simt"),
    Mutant(CK, "    if (c == y) gv -= gc.ky;\n    if (cap > acc_t(0)) gv *= dz;\n"
               "    return static_cast<scalar_t>(gv);  // computed in acc_t, rounded once",
           "    if (c == y + 1) gv -= gc.ky;\n    if (cap > acc_t(0)) gv *= dz;\n"
           "    return static_cast<scalar_t>(gv);  // computed in acc_t, rounded once",
           "cuda ce_forward: -ky on the class after the target", "simt"),
    Mutant(CK, "  const acc_t W = weighted ? *p.weight_sum : acc_t(K);\n  if (!row_max_is_finite(m)) {",
           "  const acc_t W = weighted ? *p.weight_sum : acc_t(K - 1);\n  if (!row_max_is_finite(m)) {",
           "cuda ce_forward: unweighted W = K - 1", "simt"),
    Mutant(CK, "      if (!(srow == grow && f == acc_t(1)))", "      if (!(srow == grow))",
           "cuda ce_forward (backward): in-place rows skipped whatever the incoming gradient", "simt"),
    Mutant(CK, "  if (live && y == p.ignore_index) {", "  if (live && y == p.ignore_index && row > 0) {",
           "cuda ce_forward: ignore_index not honoured in row 0", "simt"),
    Mutant(CK, "    if (grad) grad[i] = static_cast<scalar_t>(g * scale);", "    if (grad) grad[i] = static_cast<scalar_t>(g);",
           "cuda bce: mean gradient not divided by n", "simt"),
    Mutant(CK, "    if (f == acc_t(1)) continue;  // uniform over the block", "    if (f <= acc_t(1)) continue;  // uniform over the block",
           "cuda scale_kernel 'none': rows with an incoming gradient below 1 not scaled", "simt"),
    Mutant(CR, "    if (lane >= kWarps) st = RowState<acc_t>{acc_t(-INFINITY), acc_t(0), acc_t(0), acc_t(0)};\n",
           "", "cuda row_reduce: lanes past the warp count keep partial[0] (counted twice)", "simt"),
    Mutant(CR, "  for (int off = WIDTH / 2; off > 0; off >>= 1) {", "  for (int off = WIDTH / 2; off > 1; off >>= 1) {",
           "cuda warp_reduce: last shuffle step (neighbouring lane) left out", "simt"),
    # --- C++ autograd of the CPU operator (csrc/cpu/autograd_cpu.cpp) ---
    Mutant(AC, "      out[0] = go_is_one() ? grad : ce_backward_op().call(grad, go, red);",
           "      out[0] = grad;", "cpu autograd: float32 / float64 backward ignores the incoming gradient"),
    Mutant(AC, "      return !traced && red != kNoneReduction && go.item<double>() == 1.0 &&\n             !graph_kept();",
           "      return !traced && red != kNoneReduction && go.item<double>() == 1.0;",
           "cpu autograd: retain_graph=True hands out the saved gradient"),
    Mutant(AC, "    if (is_sixteen_bit(input.scalar_type())) {", "    if (input.scalar_type() == at::kHalf) {",
           "cpu autograd: bfloat16 backward scales the saved 16-bit gradient (rounded twice)"),
    Mutant(AC, "    const std::optional<at::Tensor> saved_grad =\n        grad.sym_numel() != 0 ? std::optional<at::Tensor>(grad) : std::nullopt;",
           "    const std::optional<at::Tensor> saved_grad = std::nullopt;",
           "cpu autograd: 16-bit backward never uses the saved gradient (recomputes: equivalent values)"),
    # --- tensor-parallel CPU operators (csrc/cpu/vp_cpu.cpp) ---
    Mutant(VP, "  a.start = class_start;", "  a.start = 0;", "vocab parallel: the shard's first class ignored"),
    Mutant(VP, "  a.softcap = softcap;", "  a.softcap = 0;", "vocab parallel: softcap dropped"),
    Mutant(VP, "  return weight->to(acc_type_of(input_dtype)).contiguous();", "  return at::Tensor();",
           "vocab parallel: class weights dropped"),
    # --- added later (appended, so earlier numbers stay) ---
    Mutant(K, "    if (held.valid) tile_loss(", "    if (false) tile_loss(",
           "ce_spatial forward: a thread's last held tile's loss never written"),
    Mutant(K, "            zy1 = zy1 | (z1 & (vcls == vc + vone));", "            zy1 = zy1 | (z1 & (vcls == vc));",
           "ce_spatial, 16-bit: odd classes' z_y picked for the even class"),
    Mutant(K, "        for (c = C_ - 1; c >= 1; c -= 2) {", "        for (c = C_ - 1; c >= 2; c -= 2) {",
           "ce_spatial: the exp pass skips classes 1 and 0 when C is even"),
    Mutant(K, "      const __m256i idx = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3,",
           "      const __m256i idx = _mm256_setr_epi8(-1, -1, 2, 3, -1, -1, 2, 3,",
           "load_full, bfloat16: lane 0 reads value 1"),
    Mutant(RM, "    return E < acc_t(INFINITY) ? (E * q) * q : acc_t(0);",
           "    return acc_t(1) - (acc_t(1) - q) * (acc_t(1) - q);",
           "softcap_factor (GPU, float): 1 - t^2 of the rounded t again", "simt"),
    Mutant(K, "    *dz = q4 - q4 * q;", "    *dz = one_minus_sq(ta);",
           "softcap_vec: 1 - t^2 of the rounded t again"),
]

# Stage 1, per source file: the tests most likely to kill its mutants, the most direct (and
# fastest to fail) first; with -x a caught mutant stops at its first failing test.
_VALUE_TESTS = ["tests/test_parity.py", "tests/test_kernel_boundaries.py", "tests/test_operators.py",
                "tests/test_matrix.py", "tests/test_edge_cases.py", "tests/test_regressions.py"]
STAGE1_TESTS = {
    K: _VALUE_TESTS,
    LC: ["tests/test_parity.py", "tests/test_binary.py", "tests/test_regressions.py",
         "tests/test_kernel_boundaries.py", "tests/test_edge_cases.py", "tests/test_operators.py"],
    RM: ["tests/test_parity.py", "tests/test_binary.py", "tests/test_regressions.py",
         "tests/test_kernel_boundaries.py", "tests/test_edge_cases.py", "tests/test_operators.py",
         "tests/test_llm_options.py"],
    OPS: ["tests/test_regressions.py", "tests/test_errors.py", "tests/test_parity.py",
          "tests/test_binary.py", "tests/test_edge_cases.py", "tests/test_operators.py"],
    FN: ["tests/test_regressions.py", "tests/test_errors.py", "tests/test_binary.py",
         "tests/test_operators.py", "tests/test_matrix.py", "tests/test_parity.py"],
    PO: ["tests/test_regressions.py", "tests/test_autograd.py", "tests/test_binary.py",
         "tests/test_operators.py", "tests/test_matrix.py"],
    MOD: ["tests/test_regressions.py", "tests/test_operators.py", "tests/test_parity.py"],
    CK: ["tests/test_simt_emulation.py", "tests/test_parity.py", "tests/test_edge_cases.py",
         "tests/test_cuda.py", "tests/test_autograd.py", "tests/test_binary.py", "tests/test_mixed.py"],
    CR: ["tests/test_simt_emulation.py", "tests/test_parity.py", "tests/test_cuda.py",
         "tests/test_edge_cases.py"],
    AC: ["tests/test_regressions.py", "tests/test_autograd.py", "tests/test_mixed.py", "tests/test_parity.py",
         "tests/test_operators.py"],
    VP: ["tests/test_vocab_parallel_ops.py", "tests/test_distributed_linear.py"],
}

# Stage 2: the whole CPU suite. Left out (and said so in the report): the build / packaging
# tests (they build wheels and read cuobjdump; they test no kernel value) and the client-library
# and distributed tests (slow, and every value they check is the same operator calls that
# the value tests check directly); test_fuzz.py is in (the fast profile).
FULL_SUITE_EXCLUDED = {
    "tests/test_build.py": "builds and inspects wheels / cuobjdump output, no loss values",
    "tests/test_build_support.py": "tests setup.py's helpers, no loss values",
    "tests/test_bench_report.py": "tests the benchmark report formatting, no loss values",
    "tests/test_patch.py": "client libraries (torchvision/transformers/timm) routed to the same "
                           "cross_entropy calls; slow",
    "tests/test_distributed.py": "multi-process tensor-parallel runs of the same row kernels; slow",
}
# Emulated CUDA mutants: only the simt-device cases can reach the CUDA kernels.
SIMT_FILTER = "simt"
# Stage 1 of a CPU-kernel mutant leaves out the simt-device cases (the emulated CUDA kernels do
# not run the CPU kernels; stage 2 runs them all the same).
STAGE1_FILTER = {K: "not simt", LC: "not simt", AC: "not simt", VP: "not simt"}


def _ids(specs, n):
    out = set()
    for s in specs:
        a, _, b = s.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return sorted(i for i in out if 0 <= i < n)


def _copy_tree(work):
    if work.exists():
        shutil.rmtree(work)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        dst = work / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / f).is_file():
            shutil.copy2(ROOT / f, dst)


def _lower_optimisation(work, level):
    """The scratch copy compiles at -O{level} (default 1: about twice as fast to build as -O3;
    the same code paths, so the same mutants are caught)."""
    setup = work / "setup.py"
    text = setup.read_text()
    if '"-O3"' in text:
        setup.write_text(text.replace('"-O3"', f'"-O{level}"', 1))


def _build(work, log):
    env = dict(os.environ, LABELSMOOTH_EXT_CPU_ONLY="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                       stdout=log, stderr=subprocess.STDOUT)
    return r.returncode == 0


def _full_suite(work):
    return [str(f.relative_to(work)) for f in sorted((work / "tests").glob("test_*.py"))
            if str(f.relative_to(work)) not in FULL_SUITE_EXCLUDED]


def _run_tests(work, tests, log, timeout, kfilter=None):
    """(status, detail): "passed" / "failed" with the first failing test / "exit N" / "timeout"."""
    if not tests:
        return "passed", "nothing to run"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if kfilter:
        cmd += ["-k", kfilter]
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    try:
        r = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "timeout"
    log.write(r.stdout[-3000:])
    log.flush()
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode == 0:
        return "passed", last
    if r.returncode == 5:  # nothing collected (e.g. -k simt in a file without simt cases)
        return "passed", last
    if r.returncode in (1, 2) and lines:
        return "failed", lines[0]
    return f"exit {r.returncode}", (lines[0] if lines else last)  # a crash also catches it


def _stage1(m, work):
    tests = STAGE1_TESTS.get(m.path) or _full_suite(work)
    return [t for t in tests if (work / t).exists()]


def _load_results(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--workdir", default="/tmp/labelsmooth_mutation")
    ap.add_argument("--report", default=str(ROOT / "docs" / "mutation_report.md"))
    ap.add_argument("--results", default=str(ROOT / "docs" / "mutation_results.json"),
                    help="per-mutant results, kept between runs (keyed by the mutant's text)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per test stage")
    ap.add_argument("--opt", default="1", help="C++ optimisation level of the scratch build")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse an existing scratch copy (its build is brought up to date)")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not run the unmutated stage-1 tests first (when they were just run)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the results file")
    args = ap.parse_args()

    if args.list:
        for i, m in enumerate(MUTANTS):
            print(f"{i:3d}  {m.path:32s} {m.build:6s} {m.what}")
        return 0
    results = _load_results(args.results)
    if args.report_only:
        _write_report(args.report, results)
        return 0
    ids = _ids(args.only, len(MUTANTS)) if args.only else list(range(len(MUTANTS)))
    if not ids:
        print("no mutant selected", file=sys.stderr)
        return 2
    # Every mutant's text must occur exactly once in today's code; a selected one that does not
    # stops the run, the others are listed (their texts need updating before they can run).
    problems = [(i, m) for i, m in enumerate(MUTANTS)
                if (ROOT / m.path).read_text().count(m.old) != 1]
    for i, m in problems:
        print(f"{'error' if i in ids else 'warning'}: mutant {i} ({m.path}: {m.what}): its text occurs "
              f"{(ROOT / m.path).read_text().count(m.old)} times (must be once)", file=sys.stderr)
    if any(i in ids for i, _ in problems):
        return 2
    work = Path(args.workdir)
    if not (args.reuse and work.exists()):
        _copy_tree(work)
        _lower_optimisation(work, args.opt)
    log = open(work / "mutation.log", "a")
    if not _build(work, log):
        print("the unmutated copy does not build; see", work / "mutation.log", file=sys.stderr)
        return 2
    if not args.skip_baseline:
        # every stage-1 selection of the mutants to run passes unmutated (a failing one would
        # count every mutant as caught); stage 2 is the whole suite, checked by its own run
        base = []
        for i in ids:
            for t in _stage1(MUTANTS[i], work):
                if t not in base:
                    base.append(t)
        status, detail = _run_tests(work, base, log, args.timeout)
        if status != "passed":
            print("the unmutated stage-1 tests do not pass:", detail, file=sys.stderr)
            return 2
    done = 0
    # Python first (no rebuild), then grouped by file (fewer rebuilds)
    for i in sorted(ids, key=lambda i: (MUTANTS[i].path.startswith("csrc/"), MUTANTS[i].path, i)):
        m = MUTANTS[i]
        path = work / m.path
        original = path.read_text()
        path.write_text(original.replace(m.old, m.new))
        t = time.time()
        stage = 0
        kfilter = SIMT_FILTER if m.build == "simt" else None
        try:
            if m.path.startswith("csrc/") and m.build == "cpu" and not _build(work, log):
                status, detail = "caught", "build failed"
            else:
                stage = 1
                first = _stage1(m, work)
                status, detail = _run_tests(work, first, log, args.timeout, kfilter or STAGE1_FILTER.get(m.path))
                if status == "passed":
                    stage = 2
                    rest = [f for f in _full_suite(work) if f not in first]
                    status, detail = _run_tests(work, rest, log, args.timeout, kfilter)
                status = "survived" if status == "passed" else "caught"
        finally:
            path.write_text(original)
        secs = time.time() - t
        results[_key(m)] = {"id": i, "path": m.path, "what": m.what, "status": status, "stage": stage,
                            "detail": detail, "seconds": round(secs), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        done += 1
        print(f"[{done}/{len(ids)}] {i:3d} {status:8s} stage {stage} {secs:6.0f}s  {m.path}: {m.what}"
              f"  -- {detail}", flush=True)
        Path(args.results).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        _write_report(args.report, results)
    _build(work, log)  # leave the copy unmutated
    _write_report(args.report, results)
    print(_summary(results)[0] + "; report: " + args.report)
    return 0


def _summary(results):
    rows = []
    for i, m in enumerate(MUTANTS):
        r = results.get(_key(m))
        rows.append((i, m, r))
    caught = sum(1 for _, _, r in rows if r and r["status"] == "caught")
    run = sum(1 for _, _, r in rows if r and r["status"] in ("caught", "survived"))
    equiv = sum(1 for _, m, r in rows if r and r["status"] == "survived" and m.what in EQUIVALENT)
    text = (f"caught {caught} of {run} mutants run ({100.0 * caught / max(run, 1):.1f}%); "
            f"{equiv} of the {run - caught} survivors are equivalent mutants; "
            f"{len(MUTANTS) - run} not run")
    return text, rows


NOTES_MARK = "<!-- notes: kept when the tool rewrites the report -->"


def _write_report(path, results):
    text, rows = _summary(results)
    per_file = collections.OrderedDict()
    for i, m, r in rows:
        per_file.setdefault(m.path, collections.Counter())[r["status"] if r else "not run"] += 1
    caught = sum(1 for _, _, r in rows if r and r["status"] == "caught")
    run = sum(1 for _, _, r in rows if r and r["status"] in ("caught", "survived"))
    equiv = sum(1 for _, m, r in rows if r and r["status"] == "survived" and m.what in EQUIVALENT)
    nonequiv_run = run - equiv
    secs = sum(r["seconds"] for _, _, r in rows if r)
    lines = [
        "# Mutation testing report", "",
        "Generated by `python tools/mutation.py` (one textual mutant at a time in a scratch copy, "
        "CPU-only build at -O1; results kept per mutant in `docs/mutation_results.json`).", "",
        "Per mutant: **stage 1** runs the test files most likely to kill a mutant of its source file "
        "with `-x`; only if they all pass, **stage 2** runs the rest of the CPU suite with `-x`. "
        "Emulated CUDA mutants (`build simt`) run the simt-device cases only (`-k simt`). Stage 1 of "
        "a CPU-kernel mutant (" + ", ".join(f"`{f}`" for f in STAGE1_FILTER) + ") leaves out the "
        "simt-device cases (`-k 'not simt'`: they run the emulated CUDA kernels, not the CPU ones); "
        "stage 2 runs them.", "",
        "Stage 1 per file: " + "; ".join(f"`{f}`: " + ", ".join(t.split("/")[-1] for t in ts)
                                        for f, ts in STAGE1_TESTS.items()) + ".", "",
        "Stage 2 leaves out: " + "; ".join(f"`{f}` ({why})" for f, why in FULL_SUITE_EXCLUDED.items()) + ".", "",
        f"**Caught {caught} of {run} mutants run ({100.0 * caught / max(run, 1):.1f}%); "
        f"{equiv} survivors are equivalent mutants: caught {caught} of the {nonequiv_run} "
        f"non-equivalent ones ({100.0 * caught / max(nonequiv_run, 1):.1f}%).** "
        f"{len(MUTANTS) - run} of {len(MUTANTS)} not run. Test time of the recorded runs: "
        f"{secs / 60:.0f} min (2-core machine shared with other builds, nice 10).", "",
        "| file | caught | survived | not run |", "|---|---|---|---|",
    ]
    for f, c in per_file.items():
        lines.append(f"| `{f}` | {c['caught']} | {c['survived']} | {c['not run']} |")
    lines += ["", "| id | file | mutant | result | stage | s | first failing test |", "|---|---|---|---|---|---|---|"]
    for i, m, r in rows:
        if not r:
            lines.append(f"| {i} | `{m.path}` | {m.what} | not run | | | |")
            continue
        status = r["status"]
        if status == "survived" and m.what in EQUIVALENT:
            status = "survived (equivalent: " + EQUIVALENT[m.what] + ")"
        lines.append(f"| {i} | `{m.path}` | {m.what} | {status} | {r['stage']} | {r['seconds']} | "
                     f"{r['detail'].replace('|', '/')[:140]} |")
    old = Path(path).read_text() if Path(path).exists() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else NOTES_MARK + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n\n" + notes)


if __name__ == "__main__":
    sys.exit(main())
