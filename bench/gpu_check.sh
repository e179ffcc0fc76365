#!/usr/bin/env bash
# GPU checks for a lent H100/H200: well under 10 minutes, installs nothing. Writes results under $OUT.
#
#   bench/gpu_check.sh                 # on the GPU machine (results in $OUT, default bench/out/gpu)
#   SMOKE=1 bench/gpu_check.sh         # seconds-long dry run of the same plumbing (any machine, CPU too)
#
# 0. A 2 x 300-step diagnosis of the training loop's speed (see below).
# 1. The base recipe (experiments/base.py, 5000 steps) in bf16: wall time, training time, best val loss on
#    'validation+test', tokens/s and MFU.           Targets on one H100: val <= 1.47 in <= 60 s of training.
# 2. Speed of the base and GPT-2-small (12 x 768, context 1024) shapes: ms/step, tokens/s and MFU over
#    100 timed steps.                                Target: GPT-2-small MFU >= 45% in bf16.
# 3. If the script is under 7 minutes by then: GPT-2-small at batch 64.
# Needs jax with CUDA, flax, optax and orbax-checkpoint (the GPU image has them), ml_collections
# (pure Python; taken from .gpu/site when the image lacks it), and the tiny-shakespeare text at
# .gpu/input.txt or $NANODECODER_TEXT (the machine has no network; bench/RESULTS.md says how to stage both).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$PWD/.gpu/site" PYTHONUNBUFFERED=1
TEXT="${NANODECODER_TEXT:-$PWD/.gpu/input.txt}"
PY="${PYTHON:-python3}"
data=(--set 'data.source="text"' --set "data.text_path=\"$TEXT\"")
if [ "${SMOKE:-0}" = 1 ]; then
  recipe=(--config experiments/cpu.py --set train.num_steps=40 --set train.decay_steps=40 --set train.warmup_steps=5 --set train.log_every=10
          --set eval.every=20 --set eval.batches=2)
  speed=(--shapes cpu --steps 10 --repeats 2)
else
  recipe=(--config experiments/base.py --set 'model.dtype="bfloat16"')
  speed=(--shapes base,gpt2_small --steps 20 --repeats 5 --set 'model.dtype="bfloat16"')
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'no nvidia-smi'
  "$PY" -c 'import jax, flax, optax, orbax.checkpoint as ocp, ml_collections
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", ocp.__version__)
print(jax.devices())'
} 2>&1 | tee "$OUT/env.txt"

# 0. Diagnosis of an open question (bench/RESULTS.md): the training loop ran the base recipe at 37 ms/step on an
#    H200 where train_speed.py times the same step at 9.8 ms. 300 steps of the loop with JAX's persistent
#    compilation cache off, then on, in fresh processes.
if [ "${SMOKE:-0}" != 1 ]; then
  for cache in off on; do
    rm -rf /tmp/nanodecoder_gpu_diag
    env_cache=(); [ "$cache" = off ] && env_cache=(NANODECODER_COMPILATION_CACHE=)
    echo "== loop speed, compilation cache $cache" | tee -a "$OUT/summary.txt"
    env "${env_cache[@]}" JAX_LOG_COMPILES=1 timeout 60 "$PY" bench/recipe_run.py "${recipe[@]}" "${data[@]}" --set train.num_steps=300 \
      --set train.decay_steps=300 --set eval.every=300 --set eval.batches=10 --set train.profile_start=200 \
      --set train.profile_steps=20 --workdir /tmp/nanodecoder_gpu_diag \
      --out "$OUT/diag_cache_$cache.json" > "$OUT/diag_cache_$cache.log" 2>&1
    grep -E '"median_ms_per_step"|"stopped_by"' "$OUT/diag_cache_$cache.json" 2>/dev/null | tee -a "$OUT/summary.txt"
    # More than one compilation of the step would mean the loop retraces (e.g. a changing argument signature).
    echo "compilations: train_steps $(grep -c 'Compiling jit(train_steps) ' "$OUT/diag_cache_$cache.log")," \
      "train_step $(grep -c 'Compiling jit(train_step) ' "$OUT/diag_cache_$cache.log")" | tee -a "$OUT/summary.txt"
    # Where the 20 traced steps spent their time, device ops and host events (bench/trace_summary.py).
    "$PY" bench/trace_summary.py /tmp/nanodecoder_gpu_diag/plugins/profile --top 12 > "$OUT/diag_trace_$cache.txt" 2>&1
    head -n 30 "$OUT/diag_trace_$cache.txt" | tee -a "$OUT/summary.txt"
  done
