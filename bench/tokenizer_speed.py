"""Time to learn BPE merges and to encode with them, and characters per token, for a few vocabulary sizes.

  python bench/tokenizer_speed.py --text ../shared/data/tinyshakespeare/input.txt --vocab_sizes 256,512,2048

Learns the merges on the text's first 90% (tiny-shakespeare's train split), as
`data.vocab_size` does, and encodes that part with them. Prints a table and
writes JSON (default bench/out/tokenizer_speed.json).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanodecoder.files import atomic_write  # noqa: E402
from cli_args import out_file, positive_ints, text_file  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--text', type=text_file, required=True, help='a UTF-8 text file')
  parser.add_argument('--vocab_sizes', type=positive_ints, default=[256, 512, 2048])
  parser.add_argument('--out', type=out_file, default=str(REPO / 'bench' / 'out' / 'tokenizer_speed.json'))
  args = parser.parse_args()
  text = pathlib.Path(args.text).read_text(encoding='utf-8')
  from nanodecoder.tokenizer import Tokenizer
  from train_speed import machine

  train = text[:len(text) * 9 // 10]
  too_small = [v for v in args.vocab_sizes if v < len(set(text))]
  if too_small:
    parser.error(f'--vocab_sizes {too_small[0]} is below the text\'s {len(set(text))} characters; give larger ones')
  rows = []
  print(f'{"vocab":>6} {"merges":>6} {"learn s":>8} {"encode s":>8} {"chars/token":>11}')
  for vocab_size in args.vocab_sizes:
    start = time.perf_counter()
    tokenizer = Tokenizer.train(text, train, vocab_size)
    learned = time.perf_counter()
    tokens = tokenizer.encode(train)
    encoded = time.perf_counter()
    rows.append({'vocab_size': tokenizer.vocab_size, 'merges': len(tokenizer.merges), 'learn_s': learned - start,
                 'encode_s': encoded - learned, 'characters_per_token': len(train) / len(tokens)})
    r = rows[-1]
    print(f'{r["vocab_size"]:>6} {r["merges"]:>6} {r["learn_s"]:>8.2f} {r["encode_s"]:>8.2f} '
          f'{r["characters_per_token"]:>11.3f}')
  out = pathlib.Path(args.out)
  atomic_write(out, json.dumps({'machine': machine(), 'text': str(args.text), 'characters': len(train),
                                'results': rows}, indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
