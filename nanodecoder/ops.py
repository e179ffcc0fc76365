"""The primitives the decoder is written with, each the textbook operation.

`dense`, `embed_lookup` and `dropout` compute exactly what their names say;
their gradients or random draws are spelled out by hand where XLA's own were
slow on some backend, and each docstring says why. `gelu` is the exact GELU,
computed in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """x [..., K...] @ w [K..., M...] -> [..., M...], contracting x's last `contract` axes.

  Mathematically a plain matmul. The custom gradient spells out the weight
  gradient as x^T @ g with x as the first operand: left to itself, XLA's CPU
  backend transposes the (larger) output gradient g instead, fusing the
  elementwise backward of GELU/LayerNorm into a slow transposed write.
  """
  return jnp.tensordot(x, w, axes=contract)


def _dense_fwd(x, w, contract):
  return dense(x, w, contract), (x, w)


def _dense_bwd(contract, residuals, g):
  x, w = residuals
  out_axes = w.ndim - contract
  dx = jnp.tensordot(g, w, axes=(list(range(g.ndim - out_axes, g.ndim)), list(range(contract, w.ndim))))
  batch_axes = list(range(x.ndim - contract))
  dw = jnp.tensordot(x, g, axes=(batch_axes, batch_axes))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def embed_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows of table [V, D] at integer ids [...]: [..., D].

  Mathematically `table[ids]`. The custom gradient adds up each id's output
  gradients with a one-hot matmul (fp32 accumulation) instead of XLA's
  scatter-add: on NVIDIA GPUs that scatter runs as atomic compare-and-swap
  loops (bf16 always; fp32 too in jaxlib 0.10.2-0.11.0), which serialize when
  many tokens share an id, as a character vocabulary's space and 'e' do.
  The matmul costs 2 * tokens * V * D FLOPs: noise for character vocabularies
  and for the position table (V = context_length: ~0.25% of a base or GPT-2-small step).
  """
  return table[ids]


def _embed_lookup_fwd(table, ids):
  return table[ids], (table, ids)


def _embed_lookup_bwd(residuals, g):
  table, ids = residuals
  one_hot = jax.nn.one_hot(ids, table.shape[0], dtype=g.dtype)  # [..., V]; exact in any dtype
  token_axes = list(range(ids.ndim))
  grad = jax.lax.dot_general(one_hot, g, ((token_axes, token_axes), ((), ())), precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)  # [V, D]
  return grad.astype(table.dtype), None


embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout (the identity when `key` is None, i.e. in evaluation).

  Draws 16 random bits per element, two per 32-bit PRNG word: half the
  generator work of a float per element. Keeps an element with probability
  p = round((1 - rate) * 2^16) / 2^16 and multiplies it by 1 / p. bf16/fp16
  inputs are scaled in fp32 and rounded once (as PyTorch does): 1 / p rounded
  to bf16 would be off by up to 0.4% (1.1111 -> 1.1094 at rate 0.1).
  """
  if key is None or rate == 0.0:
    return x
  threshold = max(1, round((1.0 - rate) * 65536))  # rates within 2^-17 of 1 keep 1 in 65536
  words = jax.random.bits(key, (*x.shape[:-1], (x.shape[-1] + 1) // 2), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]
  keep = halves < jnp.uint16(threshold) if threshold < 65536 else jnp.ones(x.shape, bool)
  return jnp.where(keep, x.astype(jnp.float32) * (65536.0 / threshold), 0).astype(x.dtype)  # fp32: no casts


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2))), written with erf as PyTorch (nanoGPT) does.

  Computed in fp32 and rounded once, as PyTorch does for bf16: in bf16,
  1 + erf(x) cancels for x < -2 (errors up to 100% there). `jax.nn.gelu`
  uses erfc instead, more accurate far in the negative tail (in fp32 the two
  differ by < 1e-6), but erfc costs 2.5-4x more on XLA's CPU backend (the CPU
  recipe trains ~15% faster with erf).
  """
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * 2**-0.5))).astype(x.dtype)
