"""Sampling: KV-cached decoding equals recomputation; the filters do what they say."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_tiny_config
from nanodecoder import config as config_lib
from nanodecoder import data as data_lib
from nanodecoder import sharding as sharding_lib
from nanodecoder import train as train_lib
from nanodecoder.model import Decoder, _stack
from nanodecoder.sampling import SamplingError, SamplingOptions, filter_logits, generate, next_token, stream



@pytest.fixture(scope='module')
def model(corpus_file):
  """A tiny model trained for a few seconds (context 16), so that its greedy text is not degenerate."""
  config = make_tiny_config(corpus_file, **{'train.learning_rate': 1e-2, 'train.min_learning_rate': 1e-2})
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  dataset = data_lib.load_dataset(config)
  trainer = train_lib.create_trainer(config, config_lib.model_config(config, dataset.tokenizer.vocab_size), mesh)
  for step in range(150):
    trainer.state, _ = trainer.train_step(trainer.state, jnp.asarray(dataset.train_batch(0, step, 8)))
  return trainer.model()


@pytest.fixture(scope='module')
def sharp(model):
  """A random model with large weights: each of its next tokens depends on every token of the window it sees."""
  with nnx.use_eager_sharding(False):
    sharp = Decoder(model.cfg, nnx.Rngs(params=1))
  nnx.update(sharp, jax.tree.map(lambda x: 8 * x, nnx.state(sharp, nnx.Param)))
  return sharp


_forward = nnx.jit(lambda model, window: model(window)[0])  # (eager, each window length took a second or more)


def greedy_reference(model, prompt, steps, refill=True):
  """Token by token, re-running the model on exactly the text the cached decoder has seen."""
  context, keep = model.cfg.context_length, model.cfg.context_length // 2
  tokens, seen = list(prompt), len(prompt)
  for _ in range(steps):
    window = jnp.asarray(tokens[len(tokens) - seen:])[None]
    logits = _forward(model, window)
    tokens.append(int(jnp.argmax(logits[0, -1])))
    if refill and seen == context:
      seen = keep
    seen = seen + 1 if refill else min(seen + 1, context)
  return np.asarray(tokens[len(prompt):])


def test_cached_greedy_equals_uncached_within_the_context(model):
  prompt = np.array([1, 5, 7, 2], np.int32)
  options = SamplingOptions(max_new_tokens=12, temperature=0.0)  # 4 + 12 = the whole context
  cached = generate(model, prompt, options)
  uncached = generate(model, prompt, SamplingOptions(max_new_tokens=12, temperature=0.0, use_cache=False))
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached[0], greedy_reference(model, prompt, 12))
  assert len(set(cached[0].tolist())) > 2  # not a degenerate repetition


def test_uncached_past_the_context_crops_to_the_last_context(model):
  prompt = np.array([3, 1, 4, 1, 5], np.int32)
  out = generate(model, prompt, SamplingOptions(max_new_tokens=40, temperature=0.0, use_cache=False))
  np.testing.assert_array_equal(out[0], greedy_reference(model, prompt, 40, refill=False))


def test_cached_generation_past_the_context_refills_half_a_context(sharp):
  """Each refill re-encodes the new token and the context // 2 before it (`sharp`: one token fewer changes the text)."""
  prompt = np.array([3, 1, 4, 1, 5], np.int32)
  out = generate(sharp, prompt, SamplingOptions(max_new_tokens=45, temperature=0.0))  # ~3 contexts
  assert out.shape == (1, 45) and len(set(out[0].tolist())) > 5
  np.testing.assert_array_equal(out[0], greedy_reference(sharp, prompt, 45))


def test_scanned_layers_sample_the_same_tokens(model):
  """Stacked blocks (`scan_layers`) carry stacked caches; decoding gives the same text."""
  with nnx.use_eager_sharding(False):
    scanned = Decoder(dataclasses.replace(model.cfg, scan_layers=True), nnx.Rngs(params=0))
    scanned.blocks = _stack(model.layers())
  for name in ('token_embed', 'position_embed', 'ln_final'):
    setattr(scanned, name, getattr(model, name))
  prompt = np.array([3, 1, 4], np.int32)
  options = SamplingOptions(max_new_tokens=30, num_samples=2, temperature=1.0, seed=3)  # past the context
  np.testing.assert_array_equal(generate(scanned, prompt, options), generate(model, prompt, options))


