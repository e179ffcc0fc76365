"""Train a decoder, or sample from a trained one: the command-line entry point.

  python launch.py --config experiments/cpu.py [--config.train.num_steps=500] [--workdir runs/cpu]
  python launch.py --mode sample --workdir runs/cpu --prompt 'ROMEO:' --temperature 0.8 --top_k 40

All logic lives in nanodecoder.cli.
"""

import sys

from nanodecoder import interrupts

if __name__ == '__main__':
  interrupts.install()
  try:
    from nanodecoder import cli  # imports JAX: Ctrl-C meanwhile exits quietly, as it does later
  except KeyboardInterrupt:
    sys.exit(130)
  cli.run()
