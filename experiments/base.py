"""Base recipe: nanoGPT's shakespeare_char on one GPU/TPU (or many).

6 layers, 6 heads of size 64 (384 wide), context 256, batch 64, 5000 steps,
dropout 0.2. nanoGPT reaches val loss ~1.47 with it. Every field the trainer
reads is listed here; other experiment files start from this one.

  python launch.py --config experiments/base.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = 'base'  # experiment name; the default workdir is runs/<name>
  config.seed = 1337  # seeds the parameters, the data order and dropout

  config.model = model = ml_collections.ConfigDict()
  model.num_layers = 6  # transformer blocks
  model.num_heads = 6  # attention heads per block
  model.head_size = 64  # width of each head; embedding width = num_heads * head_size
  model.context_length = 256  # tokens the model sees at once (positional table size)
  model.mlp_ratio = 4  # feed-forward width = mlp_ratio * embedding width
  model.dropout = 0.2  # on embeddings, attention weights, and each residual branch
  model.use_bias = False  # biases in linear layers and LayerNorms
  model.tie_embeddings = True  # LM head reuses the token embedding matrix
  model.dtype = 'float32'  # compute dtype ('bfloat16' on GPU/TPU); logits stay fp32
  model.param_dtype = 'float32'  # storage dtype of parameters and optimizer state (bfloat16: no fp32 master copy)
  model.attention_impl = 'auto'  # 'einsum', 'xla', 'cudnn' (fused, NVIDIA); auto: cudnn on GPU if it applies
  model.remat = 'none'  # backward-pass recompute: 'none', 'matmuls' (keep weight matmuls' outputs), 'block'
  model.scan_layers = False  # scan over stacked blocks: compile time flat in depth

  config.data = data = ml_collections.ConfigDict()
  data.source = 'tfds'  # 'tfds' (a TFDS text dataset) or 'text' (a local UTF-8 file)
  data.tfds_name = 'tiny_shakespeare'  # TFDS dataset with a 'text' feature
  data.tfds_data_dir = ''  # where TFDS keeps prepared data; '' = its default
  data.manual_dir = ''  # offline: folder holding the raw input.txt ('' = $NANODECODER_MANUAL_DIR)
  data.text_path = ''  # source='text': path of the corpus file
  data.text_eval_fraction = 0.1  # source='text': held-out tail, halved into 'validation' and 'test'
  data.train_split = 'train'  # split to train on
  data.eval_split = 'validation+test'  # split(s) for val loss; '+' joins them (= nanoGPT's val)
  data.vocab_size = 0  # 0: one token per character (65 here); N: characters + BPE merges of train_split, N in all

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # sequences per optimizer step (global, over all devices)
  train.num_steps = 5000  # optimizer steps
  train.learning_rate = 1e-3  # peak learning rate, reached after warmup
  train.warmup_steps = 100  # linear warmup to learning_rate (nanoGPT's: step s uses lr * (s + 1) / (warmup + 1))
  train.decay_steps = 5000  # cosine decay ends here (usually = num_steps)
  train.min_learning_rate = 1e-4  # floor of the cosine decay
  train.beta1 = 0.9  # AdamW first-moment decay
  train.beta2 = 0.99  # AdamW second-moment decay
  train.weight_decay = 0.1  # decoupled weight decay of every matrix, embeddings too (not norms or biases)
  train.grad_clip = 1.0  # clip gradients to this global norm (0 = off)
  train.grad_accum_steps = 1  # micro-batches per step (batch_size / this rows each)
  train.steps_per_call = 10  # optimizer steps per compiled call, fewer host round trips (divides num_steps, intervals)
  train.log_every = 50  # steps between log lines
  train.profile_steps = 0  # steps traced with jax.profiler into <workdir>/plugins/profile (0 = no trace)
  train.profile_start = 100  # steps before the trace (past compilation and warm-up): it starts at step 101

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.every = 250  # steps between evaluations (and at the last step)
  evaluation.batches = 200  # fixed random batches (the same at every evaluation) averaged per train/val loss
  evaluation.all_windows = False  # True: val loss over every window of eval_split instead (each character once)

  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.every = 250  # steps between checkpoints (and at the end, and on SIGTERM/Ctrl-C)
  checkpoint.keep = 2  # most recent checkpoints kept
  checkpoint.keep_best = True  # also keep the one with the lowest val loss (of those saved at evaluation steps)
  checkpoint.async_save = True  # write in the background while training goes on

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel axis size; -1 = all devices left over
  mesh.fsdp = 1  # fully-sharded data parallel: batch and parameters split over it
  mesh.tensor = 1  # tensor parallel: heads and feed-forward width split over it
  mesh.cpu_devices = 0  # CPU only: split the host into this many devices (0: one per core, or fewer to split the batch)
  return config
