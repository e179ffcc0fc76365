"""The decoder: shapes, causality, initial loss, attention and KV-cache equivalences."""

import contextlib
import dataclasses
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanodecoder.model import (Decoder, ModelConfig, abstract_decoder, attend, attend_heads_first, auto_attention_impl,
                               count_params, train_flops_per_token)

CFG = ModelConfig(vocab_size=65, num_layers=2, num_heads=4, head_size=8, context_length=32)


def make_model(cfg=CFG, seed=0):
  with nnx.use_eager_sharding(False):
    return Decoder(cfg, nnx.Rngs(params=seed))


def test_logits_shape_and_dtype():
  model = make_model()
  tokens = jnp.zeros((3, 20), jnp.int32)
  logits, caches = model(tokens)
  assert logits.shape == (3, 20, 65) and logits.dtype == jnp.float32
  assert caches is None


def test_parameter_count_matches_the_formula():
  d, v, t, L = CFG.embed_dim, CFG.vocab_size, CFG.context_length, CFG.num_layers
  per_block = 2 * d + 3 * d * d + d * d + 2 * 4 * d * d  # 2 LayerNorm scales, qkv, out, mlp
  assert count_params(make_model()) == v * d + t * d + L * per_block + d


def test_projections_into_the_residual_stream_start_smaller_by_the_square_root_of_twice_the_depth():
  cfg = ModelConfig(vocab_size=65, num_layers=2, num_heads=4, head_size=16, context_length=32)  # D 64
  model = make_model(cfg)
  std = lambda param: float(jnp.std(param[...]))
  for block in model.blocks:
    assert std(block.attn.out) == pytest.approx(0.02 / 2, rel=0.1)  # 0.02 / sqrt(2 * 2), as GPT-2
    assert std(block.mlp.proj) == pytest.approx(0.02 / 2, rel=0.1)
    assert std(block.attn.qkv) == pytest.approx(0.02, rel=0.1) and std(block.mlp.fc) == pytest.approx(0.02, rel=0.1)
  assert std(model.token_embed) == pytest.approx(0.02, rel=0.1)
  assert std(model.position_embed) == pytest.approx(0.02, rel=0.1)


def test_train_flops_per_token_is_six_per_matmul_weight_plus_attention():
  # GPT-2 small (L 12, D 768, T 1024, V 50257), by hand: per block qkv 3 D^2 + out D^2 + fc and proj 2 * 4 D^2 =
  # 12 D^2 = 7,077,888 matmul weights, x 12 = 84,934,656; the LM head D * V = 38,597,376; in all 123,532,032,
  # x 6 = 741,192,192. Attention: 12 * L * T * D = 113,246,208.
  gpt2 = ModelConfig(vocab_size=50257, num_layers=12, num_heads=12, head_size=64, context_length=1024)
  assert train_flops_per_token(gpt2) == 741_192_192 + 113_246_208
  # Another shape (mlp_ratio 3, untied head, biases): the matmul weights are the parameters less the embedding
  # tables, the LayerNorms and the biases.
  cfg = ModelConfig(vocab_size=11, num_layers=3, num_heads=2, head_size=5, context_length=7, mlp_ratio=3,
                    use_bias=True, tie_embeddings=False)
  d, f, L = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers
  others = 11 * d + 7 * d + (2 * L + 1) * 2 * d + L * (3 * d + d + f + d)  # tables, LayerNorms, biases
  matmul_weights = count_params(abstract_decoder(cfg)) - others
  assert matmul_weights == L * (3 * d * d + d * d + 2 * d * f) + 11 * d
  assert train_flops_per_token(cfg) == 6 * matmul_weights + 12 * L * 7 * d


@pytest.mark.parametrize('t', [1, 7, 31])  # 31: the last position
def test_causality_changing_token_t_never_changes_earlier_logits(t):
  model = make_model()
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 65)
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 65)
  a, _ = model(tokens)
  b, _ = model(changed)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert not np.allclose(a[:, t:], b[:, t:])  # and it does change position t onwards


