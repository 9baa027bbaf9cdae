#!/usr/bin/env bash
# The GPU check of issue 19 (attribution at Gemma-2-2B's size), apart from scripts/gpu_check.sh (which fills
# its own ~560 s): a random Gemma-2-2B (bf16) with a random 16,384-feature JumpReLU CLT on all 26 layers
# (decoders ~26 GB bf16), thresholds calibrated to 64 active features per token and layer, prompts of 128 and
# 1,024 tokens, max_feature_nodes 8,192 (halved while the adjacency would not fit; refusals are recorded):
# time and peak GPU memory of attribute + prune. About 3-6 minutes on an H100; fits a lease on its own.
#
#   bash scripts/gpu_check_attribution.sh                    # on the GPU machine, from the repository root
#   GPU_CHECK_DRY=1 bash scripts/gpu_check_attribution.sh    # tiny Gemma 2 on the CPU: tests the script
#
# Results: $OUT/attribution_gemma2.json (rewritten after each prompt length) and .log.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-420}
mkdir -p "$OUT"
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  ARGS=(--dry)
else
  ARGS=(--device cuda --tokens "${ATTRIBUTION_TOKENS:-128,1024}")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/env_attribution.txt"
fi
echo "== attribution, Gemma-2-2B size (timeout ${BUDGET}s)"
timeout -k 10 "$BUDGET" "$PY" scripts/bench_attribution_gemma2.py "${ARGS[@]}" --out "$OUT/attribution_gemma2.json" \
  > "$OUT/attribution_gemma2.log" 2>&1
rc=$?
echo "rc=$rc"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "(timed out; the JSON keeps the prompt lengths measured)"
tail -n 40 "$OUT/attribution_gemma2.log"
exit $rc
