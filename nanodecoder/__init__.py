"""nanodecoder: decoder-only transformer language models in JAX / Flax NNX."""

import sys

if sys.platform == 'win32':  # workdir locks (fcntl), process groups and signals are POSIX
  raise ImportError('nanodecoder runs on Linux and macOS; on Windows, run it under WSL')
