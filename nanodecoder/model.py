"""A GPT-style decoder-only transformer in Flax NNX.

Reads top to bottom like the design notes: add & norm, self-attention,
feed-forward, the block, then the whole model with its token and positional
embeddings. The primitives it is written with (matmuls, embedding lookups,
dropout, GELU) are in `nanodecoder.ops`. Shape letters used in the comments:

  B batch, T time (tokens), D embedding width, N heads, H head size
  (D = N * H), F feed-forward width, V vocabulary, S cached positions, L layers.

Parameters carry *logical* axis names ('embed', 'heads', ...) as NNX sharding
metadata; `nanodecoder.sharding` maps them onto mesh axes in one place.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec as P

from nanodecoder.ops import dense, dropout, embed_lookup, gelu

REMAT_POLICIES = ('none', 'block', 'matmuls')
ATTENTION_IMPLS = ('auto', 'einsum', 'xla', 'cudnn')


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
  dtype: str = 'float32'  # compute dtype of activations and matmuls; logits stay fp32
  param_dtype: str = 'float32'  # storage dtype of the parameters
  attention_impl: str = 'auto'  # see `attend`
  remat: str = 'none'  # activations recomputed in the backward pass: see `Decoder._block`
  scan_layers: bool = False  # one `lax.scan` over stacked blocks: compile time independent of depth

  @property
  def embed_dim(self) -> int:
    return self.num_heads * self.head_size

  @property
  def mlp_dim(self) -> int:
    return self.mlp_ratio * self.embed_dim


def _param(init, names: tuple[str | None, ...], key, shape, cfg: ModelConfig) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, names)(key, shape, jnp.dtype(cfg.param_dtype)))


def _split(key, num: int = 2):
  return (None,) * num if key is None else tuple(jax.random.split(key, num))


# Add & norm ---------------------------------------------------------------------


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with statistics in fp32; bias optional.

  Returns the normalized input with its scale and bias still apart
  (`Normalized`): every norm here feeds a matmul, which applies them to its
  weight instead of to each token's activations.
  """

  def __init__(self, cfg: ModelConfig):
    d = cfg.embed_dim
    self.scale = _param(nnx.initializers.ones_init(), ('norm',), None, (d,), cfg)
    self.bias = _param(nnx.initializers.zeros_init(), ('norm',), None, (d,), cfg) if cfg.use_bias else None
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x) -> Normalized:  # [..., D]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    x_hat = (centered * jax.lax.rsqrt(variance + 1e-5)).astype(self.dtype)
    return Normalized(x_hat, self.scale[...], None if self.bias is None else self.bias[...])


class Normalized(NamedTuple):
  """A LayerNorm's output, x_hat * scale + bias, kept as its three parts.

  The matmul that reads it folds scale and bias into its weight w [D, ...]:
  (x_hat * scale + bias) @ w = x_hat @ (scale * w) + bias @ w. Same math;
  the scale's gradient then comes out of the weight's ([D, ...]) instead of
  a sum over every token, which XLA runs as extra passes over [B, T, D]
  fp32 arrays (on GPUs a fifth of a GPT-2-small step's memory traffic outside
  the matmuls; bench/gpu_hlo.py). In the compiled decoding loop XLA folds once,
  outside the per-token loop; `sampling.stream`, one call per token, folds at
  every token (~15% slower there).
  """

  x_hat: jax.Array  # [..., D] normalized, in the compute dtype
  scale: jax.Array  # [D]
  bias: jax.Array | None  # [D]

  def fold(self, w: jax.Array, dtype, axis: int = 0, out_bias: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array | None]:
    """w with its D axis at `axis` -> (scale * w in `dtype`, bias @ w + out_bias in fp32, or None): the
    weight and output shift that give with x_hat what w (and its layer's `out_bias`) give with the
    LayerNorm's output. Folded in fp32, so bf16 parameters are rounded once, as before folding."""
    shape = [1] * w.ndim
    shape[axis] = -1
    w32 = w.astype(jnp.float32)
    shift = None if out_bias is None else out_bias.astype(jnp.float32)
    if self.bias is not None:
      bias_term = jnp.tensordot(self.bias.astype(jnp.float32), w32, axes=([0], [axis]))
      shift = bias_term if shift is None else shift + bias_term
    return (w32 * self.scale.astype(jnp.float32).reshape(shape)).astype(dtype), shift