@pytest.mark.parametrize('use_cache', [True, False])
def test_generation_is_one_compiled_call_whatever_its_length(model, monkeypatch, use_cache):
  """One call of the compiled loop per generation; the model's Python code runs only while that loop is traced
  (as often for 37 tokens as for 111, three contexts; not at all when a generation of the same shape reruns)."""
  from nanodecoder import sampling
  model_calls, loop_calls = [], []
  call_model = Decoder.__call__
  monkeypatch.setattr(Decoder, '__call__', lambda self, *a, **kw: model_calls.append(1) or call_model(self, *a, **kw))
  compiled = sampling._compiled_generate()
  monkeypatch.setattr(sampling, '_compiled_generate',
                      lambda: lambda *a, **kw: loop_calls.append(1) or compiled(*a, **kw))
  counts = []
  for steps in (37, 111, 111):
    model_calls.clear(), loop_calls.clear()
    generate(model, np.array([1, 2], np.int32), SamplingOptions(max_new_tokens=steps, use_cache=use_cache))
    counts.append(len(model_calls))
    assert len(loop_calls) == 1
  assert counts[0] == counts[1] == (3 if use_cache else 1) and counts[2] == 0  # cached: prompt, token, refill


def test_long_prompt_keeps_its_last_context(model):
  prompt = np.arange(40, dtype=np.int32) % 20
  a = generate(model, prompt, SamplingOptions(max_new_tokens=5, temperature=0.0))
  b = generate(model, prompt[-16:], SamplingOptions(max_new_tokens=5, temperature=0.0))
  np.testing.assert_array_equal(a, b)


def test_stream_yields_the_same_tokens_as_the_compiled_loop(model):
  prompt = np.array([2, 4, 6], np.int32)
  options = SamplingOptions(max_new_tokens=30, num_samples=1, temperature=0.9, top_k=5, seed=7)
  streamed = np.stack(list(stream(model, prompt, options)), axis=1)
  np.testing.assert_array_equal(streamed, generate(model, prompt, options))


def test_samples_are_reproducible_per_seed_and_differ_across_rows(model):
  prompt = np.array([2], np.int32)
  options = SamplingOptions(max_new_tokens=20, num_samples=4, temperature=1.0, seed=1)
  a, b = generate(model, prompt, options), generate(model, prompt, options)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 20) and len({tuple(row) for row in a}) == 4  # four samples, each its own
  assert not np.array_equal(a, generate(model, prompt, dataclasses.replace(options, seed=2)))


def test_a_sample_does_not_depend_on_the_number_of_samples(model):
  prompt = np.array([2], np.int32)
  options = SamplingOptions(max_new_tokens=20, num_samples=4, temperature=1.0, seed=1)  # compiled above
  one = generate(model, prompt, dataclasses.replace(options, num_samples=1))
  np.testing.assert_array_equal(generate(model, prompt, options)[:1], one)


LOGITS = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))


def kept(logits):
  return np.isfinite(np.asarray(logits[0])).nonzero()[0].tolist()


def test_top_k_keeps_the_k_largest():
  assert kept(filter_logits(LOGITS, 1.0, 2, 1.0)) == [2, 3]
  assert kept(filter_logits(LOGITS, 1.0, 1, 1.0)) == [3]
  assert kept(filter_logits(LOGITS, 1.0, 0, 1.0)) == [0, 1, 2, 3]


@pytest.mark.parametrize('top_p, expected', [(1.0, [0, 1, 2, 3]), (0.5, [2, 3]), (0.7, [2, 3]), (0.71, [1, 2, 3]),
                                             (0.4, [3]), (0.05, [3]), (1e-40, [3]), (1e-46, [3])])  # float32: 0
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
  assert kept(filter_logits(LOGITS, 1.0, 0, top_p)) == expected


DYADIC = jnp.log(jnp.array([[0.0625, 0.25, 0.5, 0.0625, 0.125]]))  # cumulative masses exact in float32


