"""Train a whole recipe and report its time, loss and speed (used by bench/gpu_check.sh).

  python bench/recipe_run.py --config experiments/base.py --set model.dtype='"bfloat16"' --workdir /tmp/base

Prints and writes JSON: total wall time, training time (the logged step
times: no compilation, no evaluation, no checkpoint waits; profiled steps
count at the median), best val loss (also in bits per character) and final
val loss, median tokens/s over the
run's log windows, and MFU against the chip's datasheet bf16 peak (GPU) from
`train_speed.PEAK_BF16_FLOPS`. The workdir must hold no checkpoints (training would resume from them).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanodecoder.files import atomic_write  # noqa: E402  (light: no JAX import)
from cli_args import checked_configs, out_file, override  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=JSON', type=override)
  parser.add_argument('--workdir', required=True, help='a new or empty folder for the run')
  parser.add_argument('--out', type=out_file)
  args = parser.parse_args()
  config, = checked_configs(parser, [args.config], args.set)

  from nanodecoder import cli, config as config_lib, train
  from nanodecoder.tokenizer import Tokenizer
  from nanodecoder.model import train_flops_per_token
  from nanodecoder.sweep import saved_steps
  from train_speed import MFU_CONVENTION, machine, peak_flops

  if saved_steps(args.workdir):  # training would resume from them: the report would time only the rest
    parser.error(f'--workdir {args.workdir} holds checkpoints of an earlier run; a recipe is timed from step 0: '
                 'give a new or empty folder')
  cli.setup_jax(config)
  import jax

  start = time.perf_counter()
  metrics = train.train_and_evaluate(config, args.workdir)
  wall = time.perf_counter() - start

  metrics_file = pathlib.Path(args.workdir) / 'metrics.jsonl'
  records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
  train_records = [r for r in records if 'train/loss' in r]
  logs = [r for r in train_records if 'train/ms_per_step' in r]
  evals = [r for r in records if 'eval/val_loss' in r]
  best = min(evals, key=lambda r: r['eval/val_loss'], default=None)
  # Below train.num_steps when a signal stopped the run: then its last checkpoint is past its last log line.
  steps_done = max([r['step'] for r in train_records[-1:]] + saved_steps(args.workdir), default=0)
  # None where a run stopped (signal, timeout) before its first timed log line or evaluation.
  median_ms = tokens_per_s = train_seconds = achieved = None
  previous = {r['step']: p['step'] for p, r in zip(train_records, train_records[1:])}
  # Windows that ran the profiler (steps profile_start + 1 .. + profile_steps) are not timed: tracing slows them.
  first, end = config.train.profile_start, config.train.profile_start + config.train.profile_steps
  profiled = lambda r: config.train.profile_steps and previous.get(r['step'], 0) < end and r['step'] > first
  logs = [r for r in logs if not profiled(r)]
  if logs:
    # Each timed log line covers the steps since the previous log line; steps without a timing (the first,
    # compiling call, and the profiled windows) count at the median speed.
    covered = {r['step']: r['step'] - previous[r['step']] for r in logs if r['step'] in previous}
    median_ms = statistics.median(r['train/ms_per_step'] for r in logs)
    train_seconds = (sum(r['train/ms_per_step'] * covered.get(r['step'], 0) for r in logs)
                     + (steps_done - sum(covered.values())) * median_ms) / 1000
    tokens_per_s = statistics.median(r['train/tokens_per_s'] for r in logs)
    tokenizer_json = (pathlib.Path(args.workdir) / 'tokenizer.json').read_text(encoding='utf-8')
    vocab_size = Tokenizer.from_json(tokenizer_json).vocab_size  # the LM head's size, for the FLOPs
    achieved = train_flops_per_token(config_lib.model_config(config, vocab_size)) * tokens_per_s
  peak = peak_flops(jax.devices()[0].device_kind) if jax.default_backend() == 'gpu' else None
  result = {
      'config': args.config, 'overrides': args.set, 'device_kind': jax.devices()[0].device_kind,
      'devices': jax.device_count(), 'steps': config.train.num_steps, 'steps_done': steps_done,
      'stopped_by': metrics.get('stopped_by'), 'wall_s': wall, 'train_s': train_seconds,
      'median_ms_per_step': median_ms,
      'best_val_loss': None if best is None else best['eval/val_loss'],
      'best_val_bits_per_char': None if best is None else best['eval/val_bits_per_char'],
      'final_val_loss': metrics.get('val_loss'), 'final_train_loss': metrics.get('train_loss'),
      'tokens_per_s': tokens_per_s, 'tflops': None if achieved is None else achieved / 1e12,
      'mfu': None if peak is None or achieved is None else achieved / (peak * jax.device_count()),
      'machine': machine(),
  }
  print(json.dumps(result, indent=2))
  if result['mfu'] is not None:
    print(MFU_CONVENTION)
  if args.out:
    atomic_write(args.out, json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
  main()