# Self-attention -----------------------------------------------------------------


class KVCache(NamedTuple):
  """Keys and values of the positions decoded so far, with batch and heads merged into one axis.

  [B * N, S, H] rather than [B, N, S, H]: XLA's CPU backend then writes each
  new position in place; with a unit batch axis (one sample) it copies every
  cache on every token.
  """

  key: jax.Array  # [B * N, S, H] (with a leading L axis when layers are scanned)
  value: jax.Array  # [B * N, S, H]


def attention_weights(q, k, query_offset=None) -> jax.Array:
  """softmax(q k^T / sqrt(H) + causal mask) in fp32: q [..., T, H], k [..., S, H] -> [..., T, S]."""
  t, s = q.shape[-2], k.shape[-2]
  scores = jnp.einsum('...th,...sh->...ts', q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  q_pos = jnp.arange(t)[:, None] + (0 if query_offset is None else query_offset)
  mask = jnp.arange(s)[None, :] <= q_pos  # [T, S]: the triangle
  return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


def attend_heads_first(q, k, v, *, query_offset=None, dropout_rate: float = 0.0, dropout_key=None):
  """The formula of `attend` as written: q [..., T, H], k/v [..., S, H] -> [..., T, H] (any leading axes).

  Query i sits at position `query_offset + i` (default i) and sees the keys at
  positions <= its own; over a KV cache ([B * N, S, H]) those are the
  positions written so far.
  """
  weights = attention_weights(q, k, query_offset)  # [..., T, S]
  weights = dropout(weights, dropout_rate, dropout_key).astype(v.dtype)
  return jnp.einsum('...ts,...sh->...th', weights, v)


def attend(q, k, v, *, impl: str = 'einsum', dropout_rate: float = 0.0, dropout_key=None):
  """Causal scaled dot-product attention of each head over the sequence: q, k, v [B, T, N, H] -> [B, T, N, H].

  softmax(q k^T / sqrt(H) + mask) v, where query i sees keys 0..i. Implementations:
    'einsum'  the formula as written, heads first (`attend_heads_first`; any
              backend; dropout on the attention weights);
    'xla' / 'cudnn'  `jax.nn.dot_product_attention`, which takes this layout
              as it is (no transposes around the kernel); 'cudnn' is cuDNN's
              fused flash attention (NVIDIA GPUs, bf16/fp16). Neither drops out
              attention weights, so such calls run 'einsum' (`config.validate`
              refuses either impl with model.dropout > 0);
    'auto'    'cudnn' where it surely applies (see `auto_attention_impl`), else 'einsum'.
  """
  impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], dropout=dropout_key is not None and dropout_rate > 0)
  if impl != 'einsum':
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
  swap = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, N, H] <-> [B, N, T, H]
  return swap(attend_heads_first(swap(q), swap(k), swap(v), dropout_rate=dropout_rate, dropout_key=dropout_key))


def resolve_attention_impl(impl: str, dtype, head_size: int, *, dropout: bool) -> str:
  """What `attend` runs for `impl` ('auto' resolved; 'einsum' whenever attention weights are dropped out)."""
  if dropout:
    return 'einsum'
  return auto_attention_impl(jnp.dtype(dtype), head_size, jax.default_backend()) if impl == 'auto' else impl


