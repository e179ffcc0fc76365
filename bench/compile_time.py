"""Compile time of the train step as depth grows, with blocks unrolled or scanned (`model.scan_layers`).

  python bench/compile_time.py                      # base width, 4 / 12 / 24 layers
  python bench/compile_time.py --layers 4,8 --shape cpu

Each configuration compiles in a fresh process with the persistent compilation
cache off, so the numbers are real compile times (tracing + lowering + XLA).
Prints a table and writes JSON (default bench/out/compile_time.json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_args import out_file, positive_ints, shape as shape_name  # noqa: E402
from nanodecoder.files import atomic_write  # noqa: E402  (light: no JAX import)


def worker(shape: str, layers: int, scan: bool) -> dict:
  import jax
  import numpy as np

  from nanodecoder import cli, config as config_lib, sharding, train

  config = config_lib.load_config_file(REPO / 'experiments' / f'{shape}.py')
  config.model.num_layers = layers
  config.model.scan_layers = scan
  config.train.steps_per_call = 1
  cli.setup_jax(config)
  mesh = sharding.make_mesh(config.mesh)
  trainer = train.create_trainer(config, config_lib.model_config(config, 65), mesh)
  tokens = np.zeros((config.train.batch_size, config.model.context_length + 1), np.int32)
  batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
  start = time.perf_counter()
  lowered = trainer.train_step.lower(trainer.state, batch)
  traced = time.perf_counter() - start
  lowered.compile()
  total = time.perf_counter() - start
  return {'shape': shape, 'layers': layers, 'scan_layers': scan, 'trace_lower_s': traced, 'compile_s': total,
          'platform': jax.default_backend()}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', type=shape_name, default='base')
  parser.add_argument('--layers', type=positive_ints, default='4,12,24')
  parser.add_argument('--out', type=out_file, default=str(REPO / 'bench' / 'out' / 'compile_time.json'))
  parser.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    shape, layers, scan = args.worker
    print(json.dumps(worker(shape, int(layers), scan == 'True')))
    return

  from train_speed import machine

  rows = []
  env = {**os.environ, 'NANODECODER_COMPILATION_CACHE': ''}
  for layers in args.layers:
    for scan in (False, True):
      result = subprocess.run([sys.executable, __file__, '--worker', args.shape, str(layers), str(scan)],
                              capture_output=True, text=True, env=env, cwd=REPO)
      if result.returncode:
        raise SystemExit(result.stderr[-3000:])
      rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
  print(f'{"layers":>6} {"scan":>5} {"trace+lower s":>13} {"compile s":>9}')
  for r in rows:
    print(f'{r["layers"]:>6} {str(r["scan_layers"]):>5} {r["trace_lower_s"]:>13.1f} {r["compile_s"]:>9.1f}')
  out = pathlib.Path(args.out)
  atomic_write(out, json.dumps({'machine': machine(), 'results': rows}, indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
