"""Text generation: temperature / top-k / top-p sampling with a KV cache, compiled end to end.

Positions past the context. The positional table covers `context_length`
tokens. While prompt + generated text fit in it, each new token attends to
everything before it, and cached decoding gives exactly the logits of
re-running the model on the whole text. Past that point, when the cache is
full, the last `context_length // 2` tokens are re-encoded at positions
0, 1, ... (one prefill) and decoding goes on from there: every new token sees
between half a context and a full context of history, and costs one cached
step (plus one prefill every `context_length // 2` tokens). `use_cache=False`
is the uncached method of nanoGPT: every token re-runs the model on the last
`context_length` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodecoder.model import Decoder


class SamplingError(ValueError):
  """A sampling option or prompt that cannot be used."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  max_new_tokens: int = 500  # tokens generated after the prompt
  num_samples: int = 1  # independent samples, decoded together as one batch
  temperature: float = 0.8  # divides the logits; 0 means greedy (argmax)
  top_k: int = 0  # keep only the k most likely tokens (0: all)
  top_p: float = 1.0  # keep the smallest set of tokens with this much probability (1: all)
  seed: int = 0  # PRNG seed of the sampling
  use_cache: bool = True  # KV cache (False: re-run the whole context per token)

  def validate(self) -> None:
    if self.max_new_tokens <= 0:
      raise SamplingError(f'max_new_tokens must be positive, got {self.max_new_tokens}')
    if self.num_samples <= 0:
      raise SamplingError(f'num_samples must be positive, got {self.num_samples}')
    if self.temperature < 0:
      raise SamplingError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}')
    if self.top_k < 0:
      raise SamplingError(f'top_k must be >= 0 (0 = off), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')


def filter_logits(logits: jax.Array, temperature, top_k: int, top_p=None) -> jax.Array:
  """Logits [..., V] scaled by 1/temperature, with tokens outside top-k / top-p set to -inf.

  top_k 0 and top_p None (or 1) keep every token.
  """
  logits = logits.astype(jnp.float32) / temperature
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
  return jnp.where(logits < threshold, -jnp.inf, logits)


def next_token(key, logits, temperature, top_k: int, top_p, greedy: bool) -> jax.Array:
  """[B, V] logits -> [B] token ids."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


# The decoding loop, as a state and one step, shared by the compiled loop and streaming.


def _start(model: Decoder, prompt, num_samples: int, steps: int, use_cache: bool):
  """Decoding state after reading the prompt [P]: a token buffer, and caches + last logits."""
  length = prompt.shape[0]
  total = max(length + steps, model.cfg.context_length)
  tokens = jnp.zeros((num_samples, total), jnp.int32).at[:, :length].set(prompt)
  if not use_cache:
    return {'tokens': tokens}
  logits, caches = model(tokens[:, :length], caches=model.init_caches(num_samples), cache_index=0)
  return {'tokens': tokens, 'caches': caches, 'cache_len': jnp.int32(length), 'logits': logits[:, -1]}


def _advance(model: Decoder, state, i, prompt_len: int, key, temperature, top_p, *, top_k: int, greedy: bool):
  """Samples token `i` after the prompt and appends it; returns (state, token [B])."""
  context = model.cfg.context_length
  tokens = state['tokens']
  length = prompt_len + i  # tokens before the new one
  if 'caches' in state:
    logits = state['logits']
  else:  # uncached: run the model over the last `context` tokens
    start = jnp.maximum(length - context, 0)
    window = jax.lax.dynamic_slice_in_dim(tokens, start, context, axis=1)
    all_logits, _ = model(window)
    logits = jax.lax.dynamic_index_in_dim(all_logits, length - 1 - start, axis=1, keepdims=False)
  token = next_token(jax.random.fold_in(key, i), logits, temperature, top_k, top_p, greedy)
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], length, axis=1)
  state = dict(state, tokens=tokens)
  if 'caches' in state:
    keep = context // 2

    def refill(caches):  # cache full: re-encode the last `keep` tokens at positions 0..keep-1
      window = jax.lax.dynamic_slice_in_dim(tokens, length - keep, keep, axis=1)
      _, caches = model(window, caches=caches, cache_index=0)
      return caches, jnp.int32(keep)

    caches, cache_len = jax.lax.cond(state['cache_len'] == context, refill,
                                     lambda caches: (caches, state['cache_len']), state['caches'])
    logits, caches = model(token[:, None], caches=caches, cache_index=cache_len)
    state.update(caches=caches, cache_len=cache_len + 1, logits=logits[:, -1])
  return state, token


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_samples', 'steps', 'top_k', 'greedy', 'use_cache'))
def _generate(params, prompt, key, temperature, top_p, *, graphdef, num_samples, steps, top_k, greedy, use_cache):
  model = nnx.merge(graphdef, params)
  state = _start(model, prompt, num_samples, steps, use_cache)
  step = functools.partial(_advance, model, prompt_len=prompt.shape[0], key=key, temperature=temperature,
                           top_p=top_p, top_k=top_k, greedy=greedy)
  state = jax.lax.fori_loop(0, steps, lambda i, s: step(s, i)[0], state)
  return jax.lax.dynamic_slice_in_dim(state['tokens'], prompt.shape[0], steps, axis=1)


def _prepare(model: Decoder, prompt: np.ndarray, options: SamplingOptions):
  options.validate()
  prompt = np.asarray(prompt, np.int32).reshape(-1)
  if prompt.size == 0:
    raise SamplingError('the prompt is empty; give at least one character (e.g. a newline)')
  prompt = prompt[-model.cfg.context_length:]  # only the last context can condition the next token
  graphdef, params = nnx.split(model)
  static = dict(top_k=options.top_k, greedy=options.temperature == 0)
  return jnp.asarray(prompt), graphdef, params, static


def _top_p(options: SamplingOptions):
  return None if options.top_p >= 1.0 else jnp.float32(options.top_p)  # None: no nucleus filter compiled in


def generate(model: Decoder, prompt: np.ndarray, options: SamplingOptions = SamplingOptions()) -> np.ndarray:
  """Token ids [num_samples, max_new_tokens] following `prompt` (token ids), in one compiled call."""
  prompt, graphdef, params, static = _prepare(model, prompt, options)
  out = _generate(params, prompt, jax.random.key(options.seed), jnp.float32(options.temperature or 1.0),
                  _top_p(options), graphdef=graphdef, num_samples=options.num_samples,
                  steps=options.max_new_tokens, use_cache=options.use_cache, **static)
  return np.asarray(out)


def stream(model: Decoder, prompt: np.ndarray, options: SamplingOptions = SamplingOptions()) -> Iterator[np.ndarray]:
  """Yields each new token [num_samples] as soon as it is sampled (one compiled step per token)."""
  prompt, graphdef, params, static = _prepare(model, prompt, options)
  key, temperature, top_p = jax.random.key(options.seed), jnp.float32(options.temperature or 1.0), _top_p(options)
  start = jax.jit(lambda params, prompt: _start(nnx.merge(graphdef, params), prompt, options.num_samples,
                                                options.max_new_tokens, options.use_cache))
  advance = jax.jit(lambda params, state, i: _advance(nnx.merge(graphdef, params), state, i, prompt.shape[0], key,
                                                      temperature, top_p, **static), donate_argnums=1)
  state = start(params, prompt)
  for i in range(options.max_new_tokens):
    state, token = advance(params, state, jnp.int32(i))
    yield np.asarray(token)