def auto_attention_impl(dtype, head_size: int, backend: str) -> str:
  """What 'auto' runs without cache or dropout: 'cudnn' on a GPU in bf16/fp16 with head_size a multiple
  of 8 up to 128 (cuDNN takes 256 on Hopper and newer; 'auto' stays on the safe side), else 'einsum'."""
  fits = dtype in (jnp.bfloat16, jnp.float16) and head_size % 8 == 0 and head_size <= 128
  return 'cudnn' if backend == 'gpu' and fits else 'einsum'


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention: project to queries, keys and values, attend per head, project back."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_size
    normal = nnx.initializers.normal
    self.qkv = _param(normal(0.02), ('embed', None, 'heads', 'head'), rngs.params(), (d, 3, n, h), cfg)
    # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * num_layers).
    self.out = _param(normal(0.02 / (2 * cfg.num_layers) ** 0.5), ('heads', 'head', 'embed'), rngs.params(),
                      (n, h, d), cfg)
    zeros = nnx.initializers.zeros_init()
    self.qkv_bias = _param(zeros, (None, 'heads', 'head'), None, (3, n, h), cfg) if cfg.use_bias else None
    self.out_bias = _param(zeros, ('embed',), None, (d,), cfg) if cfg.use_bias else None
    self.cfg = cfg

  def project(self, x: Normalized, *, separately: bool = False):
    """x [B, T, D] (a LayerNorm's output) -> queries, keys, values, each [B, T, N, H].

    One matmul with the packed [D, 3, N, H] weight, or with `separately` one
    per output. Fused attention kernels take q, k and v as separate arrays:
    cut out of one packed [B, T, 3, N, H] result they are copies, and so is
    the packing of their gradients (together 3 ms of a 55 ms GPT-2-small step
    on an H100). The packed matmul suits the einsum path and decoding on CPU,
    where three matrix-vector products would each be a kernel of their own.
    """
    dt = jnp.dtype(self.cfg.dtype)
    w, shift = x.fold(self.qkv[...], dt, out_bias=None if self.qkv_bias is None else self.qkv_bias[...])
    shift = None if shift is None else shift.astype(dt)  # [3, N, H]
    if separately:
      outputs = [checkpoint_name(dense(x.x_hat, w[:, i]), 'projection') for i in range(3)]  # 3 x [B, T, N, H]
    else:
      qkv = checkpoint_name(dense(x.x_hat, w), 'projection')  # [B, T, 3, N, H]
      outputs = [qkv[:, :, i] for i in range(3)]
    return tuple(outputs) if shift is None else tuple(y + shift[i] for i, y in enumerate(outputs))

  def __call__(self, x: Normalized, *, dropout_key=None, cache: KVCache | None = None, cache_index=None):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    attn_key, out_key = _split(dropout_key)
    dropped_out = attn_key is not None and cfg.dropout > 0
    impl = resolve_attention_impl(cfg.attention_impl, dt, cfg.head_size, dropout=dropped_out)
    q, k, v = self.project(x, separately=cache is None and impl != 'einsum')  # each [B, T, N, H]
    if cache is None:
      y = attend(q, k, v, impl=impl, dropout_rate=cfg.dropout, dropout_key=attn_key)
    else:  # write this step's keys/values at `cache_index`, attend over the whole cache
      b, t, n, h = q.shape
      merge = lambda a: a.transpose(0, 2, 1, 3).reshape(b * n, t, h)  # [B, T, N, H] -> [B * N, T, H] (cache layout)
      cache = KVCache(*(jax.lax.dynamic_update_slice_in_dim(c, merge(a).astype(c.dtype), cache_index, axis=1)
                        for c, a in ((cache.key, k), (cache.value, v))))
      y = attend_heads_first(merge(q), cache.key.astype(dt), cache.value.astype(dt), query_offset=cache_index)
      y = y.reshape(b, n, t, h).transpose(0, 2, 1, 3)
    out = dense(y, self.out[...].astype(dt), contract=2)  # [B, T, N, H] -> [B, T, D]
    out = checkpoint_name(out, 'projection')
    if self.out_bias is not None:
      out = out + self.out_bias[...].astype(dt)
    return dropout(out, cfg.dropout, out_key), cache


# Feed-forward -------------------------------------------------------------------


class FeedForward(nnx.Module):
  """Position-wise MLP: expand to F = mlp_ratio * D, GELU, project back to D."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.embed_dim, cfg.mlp_dim
    normal = nnx.initializers.normal
    self.fc = _param(normal(0.02), ('embed', 'mlp'), rngs.params(), (d, f), cfg)
    self.proj = _param(normal(0.02 / (2 * cfg.num_layers) ** 0.5), ('mlp', 'embed'), rngs.params(), (f, d), cfg)
    zeros = nnx.initializers.zeros_init()
    self.fc_bias = _param(zeros, ('mlp',), None, (f,), cfg) if cfg.use_bias else None
    self.proj_bias = _param(zeros, ('embed',), None, (d,), cfg) if cfg.use_bias else None
    self.cfg = cfg

  def __call__(self, x: Normalized, *, dropout_key=None):  # [B, T, D] -> [B, T, D]
    dt = jnp.dtype(self.cfg.dtype)
    w, shift = x.fold(self.fc[...], dt, out_bias=None if self.fc_bias is None else self.fc_bias[...])
    h = checkpoint_name(dense(x.x_hat, w), 'projection')  # [B, T, F]
    if shift is not None:
      h = h + shift.astype(dt)
    h = gelu(h)
    out = checkpoint_name(dense(h, self.proj[...].astype(dt)), 'projection')  # [B, T, D]
    if self.proj_bias is not None:
      out = out + self.proj_bias[...].astype(dt)
    return dropout(out, self.cfg.dropout, dropout_key)


# The block ----------------------------------------------------------------------


class Block(nnx.Module):
  """Pre-norm transformer block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

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