def test_initial_loss_is_close_to_uniform():
  model = make_model()
  tokens = jax.random.randint(jax.random.key(2), (8, 33), 0, 65)
  logits, _ = model(tokens[:, :-1])
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean()
  assert abs(float(loss) - math.log(65)) < 0.05


def naive_attention(q, k, v):
  """softmax(q k^T / sqrt(H) + triangular mask) v, head by head, in numpy; [B, N, T, H]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, n, t, h = q.shape
  out = np.zeros_like(q)
  mask = np.tril(np.ones((t, t), bool))
  for bi in range(b):
    for ni in range(n):
      scores = q[bi, ni] @ k[bi, ni].T / math.sqrt(h)
      scores = np.where(mask, scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[bi, ni] = probs @ v[bi, ni]
  return out


@pytest.mark.parametrize('impl', ['einsum', 'xla'])  # 'auto' runs one of these, as chosen below
def test_attention_equals_the_textbook_formula(impl):
  q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 3, 5, 4))  # [B, N, T, H] each
  swap = lambda x: x.transpose(0, 2, 1, 3)  # attend takes [B, T, N, H]
  np.testing.assert_allclose(attend(swap(q), swap(k), swap(v), impl=impl), swap(naive_attention(q, k, v)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype, head_size, backend, impl', [
    (jnp.bfloat16, 64, 'gpu', 'cudnn'),
    (jnp.float16, 128, 'gpu', 'cudnn'),
    (jnp.bfloat16, 12, 'gpu', 'einsum'),  # cuDNN needs a multiple of 8
    (jnp.bfloat16, 256, 'gpu', 'einsum'),  # cuDNN takes 256 on Hopper and newer only
    (jnp.float32, 64, 'gpu', 'einsum'),  # cuDNN needs bf16/fp16
    (jnp.bfloat16, 64, 'cpu', 'einsum'),
])
def test_auto_attention_picks_cudnn_only_where_it_applies(dtype, head_size, backend, impl):
  assert auto_attention_impl(jnp.dtype(dtype), head_size, backend) == impl


@pytest.mark.parametrize('use_bias', [False, True])
def test_fused_attention_models_project_separately_with_the_same_result(use_bias):
  """'xla' attention gets q, k, v from three matmuls (`project(separately=True)`), 'einsum' cuts them out
  of one: the same parameters give the same loss and gradients."""
  cfg = ModelConfig(**{**CFG.__dict__, 'use_bias': use_bias})
  tokens = jax.random.randint(jax.random.key(10), (2, 17), 0, 65)

  def loss_and_grads(impl):
    model = make_model(ModelConfig(**{**cfg.__dict__, 'attention_impl': impl}))
    if use_bias:  # biases start at zero: give them values that matter
      for layer in model.blocks:
        layer.attn.qkv_bias[...] = jax.random.normal(jax.random.key(11), layer.attn.qkv_bias.shape)

    def loss(model):
      logits, _ = model(tokens[:, :-1])
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean()

    return nnx.jit(nnx.value_and_grad(loss))(model)  # compiled: eager, op by op, took seconds

  (packed_loss, packed_grads), (separate_loss, separate_grads) = loss_and_grads('einsum'), loss_and_grads('xla')
  np.testing.assert_allclose(separate_loss, packed_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), separate_grads, packed_grads)
  block = make_model(cfg).blocks[0]
  normed = block.ln_attn(jax.random.normal(jax.random.key(12), (1, 3, cfg.embed_dim)))
  packed, separate = block.attn.project(normed), block.attn.project(normed, separately=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), separate, packed)


def test_a_cudnn_model_decodes_with_a_cache_on_any_backend():
  """KV-cache decoding never runs the fused kernel: a model trained with 'cudnn' samples on CPU too."""
  settings = {**CFG.__dict__, 'num_layers': 1, 'dtype': 'bfloat16'}
  model = make_model(ModelConfig(**{**settings, 'attention_impl': 'cudnn'}))
  reference = make_model(ModelConfig(**{**settings, 'attention_impl': 'einsum'}))  # the same weights
  tokens = jnp.array([[3, 1, 4, 1]])
  logits, _ = model(tokens, caches=model.init_caches(1), cache_index=0)
  np.testing.assert_array_equal(logits, reference(tokens, caches=reference.init_caches(1), cache_index=0)[0])


def test_attention_over_a_cache_sees_only_positions_up_to_its_own():
  q, k, v = jax.random.normal(jax.random.key(4), (3, 1, 2, 8, 4))
  # Queries at positions 5..6 over a cache of 8 slots (slot 7 not yet written, here random)
  # equal rows 5..6 of full attention over the first 7 positions.
  full = naive_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7])
  cached = attend_heads_first(q[:, :, 5:7], k, v, query_offset=5)
  np.testing.assert_allclose(cached, full[:, :, 5:7], rtol=1e-5, atol=1e-6)
  # The same with batch and heads merged into one axis, the KV cache's layout.
  merged = attend_heads_first(q[:, :, 5:7].reshape(2, 2, 4), k.reshape(2, 8, 4), v.reshape(2, 8, 4), query_offset=5)
  np.testing.assert_allclose(merged, full[:, :, 5:7].reshape(2, 2, 4), rtol=1e-5, atol=1e-6)


def test_model_gradient_has_no_scatter():
  # Skewed ids, as in text: id 0 takes ~half the tokens (where GPU scatter-adds serialize). Token and
  # position embeddings are both looked up with `ops.embed_lookup`, whose gradient is a one-hot matmul.
  ids = jnp.asarray(np.random.default_rng(0).choice(11, size=(3, 40), p=[0.5] + [0.05] * 10))
  model = make_model()
  loss = lambda model: jnp.mean(model(jnp.asarray(ids[:, :CFG.context_length]))[0])
  assert 'scatter' not in jax.jit(nnx.grad(loss)).lower(model).as_text()


def test_gradient_sums_no_activation_over_the_batch_axis_alone():
  # XLA's GPU layout assignment gives a reduction's operand a layout in which the reduced axes are
  # minor. A sum over the batch axis alone (the gradient of position embeddings added to every row)
  # thus made the whole residual stream batch-minor, with a transpose before every matmul (9.4 of the
  # 55 ms of a GPT-2-small step on an H100). The position table's gradient is a one-hot matmul instead.
  model = make_model()
  tokens = jax.random.randint(jax.random.key(0), (3, CFG.context_length), 0, CFG.vocab_size)
  loss = lambda model: jnp.mean(jnp.square(model(tokens)[0]))
  hlo = jax.jit(nnx.grad(loss)).lower(model).as_text()
  batch_sums = re.findall(rf'across dimensions = \[0\] : \(tensor<3x{CFG.context_length}x', hlo)
  assert f'across dimensions = [2] : (tensor<3x{CFG.context_length}x' in hlo  # the pattern matches (LayerNorm)
  assert not batch_sums


def test_layer_norm_scale_gradients_sum_no_activations_over_tokens():
  # Each LayerNorm's scale is applied to the next matmul's weight, so its gradient comes from that weight's
  # gradient ([D, ...]); applied to the activations, it is a sum of [B, T, D] products over every token,
  # which XLA runs as extra passes over fp32 copies of the residual stream (~9 of a GPT-2-small step's 44 GB
  # of non-matmul traffic, bench/gpu_hlo.py). Without biases, no gradient sums activations over tokens.
  model = make_model()
  tokens = jax.random.randint(jax.random.key(0), (3, CFG.context_length), 0, CFG.vocab_size)
  loss = lambda model: jnp.mean(jnp.square(model(tokens)[0]))
  hlo = jax.jit(nnx.grad(loss)).lower(model).as_text()
  assert f'across dimensions = [2] : (tensor<3x{CFG.context_length}x' in hlo  # the pattern matches (LayerNorm)
  assert not re.findall(rf'across dimensions = \[0, 1\] : \(tensor<3x{CFG.context_length}x', hlo)


def saved_residuals(fn, *args) -> list[tuple[tuple[int, ...], str]]:
  """(shape, origin) of each array the backward pass of `fn` keeps from its forward pass, less `args` themselves
  (as `jax.ad_checkpoint.print_saved_residuals` lists them)."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  kept = []
  for line in printed.getvalue().splitlines():
    array, origin = line.split(' ', 1)  # e.g. "f32[1,8,24] named 'projection' from ..."
    if not origin.startswith('from the argument'):
      kept.append((tuple(int(n) for n in array[array.index('[') + 1:-1].split(',') if n), origin))
  return kept


