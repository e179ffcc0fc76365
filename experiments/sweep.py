"""Sweeps of the model's shape (and its tokens), one per argument, starting from the CPU recipe (experiments/cpu.py).

  python launch.py --config experiments/sweep.py:blocks        # model.num_layers 1, 2, 4, 6
  python launch.py --config experiments/sweep.py:head_size     # model.head_size 8, 16, 32, 64 (width 4 x that)
  python launch.py --config experiments/sweep.py:context       # model.context_length 16, 32, 64, 128
  python launch.py --config experiments/sweep.py:shape         # num_layers 2, 4, 6 x head_size 16, 32, 64 (9 points)
  python launch.py --config experiments/sweep.py:vocab         # data.vocab_size 0 (characters), 256, 512, 1024 (BPE)

Each point trains the CPU recipe (2000 steps, about a minute on 2 cores) in
runs/sweep_<name>/<field=value,...>. `:blocks,base` starts from
experiments/base.py instead (nanoGPT's GPU recipe, same values). --config.*
overrides apply to every point, e.g. --config.train.num_steps=500
--config.train.decay_steps=500 --workdir runs/sweep_shape_500 for a quick look
(in its own folder: a sweep refuses to resume points trained with other settings).
"""

import pathlib

from nanodecoder.config import ConfigError, load_config_file

# name -> {dotted field: values}; several fields sweep their cartesian product.
SWEEPS = {
    'blocks': {'model.num_layers': [1, 2, 4, 6]},
    'head_size': {'model.head_size': [8, 16, 32, 64]},
    'context': {'model.context_length': [16, 32, 64, 128]},
    'shape': {'model.num_layers': [2, 4, 6], 'model.head_size': [16, 32, 64]},
    'vocab': {'data.vocab_size': [0, 256, 512, 1024]},  # ranked by val bits per character (nats per token differ)
}
RECIPES = ('cpu', 'base')


def _parse(arg: str) -> tuple[str, str]:
  name, _, recipe = (arg or 'blocks').partition(',')
  return name, recipe or 'cpu'


def get_config(arg: str = 'blocks'):
  """The base config every point starts from: the recipe, named after the sweep."""
  name, recipe = _parse(arg)
  config = load_config_file(pathlib.Path(__file__).with_name(f'{recipe if recipe in RECIPES else "cpu"}.py'))
  config.name = f'sweep_{name}' if recipe == 'cpu' else f'sweep_{name}_{recipe}'
  return config


def get_sweep(arg: str = 'blocks'):
  """The values to try: {dotted field: [values]}."""
  name, recipe = _parse(arg)
  if name not in SWEEPS or recipe not in RECIPES:
    raise ConfigError(f'unknown sweep {arg!r} in experiments/sweep.py; use NAME or NAME,RECIPE with NAME one of '
                      f'{", ".join(SWEEPS)} and RECIPE one of {", ".join(RECIPES)}')
  return SWEEPS[name]
