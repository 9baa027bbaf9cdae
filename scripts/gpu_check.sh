#!/usr/bin/env bash
# The one prepared GPU check of issue 10, sized for a 15-minute lease (about 10 minutes of wall time):
#   1. the exactness tests on CUDA (tests/test_gpu.py: eager generate, static-cache generate compiled by
#      transformers with CUDA graphs, a second static generate with dynamo's error_on_recompile, the plugin's
#      host syncs per call under torch.cuda.set_sync_debug_mode), run by
#      pytest if it is installed, else by scripts/gpu_tests.py's direct runner (the GPU machine has no pytest);
#   2. the bench, `--gemma2-2b --device cuda` (random Gemma-2-2B bf16, random JumpReLU CLT 16,384 x 26 at
#      resid_mid, top-32, prompt 128, 64 new greedy tokens): W1 eager columns (plain, attached, hidden
#      states + encode after) at batch 1, 8, 32, W2 (2048-token prefill, warmed up), W3 (encode_sparse vs
#      the bare matmul at 4,096 and 32,768 rows);
#   3. W1's static-cache (compiled) columns at batch 8, then at batch 1 and 32 while time is left (each
#      compiled variant compiles once, about 70 s for Gemma-2-2B, timed apart).
# Every step runs under `timeout`, inside an overall budget (GPU_CHECK_BUDGET, default 560 s); a bench
# step that is cut short keeps the rows it measured (its JSON is rewritten after every row). Results:
# $OUT/*.json and *.log, then a compact summary (also $OUT/summary.md).
#
#   bash scripts/gpu_check.sh                    # on the GPU machine, from the repository root
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh    # tiny sizes on the CPU: tests the script itself
#
# Needs only what the GPU machine has (torch, transformers, accelerate, safetensors, huggingface_hub,
# pyyaml, tqdm): no pip install; the package runs from the working tree (PYTHONPATH=.).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-560}
DRY=${GPU_CHECK_DRY:-0}
START=$(date +%s)
: > "$OUT/steps.txt"

if [ "$DRY" = 1 ]; then
  # Same steps, tiny random Llama on the CPU; the static decode step compiled through CompileConfig
  # (aot_eager), the GPU tests on the CPU through the direct runner (the path the GPU machine takes).
  BENCH=(-m sparse_clt_hf bench --quick --device cpu)
  STATIC=(--compile --compile-backend aot_eager)
  BATCHES=(2 1)
  export SPARSE_CLT_GPU_TEST_DEVICE=cpu GPU_CHECK_NO_PYTEST=1
else
  BENCH=(-m sparse_clt_hf bench --gemma2-2b --device cuda)
  STATIC=()
  BATCHES=(8 1 32)
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS COMMAND...: run under timeout (MAX_SECONDS or what is left of the budget, less a
# margin for the summary); skipped when under 45 s would be left for it.
step() {
  local name=$1 max=$2 t rc s0
  shift 2
  t=$(($(left) - 15))
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 45 ]; then
    echo "== $name: skipped ($(left) s of the budget left)"
    echo "$name skipped (budget)" >> "$OUT/steps.txt"
    return 0
  fi
  echo "== $name (timeout ${t}s): $*"
  s0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - s0))s" >> "$OUT/steps.txt"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "   (timed out after ${t}s; partial results kept)"
  tail -n 12 "$OUT/$name.log" | sed 's/^/   | /'
}

{
  date -Is
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  "$PY" -c 'import pytest; print("pytest", pytest.__version__)' 2>/dev/null || echo "pytest: not installed (direct runner)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

TESTS=("$PY" scripts/gpu_tests.py --json "$OUT/tests.json")
[ "${GPU_CHECK_NO_PYTEST:-0}" = 1 ] && TESTS+=(--no-pytest)
step tests 170 "${TESTS[@]}"
step bench_eager 240 "$PY" "${BENCH[@]}" --only w1,w2,w3 --columns clt,hidden --out "$OUT/bench_eager.json"
for b in "${BATCHES[@]}"; do
  step "bench_static_b$b" 240 "$PY" "${BENCH[@]}" --only w1 --columns static --batches "$b" "${STATIC[@]}" \
    --out "$OUT/bench_static_b$b.json"
done
echo "== summary ($(($(date +%s) - START)) s in all)"
"$PY" scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
