"""The optimizer, the compiled steps and the loop."""

import contextlib
import gzip
import json
import math
import os
import signal
import threading
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import make_tiny_config
from nanodecoder import config as config_lib
from nanodecoder import data as data_lib
from nanodecoder import metrics as metrics_lib
from nanodecoder import sharding as sharding_lib
from nanodecoder import train as train_lib
from nanodecoder.checkpoint import Checkpoints
from nanodecoder.model import Decoder


def build(config, devices):
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  dataset = data_lib.load_dataset(config)
  model_config = config_lib.model_config(config, dataset.tokenizer.vocab_size)
  return train_lib.create_trainer(config, model_config, mesh), dataset


def put(trainer, batch):
  return jax.device_put(batch, sharding_lib.batch_sharding(trainer.mesh))


def params(trainer):
  return jax.device_get(nnx.state(trainer.model(), nnx.Param))


def test_schedule_matches_nanogpt(tiny_config):
  t = tiny_config().train
  t.learning_rate, t.min_learning_rate, t.warmup_steps, t.decay_steps = 1e-3, 1e-4, 10, 110
  lr = train_lib.learning_rate_schedule(t)
  np.testing.assert_allclose(float(lr(0)), 1e-3 * 1 / 11, rtol=1e-6)
  np.testing.assert_allclose(float(lr(9)), 1e-3 * 10 / 11, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(110)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(500)), 1e-4, rtol=1e-6)
  # Between the ends and the midpoint (which a linear decay also passes): floor + (peak - floor) * (1 + cos(pi *
  # progress)) / 2, progress = (step - warmup) / (decay - warmup). At 35, 85: progress 1/4, 3/4.
  np.testing.assert_allclose(float(lr(35)), 1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(lr(85)), 1e-4 + 9e-4 * (1 + math.cos(3 * math.pi / 4)) / 2, rtol=1e-6)
  steps = np.arange(0, 200)
  progress = np.clip((steps - 10) / 100, 0, 1)
  closed_form = np.where(steps < 10, 1e-3 * (steps + 1) / 11, 1e-4 + 9e-4 * (1 + np.cos(np.pi * progress)) / 2)
  np.testing.assert_allclose(np.asarray(lr(jnp.asarray(steps))), closed_form, rtol=1e-5)


