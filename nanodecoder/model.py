"""A GPT-style decoder-only transformer in Flax NNX.

Reads top to bottom like the design notes: self-attention, feed-forward,
add & norm, positional embeddings, the whole model. Shape letters used in the
comments:

  B batch, T time (tokens), D embedding width, N heads, H head size
  (D = N * H), F feed-forward width, V vocabulary, S cached time steps.

Parameters carry *logical* axis names ('embed', 'heads', ...) as NNX sharding
metadata; `nanodecoder.sharding` maps them onto mesh axes in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder (built from `config.model`)."""

  vocab_size: int
  num_layers: int
  num_heads: int
  head_size: int
  context_length: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  use_bias: bool = False
  tie_embeddings: bool = True
  dtype: str = 'float32'  # compute dtype of activations and matmuls
  param_dtype: str = 'float32'  # storage dtype of the parameters
  attention_impl: str = 'xla'  # 'xla', 'cudnn' (fused, GPU) or None (JAX picks)

  @property
  def embed_dim(self) -> int:
    return self.num_heads * self.head_size

  @property
  def mlp_dim(self) -> int:
    return self.mlp_ratio * self.embed_dim


def _init(std: float, names: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), names)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None (evaluation)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in fp32, optional bias."""

  def __init__(self, cfg: ModelConfig):
    d = cfg.embed_dim
    self.scale = nnx.Param(
        nnx.with_partitioning(nnx.initializers.ones_init(), ('norm',))(None, (d,), jnp.dtype(cfg.param_dtype))
    )
    self.bias = (
        nnx.Param(_zeros(('norm',))(None, (d,), jnp.dtype(cfg.param_dtype))) if cfg.use_bias else None
    )
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x):  # [..., D] -> [..., D]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + 1e-5) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(self.dtype)


class KVCache(NamedTuple):
  """Keys and values of one attention layer for incremental decoding."""

  key: jax.Array  # [B, S, N, H]
  value: jax.Array  # [B, S, N, H]


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention with a triangular (causal) mask.

  softmax(q k^T / sqrt(H) + mask) v, per head, where position t attends only to
  positions <= t.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_size
    pdt = jnp.dtype(cfg.param_dtype)
    # Fused query/key/value projection straight into the heads layout.
    self.qkv = nnx.Param(_init(0.02, ('embed', None, 'heads', 'head'))(rngs.params(), (d, 3, n, h), pdt))
    # Output projection; GPT-2 scales its init by 1/sqrt(2 * num_layers).
    std_out = 0.02 / (2 * cfg.num_layers) ** 0.5
    self.out = nnx.Param(_init(std_out, ('heads', 'head', 'embed'))(rngs.params(), (n, h, d), pdt))
    if cfg.use_bias:
      self.qkv_bias = nnx.Param(_zeros((None, 'heads', 'head'))(None, (3, n, h), pdt))
      self.out_bias = nnx.Param(_zeros(('embed',))(None, (d,), pdt))
    else:
      self.qkv_bias = self.out_bias = None
    self.cfg = cfg

  def __call__(self, x, *, dropout_key=None, cache: KVCache | None = None, cache_index=None):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    qkv = jnp.einsum('btd,dsnh->sbtnh', x, self.qkv[...].astype(dt))  # [3, B, T, N, H]
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(dt)[:, None, None]
    q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, T, N, H]

    if cache is not None:
      # Write the new keys/values at `cache_index` and attend over the cache.
      k_all = jax.lax.dynamic_update_slice_in_dim(cache.key, k.astype(cache.key.dtype), cache_index, axis=1)
      v_all = jax.lax.dynamic_update_slice_in_dim(cache.value, v.astype(cache.value.dtype), cache_index, axis=1)
      cache = KVCache(k_all, v_all)
      y = attend(q, k_all.astype(dt), v_all.astype(dt), query_offset=cache_index, num_valid=cache_index + x.shape[1])
    else:
      attn_key, dropout_key = _split(dropout_key)
      y = attend(q, k, v, dropout_rate=cfg.dropout, dropout_key=attn_key, implementation=cfg.attention_impl)
    # y: [B, T, N, H]
    out = jnp.einsum('btnh,nhd->btd', y, self.out[...].astype(dt))  # [B, T, D]
    if self.out_bias is not None:
      out = out + self.out_bias[...].astype(dt)
    return dropout(out, cfg.dropout, dropout_key), cache


def _split(key):
  if key is None:
    return None, None
  a, b = jax.random.split(key)
  return a, b


def attend(q, k, v, *, dropout_rate=0.0, dropout_key=None, implementation='xla', query_offset=None, num_valid=None):
  """Causal scaled dot-product attention. q: [B, T, N, H], k/v: [B, S, N, H] -> [B, T, N, H].

  Query i sits at absolute position `query_offset + i` and sees keys at
  positions <= its own (and < `num_valid` when attending over a cache).
  Without dropout or a cache this calls `jax.nn.dot_product_attention`, which
  dispatches to fused (cuDNN flash) attention on GPU when asked.
  """
  if query_offset is None and (dropout_key is None or dropout_rate == 0.0):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  t, s = q.shape[1], k.shape[1]
  scores = jnp.einsum('btnh,bsnh->bnts', q, k).astype(jnp.float32) * q.shape[-1] ** -0.5  # [B, N, T, S]
  q_pos = jnp.arange(t)[:, None] + (0 if query_offset is None else query_offset)
  k_pos = jnp.arange(s)[None, :]
  mask = k_pos <= q_pos
  if num_valid is not None:
    mask = mask & (k_pos < num_valid)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = dropout(probs, dropout_rate, dropout_key).astype(q.dtype)
  return jnp.einsum('bnts,bsnh->btnh', probs, v)


class FeedForward(nnx.Module):
  """Position-wise MLP: expand to F = mlp_ratio * D, GELU, project back to D."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.embed_dim, cfg.mlp_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.fc = nnx.Param(_init(0.02, ('embed', 'mlp'))(rngs.params(), (d, f), pdt))
    self.proj = nnx.Param(_init(0.02 / (2 * cfg.num_layers) ** 0.5, ('mlp', 'embed'))(rngs.params(), (f, d), pdt))
    if cfg.use_bias:
      self.fc_bias = nnx.Param(_zeros(('mlp',))(None, (f,), pdt))
      self.proj_bias = nnx.Param(_zeros(('embed',))(None, (d,), pdt))
    else:
      self.fc_bias = self.proj_bias = None
    self.cfg = cfg

  def __call__(self, x, *, dropout_key=None):  # [B, T, D] -> [B, T, D]
    dt = jnp.dtype(self.cfg.dtype)
    h = x @ self.fc[...].astype(dt)  # [B, T, F]
    if self.fc_bias is not None:
      h = h + self.fc_bias[...].astype(dt)
    h = jax.nn.gelu(h, approximate=False)
    out = h @ self.proj[...].astype(dt)  # [B, T, D]
    if self.proj_bias is not None:
      out = out + self.proj_bias[...].astype(dt)
    return dropout(out, self.cfg.dropout, dropout_key)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln_attn = LayerNorm(cfg)
    self.attn = CausalSelfAttention(cfg, rngs)
    self.ln_mlp = LayerNorm(cfg)
    self.mlp = FeedForward(cfg, rngs)

  def __call__(self, x, *, dropout_key=None, cache=None, cache_index=None):
    attn_key, mlp_key = _split(dropout_key)
    y, cache = self.attn(self.ln_attn(x), dropout_key=attn_key, cache=cache, cache_index=cache_index)
    x = x + y
    x = x + self.mlp(self.ln_mlp(x), dropout_key=mlp_key)
    return x, cache