REMAT_CFG = ModelConfig(vocab_size=11, num_layers=3, num_heads=2, head_size=4, context_length=8, mlp_ratio=3)
B, T, D, N, H, F = 1, 8, 8, 2, 4, 24  # REMAT_CFG's shapes: every residual of a block has a shape of its own


def block_residuals(remat):
  """What one block of a REMAT_CFG model with `remat` keeps for its backward pass."""
  model = make_model(dataclasses.replace(REMAT_CFG, remat=remat))
  graphdef, state = nnx.split(model.blocks[0])
  run = lambda state, x: model._block(nnx.merge(graphdef, state), x, None, None, None)[0].sum()
  return saved_residuals(run, state, jax.random.normal(jax.random.key(0), (B, T, D)))


def test_each_remat_policy_keeps_what_it_names():
  # 'block': nothing but its input (and parameters), the arguments.
  assert block_residuals('block') == []
  # 'matmuls': the matmul outputs the backward pass needs (qkv, attention out, fc; the second MLP matmul's output
  # only feeds the residual sum), as named; nothing else.
  kept = block_residuals('matmuls')
  assert sorted(shape for shape, _ in kept) == sorted([(B, T, 3, N, H), (B, T, D), (B, T, F)])
  assert all(origin.startswith("named 'projection'") for _, origin in kept), kept
  # 'none': everything, the attention weights [B, N, T, T] among it.
  kept = block_residuals('none')
  assert (B, N, T, T) in [shape for shape, _ in kept] and len(kept) > 10