def test_weight_decay_only_on_matrices(tiny_config):
  config = tiny_config()
  config.train.learning_rate, config.train.warmup_steps = 1.0, 0
  config.train.weight_decay, config.train.grad_clip = 0.5, 0.0
  tx = train_lib.make_optimizer(config.train)
  params = {'matrix': jnp.ones((2, 2)), 'vector': jnp.ones((2,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates['matrix'], -0.5 * params['matrix'] * float(train_lib.learning_rate_schedule(config.train)(0)))
  np.testing.assert_array_equal(updates['vector'], 0.0)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_weight_decay_spares_every_bias_and_norm_of_the_model(tiny_config, scan_layers):
  config = tiny_config(**{'model.use_bias': True, 'model.scan_layers': scan_layers})
  config.train.weight_decay, config.train.grad_clip, config.train.warmup_steps = 0.5, 0.0, 0
  with nnx.use_eager_sharding(False):
    model = Decoder(config_lib.model_config(config, 65), nnx.Rngs(params=0))
  params = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))  # biases start at 0, which decay leaves alone
  tx = train_lib.make_optimizer(config.train, stacked_blocks=scan_layers)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), jax.jit(tx.init)(params), params)
  decayed = {tuple(getattr(k, 'key', None) for k in path): bool(jnp.any(u != 0))
             for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  name = lambda path: next(k for k in reversed(path) if isinstance(k, str))
  assert {name(p) for p, d in decayed.items() if d} == {'qkv', 'out', 'fc', 'proj', 'token_embed', 'position_embed'}
  assert {name(p) for p, d in decayed.items() if not d} == {'qkv_bias', 'out_bias', 'fc_bias', 'proj_bias', 'bias',
                                                            'scale'}


def test_tiny_model_overfits_one_batch(tiny_config):
  config = tiny_config(**{'train.learning_rate': 1e-2, 'train.min_learning_rate': 1e-2, 'train.warmup_steps': 0})
  trainer, dataset = build(config, jax.devices()[:1])
  batch = put(trainer, dataset.train_batch(0, 0, 8))
  losses = []
  for _ in range(150):
    trainer.state, out = trainer.train_step(trainer.state, batch)
    losses.append(float(out['loss']))
  assert losses[0] > 3.0 and losses[-1] < 0.1, (losses[0], losses[-1])


@pytest.mark.parametrize('dropout', [0.0, 0.1])  # with dropout: the same masks whatever the device count
def test_step_on_8_devices_equals_step_on_1(tiny_config, dropout):
  config = tiny_config(**{'model.dropout': dropout})
  one, dataset = build(config, jax.devices()[:1])
  eight, _ = build(config, jax.devices()[:8])
  assert len(eight.mesh.devices.flat) == 8
  for a, b in zip(jax.tree.leaves(params(one)), jax.tree.leaves(params(eight))):
    np.testing.assert_array_equal(a, b)  # same initial parameters
  for step in range(3):
    batch = dataset.train_batch(config.seed, step, 8)
    one.state, out_one = one.train_step(one.state, put(one, batch))
    eight.state, out_eight = eight.train_step(eight.state, put(eight, batch))
    np.testing.assert_allclose(float(out_one['loss']), float(out_eight['loss']), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(params(one)), jax.tree.leaves(params(eight))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert one.step == eight.step == 3


@pytest.mark.parametrize('accum_steps, devices', [(4, 1), (2, 2)])  # 2 devices: the flat all-reduce path
def test_gradient_accumulation_equals_one_big_batch(tiny_config, accum_steps, devices):
  full, dataset = build(tiny_config(), jax.devices()[:1])
  accum, _ = build(tiny_config(**{'train.grad_accum_steps': accum_steps}), jax.devices()[:devices])
  for step in range(2):
    batch = dataset.train_batch(0, step, 8)
    full.state, out_full = full.train_step(full.state, put(full, batch))
    accum.state, out_accum = accum.train_step(accum.state, put(accum, batch))
    np.testing.assert_allclose(float(out_full['loss']), float(out_accum['loss']), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params(full)), jax.tree.leaves(params(accum))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('dropout', [0.0, 0.5])
def test_each_micro_batch_draws_its_own_dropout_masks(tiny_config, dropout):
  """Micro-batch j takes rows j, j + 2, ...: swapping the two micro-batches changes the step's loss exactly when
  dropout draws other masks for each (with one key for both, the mean over them would not see the order)."""
  trainer, dataset = build(tiny_config(**{'train.grad_accum_steps': 2, 'model.dropout': dropout}), jax.devices()[:1])
  batch = dataset.train_batch(0, 0, 8)
  swapped = batch.reshape(4, 2, -1)[:, ::-1].reshape(batch.shape)  # rows 0 <-> 1, 2 <-> 3, ...
  start = jax.tree.map(jnp.copy, trainer.state)
  _, out = trainer.train_step(jax.tree.map(jnp.copy, start), put(trainer, batch))
  _, out_swapped = trainer.train_step(start, put(trainer, swapped))
  if dropout:
    assert abs(float(out['loss']) - float(out_swapped['loss'])) > 1e-5  # (rounding alone: ~1e-7)
  else:
    np.testing.assert_allclose(float(out['loss']), float(out_swapped['loss']), rtol=1e-6)


def all_reduces(trainer, dataset):
  batch = put(trainer, dataset.train_batch(0, 0, 8))
  hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text()
  return [line for line in hlo.splitlines() if ' all-reduce(' in line or ' all-reduce-start(' in line]


def test_data_parallel_gradients_are_all_reduced_as_one_vector(tiny_config):
  trainer, dataset = build(tiny_config(), jax.devices()[:2])
  flat = f'f32[{sum(x.size for x in jax.tree.leaves(params(trainer)))}]'
  (line,) = all_reduces(trainer, dataset)  # the flat gradient and the loss, together
  assert flat in line
  # With dropout (random bits laid out over the global batch) GSPMD places the all-reduces, per array.
  trainer, dataset = build(tiny_config(**{'model.dropout': 0.1}), jax.devices()[:2])
  lines = all_reduces(trainer, dataset)
  assert lines and not any(flat in line for line in lines)


def test_dropout_changes_with_step_but_is_reproducible(tiny_config):
  a, dataset = build(tiny_config(**{'model.dropout': 0.3}), jax.devices()[:1])
  b, _ = build(tiny_config(**{'model.dropout': 0.3}), jax.devices()[:1])
  plain, _ = build(tiny_config(), jax.devices()[:1])
  for x, y in zip(jax.tree.leaves(params(a)), jax.tree.leaves(params(plain))):
    np.testing.assert_array_equal(x, y)  # same parameters: the losses below differ only by their dropout masks
  batch = put(a, dataset.train_batch(0, 0, 8))
  loss = lambda trainer, state: float(trainer.train_step(state, batch)[1]['loss'])  # of the parameters before the step
  at_step_0 = loss(a, a.init_state())
  assert loss(b, b.init_state()) == at_step_0  # reproducible
  assert loss(plain, plain.init_state()) != at_step_0  # dropout is on
  state = a.init_state()
  state[1]['step'][...] = 1  # the same parameters and batch at optimizer step 1
  assert loss(a, state) != at_step_0  # another mask


def test_evaluate_scores_the_same_fixed_batches_of_each_split_every_time(tiny_config, monkeypatch):
  config = tiny_config(**{'eval.batches': 3})
  dataset = data_lib.load_dataset(config)
  scored = []
  monkeypatch.setattr(train_lib, '_mean_loss', lambda trainer, tokens, weights: (scored.append(tokens), (1.0, 1.0))[1])
  trainer = types.SimpleNamespace(config=config)  # all evaluate reads of it besides _mean_loss
  for _ in range(2):
    assert train_lib.evaluate(trainer, dataset) == {'train_loss': 1.0, 'eval_loss': 1.0}
  assert len(scored) == 4  # train, eval; train, eval
  for split, first, again in (('train', scored[0], scored[2]), ('eval', scored[1], scored[3])):
    expected = np.stack([dataset.eval_batch(split, config.seed, i, 8) for i in range(3)])
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(again, expected)


def test_evaluate_all_windows_predicts_every_target_once(tiny_config, monkeypatch):
  config = tiny_config(**{'eval.all_windows': True})
  trainer, dataset = build(config, jax.devices()[:2])
  tokens, context = dataset.eval_tokens, config.model.context_length
  # The reference: the model on consecutive windows (the last one shorter), each target's loss once.
  model, losses = trainer.model(), []
  forward = nnx.jit(lambda model, inputs: model(inputs)[0])  # (eager calls: seconds)
  for start in range(0, len(tokens) - 1, context):
    window = tokens[start:start + context + 1]
    logits = forward(model, jnp.asarray(window[None, :-1]))
    losses.append(optax.softmax_cross_entropy_with_integer_labels(logits[0], jnp.asarray(window[1:])))
  reference = float(jnp.concatenate(losses).mean())
  loss, count = train_lib.window_loss(trainer, tokens)
  assert count == len(tokens) - 1
  np.testing.assert_allclose(loss, reference, rtol=1e-5)
  np.testing.assert_allclose(train_lib.evaluate(trainer, dataset)['eval_loss'], loss, rtol=1e-6)
  monkeypatch.setattr(train_lib, 'EVAL_BATCHES_PER_CALL', 1)  # ~15 compiled calls of one batch: the same sums
  assert train_lib.window_loss(trainer, tokens) == pytest.approx((loss, count), rel=1e-6)


def test_train_and_evaluate_learns_and_writes_the_workdir(tiny_config, tmp_path):
  config = tiny_config(**{'train.num_steps': 60, 'train.decay_steps': 60, 'eval.every': 30,
                          'train.learning_rate': 1e-2, 'train.min_learning_rate': 1e-3})
  metrics = train_lib.train_and_evaluate(config, tmp_path)
  assert metrics['val_loss'] < 2.6 and metrics['train_loss'] < 2.6
  assert (tmp_path / 'config.json').is_file() and (tmp_path / 'tokenizer.json').is_file()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'eval/val_loss' in r] == [30, 60]
  evals = [r for r in records if 'eval/val_loss' in r]
  assert [set(r) - {'step', 'time', 'session_start'} for r in evals] == [
      {'eval/train_loss', 'eval/val_loss', 'eval/val_bits_per_char'}] * 2
  assert [r['eval/val_bits_per_char'] for r in evals] == [r['eval/val_loss'] / math.log(2) for r in evals]  # characters
  schedule = train_lib.learning_rate_schedule(config.train)
  logged_lrs = {r['step']: r['train/lr'] for r in records if 'train/lr' in r}
  assert list(logged_lrs) == [10, 20, 30, 40, 50, 60]
  for step, lr in logged_lrs.items():  # the rate that step's update used: the optimizer's count was step - 1
    assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-6)
    assert lr != pytest.approx(float(schedule(step)), rel=1e-6)


