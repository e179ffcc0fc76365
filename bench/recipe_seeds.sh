#!/usr/bin/env bash
# Final val loss of the CPU recipe over seeds, over every window of 'validation+test' (about a minute per seed on 2 cores).
#   bench/recipe_seeds.sh [SEED ...]          (default: 1337 1 2 3 4 5 6 7)
# Needs tiny-shakespeare through TFDS (or NANODECODER_MANUAL_DIR). Prints one line per seed; JSON per seed in
# bench/out/recipe_seeds/.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1337 1 2 3 4 5 6 7)
out=bench/out/recipe_seeds
mkdir -p "$out"
for seed in "${seeds[@]}"; do
  rm -rf "/tmp/nanodecoder_seed_$seed"
  python bench/recipe_run.py --config experiments/cpu.py --set "seed=$seed" --set eval.all_windows=true \
    --workdir "/tmp/nanodecoder_seed_$seed" --out "$out/seed_$seed.json" > "$out/seed_$seed.log" 2>&1
  python -c "import json; r = json.load(open('$out/seed_$seed.json')); print('seed $seed: final val loss (every window)', round(r['final_val_loss'], 4))"
done
