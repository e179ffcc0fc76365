"""What `launch.py` does, reachable (and tested) through the package."""

from __future__ import annotations

import os
import pathlib
import sys

import jax
import ml_collections

from nanodecoder import sharding
from nanodecoder.config import ConfigError
from nanodecoder.data import DataError

USER_ERRORS = (ConfigError, DataError, FloatingPointError)
CACHE_ENV = 'NANODECODER_COMPILATION_CACHE'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.x.y` field reported in one line (exit 2)."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e} (see --helpfull)', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config does not have
    message = str(e.args[0] if e.args else e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    print(f'error: unknown config field in the overrides: {message}; see experiments/base.py for the fields', file=sys.stderr)
    sys.exit(2)


def setup_jax(config: ml_collections.ConfigDict) -> None:
  """Process-wide JAX settings; must run before the first computation."""
  sharding.set_cpu_devices(config.mesh.cpu_devices)
  cache = os.environ.get(CACHE_ENV, str(pathlib.Path.home() / '.cache' / 'nanodecoder' / 'jax'))
  if cache:  # NANODECODER_COMPILATION_CACHE='' turns the persistent cache off
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def default_workdir(config: ml_collections.ConfigDict) -> str:
  return str(pathlib.Path('runs') / config.name)


def run(config: ml_collections.ConfigDict | None, workdir: str | None) -> None:
  """Trains `config` in `workdir`; a user error prints one line and exits with status 2."""
  from nanodecoder import train  # after argument parsing: keeps `--help` fast

  if config is None:
    print('error: --config is required, e.g. --config experiments/cpu.py', file=sys.stderr)
    sys.exit(2)
  try:
    config.get('name')  # config_flags defers a failed load to the first access
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    print(f'error: cannot load the --config file: {reason}', file=sys.stderr)
    sys.exit(2)
  try:
    setup_jax(config)
    metrics = train.train_and_evaluate(config, workdir or default_workdir(config))
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if metrics:
    print(f'final: train loss {metrics["train_loss"]:.4f} | val loss {metrics["val_loss"]:.4f}')