def test_an_eval_split_holding_trained_text_is_named_in_a_warning(tiny_config, tmp_path, capsys):
  settings = {'train.num_steps': 2, 'train.warmup_steps': 1, 'train.decay_steps': 2, 'eval.every': 2}
  train_lib.train_and_evaluate(tiny_config(**settings, **{'data.eval_split': 'validation+train'}), tmp_path)
  assert ("warning: data.eval_split='validation+train' holds text the run trains on ('train', also in "
          'data.train_split): its val loss measures fit, not generalization') in capsys.readouterr().out
  for train, evaluated, shared in (('train', 'validation+test', []), ('train+validation', 'test+validation',
                                                                     ['validation']), ('train', 'train', ['train'])):
    assert data_lib.shared_splits(ml_collections.ConfigDict({'train_split': train, 'eval_split': evaluated})) == shared


def test_while_locked_is_entered_and_left_while_the_run_holds_the_workdir(tiny_config, tmp_path):
  from nanodecoder import sweep as sweep_lib
  seen = []

  @contextlib.contextmanager
  def while_locked():  # which pid holds the workdir when the context is entered and left
    seen.append(('enter', sweep_lib.live_run(workdir)))
    try:
      yield
    except BaseException as e:
      seen.append((type(e).__name__, sweep_lib.live_run(workdir)))
      raise
    seen.append(('exit', sweep_lib.live_run(workdir)))

  workdir = tmp_path / 'finished'
  short = tiny_config(**{'train.num_steps': 2, 'train.warmup_steps': 1, 'train.decay_steps': 2, 'eval.every': 2})
  train_lib.train_and_evaluate(short, workdir, while_locked)
  assert sweep_lib.live_run(workdir) is None
  workdir = tmp_path / 'diverged'
  diverging = tiny_config(**{'train.learning_rate': 1e30, 'train.min_learning_rate': 1e29, 'train.grad_clip': 0.0})
  with pytest.raises(FloatingPointError):
    train_lib.train_and_evaluate(diverging, workdir, while_locked)
  assert sweep_lib.live_run(workdir) is None
  pid = str(os.getpid())
  assert seen == [('enter', pid), ('exit', pid), ('enter', pid), ('FloatingPointError', pid)]


def test_batch_must_divide_over_data_parallel_devices(tiny_config, tmp_path):
  config = tiny_config(**{'train.batch_size': 6})  # 8 devices
  with pytest.raises(config_lib.ConfigError, match=r'train.batch_size=6 .* not divisible by the data-parallel size 8'):
    train_lib.train_and_evaluate(config, tmp_path)


def test_diverging_loss_stops_with_a_clear_error(tiny_config, tmp_path):
  config = tiny_config(**{'train.learning_rate': 1e30, 'train.min_learning_rate': 1e29, 'train.grad_clip': 0.0})
  with pytest.raises(FloatingPointError, match=r'(loss|gradient norm) became (nan|inf) at step \d+'):
    train_lib.train_and_evaluate(config, tmp_path)


def after_each_step(monkeypatch, change):
  """Makes the trainers the run creates pass each step's (state, outputs) through `change(state, out, step)`."""
  create_trainer = train_lib.create_trainer

  def changed_trainer(*args, **kwargs):
    trainer = create_trainer(*args, **kwargs)
    train_step = trainer.train_step

    def step(state, batch):
      state, out = train_step(state, batch)
      return change(state, out, int(state[1]['step'][...]))

    trainer.train_step = step
    return trainer

  monkeypatch.setattr(train_lib, 'create_trainer', changed_trainer)


def test_an_infinite_gradient_stops_before_its_step_is_saved(tiny_config, tmp_path, monkeypatch):
  """A finite loss with an infinite gradient norm (clipping then makes NaN parameters) stops the run at that step."""
  after_each_step(monkeypatch, lambda state, out, step: (
      state, out if step != 3 else {**out, 'grad_norm': jnp.float32(jnp.inf)}))
  config = tiny_config(**{'train.num_steps': 6, 'checkpoint.every': 1, 'eval.every': 6, 'train.log_every': 1})
  with pytest.raises(FloatingPointError,
                     match=r'^gradient norm became inf at step 3; the last good checkpoint \(step 2\) is kept'):
    train_lib.train_and_evaluate(config, tmp_path)
  assert Checkpoints(tmp_path, read_only=True).steps() == [1, 2]