@pytest.mark.parametrize('top_p, expected', [
    (0.5, [2]), (0.75, [1, 2]), (0.875, [1, 2, 4]),  # exactly reached: the token reaching p is the last kept
    (0.5 - 2**-20, [2]), (0.5 + 2**-20, [1, 2]), (0.875 + 2**-20, [0, 1, 2, 3, 4]),  # 0 and 3 tie: both kept
])
def test_top_p_at_exactly_p_keeps_the_token_that_reaches_it_and_no_more(top_p, expected):
  # LOGITS' masses (0.4 + 0.3 = 0.70000005 in float32) miss p = 0.7: these hit p exactly, as the test assumes.
  ordered = jnp.sort(DYADIC, axis=-1)[..., ::-1]
  np.testing.assert_array_equal(jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1), [[0.5, 0.75, 0.875, 0.9375, 1]])
  assert kept(filter_logits(DYADIC, 1.0, 0, top_p)) == expected


def draw(uniform, temperature=1.0, top_k=0, top_p=None):
  u = jnp.atleast_1d(jnp.asarray(uniform, jnp.float32))
  return np.asarray(next_token(u, jnp.broadcast_to(LOGITS, (u.shape[0], 4)), temperature, top_k, top_p, greedy=False))


def test_a_uniform_picks_the_token_whose_cdf_interval_holds_it():
  # probabilities 0.1, 0.2, 0.3, 0.4: cumulative 0.1, 0.3, 0.6, 1.0
  assert draw([0.0, 0.05, 0.11, 0.29, 0.31, 0.59, 0.61, 0.999]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  # filtered tokens are never drawn, even at the ends of [0, 1)
  assert draw([0.0, 0.4, 0.999], top_k=2).tolist() == [2, 2, 3]
  assert draw([0.0, 0.999], top_p=0.4).tolist() == [3, 3]


def test_temperature_scales_logits_and_sampling_follows_the_distribution():
  np.testing.assert_allclose(filter_logits(LOGITS, 2.0, 0, 1.0), (LOGITS - LOGITS.max()) / 2.0, rtol=1e-6)
  u = jax.random.uniform(jax.random.key(0), (20000,))
  freq = np.bincount(draw(u, temperature=0.5), minlength=4) / 20000
  expected = np.asarray(jax.nn.softmax(LOGITS[0] / 0.5))
  np.testing.assert_allclose(freq, expected, atol=0.015)
  # top-k 2 at temperature 1: only tokens 2 and 3, in proportion 3:4.
  freq = np.bincount(draw(u, top_k=2), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0, 0, 3 / 7, 4 / 7], atol=0.015)


@pytest.mark.parametrize('temperature', [1e-39, 1e-50])  # float32: subnormal, and 0
def test_a_tiny_temperature_tends_to_greedy_not_nan(temperature):
  logits = jnp.array([[0.0, 50.0, 49.0, -3.0], [7.0, 7.0, 6.0, 1e4]])  # logits / 1e-39 overflow float32
  probs = np.asarray(jax.nn.softmax(filter_logits(logits, temperature, 0, None), axis=-1))
  np.testing.assert_array_equal(probs, [[0, 1, 0, 0], [0, 0, 0, 1]])
  u = jnp.array([0.0, 0.999])
  assert np.asarray(next_token(u, logits, temperature, 0, None, greedy=False)).tolist() == [1, 3]
  assert np.asarray(next_token(u, logits, temperature, 2, jnp.float32(0.5), greedy=False)).tolist() == [1, 3]


def test_zero_and_tiny_temperatures_give_the_argmax_text(model):
  """Through SamplingOptions: whatever the seed and filters, every row is the greedy text."""
  prompt = np.array([1, 5, 7, 2], np.int32)
  expected = greedy_reference(model, prompt, 12)  # the shapes of the first test: no new compilation
  for temperature in (0.0, 1e-39):
    options = SamplingOptions(max_new_tokens=12, num_samples=3, temperature=temperature, top_k=3, top_p=0.9, seed=5)
    np.testing.assert_array_equal(generate(model, prompt, options), [expected] * 3)


