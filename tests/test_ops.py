"""The primitives: each equals the textbook operation, in value and gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from nanodecoder.ops import dense, dropout, embed_lookup, gelu


def test_dense_gradient_equals_matmul_gradient():
  x, w = jax.random.normal(jax.random.key(5), (2, 3, 4, 6)), jax.random.normal(jax.random.key(6), (6, 2, 5))
  ref = lambda x, w: jnp.sum(jnp.sin(jnp.einsum('abcd,def->abcef', x, w)))
  ours = lambda x, w: jnp.sum(jnp.sin(dense(x, w)))
  for a, b in zip(jax.grad(ref, (0, 1))(x, w), jax.grad(ours, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  w2 = jax.random.normal(jax.random.key(7), (4, 6, 5))
  ref2 = lambda x, w: jnp.sum(jnp.sin(jnp.einsum('abcd,cde->abe', x, w)))
  for a, b in zip(jax.grad(ref2, (0, 1))(x, w2), jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w, 2))), (0, 1))(x, w2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_embedding_gradient_equals_gather_gradient():
  # Skewed ids, as in text: id 0 takes ~half the tokens (where GPU scatter-adds serialize).
  ids = jnp.asarray(np.random.default_rng(0).choice(11, size=(3, 40), p=[0.5] + [0.05] * 10))
  table, weights = jax.random.normal(jax.random.key(8), (11, 6)), jax.random.normal(jax.random.key(9), (3, 40, 6))
  ref = lambda table: jnp.sum(jnp.sin(table[ids]) * weights)
  ours = lambda table: jnp.sum(jnp.sin(embed_lookup(table, ids)) * weights)
  assert ours(table) == ref(table)  # the lookup itself is a plain gather
  np.testing.assert_allclose(jax.grad(ours)(table), jax.grad(ref)(table), rtol=1e-5, atol=1e-5)


def test_gelu_is_exact_gelu():
  x = np.linspace(-8, 8, 4001)
  cdf = 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in x])  # Phi(x) in float64
  np.testing.assert_allclose(gelu(jnp.asarray(x, jnp.float32)), x * cdf, rtol=1e-5, atol=1e-6)
  grad = jax.vmap(jax.grad(gelu))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(grad, cdf + x * np.exp(-x**2 / 2) / math.sqrt(2 * math.pi), rtol=1e-5, atol=2e-6)
  assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
  # bf16 inputs: computed in fp32 and rounded once (as PyTorch), also in the tail where 1 + erf cancels.
  x16 = jnp.asarray(x, jnp.bfloat16)
  exact = np.asarray(x16, np.float64) * 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in np.asarray(x16, float)])
  np.testing.assert_allclose(np.asarray(gelu(x16), np.float64), exact, rtol=2**-8, atol=1e-6)  # bf16's rounding


def test_dropout_keeps_the_expected_fraction_and_mean():
  x = jnp.ones((64, 1001))
  y = dropout(x, 0.2, jax.random.key(0))
  kept = np.asarray(y != 0)
  assert abs(kept.mean() - 0.8) < 0.005
  np.testing.assert_allclose(float(y.mean()), 1.0, atol=0.01)
  np.testing.assert_array_equal(dropout(x, 0.2, None), x)
  nearly_all = dropout(x, 0.999999, jax.random.key(0))  # keeps 1 in 65536 at least, scaled by 65536
  assert set(np.unique(np.asarray(nearly_all))) <= {0.0, 65536.0}


def test_bfloat16_dropout_rounds_the_scaled_value_once():
  x = jax.random.normal(jax.random.key(9), (64, 1001), jnp.bfloat16)
  y = dropout(x, 0.1, jax.random.key(0))
  assert y.dtype == jnp.bfloat16
  kept = np.asarray(y != 0)
  assert abs(kept.mean() - 0.9) < 0.005
  scale = np.float32(65536 / round(0.9 * 65536))  # 1 / (keep probability), 1.1111
  # x * scale in fp32, rounded to bf16 once; scaling by bf16(scale) = 1.109375 differs in ~27% of the elements.
  expected = (np.asarray(x, np.float32) * scale).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(y)[kept], expected[kept])


def test_dropout_keeps_with_its_16_bit_probability_and_scales_by_exactly_its_inverse():
  # Kept when the 16 random bits are below round((1 - rate) * 2^16), scaled by 2^16 / that: the mean is exact.
  x = jnp.ones((1024, 1024))
  one_third = dropout(x, 1 / 3, jax.random.key(0))  # keeps 43691 / 65536 = 0.666672, scaled by 1.4999886 (not 1.5)
  assert set(np.unique(np.asarray(one_third))) == {0.0, np.float32(65536 / 43691)}
  # The smallest rate keeps 65535 of the 65536 bit patterns: ~16 of these 2^20 elements are dropped, not none.
  smallest = dropout(x, 2**-16, jax.random.key(0))
  assert 0 < int(jnp.sum(smallest == 0)) < 64
  np.testing.assert_array_equal(np.unique(np.asarray(smallest)), [0.0, np.float32(65536 / 65535)])