def test_a_divergence_before_the_first_checkpoint_says_there_is_none(tiny_config, tmp_path, monkeypatch):
  after_each_step(monkeypatch, lambda state, out, step: (state, {**out, 'loss': jnp.float32(jnp.nan)}))
  with pytest.raises(FloatingPointError, match=r'^loss became nan at step 1; no checkpoint was written; lower '):
    train_lib.train_and_evaluate(tiny_config(**{'train.log_every': 1}), tmp_path)
  assert Checkpoints(tmp_path, read_only=True).steps() == []


def test_a_divergence_in_a_call_of_several_steps_names_its_first_bad_step():
  with pytest.raises(FloatingPointError, match=r'^loss became nan at step 8; the last good checkpoint \(step 6\) '):
    train_lib._raise_if_diverged(np.array([2.0, np.nan, np.nan]), np.array([1.0, 1.0, np.inf]), 6, 6)  # steps 7-9
  with pytest.raises(FloatingPointError, match=r'^gradient norm became inf at step 7; no checkpoint was written'):
    train_lib._raise_if_diverged(np.array([2.0, 2.0]), np.array([1.0, np.inf]), 5, None)
  train_lib._raise_if_diverged(np.array([2.0, 2.0]), np.array([1.0, 1.0]), 5, None)
  with pytest.raises(FloatingPointError, match=r'^val loss became inf at step 4; the last good checkpoint \(step 2\)'):
    train_lib._check_savable(None, 4, float('inf'), 2)  # (refused before the parameters are looked at)


def test_the_first_signal_names_the_stop_and_a_second_ctrl_c_aborts():
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  def signal_self(signum):
    os.kill(os.getpid(), signum)
    for _ in range(1000):  # its handler runs between bytecodes, here (before the next signal)
      pass

  with train_lib.StopRequest() as stop:
    signal_self(signal.SIGTERM)
    signal_self(signal.SIGINT)  # a first Ctrl-C after SIGTERM: still a SIGTERM stop (exit status 143)
    assert stop.requested() and stop.name() == 'SIGTERM'
    with pytest.raises(KeyboardInterrupt):
      signal_self(signal.SIGINT)
    assert absl_logging.get_verbosity() == absl_logging.FATAL  # Orbax's errors about the aborted save: silenced
  assert absl_logging.get_verbosity() == verbosity  # until the training ends
  with train_lib.StopRequest() as stop:
    signal_self(signal.SIGINT)
    signal_self(signal.SIGTERM)  # (e.g. a scheduler's, between the two Ctrl-Cs): the second Ctrl-C still aborts
    assert stop.requested() and stop.name() == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      signal_self(signal.SIGINT)


def test_a_stop_request_outside_the_main_thread_leaves_the_signal_handlers_alone():
  """(Python sets handlers only from the main thread: training run from another one would fail to start.)"""
  handlers, errors = signal.getsignal(signal.SIGTERM), []

  def train():
    try:
      with train_lib.StopRequest() as stop:
        assert not stop.requested()
    except Exception as e:  # noqa: BLE001 (reported below)
      errors.append(e)

  thread = threading.Thread(target=train)
  thread.start()
  thread.join()
  assert errors == [] and signal.getsignal(signal.SIGTERM) == handlers


def test_a_signal_to_another_process_stops_this_one_too(monkeypatch):
  monkeypatch.setattr(train_lib.sharding_lib, 'gather_from_processes', lambda value: np.array([value, 1]))
  with train_lib.StopRequest() as stop:
    assert stop.requested() and stop.name() == 'a signal to another process'


def test_several_steps_per_call_equal_single_steps(tiny_config, tmp_path):
  settings = {'train.num_steps': 12, 'train.log_every': 1, 'eval.every': 6, 'checkpoint.every': 6}
  single = train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'single')
  settings.update({'train.log_every': 3, 'train.steps_per_call': 3})
  several = train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'several')
  read = lambda d, tag: {r['step']: r[tag] for r in map(json.loads, (d / 'metrics.jsonl').read_text().splitlines())
                         if tag in r}
  for tag in ('train/loss', 'train/grad_norm'):  # (the line of a call logs its last step's)
    logged_single, logged_several = read(tmp_path / 'single', tag), read(tmp_path / 'several', tag)
    assert sorted(logged_several) == [3, 6, 9, 12]
    np.testing.assert_allclose([logged_several[s] for s in (3, 6, 9, 12)], [logged_single[s] for s in (3, 6, 9, 12)],
                               rtol=1e-5)
  np.testing.assert_allclose(several['val_loss'], single['val_loss'], rtol=1e-5)


def test_steps_per_call_must_divide_the_intervals(tiny_config, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r'eval.every=10 is not a multiple of train.steps_per_call=4'):
    train_lib.train_and_evaluate(tiny_config(**{'train.steps_per_call': 4, 'train.log_every': 4}), tmp_path)


def test_profile_traces_the_asked_steps(tiny_config, tmp_path, capsys):
  config = tiny_config(**{'train.num_steps': 12, 'train.decay_steps': 12, 'train.log_every': 3, 'eval.every': 6,
                          'checkpoint.every': 6, 'train.steps_per_call': 3, 'train.profile_start': 4,
                          'train.profile_steps': 2})
  train_lib.train_and_evaluate(config, tmp_path)
  assert 'profiled steps 4..6 into' in capsys.readouterr().out  # whole calls: the one holding steps 5-6
  traces = list((tmp_path / 'plugins' / 'profile').glob('*/*.trace.json.gz'))
  assert len(traces) == 1 and len(list(traces[0].parent.glob('*.xplane.pb'))) == 1
  events = json.loads(gzip.decompress(traces[0].read_bytes()))['traceEvents']
  modules = {e.get('args', {}).get('hlo_module') for e in events}
  assert any(m and 'train_steps' in m for m in modules), modules  # the compiled steps ran inside the trace


