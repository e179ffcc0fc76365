"""Time of the token-embedding gradient: XLA's scatter-add (the gradient of `table[ids]`) against
`nanodecoder.ops.embed_lookup`'s one-hot matmul, on uniformly random ids and on the ids of real text.

  python bench/embed_grad.py --text input.txt      # prints a table, writes JSON (default bench/out/embed_grad.json)

On NVIDIA GPUs the scatter-add runs as atomic compare-and-swap loops (bf16; fp32 in jaxlib 0.10.2-0.11.0),
which serialize on repeated ids: text repeats a few characters (space, 'e') far more than uniform ids do.
Shapes: the base recipe's batch (64 x 256 tokens, 384 wide) and GPT-2-small's (32 x 1024, 768 wide).
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
from cli_args import out_file, text_file  # noqa: E402

SHAPES = {'base': (64, 256, 384), 'gpt2_small': (32, 1024, 768)}  # batch, tokens, width


def median_ms(fn, *args, repeats: int = 20) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--text', type=text_file, help='text file whose character ids are timed besides uniform ids')
  parser.add_argument('--out', type=out_file, default=str(REPO / 'bench' / 'out' / 'embed_grad.json'))
  args = parser.parse_args()
  text = None
  if args.text:
    text = pathlib.Path(args.text).read_text(encoding='utf-8')
    needed = max(batch * length for batch, length, _ in SHAPES.values())
    if len(text) < needed:
      parser.error(f'--text {args.text} has {len(text):,} characters; the largest timed batch takes {needed:,}: '
                   'give a longer text (e.g. tiny-shakespeare)')

  import jax
  import jax.numpy as jnp
  import numpy as np

  from nanodecoder.tokenizer import Tokenizer
  from nanodecoder.ops import embed_lookup
  from train_speed import machine

  vocab = 65  # tiny-shakespeare's characters
  id_sources = {'uniform': np.random.default_rng(0).integers(0, vocab, size=1_000_000).astype(np.int32)}
  if text is not None:
    tokenizer = Tokenizer(text)
    id_sources['text'], vocab = tokenizer.encode(text), max(vocab, tokenizer.vocab_size)
  rows = []
  for shape, (batch, length, width) in SHAPES.items():
    for dtype in ('bfloat16', 'float32'):
      for source, ids in id_sources.items():
        ids = jnp.asarray(ids[:batch * length].reshape(batch, length))
        table = jax.random.normal(jax.random.key(0), (vocab, width), jnp.float32)
        cotangent = jax.random.normal(jax.random.key(1), (batch, length, width), dtype)
        # The gradient of the lookup as training takes it: through the cast to the compute dtype.
        grad = lambda lookup: jax.jit(jax.grad(lambda t, g: jnp.sum(lookup(t.astype(dtype), ids) * g, dtype=jnp.float32)))
        row = {'shape': shape, 'dtype': dtype, 'ids': source,
               'scatter_ms': median_ms(grad(lambda t, i: t[i]), table, cotangent),
               'one_hot_ms': median_ms(grad(embed_lookup), table, cotangent)}
        rows.append(row)
        print(f'{shape:<11} {dtype:<9} {source:<8} scatter-add {row["scatter_ms"]:8.3f} ms   '
              f'one-hot matmul {row["one_hot_ms"]:8.3f} ms', flush=True)
  payload = {'machine': machine(), 'device_kind': jax.devices()[0].device_kind, 'results': rows}
  atomic_write(args.out, json.dumps(payload, indent=2) + '\n')
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