@pytest.mark.parametrize('remat', ['block', 'matmuls', 'none'])
def test_remat_policies_apply_inside_the_scan_over_layers(remat):
  """With scan_layers the per-layer residuals leave the scan stacked [L, ...] (print_saved_residuals names them
  'output of scan', not by their checkpoint names): per layer the block's input and what its policy keeps."""
  cfg = dataclasses.replace(REMAT_CFG, remat=remat, scan_layers=True)
  graphdef, state = nnx.split(make_model(cfg))
  tokens = jnp.zeros((B, T), jnp.int32)
  kept = saved_residuals(lambda state: nnx.merge(graphdef, state)(tokens)[0].sum(), state)
  stacked = sorted(shape for shape, origin in kept if origin.startswith('output of scan'))
  L = cfg.num_layers
  if remat == 'none':
    assert (L, B, N, T, T) in stacked  # the attention weights
  else:
    assert stacked == sorted([(L, B, T, D)] + [(L, *shape) for shape, _ in block_residuals(remat)])


def test_dropout_is_active_only_with_a_key():
  cfg = ModelConfig(**{**CFG.__dict__, 'dropout': 0.5})
  model = make_model(cfg)
  tokens = jnp.ones((2, 16), jnp.int32)
  clean_a, _ = model(tokens)
  clean_b, _ = model(tokens)
  np.testing.assert_array_equal(clean_a, clean_b)
  noisy_a, _ = model(tokens, dropout_key=jax.random.key(0))
  noisy_b, _ = model(tokens, dropout_key=jax.random.key(0))
  noisy_c, _ = model(tokens, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(noisy_a, noisy_b)
  assert not np.allclose(noisy_a, clean_a) and not np.allclose(noisy_a, noisy_c)


def test_dropout_drops_the_embeddings_the_attention_weights_and_both_branch_outputs():
  """nanoGPT's dropout sites, each active with a key. At rate 0.5 a dropped-out value is 0 or exactly doubled."""
  cfg = ModelConfig(vocab_size=11, num_layers=1, num_heads=1, head_size=8, context_length=4, dropout=0.5)
  model = make_model(cfg)
  block, key = model.blocks[0], jax.random.key(0)
  normed = block.ln_attn(jax.random.normal(jax.random.key(1), (64, 1, cfg.embed_dim)))  # 64 sequences of 1 token
  # Feed-forward: its output, element by element.
  ratio = np.asarray(block.mlp(normed, dropout_key=key) / block.mlp(normed))
  assert set(np.unique(ratio)) == {0.0, 2.0}
  # Attention of one head over one token: its one weight (1) is dropped or doubled, then each output element is:
  # 0 or 4 times the output without dropout (2 would mean one of the two sites is off).
  ratio = np.asarray(block.attn(normed, dropout_key=key)[0] / block.attn(normed)[0])
  assert set(np.unique(ratio)) == {0.0, 4.0}
  # The embeddings: with both output projections zero the block adds nothing, and the logits still change.
  block.attn.out[...] = jnp.zeros_like(block.attn.out[...])
  block.mlp.proj[...] = jnp.zeros_like(block.mlp.proj[...])
  tokens = jax.random.randint(jax.random.key(2), (4, 4), 0, 11)
  clean, noisy = model(tokens)[0], model(tokens, dropout_key=key)[0]
  assert not np.allclose(noisy, clean)


def test_untied_head_and_biases():
  cfg = ModelConfig(**{**CFG.__dict__, 'tie_embeddings': False, 'use_bias': True})
  model = make_model(cfg)
  block = model.blocks[0]
  assert all(ln.bias is not None for ln in (block.ln_attn, block.ln_mlp, model.ln_final))
  d, f, v = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  biases = 2 * d + 3 * d + d + f + d  # per block: 2 LayerNorms, qkv, out, fc, proj
  assert count_params(model) == count_params(make_model()) + v * d + cfg.num_layers * biases + d

  tokens = jax.random.randint(jax.random.key(8), (2, 12), 0, 65)
  logits, _ = model(tokens)
  # The logits are the final LayerNorm's output times lm_head: a bias c there adds lm_head @ c at every position.
  c = jax.random.normal(jax.random.key(9), (d,))
  model.ln_final.bias[...] = c
  shifted, _ = model(tokens)
  np.testing.assert_allclose(shifted - logits, np.broadcast_to(model.lm_head[...] @ c, logits.shape), atol=1e-5)
  model.lm_head[...] = jnp.zeros((v, d))  # and the head is lm_head alone (not the token embeddings)
  zeros, _ = model(tokens)
  np.testing.assert_array_equal(zeros, 0)


def test_positions_past_the_context_are_refused():
  model = make_model(ModelConfig(**{**CFG.__dict__, 'num_layers': 1}))  # context_length 32
  with pytest.raises(ValueError, match=r'33 tokens do not fit model.context_length=32'):
    model(jnp.zeros((1, 33), jnp.int32))
  caches = model.init_caches(1)
  with pytest.raises(ValueError, match=r'positions 30..32 run past model.context_length=32'):
    model(jnp.zeros((1, 3), jnp.int32), caches=caches, cache_index=30)
  assert model.embed(jnp.zeros((1, 2), jnp.int32), 30).shape == (1, 2, 32)  # the last two positions fit


def test_bfloat16_compute_keeps_fp32_logits():
  cfg = ModelConfig(**{**CFG.__dict__, 'dtype': 'bfloat16'})
  model = make_model(cfg)
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 65)
  logits, _ = model(tokens)
  reference, _ = make_model()(tokens)
  assert logits.dtype == jnp.float32
  # bf16 activations move these logits (std 0.12) by up to ~0.003 from fp32 over seeds: 1e-2 leaves room for
  # rounding and still catches real errors. Not equal: the compute really is bf16.
  np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-2)
  assert not np.array_equal(logits, reference)


