"""What `launch.py` does: its flags, and one function per mode.

User errors (bad config, data, checkpoint or sampling options) print one line
starting with 'error:' and exit with status 2.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

import jax
import ml_collections
from absl import flags

from nanodecoder import sharding
from nanodecoder.checkpoint import CheckpointError
from nanodecoder.config import ConfigError
from nanodecoder.data import DataError
from nanodecoder.files import atomic_write
from nanodecoder.sampling import SamplingError, SamplingOptions

USER_ERRORS = (ConfigError, DataError, CheckpointError, SamplingError, FloatingPointError)
CACHE_ENV = 'NANODECODER_COMPILATION_CACHE'
FLAGS = flags.FLAGS


def define_flags() -> None:
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. experiments/cpu.py; --config.a.b=v overrides.')
  flags.DEFINE_string('workdir', None, 'Run directory (default runs/<config.name>); holds checkpoints and logs.')
  flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'train: train (or resume) the config in the workdir; '
                    'sample: generate text from the workdir\'s checkpoint (needs no --config).')
  flags.DEFINE_string('prompt', '\n', 'sample: text to continue.')
  flags.DEFINE_string('prompt_file', None, 'sample: read the prompt from this file instead.')
  flags.DEFINE_integer('num_samples', 1, 'sample: how many samples.')
  flags.DEFINE_integer('max_new_tokens', 500, 'sample: tokens generated per sample.')
  flags.DEFINE_float('temperature', 0.8, 'sample: softmax temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'sample: keep the k most likely tokens (0 = off).')
  flags.DEFINE_float('top_p', 1.0, 'sample: nucleus sampling mass in (0, 1] (1 = off).')
  flags.DEFINE_integer('seed', 0, 'sample: PRNG seed.')
  flags.DEFINE_string('checkpoint', 'latest', 'sample: latest, best (lowest val loss) or a step number.')
  flags.DEFINE_string('out', None, 'sample: also write the samples to this file.')
  flags.DEFINE_bool('stream', False, 'sample: print tokens as they come (one compiled call per token).')
  flags.DEFINE_bool('kv_cache', True, 'sample: decode with a KV cache (--nokv_cache re-runs the whole context).')
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'], 'Multi-host: join the other processes with '
                    'jax.distributed.initialize (auto: when a coordinator is given or SLURM / Open MPI / a TPU slice '
                    'started several processes).')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.x.y` field reported in one line (exit 2)."""
  from absl import logging

  try:
    argv = FLAGS(argv)
    if not FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # JAX / Orbax / TFDS chatter; --verbosity=0 shows it
    return argv
  except flags.Error as e:
    fail(f'{e} (see --helpfull)')
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config does not have
    message = str(e.args[0] if e.args else e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    fail(f'unknown config field in the overrides: {message}; see experiments/base.py for the fields')


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def setup_jax(config: ml_collections.ConfigDict | None = None) -> None:
  """Process-wide JAX settings; must run before the first computation."""
  if config is not None:
    sharding.set_cpu_devices(config.mesh.cpu_devices)
  cache = os.environ.get(CACHE_ENV, str(pathlib.Path.home() / '.cache' / 'nanodecoder' / 'jax'))
  if cache:  # NANODECODER_COMPILATION_CACHE='' turns the persistent cache off
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def default_workdir(config: ml_collections.ConfigDict) -> str:
  return str(pathlib.Path('runs') / config.name)


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    if FLAGS.mode == 'sample':
      sample_command()
    else:
      train_command()
  except USER_ERRORS as e:
    fail(str(e))


def train_command() -> None:
  from nanodecoder import train  # after argument parsing: keeps `--help` fast

  config = FLAGS.config
  if config is None:
    fail('--config is required to train, e.g. --config experiments/cpu.py')
  try:
    config.get('name')  # config_flags defers a failed load to the first access
  except OSError as e:
    fail(f'cannot load the --config file: {str(e).strip().splitlines()[-1].strip()}')
  setup_jax(config)
  sharding.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  metrics = train.train_and_evaluate(config, FLAGS.workdir or default_workdir(config))
  if 'stopped_by' in metrics:  # checkpoint saved; exit as the signal would have (130 for Ctrl-C, 143 for SIGTERM)
    sys.exit(128 + int(getattr(signal, metrics['stopped_by'], signal.SIGTERM)))
  if 'train_loss' in metrics and jax.process_index() == 0:
    print(f'final: train loss {metrics["train_loss"]:.4f} | val loss {metrics["val_loss"]:.4f}')


def sample_command() -> None:
  from nanodecoder import checkpoint, sampling

  if not FLAGS.workdir:
    fail('--workdir is required to sample: the run directory holding checkpoints/')
  options = SamplingOptions(max_new_tokens=FLAGS.max_new_tokens, num_samples=FLAGS.num_samples,
                            temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                            use_cache=FLAGS.kv_cache)
  options.validate()
  prompt = FLAGS.prompt
  if FLAGS.prompt_file:
    try:
      prompt = pathlib.Path(FLAGS.prompt_file).read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
      fail(f'cannot read --prompt_file {FLAGS.prompt_file!r}: {e}')
  setup_jax()
  model, tokenizer, _, step = checkpoint.load_model(FLAGS.workdir, FLAGS.checkpoint)
  prompt_ids = tokenizer.encode(prompt)
  if FLAGS.stream:
    if options.num_samples != 1:
      fail('--stream prints one sample; use --num_samples=1')
    sys.stdout.write(prompt)
    pieces = []
    for token in sampling.stream(model, prompt_ids, options):
      pieces.append(tokenizer.decode(token))
      sys.stdout.write(pieces[-1])
      sys.stdout.flush()
    sys.stdout.write('\n')
    samples = [prompt + ''.join(pieces)]
  else:
    tokens = sampling.generate(model, prompt_ids, options)
    samples = [prompt + tokenizer.decode(row) for row in tokens]
    for i, text in enumerate(samples):
      print(f'--- sample {i + 1}/{len(samples)} (checkpoint step {step}) ---')
      print(text)
  if FLAGS.out:
    atomic_write(FLAGS.out, ''.join(f'--- sample {i + 1} ---\n{text}\n' for i, text in enumerate(samples)))
