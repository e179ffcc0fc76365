"""Text generation: temperature / top-k / top-p sampling with a KV cache, compiled end to end.

Positions past the context. The positional table covers `context_length`
tokens. While prompt + generated text fit in it, each new token attends to
everything before it, and cached decoding gives exactly the logits of
re-running the model on the whole text. Past that point, when the cache is
full, the new token and the `context_length // 2` tokens before it are
re-encoded at positions 0, 1, ... (one prefill instead of that token's cached
step) and decoding goes on from there: every new token sees between half a
context and a full context of history, and costs one cached
step (plus one prefill every `context_length // 2` tokens). `use_cache=False`
is the uncached method of nanoGPT: every token re-runs the model on the last
`context_length` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodecoder.model import Decoder


class SamplingError(ValueError):
  """A sampling option or prompt that cannot be used."""


MAX_NEW_TOKENS = 2**30  # the decoding loop counts positions in int32


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  max_new_tokens: int = 500  # tokens generated after the prompt
  num_samples: int = 1  # independent samples, decoded together as one batch
  temperature: float = 0.8  # divides the logits; 0 means greedy (argmax)
  top_k: int = 0  # keep only the k most likely tokens (0: all)
  top_p: float = 1.0  # keep the smallest set of tokens with this much probability, ties kept (1: all)
  seed: int = 0  # PRNG seed of the sampling
  use_cache: bool = True  # KV cache (False: re-run the whole context per token)

  def validate(self) -> None:
    if not 0 < self.max_new_tokens <= MAX_NEW_TOKENS:
      raise SamplingError(f'max_new_tokens must be in [1, {MAX_NEW_TOKENS:,}], got {self.max_new_tokens}')
    if self.num_samples <= 0:
      raise SamplingError(f'num_samples must be positive, got {self.num_samples}')
    if not math.isfinite(self.temperature):
      raise SamplingError(f'temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}')
    if self.temperature < 0:
      raise SamplingError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}')
    if self.top_k < 0:
      raise SamplingError(f'top_k must be >= 0 (0 = off), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')
    if not 0 <= self.seed < 2**32:  # JAX's PRNG keys take 32-bit seeds: larger ones would repeat smaller ones
      raise SamplingError(f'seed must be an integer in [0, 2**32), got {self.seed}')


def filter_logits(logits: jax.Array, temperature, top_k: int, top_p=None) -> jax.Array:
  """Logits [..., V] less their maximum, scaled by 1/temperature, with tokens outside top-k / top-p set to -inf.

  top_k 0 and top_p None (or 1) keep every token. The shift keeps a tiny
  temperature finite (the largest logit stays 0): it tends to greedy, never NaN.
  """
  logits = logits.astype(jnp.float32)
  temperature = jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)  # float32 turns 1e-50 into 0
  logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p is None:
    return logits
  # Top-p: keep a token if the probability of all more likely tokens is below top_p (the top token always).
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  threshold = jnp.minimum(threshold, ordered[..., :1])  # a top_p that float32 makes 0 (1e-46) keeps the top too
  return jnp.where(logits < threshold, -jnp.inf, logits)


def next_token(uniform, logits, temperature, top_k: int, top_p, greedy: bool) -> jax.Array:
  """[B, V] logits -> [B] token ids, drawn by inverting the CDF at `uniform` [B] (in [0, 1)).

  Token j is drawn when the probability of tokens 0..j-1 is <= uniform * total
  < that of tokens 0..j, i.e. with its probability; filtered tokens have none.
  One uniform per row, drawn for all steps before decoding starts, costs far
  less per token than a fresh PRNG draw per vocabulary entry.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  cdf = jnp.cumsum(jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p), axis=-1), axis=-1)
  return jnp.sum(cdf <= uniform[:, None] * cdf[:, -1:], axis=-1).astype(jnp.int32)


def memory_needed(model: Decoder, prompt_len: int, options: SamplingOptions) -> int:
  """A lower bound on the bytes a generation holds at once: per sample its token ids, its random numbers
  and (with a cache) its KV caches."""
  cfg = model.cfg
  per_sample = 4 * _buffer_length(prompt_len, options.max_new_tokens, cfg.context_length) + 4 * options.max_new_tokens
  if options.use_cache:
    per_sample += 2 * cfg.num_layers * cfg.context_length * cfg.embed_dim * jnp.dtype(cfg.dtype).itemsize
  return options.num_samples * per_sample


