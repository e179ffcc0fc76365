"""Test setup: 8 host CPU devices, the tiny-shakespeare file, small configs."""

import os
import pathlib
import signal

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Started where SIGINT is ignored (a background job of a non-interactive shell, nohup), the suite would pass that on
# to every process it starts, and the Ctrl-C tests would wait for exits that never come: take Ctrl-C as Python does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402
import pytest  # noqa: E402

from nanodecoder.config import load_config_file  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE_DIR = pathlib.Path(os.environ.get('NANODECODER_MANUAL_DIR') or REPO.parent / 'shared' / 'data' / 'tinyshakespeare')

jax.config.update('jax_compilation_cache_dir', str(pathlib.Path.home() / '.cache' / 'nanodecoder' / 'jax-tests'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def shakespeare_dir():
  if not (SHAKESPEARE_DIR / 'input.txt').is_file():
    if os.environ.get('CI'):
      pytest.fail(f'CI needs tiny-shakespeare input.txt in {SHAKESPEARE_DIR} (set NANODECODER_MANUAL_DIR)')
    pytest.skip(f'tiny-shakespeare input.txt not found in {SHAKESPEARE_DIR} (set NANODECODER_MANUAL_DIR)')
  return SHAKESPEARE_DIR


@pytest.fixture(scope='session')
def corpus_file(tmp_path_factory):
  """A small generated corpus: deterministic, learnable, 48 distinct characters."""
  lines = []
  words = ['the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'Alas!', 'poor', 'Yorick;', 'KING:']
  for i in range(400):
    lines.append(' '.join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) + f' {i % 10}.')
  path = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


def make_tiny_config(text_path, **overrides):
  """experiments/cpu.py shrunk to seconds: 2 layers, 2 heads of 8, context 16, batch 8."""
  config = load_config_file(REPO / 'experiments' / 'cpu.py')
  config.name = 'tiny'
  config.data.source = 'text'
  config.data.text_path = str(text_path)
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.head_size = 8
  config.model.context_length = 16
  config.train.batch_size = 8
  config.train.num_steps = 20
  config.train.warmup_steps = 2
  config.train.decay_steps = 20
  config.train.log_every = 10
  config.train.steps_per_call = 1
  config.eval.every = 10
  config.eval.batches = 2
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def tiny_config(corpus_file):
  return lambda **overrides: make_tiny_config(corpus_file, **overrides)
