"""Training speed and memory per model shape, against the machine's own matmul ceiling.

  python bench/train_speed.py                      # cpu and base shapes
  python bench/train_speed.py --shapes cpu --steps 100 --repeats 5

Each shape runs in its own process (so peak RSS is its own) with the
experiment's settings, on uniformly random tokens, or on the character tokens
of `--text`: on GPUs speed can depend on how often tokens repeat (atomic
scatter-adds serialize on repeated ids; see `nanodecoder.ops.embed_lookup`).
Prints a table and writes JSON (default bench/out/train_speed.json).
Per shape: compile time of the first step (persistent compilation cache
off), median ms/step over `repeats` blocks of `steps` steps, tokens/s,
achieved GFLOP/s (model FLOPs, see `nanodecoder.model.train_flops_per_token`),
its fraction of a large matmul measured in the same run (fp32 on CPU, bf16 on
GPU), MFU against the chip's datasheet bf16 peak on GPUs, and peak RSS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_args import checked_configs, load_config, out_file, override, positive_int, shapes, text_file  # noqa: E402
from nanodecoder.files import atomic_write  # noqa: E402  (light: no JAX import)

# steps and repeats per shape when not given on the command line
DEFAULT_STEPS = {'cpu': 50, 'base': 2}
DEFAULT_REPEATS = {'cpu': 5, 'base': 3}
# Settings per shape for CPU runs: the base shape trains 1.4x faster as 8 micro-batches through scanned layers
# than as one batch (5.0 vs 7.2 s/step in bench/RESULTS.md), in about 1/8 of the activation memory (same math as
# one batch of 64; see README, Performance).
CPU_SETTINGS = {'base': ['model.scan_layers=true', 'train.grad_accum_steps=8', 'train.steps_per_call=1']}
MFU_CONVENTION = ('MFU = model FLOPs / datasheet dense bf16 peak; model FLOPs per token = 6 x matmul weights '
                  '(LM head included, embedding lookups not) + 12 x layers x context x width (attention counted '
                  'in full, as PaLM and nanoGPT do; a causal kernel does about half of it)')
# Dense bf16 peak FLOP/s from the datasheets (SXM parts), for MFU.
PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
                   'B200': 2250e12}  # first match wins: the SXM parts last


def peak_flops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_kind), None)


def worker(shape: str, steps: int, repeats: int, overrides: list[str], text: str | None = None,
           packed_qkv: bool = False) -> dict:
  import jax
  import numpy as np

  from nanodecoder import cli, config as config_lib, data as data_lib, sharding, train
  from nanodecoder.model import CausalSelfAttention, train_flops_per_token
  from nanodecoder.tokenizer import Tokenizer

  if packed_qkv:  # for comparison: q, k, v cut out of one matmul's result even for fused attention kernels
    project = CausalSelfAttention.project
    CausalSelfAttention.project = lambda self, x, separately=False: project(self, x)

  config = load_config(REPO / 'experiments' / f'{shape}.py', overrides)
  cli.setup_jax(config)
  mesh = sharding.make_mesh(config.mesh)
  train.check_mesh_fits(config, mesh)
  if text:
    corpus = pathlib.Path(text).read_text(encoding='utf-8')
    tokenizer = Tokenizer(corpus)
    tokens = tokenizer.encode(corpus)
  else:
    tokenizer = Tokenizer(''.join(map(chr, range(32, 97))))  # 65 symbols, as tiny-shakespeare
    tokens = np.random.default_rng(0).integers(0, 65, size=200_000).astype(np.int32)
  dataset = data_lib.Dataset(tokenizer, tokens, tokens, config.model.context_length)
  model_config = config_lib.model_config(config, tokenizer.vocab_size)
  trainer = train.create_trainer(config, model_config, mesh)
  t = config.train
  k = t.steps_per_call  # steps per compiled call, as the trainer runs them
  steps = -(-steps // k) * k  # whole calls: rounded up to a multiple of k (the parent prints it)
  step_fn = trainer.train_step if k == 1 else trainer.train_steps
  batch = lambda step: train.train_batches(dataset, mesh, 0, t.batch_size, step, k)

  start = time.perf_counter()
  compiled = step_fn.lower(trainer.state, batch(0)).compile()
  compile_s = time.perf_counter() - start
  trainer.state, out = compiled(trainer.state, batch(0))
  jax.device_get(out['loss'])
  times = []
  step = k
  for _ in range(repeats):
    start = time.perf_counter()
    next_batch = batch(step)
    for _ in range(steps // k):
      trainer.state, out = compiled(trainer.state, next_batch)
      step += k
      next_batch = batch(step)  # built while the device works, as the trainer does
      jax.device_get(out['loss'])  # the trainer blocks on every call too
    times.append((time.perf_counter() - start) / steps)
  seconds = statistics.median(times)
  tokens_per_step = t.batch_size * config.model.context_length
  flops = train_flops_per_token(model_config) * tokens_per_step
  peak = peak_flops(jax.devices()[0].device_kind) if jax.default_backend() == 'gpu' else None
  return {
      'shape': shape, 'tokens': text or 'uniform random', 'steps': steps, 'steps_per_call': k,
      'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
      'device_kind': jax.devices()[0].device_kind, 'overrides': overrides, 'packed_qkv': packed_qkv,
      'mfu': None if peak is None else flops / seconds / (peak * jax.device_count()),
      'mesh': dict(mesh.shape), 'batch_size': t.batch_size, 'context_length': config.model.context_length,
      'compile_s': compile_s, 'ms_per_step': 1000 * seconds,
      'ms_per_step_all': [1000 * x for x in times], 'tokens_per_s': tokens_per_step / seconds,
      'tflop_per_step': flops / 1e12, 'gflops': flops / seconds / 1e9,
      'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def matmul_ceiling(n: int = 4096, repeats: int = 5) -> float:
  """GFLOP/s of an n x n x n matmul (fp32 on CPU over all cores, bf16 on accelerators), best of `repeats`."""
  import jax
  import jax.numpy as jnp

  dtype = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  n = n if jax.default_backend() == 'cpu' else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def fraction_of_ceiling(row: dict, ceiling: float) -> float:
  """A shape's GFLOP/s over the matmul ceiling of the devices it trained on: the ceiling's one CPU device runs on
  every core, which the trainer's CPU devices share out; an accelerator's ceiling is one chip's, so it counts
  once per device."""
  return row['gflops'] / (ceiling * (1 if row['platform'] == 'cpu' else row['devices']))


def run_child(args: list[str]) -> dict:
  env = {**os.environ, 'NANODECODER_COMPILATION_CACHE': ''}  # measure real compile times
  result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO, env=env)
  if result.returncode == 2:  # a setting the shape cannot run with, said in one line
    raise RuntimeError(result.stderr.strip().splitlines()[-1])
  if result.returncode != 0:
    raise RuntimeError(f'benchmark child {args} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def earlier_ceiling(path: str | None) -> dict | None:
  """{'matmul_gflops', 'platform'} from an earlier run's JSON, or None."""
  try:
    earlier = json.loads(pathlib.Path(path).read_text()) if path else {}
  except (OSError, ValueError):
    return None
  if 'matmul_gflops' in earlier and 'platform' in earlier:
    return {'matmul_gflops': earlier['matmul_gflops'], 'platform': earlier['platform'], 'source': f'from {path}'}
  return None