def memory_available() -> int | None:
  """Bytes the default device can hold: an accelerator's memory limit, the host's physical memory on CPU."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  stats = device.memory_stats() or {}
  return stats.get('bytes_limit')


def check_memory(model: Decoder, prompt_len: int, options: SamplingOptions) -> None:
  """Refuses a generation that cannot fit before any work (else XLA fails only after allocating what it can)."""
  needed, available = memory_needed(model, prompt_len, options), memory_available()
  if available and needed > available:
    raise SamplingError(f'out of memory: {options.num_samples:,} samples of {options.max_new_tokens:,} tokens need at '
                        f'least {needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB of this '
                        f'{jax.devices()[0].platform} device; lower --num_samples or --max_new_tokens')


def uniforms(seed: int, steps: int, num_samples: int) -> jax.Array:
  """The random numbers of a whole generation: [steps, num_samples] in [0, 1).

  Sample j's column depends only on (seed, j), not on num_samples.
  """
  key = jax.random.key(seed)
  sample_uniforms = lambda j: jax.random.uniform(jax.random.fold_in(key, j), (steps,))
  return jax.vmap(sample_uniforms, out_axes=1)(jnp.arange(num_samples))


# The decoding loop: a state and steps on it, shared by the compiled loop and streaming.


def _buffer_length(prompt_len: int, steps: int, context_length: int) -> int:
  """Tokens in a sample's buffer: its prompt (cut to the context) and new tokens, at least one context."""
  return max(min(prompt_len, context_length) + steps, context_length)


def _start(model: Decoder, prompt, num_samples: int, steps: int, use_cache: bool):
  """Decoding state after reading the prompt [P]: a token buffer, and caches + last logits."""
  length = prompt.shape[0]
  tokens = jnp.zeros((num_samples, _buffer_length(length, steps, model.cfg.context_length)),
                     jnp.int32).at[:, :length].set(prompt)
  state = {'tokens': tokens, 'i': jnp.int32(0)}
  if not use_cache:
    return state
  logits, caches = model(tokens[:, :length], caches=model.init_caches(num_samples), cache_index=0)
  return dict(state, caches=caches, cache_len=jnp.int32(length), logits=logits[:, -1])


def _sample(model: Decoder, state, prompt_len: int, randoms, temperature, top_p, *, top_k: int, greedy: bool):
  """Samples token `i` after the prompt and appends it: (tokens, its position, token [B])."""
  tokens, i = state['tokens'], state['i']
  length = prompt_len + i  # tokens before the new one
  if 'caches' in state:
    logits = state['logits']
  else:  # uncached: run the model over the last `context` tokens
    context = model.cfg.context_length
    start = jnp.maximum(length - context, 0)
    window = jax.lax.dynamic_slice_in_dim(tokens, start, context, axis=1)
    all_logits, _ = model(window)
    logits = jax.lax.dynamic_index_in_dim(all_logits, length - 1 - start, axis=1, keepdims=False)
  token = next_token(randoms[i], logits, temperature, top_k, top_p, greedy)
  return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], length, axis=1), length, token


def _decode(model: Decoder, state, prompt_len: int, *sample_args, **sample_kwargs):
  """One token: sample it, then (with a cache) feed it to the model at the next cache slot."""
  tokens, _, token = _sample(model, state, prompt_len, *sample_args, **sample_kwargs)
  state = dict(state, tokens=tokens, i=state['i'] + 1)
  if 'caches' in state:
    logits, caches = model(token[:, None], caches=state['caches'], cache_index=state['cache_len'])
    state.update(caches=caches, cache_len=state['cache_len'] + 1, logits=logits[:, -1])
  return state, token


def _refill(model: Decoder, state, prompt_len: int, *sample_args, **sample_kwargs):
  """One token when the cache is full: sample it, then re-encode the last half context with it at 0, 1, ..."""
  tokens, length, token = _sample(model, state, prompt_len, *sample_args, **sample_kwargs)
  keep = model.cfg.context_length // 2 + 1
  window = jax.lax.dynamic_slice_in_dim(tokens, length + 1 - keep, keep, axis=1)
  logits, caches = model(window, caches=model.init_caches(tokens.shape[0]), cache_index=0)
  return dict(state, tokens=tokens, i=state['i'] + 1, caches=caches, cache_len=jnp.int32(keep),
              logits=logits[:, -1]), token


def _jit(fn, **kwargs):
  """`jax.jit` for decoding. On CPU it turns off XLA's tree-reduction rewrite, which splits every
  reduction into two kernels (sums over windows of 32 elements, then their total): the reductions of
  a decoding step have at most a few hundred elements, and the extra kernels cost ~3% of a token."""
  options = {'xla_disable_hlo_passes': 'tree_reduction_rewriter'} if jax.default_backend() == 'cpu' else None
  return jax.jit(fn, compiler_options=options, **kwargs)


