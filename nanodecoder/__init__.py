"""nanodecoder: decoder-only transformer language models in JAX / Flax NNX."""
