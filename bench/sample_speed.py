"""Sampling speed: KV-cached vs uncached generation, base shape by default.

  python bench/sample_speed.py                    # 500 tokens, batch 1 and 8
  python bench/sample_speed.py --shape cpu --batch_sizes 1

Tokens/s counts every generated token of every row. Each configuration is
compiled first and then timed over `--repeats` calls (the median is kept).
The uncached method re-runs the model over a fixed window of context_length
tokens per new token, so its per-token cost is the same for any length: it is
timed over `--uncached_tokens` tokens (default 100) to keep the run short.
The last column compares the cached rows with PyTorch nanoGPT's uncached
sampling of the base shape measured on the 2-core development CPUs (12-18
tokens/s; issue 3's target is 50x of it). Writes JSON (default
bench/out/sample_speed.json).
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

from cli_args import out_file, positive_int, positive_ints, shape  # noqa: E402
from nanodecoder.files import atomic_write  # noqa: E402  (light: no JAX import)

# PyTorch nanoGPT's uncached sampling, base shape, 2-core development CPUs (tokens/s, low and high).
NANOGPT_UNCACHED_TOKENS_PER_S = (12.0, 18.0)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', type=shape, default='base',
                      help='experiment file under experiments/ giving the model shape')
  parser.add_argument('--tokens', type=positive_int, default=500)
  parser.add_argument('--uncached_tokens', type=positive_int, default=100)
  parser.add_argument('--batch_sizes', type=positive_ints, default='1,8')
  parser.add_argument('--repeats', type=positive_int, default=3)
  parser.add_argument('--out', type=out_file, default=str(REPO / 'bench' / 'out' / 'sample_speed.json'))
  args = parser.parse_args()

  import jax
  import numpy as np
  from flax import nnx

  from nanodecoder import cli, config as config_lib
  from nanodecoder.model import Decoder
  from nanodecoder.sampling import SamplingOptions, generate
  from train_speed import machine

  cli.setup_jax()
  config = config_lib.load_config_file(REPO / 'experiments' / f'{args.shape}.py')
  model_config = config_lib.model_config(config, vocab_size=65)
  with nnx.use_eager_sharding(False):
    model = Decoder(model_config, nnx.Rngs(params=0))
  prompt = np.array([0], np.int32)

  rows = []
  for batch in args.batch_sizes:
    for use_cache in (True, False):
      tokens = args.tokens if use_cache else args.uncached_tokens
      options = SamplingOptions(max_new_tokens=tokens, num_samples=batch, temperature=1.0, top_k=40, use_cache=use_cache)
      start = time.perf_counter()
      generate(model, prompt, options)
      compile_s = time.perf_counter() - start
      times = []
      for r in range(args.repeats):
        start = time.perf_counter()
        generate(model, prompt, options.__class__(**{**options.__dict__, 'seed': r + 1}))
        times.append(time.perf_counter() - start)
      seconds = statistics.median(times)
      rows.append({'batch_size': batch, 'kv_cache': use_cache, 'tokens': tokens, 'seconds': seconds,
                   'first_call_s': compile_s, 'tokens_per_s': batch * tokens / seconds,
                   'ms_per_token_step': 1000 * seconds / tokens})
  for batch in {r['batch_size'] for r in rows}:
    cached = next(r for r in rows if r['batch_size'] == batch and r['kv_cache'])
    uncached = next(r for r in rows if r['batch_size'] == batch and not r['kv_cache'])
    cached['speedup_vs_uncached'] = cached['tokens_per_s'] / uncached['tokens_per_s']
    if args.shape == 'base':
      cached['speedup_vs_nanogpt_uncached'] = [cached['tokens_per_s'] / r for r in NANOGPT_UNCACHED_TOKENS_PER_S[::-1]]

  print(f'shape {args.shape}: {model_config.num_layers} layers, {model_config.embed_dim} wide, '
        f'context {model_config.context_length}; {jax.devices()[0].platform}')
  print(f'{"batch":>5} {"kv cache":>8} {"tokens":>6} {"seconds":>8} {"tokens/s":>9} {"ms/step":>8} {"speedup":>8} '
        f'{"vs nanoGPT uncached":>20}')
  for r in rows:
    speedup = f'{r["speedup_vs_uncached"]:.0f}x' if 'speedup_vs_uncached' in r else ''
    vs_nanogpt = r.get('speedup_vs_nanogpt_uncached')
    nanogpt = '-'.join(f'{x:.0f}' for x in vs_nanogpt) + 'x' if vs_nanogpt else ''
    print(f'{r["batch_size"]:>5} {str(r["kv_cache"]):>8} {r["tokens"]:>6} {r["seconds"]:>8.2f} {r["tokens_per_s"]:>9.1f} '
          f'{r["ms_per_token_step"]:>8.2f} {speedup:>8} {nanogpt:>20}')
  out = pathlib.Path(args.out)
  device = {'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind}
  atomic_write(out, json.dumps({'machine': machine(), **device, 'shape': args.shape, 'results': rows}, indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