# The whole model ----------------------------------------------------------------


class Decoder(nnx.Module):
  """Token + learned positional embeddings -> blocks -> final LayerNorm -> LM head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, v = cfg.embed_dim, cfg.vocab_size
    normal = nnx.initializers.normal
    self.cfg = cfg
    self.token_embed = _param(normal(0.02), ('vocab', 'embed'), rngs.params(), (v, d), cfg)
    self.position_embed = _param(normal(0.02), (None, 'embed'), rngs.params(), (cfg.context_length, d), cfg)
    blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
    self.blocks = _stack(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.ln_final = LayerNorm(cfg)
    self.lm_head = None if cfg.tie_embeddings else _param(normal(0.02), ('vocab', 'embed'), rngs.params(), (v, d), cfg)

  def __call__(self, tokens, *, dropout_key=None, caches=None, cache_index=None, activation_sharding=None):
    """tokens [B, T] int -> (logits [B, T, V] fp32, updated caches or None).

    Token i sits at position i, or at `cache_index + i` when decoding with caches;
    positions must stay below `context_length` (see `embed`).
    `dropout_key` (training only) turns dropout on.
    `activation_sharding` (a NamedSharding of [B, T, D] arrays, e.g. rows over
    the batch mesh axes) pins the residual stream to it after the embeddings and
    after every block, and has the embedding tables looked up whole. Left to
    itself, GSPMD can lay the stream out like the parameters' embedding axis
    (FSDP) and move it between the two layouts with all-to-alls.
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    pin = (lambda x: x) if activation_sharding is None else (
        lambda x: jax.lax.with_sharding_constraint(x, activation_sharding))
    whole = None if activation_sharding is None else NamedSharding(activation_sharding.mesh, P())
    x = self.embed(tokens, 0 if cache_index is None else cache_index, table_sharding=whole)  # [B, T, D]
    embed_key, blocks_key = _split(dropout_key)
    x = pin(dropout(x, cfg.dropout, embed_key))
    layer_keys = None if blocks_key is None else jax.random.split(blocks_key, cfg.num_layers)
    if cfg.scan_layers:
      x, caches = self._scan_blocks(x, layer_keys, caches, cache_index, pin)
    else:
      new_caches = []
      for i, block in enumerate(self.blocks):
        x, cache = self._block(block, x, None if layer_keys is None else layer_keys[i],
                               None if caches is None else caches[i], cache_index)
        x = pin(x)
        new_caches.append(cache)
      caches = None if caches is None else tuple(new_caches)
    x = self.ln_final(x)
    head = self.token_embed if self.lm_head is None else self.lm_head  # [V, D]
    w, shift = x.fold(head[...], dt, axis=1)  # [V, D], [V] or None
    logits = jnp.einsum('btd,vd->btv', x.x_hat, w, preferred_element_type=jnp.float32)  # [B, T, V]
    return (logits if shift is None else logits + shift), caches

  def embed(self, tokens, start=0, table_sharding=None) -> jax.Array:
    """Token + positional embeddings of tokens [B, T] at positions start, start + 1, ...: [B, T, D].

    `table_sharding` (optional) is the sharding the tables are read in.

    Refuses positions past the table (checked when `start` is a Python int),
    as nanoGPT does: JAX would clamp the lookup to the last row, and a KV
    cache write to the last slots.
    """
    t, context = tokens.shape[1], self.cfg.context_length
    if t > context:
      raise ValueError(f'{t} tokens do not fit model.context_length={context}; pass at most the last {context}')
    if isinstance(start, int) and start + t > context:
      raise ValueError(f'positions {start}..{start + t - 1} run past model.context_length={context} (the KV '
                       'cache size); start a new cache or pass fewer tokens')
    dt = jnp.dtype(self.cfg.dtype)

    def table(param):  # [rows, D] in the compute dtype
      value = param[...].astype(dt)
      return value if table_sharding is None else jax.lax.with_sharding_constraint(value, table_sharding)

    # Positions are looked up per token like the tokens themselves: the table's gradient is then a
    # one-hot matmul, not a sum over the batch axis, which XLA's GPU compiler would make the minor
    # axis of the whole residual stream (a transpose at every matmul; see bench/gpu_hlo.py).
    positions = jnp.broadcast_to(start + jnp.arange(t), tokens.shape)  # [B, T]
    return embed_lookup(table(self.token_embed), tokens) + embed_lookup(table(self.position_embed), positions)

  def attention_maps(self, tokens) -> jax.Array:
    """Attention weights of every layer and head for `tokens` [B, T]: [L, B, N, T, T] (no dropout)."""
    x = self.embed(tokens)
    maps = []
    for block in self.layers():
      q, k, _ = block.attn.project(block.ln_attn(x))
      maps.append(attention_weights(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)))
      x, _ = block(x)
    return jnp.stack(maps)

  def layers(self) -> list[Block]:
    """The blocks in order, also when they are stored stacked for `scan_layers`."""
    if not self.cfg.scan_layers:
      return list(self.blocks)
    graphdef, stacked = nnx.split(self.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked)) for i in range(self.cfg.num_layers)]

  def _block(self, block, x, key, cache, cache_index):
    """One block, with its activations kept for the backward pass as `cfg.remat` says:

    'none'     keep everything (fastest, most memory);
    'matmuls'  keep the outputs of the four weight matmuls (the
               projections), recompute the rest (LayerNorm, GELU, and the
               attention scores, softmax and weighted sum of values, whose
               cost grows with the context): more time for far less memory;
    'block'    keep only the block's input, recompute the block (about a
               third more time, least memory).
    """
    if self.cfg.remat == 'none' or cache is not None:
      return block(x, dropout_key=key, cache=cache, cache_index=cache_index)
    policy = (jax.checkpoint_policies.nothing_saveable if self.cfg.remat == 'block'
              else jax.checkpoint_policies.save_only_these_names('projection'))
    graphdef, state = nnx.split(block)
    run = jax.checkpoint(lambda state, x, key: nnx.merge(graphdef, state)(x, dropout_key=key)[0], policy=policy)
    return run(state, x, key), None

  def _scan_blocks(self, x, layer_keys, caches, cache_index, pin):
    graphdef, stacked = nnx.split(self.blocks)

    def body(x, layer):
      state, key, cache = layer
      x, cache = self._block(nnx.merge(graphdef, state), x, key, cache, cache_index)
      return pin(x), cache

    x, caches = jax.lax.scan(body, x, (stacked, layer_keys, caches))
    return x, caches

  def init_caches(self, batch_size: int):
    """Empty KV caches over the whole context, in the compute dtype, one per layer (stacked when layers are
    scanned)."""
    cfg = self.cfg
    shape = (batch_size * cfg.num_heads, cfg.context_length, cfg.head_size)
    dtype = jnp.dtype(cfg.dtype)
    if cfg.scan_layers:
      stacked = (cfg.num_layers, *shape)
      return KVCache(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def _stack(blocks: list[Block]) -> Block:
  """One Block whose parameters have a leading layer axis (logical name 'layers'), for `lax.scan`.

  Built from the same per-layer initialization as the unstacked blocks, so
  `scan_layers` changes how the model runs, never its parameters.
  """
  graphdef, _ = nnx.split(blocks[0])

  def stack(*layers):
    names = layers[0].get_metadata().get('out_sharding') or (None,) * layers[0].ndim
    return layers[0].replace(jnp.stack([v[...] for v in layers]), out_sharding=('layers', *names))

  stacked = jax.tree.map(stack, *(nnx.state(b) for b in blocks), is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


def abstract_decoder(cfg: ModelConfig) -> Decoder:
  """The decoder with shape-and-dtype stand-ins for its parameters (nothing allocated or computed)."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))


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