fi

# The base recipe runs with the compilation-cache setting that the diagnosis found faster (default: on).
recipe_cache=() cache_label=on
if [ "${SMOKE:-0}" != 1 ] && "$PY" - "$OUT" 2>/dev/null <<'PY'
import json, sys
ms = {c: json.load(open(f'{sys.argv[1]}/diag_cache_{c}.json')).get('median_ms_per_step') for c in ('off', 'on')}
sys.exit(0 if None not in ms.values() and ms['off'] < 0.8 * ms['on'] else 1)
PY
then
  recipe_cache=(NANODECODER_COMPILATION_CACHE=) cache_label=off
fi
echo "== base recipe (compilation cache $cache_label)" | tee -a "$OUT/summary.txt"
rm -rf /tmp/nanodecoder_gpu_base
env "${recipe_cache[@]}" timeout 170 "$PY" bench/recipe_run.py "${recipe[@]}" "${data[@]}" \
  --workdir /tmp/nanodecoder_gpu_base --out "$OUT/base_recipe.json" > "$OUT/base_recipe.log" 2>&1
echo "exit $?" | tee -a "$OUT/summary.txt"
cp /tmp/nanodecoder_gpu_base/metrics.jsonl "$OUT/base_recipe_metrics.jsonl" 2>/dev/null
tail -n 25 "$OUT/base_recipe.log" | tee -a "$OUT/summary.txt"

echo "== speed" | tee -a "$OUT/summary.txt"
timeout 120 "$PY" bench/train_speed.py "${speed[@]}" --out "$OUT/train_speed.json" > "$OUT/train_speed.log" 2>&1
status=$?
echo "exit $status" | tee -a "$OUT/summary.txt"
tail -n 8 "$OUT/train_speed.log" | tee -a "$OUT/summary.txt"
if [ "$status" != 0 ] && [ "$status" != 124 ]; then  # e.g. no cuDNN flash attention here: plain XLA attention
  echo "== speed, einsum attention" | tee -a "$OUT/summary.txt"
  timeout 60 "$PY" bench/train_speed.py "${speed[@]}" --set 'model.attention_impl="einsum"' \
    --out "$OUT/train_speed_einsum.json" > "$OUT/train_speed_einsum.log" 2>&1
  echo "exit $?" | tee -a "$OUT/summary.txt"
  tail -n 8 "$OUT/train_speed_einsum.log" | tee -a "$OUT/summary.txt"
fi
# 3. If time is left (the whole script must stay well under 10 minutes): GPT-2-small at batch 64, whose larger
#    matmuls may raise MFU (the issue fixes the shape, not the batch).
if [ "${SMOKE:-0}" != 1 ] && [ "$SECONDS" -lt 420 ]; then
  echo "== speed, GPT-2-small at batch 64 (script at ${SECONDS} s)" | tee -a "$OUT/summary.txt"
  timeout 90 "$PY" bench/train_speed.py --shapes gpt2_small --steps 20 --repeats 5 --set 'model.dtype="bfloat16"' \
    --set train.batch_size=64 --out "$OUT/train_speed_gpt2_batch64.json" > "$OUT/train_speed_gpt2_batch64.log" 2>&1
  echo "exit $?" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/train_speed_gpt2_batch64.log" | tee -a "$OUT/summary.txt"
fi
echo "total ${SECONDS} s" | tee -a "$OUT/summary.txt"