@functools.cache
def _compiled_generate():
  return _jit(_generate, static_argnames=('graphdef', 'num_samples', 'steps', 'top_k', 'greedy', 'use_cache'))


def _generate(params, prompt, randoms, temperature, top_p, *, graphdef, num_samples, steps, top_k, greedy, use_cache):
  model = nnx.merge(graphdef, params)
  state = _start(model, prompt, num_samples, steps, use_cache)
  step_args, step_kwargs = (prompt.shape[0], randoms, temperature, top_p), dict(top_k=top_k, greedy=greedy)
  decode = lambda s: _decode(model, s, *step_args, **step_kwargs)[0]
  if not use_cache:
    state = jax.lax.while_loop(lambda s: s['i'] < steps, decode, state)
  else:
    # Segments: decode until the cache is full, then one refill step. The
    # branch sits outside the per-token loop, which then updates the caches
    # in place (a branch inside it would copy every cache on every token).
    refill = lambda s: _refill(model, s, *step_args, **step_kwargs)[0]
    context = model.cfg.context_length

    def segment(state):
      state = jax.lax.while_loop(lambda s: (s['i'] < steps) & (s['cache_len'] < context), decode, state)
      return jax.lax.cond(state['i'] < steps, refill, lambda s: s, state)

    state = jax.lax.while_loop(lambda s: s['i'] < steps, segment, state)
  return jax.lax.dynamic_slice_in_dim(state['tokens'], prompt.shape[0], steps, axis=1)


def _prepare(model: Decoder, prompt: np.ndarray, options: SamplingOptions):
  """(prompt, graphdef, params, (randoms, temperature, top_p), static sampling arguments) for decoding."""
  options.validate()
  prompt = np.asarray(prompt, np.int32).reshape(-1)
  if prompt.size == 0:
    raise SamplingError('the prompt is empty; give at least one character (e.g. a newline)')
  prompt = prompt[-model.cfg.context_length:]  # only the last context can condition the next token
  check_memory(model, prompt.size, options)
  graphdef, params = nnx.split(model)
  randoms = uniforms(options.seed, options.max_new_tokens, options.num_samples)
  top_p = None if options.top_p >= 1.0 else jnp.float32(options.top_p)  # None: no nucleus filter compiled in
  sampling = (randoms, jnp.float32(options.temperature or 1.0), top_p)
  static = dict(top_k=options.top_k, greedy=options.temperature == 0)
  return jnp.asarray(prompt), graphdef, params, sampling, static


def generate(model: Decoder, prompt: np.ndarray, options: SamplingOptions = SamplingOptions()) -> np.ndarray:
  """Token ids [num_samples, max_new_tokens] following `prompt` (token ids), in one compiled call."""
  prompt, graphdef, params, sampling, static = _prepare(model, prompt, options)
  out = _compiled_generate()(params, prompt, *sampling, graphdef=graphdef, num_samples=options.num_samples,
                             steps=options.max_new_tokens, use_cache=options.use_cache, **static)
  # Waited for first: a buffer that failed to allocate (too many tokens) then raises an error here, where
  # np.asarray on it aborts the process (jaxlib 0.10).
  return np.asarray(jax.block_until_ready(out))


def stream(model: Decoder, prompt: np.ndarray, options: SamplingOptions = SamplingOptions()) -> Iterator[np.ndarray]:
  """Yields each new token [num_samples] as soon as it is sampled (one compiled step per token)."""
  prompt, graphdef, params, (randoms, temperature, top_p), static = _prepare(model, prompt, options)
  start = _jit(lambda params, prompt: _start(nnx.merge(graphdef, params), prompt, options.num_samples,
                                             options.max_new_tokens, options.use_cache))
  steps = {fn: _jit(lambda params, state, randoms, fn=fn: fn(nnx.merge(graphdef, params), state, prompt.shape[0],
                                                             randoms, temperature, top_p, **static),
                    donate_argnums=1) for fn in (_decode, _refill)}
  state = jax.block_until_ready(start(params, prompt))  # a failed allocation raises here (see `generate`)
  for _ in range(options.max_new_tokens):
    full = options.use_cache and int(state['cache_len']) == model.cfg.context_length
    state, token = steps[_refill if full else _decode](params, state, randoms)
    yield np.asarray(token)