def test_a_run_resumed_past_the_profile_window_traces_nothing(tiny_config, tmp_path, capsys):
  settings = {'train.decay_steps': 12, 'train.log_every': 3, 'eval.every': 6, 'checkpoint.every': 6,
              'train.steps_per_call': 3, 'train.profile_start': 0, 'train.profile_steps': 3}
  train_lib.train_and_evaluate(tiny_config(**settings, **{'train.num_steps': 6}), tmp_path)
  assert 'profiled steps 1..3 into' in capsys.readouterr().out
  train_lib.train_and_evaluate(tiny_config(**settings, **{'train.num_steps': 12}), tmp_path)  # resumes at step 6
  assert 'profiled' not in capsys.readouterr().out
  assert len(list((tmp_path / 'plugins' / 'profile').glob('*/*.trace.json.gz'))) == 1


def test_the_profile_traces_the_calls_that_hold_a_step_of_its_window(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train_lib.jax.profiler, 'start_trace', lambda *args, **kwargs: calls.append('start'))
  monkeypatch.setattr(train_lib.jax.profiler, 'stop_trace', lambda: calls.append('stop'))

  def traced(start, steps, first, n):
    """The steps that ran traced, in calls of n steps from step `first` (a resume) to 12."""
    profile, traced = train_lib._Profile(tmp_path, start, steps, log=lambda message: None), []
    for step in range(first, 12, n):
      profile.before(step, n)
      traced += list(range(step + 1, step + n + 1)) if profile.tracing else []
      profile.after(step + n)
    profile.after(None)
    return traced

  assert traced(4, 2, 0, 1) == [5, 6]  # profile_start=4 steps done first
  assert traced(4, 2, 0, 3) == [4, 5, 6]  # whole calls
  assert traced(0, 3, 2, 1) == [3]  # resumed inside the window
  assert traced(0, 3, 3, 1) == []  # resumed at its end
  assert calls == ['start', 'stop'] * 3


@pytest.mark.parametrize('field', ['train.profile_steps', 'train.profile_start'])
def test_profile_fields_must_be_non_negative(tiny_config, tmp_path, field):
  with pytest.raises(config_lib.ConfigError, match=f'{field} must be an integer >= 0, got -1'):
    train_lib.train_and_evaluate(tiny_config(**{field: -1}), tmp_path)


@pytest.mark.parametrize('poison, message', [
    ('val', r'^val loss became nan at step 2; the last good checkpoint \(step 1\) is kept'),
    ('params', r'^parameters became inf or nan at step 2; the last good checkpoint \(step 1\) is kept'),
])
def test_a_diverged_model_that_the_step_loss_missed_is_not_saved(tiny_config, tmp_path, monkeypatch, poison, message):
  """The step's loss and gradient norm come from before its update: the update itself can break the model."""

  def poison_the_parameters_at_step_2(state, out, step):
    if step == 2 and poison == 'params':
      state[0] = jax.tree.map(lambda x: x * jnp.inf, state[0])
    return state, out

  after_each_step(monkeypatch, poison_the_parameters_at_step_2)
  if poison == 'val':
    monkeypatch.setattr(train_lib, 'evaluate', lambda trainer, dataset: {'train_loss': 1.0, 'eval_loss': float('nan')})
  evaluate_at_2 = poison == 'val'  # else the evaluation would be first to see the parameters
  config = tiny_config(**{'train.num_steps': 4, 'checkpoint.every': 1, 'eval.every': 2 if evaluate_at_2 else 4,
                          'train.log_every': 1})
  with pytest.raises(FloatingPointError, match=message):
    train_lib.train_and_evaluate(config, tmp_path)
  assert Checkpoints(tmp_path, read_only=True).steps() == [1]


def test_resuming_on_a_text_file_edited_in_place_is_refused(corpus_file, tmp_path):
  """The same characters and config, other text: the run would silently train on it."""
  text = tmp_path / 'corpus.txt'
  original = corpus_file.read_text(encoding='utf-8')
  text.write_text(original, encoding='utf-8')
  settings = {'train.warmup_steps': 1, 'train.decay_steps': 4, 'train.log_every': 2, 'eval.every': 2,
              'checkpoint.every': 2}
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(make_tiny_config(text, **settings, **{'train.num_steps': 2}), workdir)
  text.write_text(original[::-1], encoding='utf-8')
  with pytest.raises(data_lib.DataError, match=rf"^data.text_path '{text}' holds other text than the checkpoint at "
                                               r'step 2 in .* was trained on \(with the same characters\); put that '
                                               r'text back, or train on this one in another --workdir; or, to train '
                                               rf'this run on it on purpose, copy it to a new file and name that: '
                                               rf'--workdir {workdir} --config.data.text_path=NEW_FILE$'):
    train_lib.train_and_evaluate(make_tiny_config(text, **settings, **{'train.num_steps': 4}), workdir)
  # Named on purpose as other data (another path), the same run trains on it.
  other = tmp_path / 'other.txt'
  other.write_text(original[::-1], encoding='utf-8')
  train_lib.train_and_evaluate(make_tiny_config(other, **settings, **{'train.num_steps': 4}), workdir)
  assert (workdir / 'checkpoints' / '4').is_dir()


