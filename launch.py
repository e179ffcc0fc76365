"""Train a decoder, or sample from a trained one: the command-line entry point.

  python launch.py --config experiments/cpu.py [--config.train.num_steps=500] [--workdir runs/cpu]
  python launch.py --mode sample --workdir runs/cpu --prompt 'ROMEO:' --temperature 0.8 --top_k 40

All logic lives in nanodecoder.cli.
"""

from absl import app

from nanodecoder import cli

if __name__ == '__main__':
  cli.define_flags()
  app.run(cli.main, flags_parser=cli.parse_flags)
