"""A run's saved config as an experiment file: `--config nanodecoder/saved_config.py:RUN` is RUN/config.json.

`launch.py --workdir RUN --config.a.b=v` (overrides without --config) trains
on with it, so that the overrides are parsed as any experiment file's are.
"""

import pathlib


def get_config(workdir: str):
  from nanodecoder import config

  return config.read_saved_config(pathlib.Path(workdir))