def numpy_decoder(params: dict, tokens: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """The design notes' decoder written out in float64 numpy, independently of the model's code: [B, T] -> [B, T, V].

  Pre-norm blocks (LayerNorm eps 1e-5 -> causal attention scaled 1/sqrt(H) -> residual; LayerNorm -> exact-GELU
  MLP -> residual), final LayerNorm, head tied to the token embeddings unless `lm_head` is given.
  """
  from math import erf
  p = {name: np.asarray(value, np.float64) for name, value in params.items()}
  bias = lambda name: p.get(name, 0.0)
  erf = np.vectorize(erf)

  def layer_norm(x, prefix):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + 1e-5) * p[prefix + '.scale'] + bias(prefix + '.bias')

  t, h = tokens.shape[1], cfg.head_size
  x = p['token_embed'][tokens] + p['position_embed'][:t]
  for i in range(cfg.num_layers):
    block = f'blocks.{i}.'
    a = layer_norm(x, block + 'ln_attn')
    qkv = np.einsum('btd,dknh->btknh', a, p[block + 'attn.qkv']) + bias(block + 'attn.qkv_bias')
    q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))  # [B, N, T, H]
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(h)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = (weights @ v).transpose(0, 2, 1, 3)  # [B, T, N, H]
    x = x + np.einsum('btnh,nhd->btd', heads, p[block + 'attn.out']) + bias(block + 'attn.out_bias')
    m = layer_norm(x, block + 'ln_mlp') @ p[block + 'mlp.fc'] + bias(block + 'mlp.fc_bias')
    m = 0.5 * m * (1 + erf(m / np.sqrt(2)))
    x = x + m @ p[block + 'mlp.proj'] + bias(block + 'mlp.proj_bias')
  x = layer_norm(x, 'ln_final')
  return x @ p.get('lm_head', p['token_embed']).T