class Decoder(nnx.Module):
  """Token + learned positional embeddings -> blocks -> final LayerNorm -> LM head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, v = cfg.embed_dim, cfg.vocab_size
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.token_embed = nnx.Param(_init(0.02, ('vocab', 'embed'))(rngs.params(), (v, d), pdt))
    self.position_embed = nnx.Param(_init(0.02, (None, 'embed'))(rngs.params(), (cfg.context_length, d), pdt))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_final = LayerNorm(cfg)
    self.lm_head = None if cfg.tie_embeddings else nnx.Param(_init(0.02, ('embed', 'vocab'))(rngs.params(), (d, v), pdt))

  def __call__(self, tokens, *, dropout_key=None, caches=None, cache_index=None):
    """tokens: [B, T] int -> (logits [B, T, V] in fp32, updated caches or None).

    Token i sits at position i, or at `cache_index + i` when decoding with caches.
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    t = tokens.shape[1]
    positions = jnp.arange(t) if cache_index is None else cache_index + jnp.arange(t)
    x = self.token_embed[...].astype(dt)[tokens] + self.position_embed[...].astype(dt)[positions]  # [B, T, D]
    embed_key, dropout_key = _split(dropout_key)
    x = dropout(x, cfg.dropout, embed_key)
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)

    new_caches = []
    for i, block in enumerate(self.blocks):
      x, cache = block(x, dropout_key=None if layer_keys is None else layer_keys[i],
                       cache=None if caches is None else caches[i], cache_index=cache_index)
      new_caches.append(cache)

    x = self.ln_final(x)
    head = self.token_embed[...].T if self.lm_head is None else self.lm_head[...]  # [D, V]
    logits = jnp.einsum('btd,dv->btv', x, head.astype(dt), preferred_element_type=jnp.float32)  # [B, T, V]
    return logits, (None if caches is None else new_caches)

  def init_caches(self, batch_size: int, dtype: Any = None) -> list[KVCache]:
    """Empty KV caches covering the whole context, one per layer."""
    cfg = self.cfg
    shape = (batch_size, cfg.context_length, cfg.num_heads, cfg.head_size)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train_flops_per_token(cfg: ModelConfig) -> float:
  """Forward + backward FLOPs per trained token: 6 per weight it passes, plus attention.

  Counts the matmuls of every block and the LM head (not the embedding
  lookups), and 12 * layers * context * width for attention scores and
  values, the usual (PaLM appendix B) estimate.
  """
  d = cfg.embed_dim
  per_block = 3 * d * d + d * d + 2 * d * cfg.mlp_dim
  matmul_weights = cfg.num_layers * per_block + d * cfg.vocab_size
  return 6 * matmul_weights + 12 * cfg.num_layers * cfg.context_length * d
