"""CPU recipe: nanoGPT's shakespeare_char laptop settings (40-75 seconds on 2 cores, by the machine).

4 layers, 4 heads of size 32 (128 wide), context 64, batch 12, 2000 steps, no
dropout. nanoGPT reaches val loss 1.886 with it. Only the fields that differ
from experiments/base.py are set here.

  python launch.py --config experiments/cpu.py
"""

import pathlib

from nanodecoder.config import load_config_file


def get_config():
  config = load_config_file(pathlib.Path(__file__).with_name('base.py'))
  config.name = 'cpu'
  config.model.num_layers = 4  # transformer blocks
  config.model.num_heads = 4  # attention heads per block
  config.model.head_size = 32  # embedding width 4 * 32 = 128
  config.model.context_length = 64  # tokens the model sees at once
  config.model.dropout = 0.0  # no dropout for this small, short run
  config.train.batch_size = 12  # sequences per step
  config.train.num_steps = 2000  # optimizer steps
  config.train.decay_steps = 2000  # cosine decay over the whole run
  config.train.log_every = 100  # steps between log lines
  config.eval.batches = 20  # nanoGPT's --eval_iters=20
  return config
