#!/usr/bin/env bash
# GPU checks for a lent H100/H200: about 6 minutes (340 s on an H100; at most ~9.5), installs nothing. Writes results under $OUT;
# run it with the device's full 600 s limit. $OUT/results.tgz is refreshed after every section, so a run killed
# at its limit still returns what the finished sections measured.
#
#   bench/gpu_check.sh                 # on the GPU machine: $OUT/summary.txt, the rest in $OUT/results.tgz
#   SMOKE=1 bench/gpu_check.sh         # dry run of the same plumbing (any machine, CPU too: 1-2.5 minutes on 2 cores)
#
# 1. (Not run here: its numbers are in bench/RESULTS.md.) The token-embedding gradient, XLA's scatter-add against
#    the one-hot matmul the model uses: bench/embed_grad.py --text input.txt.
# 2. The base recipe (experiments/base.py, 5000 steps) in bf16: wall time, training time, best val loss on
#    'validation+test', tokens/s and MFU, with 20 of its steps profiled.  Targets on one H100: val <= 1.47 in
#    <= 60 s of training.
# 3. Speed of the base and GPT-2-small (12 x 768, context 1024) shapes on tiny-shakespeare's tokens: ms/step,
#    tokens/s and MFU over 100 timed steps.                               Target: GPT-2-small MFU >= 45% in bf16.
#    GPT-2-small takes 64 rows per step (experiments/gpt2_small.py); then 32 and 128 rows, to compare (the
#    optimizer's passes over the weights, ~3 GB per step, come once per 32k, 64k or 128k tokens).
#    MFU counts attention in full (PaLM/nanoGPT convention; bench/train_speed.py prints it).
# 4. Only if the recipe trained slower than 15 ms/step: 300 steps of it with the persistent compilation cache off.
# 5. 60 steps of GPT-2-small in the training loop, profiled, its optimized HLO dumped and its kernels counted.
# Needs jax with CUDA, flax, optax and orbax-checkpoint (the GPU image has them), ml_collections
# (pure Python; taken from .gpu/site when the image lacks it), and the tiny-shakespeare text at
# .gpu/input.txt or $NANODECODER_TEXT (the machine has no network; bench/RESULTS.md says how to stage both).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
RESULTS=/tmp/nanodecoder_gpu_results  # every file, packed into $OUT/results.tgz at the end (few files come back)
rm -rf "$RESULTS" && mkdir -p "$OUT" "$RESULTS"
SUMMARY="$OUT/summary.txt"
rm -f "$SUMMARY"
pack() { cp "$SUMMARY" "$RESULTS/" 2>/dev/null; tar czf "$OUT/results.tgz.tmp" -C "$RESULTS" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
trap pack EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$PWD/.gpu/site" PYTHONUNBUFFERED=1
# A fresh persistent compilation cache: a second run on a still-warm machine compiles (and is timed) like the first.
export NANODECODER_COMPILATION_CACHE=/tmp/nanodecoder_gpu_cache
rm -rf "$NANODECODER_COMPILATION_CACHE"
TEXT="${NANODECODER_TEXT:-$PWD/.gpu/input.txt}"
PY="${PYTHON:-python3}"
data=(--set 'data.source="text"' --set "data.text_path=\"$TEXT\"")
if [ "${SMOKE:-0}" = 1 ]; then
  recipe=(--config experiments/cpu.py --set train.num_steps=40 --set train.decay_steps=40 --set train.warmup_steps=5
          --set train.log_every=10 --set eval.every=20 --set eval.batches=2 --set train.profile_start=20
          --set train.profile_steps=10)
  speed=(--shapes cpu --steps 10 --repeats 2)
  other_rows=(--shapes cpu --steps 10 --repeats 2)
  gpt2=(--config experiments/cpu.py)
  slow_ms=0  # exercise step 4 too (any recipe that ran is slower than 0 ms/step)
else
  recipe=(--config experiments/base.py --set 'model.dtype="bfloat16"' --set train.profile_start=1000
          --set train.profile_steps=20)
  speed=(--shapes base,gpt2_small --steps 20 --repeats 5 --set 'model.dtype="bfloat16"')
  other_rows=(--shapes gpt2_small --steps 10 --repeats 3 --set 'model.dtype="bfloat16"')
  gpt2=(--config experiments/gpt2_small.py)
  slow_ms=15
fi
section() { pack; echo "== $* (script at ${SECONDS} s)" | tee -a "$SUMMARY"; }
limit() { timeout -k 10 "$@"; }  # SIGTERM (recipe_run.py saves and still writes its JSON), SIGKILL 10 s later

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'no nvidia-smi'
  limit 60 "$PY" -c 'import jax, flax, optax, orbax.checkpoint as ocp, ml_collections
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", ocp.__version__)
print(jax.devices())'
} 2>&1 | tee "$RESULTS/env.txt"

if [ "${SMOKE:-0}" != 1 ] && ! limit 60 "$PY" -c 'import jax; raise SystemExit(jax.default_backend() != "gpu")'; then
  echo "error: JAX sees no GPU here; run this on the GPU machine (or SMOKE=1 for a dry run on any machine)" \
    | tee -a "$SUMMARY" >&2
  exit 2
fi

section 'base recipe'
rm -rf /tmp/nanodecoder_gpu_base
limit 170 "$PY" bench/recipe_run.py "${recipe[@]}" "${data[@]}" \
  --workdir /tmp/nanodecoder_gpu_base --out "$RESULTS/base_recipe.json" > "$RESULTS/base_recipe.log" 2>&1