def machine() -> dict:
  cpu = platform.processor()
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  import jax
  return {'cpu': cpu, 'cores': os.cpu_count(), 'python': platform.python_version(), 'jax': jax.__version__,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shapes', type=shapes, default='cpu,base',
                      help='experiment files under experiments/, comma-separated')
  parser.add_argument('--steps', type=positive_int, help='steps per timed block (default per shape)')
  parser.add_argument('--repeats', type=positive_int, help='timed blocks; the median is reported')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=JSON', type=override,
                      help='config override for every shape, e.g. --set mesh.cpu_devices=1 (replaces CPU_SETTINGS)')
  parser.add_argument('--text', type=text_file, help='train on the character tokens of this text file (default: '
                      'uniform random tokens over 65 symbols)')
  parser.add_argument('--packed-qkv', action='store_true', help='project q, k, v with one matmul also where '
                      'attention is a fused kernel (the model then uses three; see CausalSelfAttention.project)')
  parser.add_argument('--out', type=out_file, default=str(REPO / 'bench' / 'out' / 'train_speed.json'))
  parser.add_argument('--ceiling-from', metavar='JSON', help="reuse the matmul ceiling of an earlier run's JSON "
                      '(measured again when the file has none)')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--ceiling', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not (args.worker or args.ceiling):  # every shape's config, checked before the first measurement
    configs = checked_configs(parser, [REPO / 'experiments' / f'{shape}.py' for shape in args.shapes], args.set)
    characters = len(pathlib.Path(args.text).read_text(encoding='utf-8')) if args.text else math.inf
    for shape, config in zip(args.shapes, configs):
      if characters <= config.model.context_length:
        parser.error(f'--text {args.text} has {characters:,} characters; shape {shape} trains on windows of '
                     f'context_length + 1 = {config.model.context_length + 1}: give a longer text')

  if args.ceiling:
    import jax
    print(json.dumps({'matmul_gflops': matmul_ceiling(), 'platform': jax.default_backend()}))
    return
  if args.worker:
    from nanodecoder.config import ConfigError
    try:
      row = worker(args.worker, args.steps, args.repeats, args.set, args.text, args.packed_qkv)
    except ConfigError as error:  # e.g. a mesh the devices do not fit: one line, which the parent passes on
      print(f'train_speed.py: error: shape {args.worker}: {error}', file=sys.stderr)
      sys.exit(2)
    print(json.dumps(row))
    return

  measured = earlier_ceiling(args.ceiling_from) or run_child(['--ceiling'])
  ceiling = measured['matmul_gflops']
  out = pathlib.Path(args.out)
  payload = {'machine': machine(), 'platform': measured['platform'], 'matmul_gflops': ceiling,
             'overrides': args.set, 'tokens': args.text or 'uniform random', 'results': [], 'failed': []}
  for shape in args.shapes:
    steps = args.steps or DEFAULT_STEPS.get(shape, 10)
    repeats = args.repeats or DEFAULT_REPEATS.get(shape, 3)
    settings = args.set if args.set or measured['platform'] != 'cpu' else CPU_SETTINGS.get(shape, [])
    extra = [x for item in settings for x in ('--set', item)]
    if args.text:
      extra += ['--text', str(pathlib.Path(args.text).resolve())]
    if args.packed_qkv:
      extra.append('--packed-qkv')
    try:
      row = run_child(['--worker', shape, '--steps', str(steps), '--repeats', str(repeats), *extra])
    except RuntimeError as error:  # the other shapes still run; the exit status says a shape failed
      print(error, file=sys.stderr)
      payload['failed'].append(shape)
      continue
    if row['steps'] != steps:
      print(f'{shape}: timed blocks of {row["steps"]} steps ({steps} rounded up to a multiple of '
            f'train.steps_per_call={row["steps_per_call"]})')
    row['fraction_of_matmul_ceiling'] = fraction_of_ceiling(row, ceiling)
    payload['results'].append(row)
    print(f'{shape}: {row["ms_per_step"]:.1f} ms/step, {row["tokens_per_s"]:.0f} tokens/s')
    atomic_write(out, json.dumps(payload, indent=2) + '\n')  # after every shape: a later one may be killed

  print(f'matmul ceiling ({measured.get("source", "measured here")}): {ceiling:.0f} GFLOP/s')
  print(f'{"shape":<10} {"devices":>7} {"compile s":>9} {"ms/step":>9} {"tokens/s":>9} {"GFLOP/s":>8} {"of ceiling":>10} '
        f'{"MFU":>5} {"peak RSS MiB":>12}  settings')
  for r in payload['results']:
    mfu = '' if r['mfu'] is None else f'{r["mfu"]:.0%}'
    print(f'{r["shape"]:<10} {r["devices"]:>7} {r["compile_s"]:>9.1f} {r["ms_per_step"]:>9.1f} {r["tokens_per_s"]:>9.0f} '
          f'{r["gflops"]:>8.1f} {r["fraction_of_matmul_ceiling"]:>10.0%} {mfu:>5} {r["peak_rss_mib"]:>12.0f}  '
          f'{" ".join(r["overrides"] + ["--packed-qkv"] * r["packed_qkv"])}')
  if any(r['mfu'] is not None for r in payload['results']):
    print(MFU_CONVENTION)
  if payload['results']:  # (a run whose every shape failed leaves an earlier file as it was)
    atomic_write(out, json.dumps(payload, indent=2) + '\n')
    print(f'wrote {out}')
  if payload['failed']:
    raise SystemExit(f'failed: {", ".join(payload["failed"])}')


if __name__ == '__main__':
  main()
