"""Train a decoder (or, later, sample from one): a thin command-line entry point.

  python launch.py --config experiments/cpu.py [--config.train.num_steps=500] [--workdir runs/cpu]
"""

from absl import app, flags
from ml_collections import config_flags

from nanodecoder import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file (ml_collections config), e.g. experiments/cpu.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config.name>.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