@pytest.mark.parametrize('use_bias, tie_embeddings, scan_layers, remat, param_dtype', [
    (False, True, False, 'none', 'float32'), (True, False, False, 'none', 'float32'),
    (True, True, True, 'matmuls', 'float32'),
    # bf16 storage, fp32 compute: the LayerNorm scale folded into a weight must not round it to bf16 again
    (True, False, False, 'none', 'bfloat16')])
def test_logits_equal_the_design_notes_written_out_in_numpy(use_bias, tie_embeddings, scan_layers, remat,
                                                            param_dtype):
  cfg = ModelConfig(vocab_size=11, num_layers=2, num_heads=3, head_size=4, context_length=9, mlp_ratio=3,
                    use_bias=use_bias, tie_embeddings=tie_embeddings, scan_layers=scan_layers, remat=remat,
                    param_dtype=param_dtype)
  model = make_model(cfg)
  # Every parameter random, LayerNorm scales and biases included, so that each one's place in the formula shows.
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [(0.3 * jax.random.normal(k, x.shape)).astype(x.dtype)
                                                 for k, x in zip(keys, leaves)]))
  params = {}
  for block_index, block in enumerate(model.layers()):
    for path, value in nnx.to_flat_state(nnx.state(block, nnx.Param)):
      params['.'.join(['blocks', str(block_index), *map(str, path)])] = value[...]
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[0] != 'blocks':
      params['.'.join(map(str, path))] = value[...]
  assert ('lm_head' in params) != tie_embeddings and ('blocks.1.mlp.fc_bias' in params) == use_bias

  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 9), 0, 11))
  logits, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(logits, numpy_decoder(params, tokens, cfg), rtol=1e-5, atol=1e-5)