def test_a_bpe_run_goes_on_on_other_text_named_on_purpose_with_its_own_merges(corpus_file, tmp_path):
  from nanodecoder import analysis
  from nanodecoder.tokenizer import Tokenizer

  text, original = tmp_path / 'corpus.txt', corpus_file.read_text(encoding='utf-8')
  text.write_text(original, encoding='utf-8')
  settings = {'train.warmup_steps': 1, 'train.decay_steps': 4, 'train.log_every': 2, 'eval.every': 2,
              'checkpoint.every': 2, 'eval.all_windows': True, 'data.vocab_size': 60}
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(make_tiny_config(text, **settings, **{'train.num_steps': 2}), workdir)
  merges = Tokenizer.from_json((workdir / 'tokenizer.json').read_text())
  text.write_text(original[::-1], encoding='utf-8')  # edited in place (it would learn other merges)
  reversed_config = make_tiny_config(text, **settings, **{'train.num_steps': 4})
  assert data_lib.load_corpus(reversed_config.data).tokenizer(60) != merges
  with pytest.raises(data_lib.DataError, match=rf"^data.text_path '{text}' holds other text than the checkpoint at "
                                               r'step 2 in .* was trained on'):  # (encoded with the run's merges)
    train_lib.train_and_evaluate(reversed_config, workdir)
  # Named on purpose as other data (another path), the run goes on with the merges its model knows, in this
  # session and the next ones (whose config.json already names that text).
  other = tmp_path / 'other.txt'
  other.write_text(original[::-1], encoding='utf-8')
  train_lib.train_and_evaluate(make_tiny_config(other, **settings, **{'train.num_steps': 4}), workdir)
  metrics = train_lib.train_and_evaluate(make_tiny_config(other, **settings, **{'train.num_steps': 6}), workdir)
  assert (workdir / 'checkpoints' / '6').is_dir()
  assert Tokenizer.from_json((workdir / 'tokenizer.json').read_text()) == merges
  report = analysis.evaluate_split(workdir)  # its new text, encoded as in training
  held_out = data_lib.load_corpus(make_tiny_config(other).data).text('validation+test')
  assert report['tokens'] == len(merges.encode(held_out)) and report['loss'] == pytest.approx(metrics['val_loss'])
  # Text with a character the run's vocabulary lacks cannot be encoded with its merges: named, with the fix.
  other.write_text(original[::-1] + '~\n', encoding='utf-8')
  with pytest.raises(data_lib.DataError, match=rf"^the text file {other} has characters that the BPE vocabulary the "
                                               rf"run keeps lacks: '~'; train on text of its {len(merges.chars)} "
                                               r'characters or pass another --workdir$'):
    train_lib.train_and_evaluate(make_tiny_config(other, **settings, **{'train.num_steps': 8}), workdir)


def test_the_speed_counts_the_timed_calls_since_its_window_restarted(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(train_lib, 'time', types.SimpleNamespace(perf_counter=lambda: now[0]))
  speed = train_lib._Speed(tokens_per_step=1000)
  now[0] = 5.0
  speed.add(3, timed=False)  # it compiled: no speed yet, and the window starts after it
  assert speed.scalars() == {}
  now[0] = 5.5
  speed.add(3)
  now[0] = 6.5
  speed.add(1)
  assert speed.scalars() == pytest.approx({'train/ms_per_step': 1500 / 4, 'train/tokens_per_s': 4000 / 1.5})


def jumping_clock(monkeypatch):
  """Makes the loop's clock (and the logger's) jump 1000 s each time the returned function is called: where the jump
  lands in the speed (ms/step) shows whether the time of what called it was counted as training steps'."""
  offset = [0.0]
  monkeypatch.setattr(train_lib, 'time', types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))
  monkeypatch.setattr(metrics_lib, 'time', types.SimpleNamespace(time=lambda: time.time() + offset[0]))
  return lambda: offset.__setitem__(0, offset[0] + 1000)


def logged_speeds(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train/ms_per_step'] for r in records if 'train/ms_per_step' in r}


def test_the_speed_leaves_out_the_logged_learning_rates_first_evaluation(tiny_config, tmp_path, monkeypatch):
  # The learning rate is computed on the host for the log line; its first evaluation compiles (~0.3 s on CPU), which
  # is no training step's time.
  jump = jumping_clock(monkeypatch)
  schedule_of = train_lib.learning_rate_schedule

  def slow_to_log(train):
    schedule = schedule_of(train)

    def logged(step):
      if isinstance(step, int):  # the host's call for the log line (the optimizer's is traced)
        jump()
      return schedule(step)
    return logged

  monkeypatch.setattr(train_lib, 'learning_rate_schedule', slow_to_log)
  train_lib.train_and_evaluate(tiny_config(), tmp_path)
  speeds = logged_speeds(tmp_path)
  assert sorted(speeds) == [10, 20] and all(0 < ms < 100_000 for ms in speeds.values()), speeds


def test_the_speed_leaves_out_checkpoints_saved_between_log_lines(tiny_config, tmp_path, monkeypatch):
  # A save's own time (its first compiles the finiteness check and Orbax's copies: ~0.7 s on CPU) is no training
  # step's, as an evaluation's is not.
  jump = jumping_clock(monkeypatch)
  save = train_lib.checkpoint_lib.Checkpoints.save
  monkeypatch.setattr(train_lib.checkpoint_lib.Checkpoints, 'save', lambda *args, **kw: (jump(), save(*args, **kw)))
  train_lib.train_and_evaluate(tiny_config(**{'checkpoint.every': 5}), tmp_path)  # saves at 5 and 15 too
  speeds = logged_speeds(tmp_path)
  assert sorted(speeds) == [10, 20] and all(0 < ms < 100_000 for ms in speeds.values()), speeds


def test_the_speed_leaves_out_profiled_steps(tiny_config, tmp_path, monkeypatch):
  # Tracing slows the steps it covers (several-fold on CPU), and stopping the trace writes it to disk.
  jump = jumping_clock(monkeypatch)
  monkeypatch.setattr(train_lib.jax.profiler, 'start_trace', lambda *args, **kwargs: jump())
  monkeypatch.setattr(train_lib.jax.profiler, 'stop_trace', jump)
  train_lib.train_and_evaluate(tiny_config(**{'train.profile_start': 12, 'train.profile_steps': 3}), tmp_path)
  speeds = logged_speeds(tmp_path)  # the window of step 20: steps 11-12 and 16-20 timed, 13-15 profiled
  assert sorted(speeds) == [10, 20] and all(0 < ms < 100_000 for ms in speeds.values()), speeds


def test_the_eta_is_the_training_speed_plus_the_evaluations_to_come(tiny_config, tmp_path, monkeypatch):
  # Each evaluation takes 1000 s: the ETA after one is the steps left at the training speed (milliseconds here) plus
  # 1000 s per evaluation to come, the first (which compiles) left out; not the wall time per step so far.
  jump = jumping_clock(monkeypatch)
  evaluate = train_lib.evaluate
  monkeypatch.setattr(train_lib, 'evaluate', lambda *args: (jump(), evaluate(*args))[1])
  etas = {}

  class Logger(train_lib.MetricsLogger):
    def write(self, step, metrics):
      super().write(step, metrics)
      etas[step, 'eval/val_loss' in metrics] = self.progress.eta

  monkeypatch.setattr(train_lib, 'MetricsLogger', Logger)
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 40, 'checkpoint.every': 40}), tmp_path)
  training = lambda steps: pytest.approx(0, abs=steps * 1.0)  # (under 1 s a step however slow the machine)
  assert etas[10, False] == training(30) and etas[10, True] == training(30)  # the first evaluation: not counted
  assert etas[20, False] == training(20)
  for step in (20, 30):
    assert etas[step, True] - 1000 * (40 - step) // 10 == training(40 - step)
  assert etas[30, False] - 2000 == training(10)  # (the evaluation of step 30 is still to come)


