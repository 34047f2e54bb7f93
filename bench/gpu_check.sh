#!/usr/bin/env bash
# The whole GPU check in one command, on a fresh GPU machine with torch, nvcc, pytest and
# pytest-benchmark (no network needed):
#   bash bench/gpu_check.sh OUTDIR
# build -> CUDA tests -> compute-sanitizer memcheck -> benchmarks; everything lands in OUTDIR,
# with a summary in OUTDIR/summary.txt. Exits non-zero if any step failed.
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
status=0
step() {  # step NAME LOG CMD...
  local name="$1" log="$2"; shift 2
  local t0=$SECONDS
  "$@" > "$OUT/$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s) -> $log" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}
: > "$OUT/summary.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"

step build build.log "$PY" -m pip install --no-build-isolation -e . || { echo "build failed"; exit 1; }
step tests tests.log "$PY" -m pytest tests -q -rs
tail -3 "$OUT/tests.log" >> "$OUT/summary.txt"
SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ -x "$SAN" ]; then
  step memcheck memcheck.log "$SAN" --tool memcheck --error-exitcode 3 "$PY" bench/sanitizer_case.py
  grep -E "ERROR SUMMARY" "$OUT/memcheck.log" >> "$OUT/summary.txt"
else
  echo "memcheck: compute-sanitizer not found" | tee -a "$OUT/summary.txt"; status=1
fi
step report bench_report.txt "$PY" -m labelsmooth_ext bench --device cuda --reps 20 \
  --json "$OUT/bench_report.json" --markdown "$OUT/bench_report.md"
step pytest-benchmark bench_suite.log "$PY" -m pytest bench -q -k cuda \
  --benchmark-storage="file://$OUT/benchmarks" --benchmark-save=gpu --benchmark-columns=median,min,rounds
echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$OUT/summary.txt"
exit $status
