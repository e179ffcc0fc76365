"""A lean PyTorch mirror of the CPU recipe with nanoGPT's semantics, to compare losses (and speed) here.

  pip install torch==2.13.0          # not a project dependency
  python bench/torch_reference.py --text ../shared/data/tinyshakespeare/input.txt --seeds 1337 1 2 3

Same model (4 layers, 4 heads, 128 wide, context 64, no bias, tied head, GPT-2 init with scaled residual
projections), AdamW (decay on 2-D parameters), nanoGPT's warmup + cosine schedule, clipping at 1.0, batch 12,
2000 steps, first 90% of the text for training. Prints, per seed, the val loss over every full window of the
last 10% (the same measure as `--config.eval.all_windows=True`) and the training speed.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LAYERS, HEADS, WIDTH, CONTEXT, BATCH, STEPS = 4, 4, 128, 64, 12, 2000


class Block(nn.Module):

  def __init__(self):
    super().__init__()
    self.ln_attn = nn.LayerNorm(WIDTH, bias=False)
    self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
    self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
    self.ln_mlp = nn.LayerNorm(WIDTH, bias=False)
    self.fc = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
    self.out = nn.Linear(4 * WIDTH, WIDTH, bias=False)

  def forward(self, x):
    b, t, _ = x.shape
    q, k, v = (z.view(b, t, HEADS, -1).transpose(1, 2) for z in self.qkv(self.ln_attn(x)).split(WIDTH, 2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, WIDTH)
    x = x + self.proj(y)
    return x + self.out(F.gelu(self.fc(self.ln_mlp(x))))


class GPT(nn.Module):

  def __init__(self, vocab: int):
    super().__init__()
    self.tokens, self.positions = nn.Embedding(vocab, WIDTH), nn.Embedding(CONTEXT, WIDTH)
    self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
    self.ln_final = nn.LayerNorm(WIDTH, bias=False)
    self.head = nn.Linear(WIDTH, vocab, bias=False)
    self.tokens.weight = self.head.weight
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    for name, p in self.named_parameters():
      if name.endswith(('proj.weight', 'out.weight')):
        nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * LAYERS))

  def forward(self, idx):
    x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_final(x))


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
  parser.add_argument('--text', required=True, help='tiny-shakespeare input.txt')
  parser.add_argument('--seeds', type=int, nargs='+', default=[1337, 1, 2, 3])
  args = parser.parse_args()
  text = open(args.text, encoding='utf-8').read()
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
  for seed in args.seeds:
    loss, ms = run(text, seed)
    print(f'seed {seed}: val loss over every window {loss:.4f} | {ms:.1f} ms/step', flush=True)


if __name__ == '__main__':
  main()