echo "exit $?" | tee -a "$SUMMARY"
cp /tmp/nanodecoder_gpu_base/metrics.jsonl "$RESULTS/base_recipe_metrics.jsonl" 2>/dev/null
tail -n 25 "$RESULTS/base_recipe.log" | tee -a "$SUMMARY"
# Where 20 steps of the loop spent their time: device ops and host events (bench/trace_summary.py).
limit 30 "$PY" bench/trace_summary.py /tmp/nanodecoder_gpu_base/plugins/profile --top 12 2>&1 | head -n 40 | tee -a "$SUMMARY"

section 'speed (tiny-shakespeare tokens)'
limit 150 "$PY" bench/train_speed.py "${speed[@]}" --text "$TEXT" --out "$RESULTS/train_speed.json" \
  > "$RESULTS/train_speed.log" 2>&1
echo "exit $?" | tee -a "$SUMMARY"
tail -n 9 "$RESULTS/train_speed.log" | tee -a "$SUMMARY"
# Other batches: per token the same kernels, but the optimizer's passes over the weights (bench/gpu_hlo.py: ~3 GB
# of the 35.5 GB a 32-row step moves outside the matmuls) are shared by fewer or more tokens.
for rows in 32 128; do
  section "speed of GPT-2-small with $rows rows per step"
  limit 100 "$PY" bench/train_speed.py "${other_rows[@]}" --set "train.batch_size=$rows" --text "$TEXT" \
    --ceiling-from "$RESULTS/train_speed.json" --out "$RESULTS/train_speed_batch$rows.json" \
    > "$RESULTS/train_speed_batch$rows.log" 2>&1
  echo "exit $?" | tee -a "$SUMMARY"
  tail -n 3 "$RESULTS/train_speed_batch$rows.log" | tee -a "$SUMMARY"
done

# A loop slower than the step alone: is it the persistent compilation cache (on above, off in train_speed.py)?
# (Not when the recipe failed: the same command would fail again.)
if "$PY" - "$RESULTS/base_recipe.json" "$slow_ms" 2>/dev/null <<'PY'
import json, sys
ms = json.load(open(sys.argv[1])).get('median_ms_per_step')
sys.exit(0 if ms is not None and ms > float(sys.argv[2]) else 1)
PY
then
  section "loop speed with the compilation cache off (the recipe ran slower than ${slow_ms} ms/step)"
  rm -rf /tmp/nanodecoder_gpu_diag
  NANODECODER_COMPILATION_CACHE= limit 60 "$PY" bench/recipe_run.py "${recipe[@]}" "${data[@]}" \
    --set train.num_steps=300 --set train.decay_steps=300 --set eval.every=300 --set eval.batches=10 \
    --set train.profile_start=200 --workdir /tmp/nanodecoder_gpu_diag --out "$RESULTS/diag_cache_off.json" \
    > "$RESULTS/diag_cache_off.log" 2>&1
  grep -E '"median_ms_per_step"|"stopped_by"' "$RESULTS/diag_cache_off.json" 2>&1 | tee -a "$SUMMARY"
  limit 30 "$PY" bench/trace_summary.py /tmp/nanodecoder_gpu_diag/plugins/profile --top 12 2>&1 | head -n 30 \
    | tee -a "$SUMMARY"
fi

# 5. GPT-2-small in the training loop: 20 steps profiled and the optimized HLO of its step kept, for the next look
#    at where its MFU goes (the trace and the HLO land in results.tgz).
section 'GPT-2-small in the training loop, 20 steps profiled'
rm -rf /tmp/nanodecoder_gpu_gpt2 /tmp/nanodecoder_gpu_hlo
XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/nanodecoder_gpu_hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=train_steps" \
  limit 75 "$PY" bench/recipe_run.py "${gpt2[@]}" "${data[@]}" --set train.num_steps=60 --set train.decay_steps=60 \
  --set train.warmup_steps=10 --set train.log_every=10 --set eval.every=60 --set eval.batches=2 \
  --set train.profile_start=30 --set train.profile_steps=20 --workdir /tmp/nanodecoder_gpu_gpt2 \
  --out "$RESULTS/gpt2_loop.json" > "$RESULTS/gpt2_loop.log" 2>&1
grep -E '"median_ms_per_step"|"mfu"' "$RESULTS/gpt2_loop.json" 2>&1 | tee -a "$SUMMARY"
limit 30 "$PY" bench/trace_summary.py /tmp/nanodecoder_gpu_gpt2/plugins/profile --top 40 > "$RESULTS/gpt2_trace.txt" 2>&1
head -n 30 "$RESULTS/gpt2_trace.txt" | tee -a "$SUMMARY"
find /tmp/nanodecoder_gpu_gpt2/plugins/profile -name '*.trace.json.gz' -exec cp {} "$RESULTS/gpt2.trace.json.gz" \;
find /tmp/nanodecoder_gpu_hlo -name '*train_steps*after_optimizations.txt' -exec gzip -c {} \; > "$RESULTS/gpt2_hlo.txt.gz" 2>/dev/null
# Its kernels by kind and their bytes, to set beside what bench/gpu_hlo.py predicts without a GPU.
limit 60 "$PY" - "$RESULTS/gpt2_hlo.txt.gz" <<'PY' 2>&1 | tee -a "$SUMMARY"
import gzip, sys
sys.path.insert(0, 'bench')
from gpu_hlo import kernel_counts, kernel_traffic
hlo = gzip.open(sys.argv[1], 'rt').read()
print('kernels of the step:', kernel_counts(hlo))
print('their inputs + outputs (GB):', {kind: round(gb, 1) for kind, gb in kernel_traffic(hlo).items()})
PY
echo "total ${SECONDS} s" | tee -a "$SUMMARY"
