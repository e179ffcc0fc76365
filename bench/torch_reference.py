"""A lean PyTorch mirror of the CPU recipe with nanoGPT's semantics, to compare losses (and speed) here.

  pip install torch==2.13.0          # not a project dependency
  python bench/torch_reference.py --text ../shared/data/tinyshakespeare/input.txt --seeds 1337 1 2 3
  python bench/torch_reference.py --sample    # nanoGPT's uncached sampling speed, base shape, batch 1 and 8

Same model (4 layers, 4 heads, 128 wide, context 64, no bias, tied head, GPT-2 init with scaled residual
projections), AdamW (decay on 2-D parameters), nanoGPT's warmup + cosine schedule, clipping at 1.0, batch 12,
2000 steps, first 90% of the text for training. Prints, per seed, the val loss over every full window of the
last 10% (the same measure as `--config.eval.all_windows=True`) and the training speed.

`--sample` times nanoGPT's `generate` (no KV cache: every new token re-runs the model on the last
`context` tokens, logits of the last position only, temperature 1, top-k 40, `torch.multinomial`) with
the base shape (6 layers, 6 heads, 384 wide, context 256) and random weights, the baseline of
`bench/sample_speed.py`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

try:
  import torch
  import torch.nn as nn
  import torch.nn.functional as F
except ImportError as e:
  sys.exit(f'torch_reference.py: error: it needs PyTorch, which is not a project dependency ({e}); install it: '
           'pip install torch==2.13.0')

LAYERS, HEADS, WIDTH, CONTEXT, BATCH, STEPS = 4, 4, 128, 64, 12, 2000  # the CPU recipe
BASE_SHAPE = dict(layers=6, heads=6, width=384, context=256)  # experiments/base.py


class Block(nn.Module):

  def __init__(self, heads: int, width: int):
    super().__init__()
    self.heads, self.width = heads, width
    self.ln_attn = nn.LayerNorm(width, bias=False)
    self.qkv = nn.Linear(width, 3 * width, bias=False)
    self.proj = nn.Linear(width, width, bias=False)
    self.ln_mlp = nn.LayerNorm(width, bias=False)
    self.fc = nn.Linear(width, 4 * width, bias=False)
    self.out = nn.Linear(4 * width, width, bias=False)

  def forward(self, x):
    b, t, _ = x.shape
    q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln_attn(x)).split(self.width, 2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, self.width)
    x = x + self.proj(y)
    return x + self.out(F.gelu(self.fc(self.ln_mlp(x))))


class GPT(nn.Module):

  def __init__(self, vocab: int, layers: int = LAYERS, heads: int = HEADS, width: int = WIDTH, context: int = CONTEXT):
    super().__init__()
    self.context = context
    self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
    self.blocks = nn.ModuleList([Block(heads, width) for _ in range(layers)])
    self.ln_final = nn.LayerNorm(width, bias=False)
    self.head = nn.Linear(width, vocab, bias=False)
    self.tokens.weight = self.head.weight
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    for name, p in self.named_parameters():
      if name.endswith(('proj.weight', 'out.weight')):
        nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

  def forward(self, idx, last_only: bool = False):
    x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_final(x[:, -1:] if last_only else x))

  @torch.no_grad()
  def generate(self, idx, new_tokens: int, temperature: float = 1.0, top_k: int = 40):
    """nanoGPT's sampling loop: crop to the context, re-run the model, sample the last position."""
    for _ in range(new_tokens):
      logits = self(idx[:, -self.context:], last_only=True)[:, -1, :] / temperature
      kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][:, [-1]]
      logits[logits < kth] = -float('inf')
      idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
    return idx


def sample_speed(tokens: int, batch_sizes: list[int], repeats: int = 3) -> None:
  torch.manual_seed(0)
  model = GPT(65, **BASE_SHAPE).eval()
  for batch in batch_sizes:
    prompt = torch.zeros((batch, 1), dtype=torch.long)
    model.generate(prompt, 5)  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      model.generate(prompt, tokens)
      times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    print(f'nanoGPT-style uncached sampling, base shape, batch {batch}: {batch * tokens / seconds:.1f} tokens/s '
          f'({1000 * seconds / tokens:.1f} ms per step, {tokens} tokens, median of {repeats})', flush=True)


def learning_rate(step, peak=1e-3, floor=1e-4, warmup=100, decay=2000):
  if step < warmup:
    return peak * (step + 1) / (warmup + 1)
  progress = min((step - warmup) / (decay - warmup), 1.0)
  return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def run(text: str, seed: int) -> tuple[float, float]:
  chars = sorted(set(text))
  ids = {c: i for i, c in enumerate(chars)}
  data = np.array([ids[c] for c in text], dtype=np.int64)
  split = int(len(data) * 0.9)
  train, val = data[:split], data[split:]
  torch.manual_seed(seed)
  model = GPT(len(chars))
  groups = [{'params': [p for p in model.parameters() if p.dim() >= 2], 'weight_decay': 0.1},
            {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
  start = time.perf_counter()
  for step in range(STEPS):
    for group in optimizer.param_groups:
      group['lr'] = learning_rate(step)
    starts = torch.randint(len(train) - CONTEXT, (BATCH,))
    x = torch.stack([torch.from_numpy(train[i:i + CONTEXT]) for i in starts])
    y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + CONTEXT]) for i in starts])
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
  ms_per_step = 1000 * (time.perf_counter() - start) / STEPS
  model.eval()
  windows = [val[i:i + CONTEXT + 1] for i in range(0, len(val) - CONTEXT, CONTEXT)]
  total = count = 0.0
  with torch.no_grad():
    for i in range(0, len(windows), 64):
      chunk = torch.from_numpy(np.stack(windows[i:i + 64]))
      total += F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten(), reduction='sum').item()
      count += chunk[:, 1:].numel()
  return total / count, ms_per_step


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--text', help='tiny-shakespeare input.txt (for the training runs)')
  parser.add_argument('--seeds', type=int, nargs='+', default=[1337, 1, 2, 3])
  parser.add_argument('--sample', action='store_true', help='time uncached sampling instead of training')
  parser.add_argument('--tokens', type=int, default=500, help='new tokens per --sample run')
  parser.add_argument('--batch_sizes', type=int, nargs='+', default=[1, 8])
  args = parser.parse_args()
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
  if args.sample:
    sample_speed(args.tokens, args.batch_sizes)
    return
  if not args.text:
    parser.error('--text is required for the training runs')
  text = open(args.text, encoding='utf-8').read()
  for seed in args.seeds:
    loss, ms = run(text, seed)
    print(f'seed {seed}: val loss over every window {loss:.4f} | {ms:.1f} ms/step', flush=True)


if __name__ == '__main__':
  main()