def test_a_run_of_no_multiple_of_its_intervals_logs_evaluates_and_saves_its_last_step(tiny_config, tmp_path,
                                                                                      monkeypatch):
  """7 steps, logging every 3, evaluating every 2, saving every 3: each also at step 7, where a signal that came
  during the step stops nothing (the run is done). Each pause goes to the ETA with its own interval."""
  jump = jumping_clock(monkeypatch)
  evaluate = train_lib.evaluate
  monkeypatch.setattr(train_lib, 'evaluate', lambda *args: (jump(), evaluate(*args))[1])
  polls = iter(range(100))
  monkeypatch.setattr(train_lib.StopRequest, 'requested', lambda self: next(polls) >= 6)  # signalled during step 7
  pauses, took = [], train_lib.MetricsLogger.took
  monkeypatch.setattr(train_lib.MetricsLogger, 'took', lambda self, what, step, seconds, every: (
      pauses.append((what, step, every)), took(self, what, step, seconds, every)))
  config = tiny_config(**{'train.num_steps': 7, 'train.decay_steps': 7, 'train.log_every': 3, 'eval.every': 2,
                          'checkpoint.every': 3})
  metrics = train_lib.train_and_evaluate(config, tmp_path)
  assert 'stopped_by' not in metrics and metrics['val_loss'] > 0
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'train/loss' in r] == [3, 6, 7]
  assert [r['step'] for r in records if 'eval/val_loss' in r] == [2, 4, 6, 7]
  assert pauses == [('evaluation', 2, 2), ('checkpoint', 3, 3), ('evaluation', 4, 2), ('evaluation', 6, 2),
                    ('checkpoint', 6, 3), ('evaluation', 7, 2), ('checkpoint', 7, 3)]
  assert Checkpoints(tmp_path, read_only=True).steps()[-1] == 7
  # Each evaluation (1000 s here) restarted the speed's window: step 3's line has step 3's speed, not step 2's pause.
  speeds = logged_speeds(tmp_path)
  assert sorted(speeds) == [3, 6, 7] and all(0 < ms < 100_000 for ms in speeds.values()), speeds


def test_a_batch_that_the_mesh_of_several_cpu_processes_cannot_split_names_their_device_count(tiny_config,
                                                                                              monkeypatch):
  """Each process chose its own CPU device count (one per core): the fix is to set it for all of them."""
  config = tiny_config(**{'train.batch_size': 6, 'mesh.cpu_devices': 0})
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:4])
  monkeypatch.setattr(train_lib.jax, 'process_count', lambda: 2)
  with pytest.raises(config_lib.ConfigError, match=r'^train.batch_size=6 \(micro-batch 6\) is not divisible by the '
                     r'data-parallel size 4 \(mesh data x fsdp\); pick a multiple of 4 \(or set mesh.cpu_devices, '
                     r'the host devices of each process: now 2, one per core\)$'):
    train_lib.check_mesh_fits(config, mesh)
  monkeypatch.setattr(train_lib.jax, 'process_count', lambda: 1)  # one process: the batch is the thing to change
  with pytest.raises(config_lib.ConfigError, match=r'pick a multiple of 4$'):
    train_lib.check_mesh_fits(config, mesh)


def test_a_batch_that_a_gpu_mesh_cannot_split_asks_for_another_batch(tiny_config, monkeypatch):
  """mesh.cpu_devices splits CPUs alone: set or not, it is no fix on GPUs, with one process or several."""
  config = tiny_config(**{'train.batch_size': 6, 'mesh.cpu_devices': 4})
  gpus = np.array([types.SimpleNamespace(platform='gpu', compute_capability='9.0')] * 4)
  mesh = types.SimpleNamespace(devices=gpus, shape={'data': 4, 'fsdp': 1, 'tensor': 1})
  for processes in (1, 2):
    monkeypatch.setattr(train_lib.jax, 'process_count', lambda: processes)
    with pytest.raises(config_lib.ConfigError, match=r'^train.batch_size=6 \(micro-batch 6\) is not divisible by '
                                                     r'the data-parallel size 4 \(mesh data x fsdp\); pick a multiple '
                                                     r'of 4$'):
      train_lib.check_mesh_fits(config, mesh)
  config.mesh.cpu_devices = 0
  with pytest.raises(config_lib.ConfigError, match=r'pick a multiple of 4$'):  # (2 processes)
    train_lib.check_mesh_fits(config, mesh)