@pytest.mark.parametrize('options, message', [
    (SamplingOptions(temperature=-1.0), r'temperature must be >= 0 \(0 = greedy\), got -1.0'),
    (SamplingOptions(temperature=float('nan')), r'temperature must be a finite number >= 0 \(0 = greedy\), got nan'),
    (SamplingOptions(temperature=float('inf')), r'temperature must be a finite number >= 0 .*, got inf'),
    (SamplingOptions(top_p=0.0), r'top_p must be in \(0, 1\] \(1 = off\), got 0.0'),
    (SamplingOptions(top_p=1.5), r'top_p must be in \(0, 1\]'),
    (SamplingOptions(top_k=-2), r'top_k must be >= 0'),
    (SamplingOptions(max_new_tokens=0), r'max_new_tokens must be in \[1, 1,073,741,824\], got 0'),
    (SamplingOptions(max_new_tokens=3_000_000_000), r'max_new_tokens must be in \[1, 1,073,741,824\], got 3000000000'),
    (SamplingOptions(seed=-1), r'seed must be an integer in \[0, 2\*\*32\), got -1'),
    (SamplingOptions(seed=2**32), r'seed must be an integer in \[0, 2\*\*32\), got 4294967296'),
])
def test_bad_options_are_refused(model, options, message):
  with pytest.raises(SamplingError, match=message):
    generate(model, np.array([1], np.int32), options)


def test_empty_prompt_is_refused(model):
  with pytest.raises(SamplingError, match='the prompt is empty'):
    generate(model, np.array([], np.int32), SamplingOptions())


def test_a_generation_larger_than_memory_is_refused_before_any_work(model, monkeypatch):
  from nanodecoder import sampling
  options = SamplingOptions(max_new_tokens=5, num_samples=2)
  caches = model.init_caches(2)  # the lower bound counts exactly the KV caches, token ids and random numbers
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(caches))
  context = model.cfg.context_length
  assert sampling.memory_needed(model, 3, options) == cache_bytes + 2 * 4 * (context + 5)
  assert sampling.memory_needed(model, 3, dataclasses.replace(options, max_new_tokens=40, use_cache=False)) == (
      2 * 4 * (3 + 40 + 40))
  monkeypatch.setattr(sampling, 'memory_available', lambda: 10**6)
  big = SamplingOptions(max_new_tokens=100, num_samples=1000)
  with pytest.raises(SamplingError, match=r'^out of memory: 1,000 samples of 100 tokens need at least 0.\d GiB, more '
                                          r'than the 0.0 GiB of this cpu device; lower --num_samples or --max_new_tokens$'):
    generate(model, np.array([1]), big)
  with pytest.raises(SamplingError, match='out of memory'):
    next(stream(model, np.array([1]), big))
  assert generate(model, np.array([1]), options).shape == (2, 5)  # fits


def test_decoding_jit_keeps_cpu_reductions_in_one_kernel():
  # Guards the XLA option behind ~3% of CPU decoding speed: a renamed pass would be ignored silently.
  from nanodecoder.sampling import _jit
  if jax.default_backend() != 'cpu':
    pytest.skip('a CPU-only compiler option')
  row_sums = lambda x: jnp.sum(jnp.exp(x), axis=-1)
  x = jnp.ones((4, 384))
  assert 'reduce-window' in jax.jit(row_sums).lower(x).compile().as_text()  # split by default
  assert 'reduce-window' not in _jit(row_sums).lower(x).compile().as_text()
  np.testing.assert_allclose(_jit(row_sums)(x), row_sums(x), rtol=1e-6)


def test_top_p_applies_to_the_distribution_after_temperature():
  # Temperature 0.5 squares the probabilities 0.1..0.4 (renormalized: 0.033, 0.133, 0.3, 0.533): 0.533 + 0.3 reach
  # 0.8. At temperature 1, 0.4 + 0.3 do not.
  assert kept(filter_logits(LOGITS, 0.5, 0, 0.8)) == [2, 3]
  assert kept(filter_logits(LOGITS, 1.0, 0, 0.8)) == [1, 2, 3]


def test_a_long_prompt_conditions_on_all_of_its_last_context(sharp):
  prompt = np.arange(40, dtype=np.int32) % 20
  out = generate(sharp, prompt, SamplingOptions(max_new_tokens=5, temperature=0.0))
  np.testing.assert_array_equal(out[0], greedy_reference(sharp, prompt[-16:], 5))
