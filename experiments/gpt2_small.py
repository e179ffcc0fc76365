"""GPT-2-small shape (12 layers, 12 heads of 64 = 768 wide, context 1024) on characters, for GPUs/TPUs.

~85M parameters with the 65-character vocabulary. bf16 compute with fp32
parameters; no dropout, so attention runs as cuDNN flash attention on NVIDIA
GPUs. Used by bench/gpu_check.sh to measure MFU (46% on one H100).

  python launch.py --config experiments/gpt2_small.py
"""

import pathlib

from nanodecoder.config import load_config_file


def get_config():
  config = load_config_file(pathlib.Path(__file__).with_name('base.py'))
  config.name = 'gpt2_small'
  config.model.num_layers = 12  # transformer blocks
  config.model.num_heads = 12  # attention heads per block
  config.model.head_size = 64  # embedding width 12 * 64 = 768
  config.model.context_length = 1024  # tokens the model sees at once
  config.model.dropout = 0.0  # no dropout: fused attention applies
  config.model.dtype = 'bfloat16'  # bf16 matmuls, fp32 parameters, logits and softmax
  # 64k tokens per step (GPT-2 took 0.5M): per token, the optimizer's passes over the 85M weights cost half
  # what they cost at 32 rows (H100, bf16: 46% MFU at 64 rows, 43% at 32; bench/RESULTS.md). ~20 GB of
  # activations: on smaller GPUs take 32 rows, or `model.remat`.
  config.train.batch_size = 64
  config.train.learning_rate = 6e-4  # GPT-2 small's peak learning rate
  config.train.min_learning_rate = 6e-5  # a tenth of the peak
  config.train.warmup_steps = 200  # linear warmup
  config.train.beta2 = 0.95  # the usual AdamW beta2 for this size
  config.eval.every = 500  # steps between evaluations
  config.eval.batches = 50  # batches per loss estimate
  config.checkpoint.every = 1000  # steps between checkpoints
  return config