def test_float16_gradients_are_computed_on_a_scaled_loss(tiny_config):
  """Unscaled, the float16 backward pass of a mean over many tokens underflows (several % off float32)."""
  tokens = jax.random.randint(jax.random.key(1), (64, 129), 0, 65)

  def gradients(dtype, scale):
    cfg = config_lib.model_config(tiny_config(**{'model.num_layers': 2, 'model.num_heads': 4, 'model.head_size': 16,
                                                 'model.context_length': 128, 'model.dtype': dtype}), 65)
    with nnx.use_eager_sharding(False):
      graph, weights, rest = nnx.split(Decoder(cfg, nnx.Rngs(params=0)), nnx.Param, ...)

    def mean_loss(weights):
      total, count = train_lib.cross_entropy(nnx.merge(graph, weights, rest)(tokens[:, :-1])[0], tokens[:, 1:])
      return total / count

    return jax.jit(train_lib.scaled_value_and_grad(mean_loss, scale))(weights)[1], train_lib.loss_scale(cfg)

  exact, _ = gradients('float32', 1.0)
  errors = {}
  for scale in (1.0, train_lib.FLOAT16_LOSS_SCALE):
    grads, used = gradients('float16', scale)
    relative = jax.tree.map(lambda g, e: float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e)), grads, exact)
    errors[scale] = max(jax.tree.leaves(relative))
  assert used == train_lib.FLOAT16_LOSS_SCALE  # what training uses for float16
  assert errors[train_lib.FLOAT16_LOSS_SCALE] < 0.003 and errors[1.0] > 0.02, errors


def test_a_float16_step_scales_its_loss_and_its_gradient_back(tiny_config):
  norms = {}
  for dtype in ('float32', 'float16'):
    trainer, dataset = build(tiny_config(**{'model.dtype': dtype, 'model.num_layers': 2, 'model.num_heads': 4,
                                            'model.head_size': 16, 'model.context_length': 128,
                                            'train.batch_size': 64}), jax.devices()[:1])
    batch = put(trainer, dataset.train_batch(0, 0, trainer.config.train.batch_size))
    norms[dtype] = float(trainer.train_step(trainer.state, batch)[1]['grad_norm'])
  # 2e-6 apart here; 4e-5 when the step does not scale the loss, 1e3 times when it does not scale the gradient back
  assert norms['float16'] == pytest.approx(norms['float32'], rel=1e-5), norms


def test_optimizer_is_adamw_after_global_norm_clipping_written_out(tiny_config):
  t = tiny_config().train
  t.learning_rate, t.min_learning_rate, t.warmup_steps, t.decay_steps = 1e-2, 1e-3, 1, 10
  t.beta1, t.beta2, t.weight_decay, t.grad_clip = 0.8, 0.95, 0.1, 1.0
  tx, lr = train_lib.make_optimizer(t), train_lib.learning_rate_schedule(t)
  rng = np.random.default_rng(0)
  params = {'matrix': rng.normal(size=(3, 2)), 'vector': rng.normal(size=(2,))}
  # Gradients of global norm 10 (clipped to 1), then 0.5 (left alone): their weighting in the moments shows the clip.
  grads = []
  for norm in (10.0, 0.5):
    g = {name: rng.normal(size=p.shape) for name, p in params.items()}
    total = math.sqrt(sum(np.sum(x**2) for x in g.values()))
    grads.append({name: x * norm / total for name, x in g.items()})
  state = tx.init(jax.tree.map(jnp.float32, params))
  ours = {name: jnp.float32(p) for name, p in params.items()}
  m = {name: 0.0 for name in params}
  v = {name: 0.0 for name in params}
  for step, g in enumerate(grads, start=1):
    updates, state = tx.update(jax.tree.map(jnp.float32, g), state, ours)
    ours = optax.apply_updates(ours, updates)
    # AdamW by hand (float64): clip, moments, bias correction, decay of the matrix alone, the schedule at step - 1.
    scale = min(1.0, 1.0 / math.sqrt(sum(np.sum(x**2) for x in g.values())))
    for name, p in params.items():
      gc = g[name] * scale
      m[name] = 0.8 * m[name] + 0.2 * gc
      v[name] = 0.95 * v[name] + 0.05 * gc**2
      adam = (m[name] / (1 - 0.8**step)) / (np.sqrt(v[name] / (1 - 0.95**step)) + 1e-8)
      decay = 0.1 * p if name == 'matrix' else 0.0
      params[name] = p - float(lr(step - 1)) * (adam + decay)
    for name in params:
      np.testing.assert_allclose(ours[name], params[name], rtol=1e-5, atol=1e-7)


def test_evaluation_runs_the_model_without_dropout(tiny_config):
  trainer, dataset = build(tiny_config(**{'model.dropout': 0.5}), jax.devices()[:1])
  tokens = np.stack([dataset.eval_batch('eval', 0, i, 8) for i in range(2)])  # [2 batches, 8, 17]
  loss, count = train_lib._mean_loss(trainer, tokens, np.ones((2, 8, 16), np.float32))
  rows = tokens.reshape(16, 17)
  logits, _ = trainer.model()(jnp.asarray(rows[:, :-1]))  # no dropout key: dropout off
  reference = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(rows[:, 1:])).mean()
  assert count == 2 * 8 * 16
  np.testing.assert_allclose(loss, float(reference), rtol=1e-5)


def test_the_speed_leaves_out_the_log_lines_between_evaluations(tiny_config, tmp_path, monkeypatch):
  # A log line's own time (metrics.jsonl, TensorBoard, the console) is no training step's either: the window restarts
  # after it as after an evaluation or a save.
  jump = jumping_clock(monkeypatch)
  write = train_lib.MetricsLogger.write
  monkeypatch.setattr(train_lib.MetricsLogger, 'write',
                      lambda self, step, metrics: (write(self, step, metrics), 'train/loss' in metrics and jump()))
  train_lib.train_and_evaluate(tiny_config(**{'train.log_every': 5}), tmp_path)  # logs at 5 and 15 between evaluations
  speeds = logged_speeds(tmp_path)
  assert sorted(speeds) == [5, 10, 15, 20] and all(0 < ms < 100_000 for ms in speeds.values()), speeds
