"""Checkpoints: exact resume, retention, restore onto other meshes, refusals, signals."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from nanodecoder import checkpoint as checkpoint_lib
from nanodecoder import config as config_lib
from nanodecoder import sharding as sharding_lib
from nanodecoder import train as train_lib
from nanodecoder.checkpoint import CheckpointError, Checkpoints
from nanodecoder.model import Decoder
from nanodecoder.tokenizer import Tokenizer


def train_losses(workdir):
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train/loss'] for r in lines if 'train/loss' in r}


def final_params(workdir):
  model, _, _, step = checkpoint_lib.load_model(workdir)
  return step, jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path, capsys):
  settings = {'train.num_steps': 20, 'train.log_every': 1, 'checkpoint.every': 5, 'eval.every': 10,
              'model.dropout': 0.1}
  train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'whole')
  train_lib.train_and_evaluate(tiny_config(**{**settings, 'train.num_steps': 12}), tmp_path / 'split')
  assert Checkpoints(tmp_path / 'split', read_only=True).steps()[-1] == 12
  capsys.readouterr()
  metrics = train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'split')
  assert 'resumed from the checkpoint at step 12' in capsys.readouterr().out
  records = [json.loads(line) for line in (tmp_path / 'split' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'train/loss' in r] == list(range(1, 21))  # steps 13-20 only, once
  whole, split = train_losses(tmp_path / 'whole'), train_losses(tmp_path / 'split')
  assert whole == split  # bit-identical losses, every step
  assert_trees_equal(final_params(tmp_path / 'whole'), final_params(tmp_path / 'split'))
  assert metrics['val_loss'] > 0


def test_a_run_resumed_after_a_crash_drops_what_the_crashed_session_logged_past_the_checkpoint(tiny_config,
                                                                                                 tmp_path):
  settings = {'train.num_steps': 20, 'train.log_every': 1, 'checkpoint.every': 10, 'eval.every': 10}
  train_lib.train_and_evaluate(tiny_config(**settings), tmp_path)
  shutil.rmtree(tmp_path / 'checkpoints' / '20')  # as if it crashed after logging step 20, before saving it
  train_lib.train_and_evaluate(tiny_config(**{**settings, 'train.log_every': 4}), tmp_path)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  # Up to the checkpoint's step 10, then the second session's: not the first session's 11 (the first step trained
  # again) nor its 15.
  assert [r['step'] for r in records if 'train/loss' in r] == [*range(1, 11), 12, 16, 20]
  assert [r['step'] for r in records if 'eval/val_loss' in r] == [10, 20]
  assert len({r['session_start'] for r in records if r['step'] > 10}) == 1


def small_state():
  """An nnx.State of two small modules, standing in for (model, optimizer) where only saving matters."""
  return nnx.state((nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 2, rngs=nnx.Rngs(1))))


def test_keeps_the_latest_and_the_best(tiny_config, tmp_path):
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path, keep=2)
  for step, val_loss in zip([1, 2, 3, 4], [3.0, 1.0, 2.0, 4.0]):  # the best (2) is neither first nor latest
    checkpoints.save(step, state, config, tokenizer, val_loss)
  checkpoints.wait()
  checkpoints.close()
  checkpoints = Checkpoints(tmp_path, read_only=True)
  assert checkpoints.steps() == [2, 3, 4]
  assert checkpoints.best_step() == 2 and checkpoints.select('best') == 2
  meta = checkpoints.meta(4)
  assert meta['step'] == 4 and meta['val_loss'] == 4.0 and meta['config']['model']['num_layers'] == 2
  assert checkpoints.select('latest') == 4 and checkpoints.select('3') == 3
  with pytest.raises(CheckpointError, match=r'no checkpoint at step 7 .*saved steps: 2, 3, 4'):
    checkpoints.select('7')
  with pytest.raises(CheckpointError, match=r"^--checkpoint 'bset' is not 'latest', 'best' or a step number; pass "
                                            r'one of them \(saved steps: 2, 3, 4\)$'):
    checkpoints.select('bset')


@pytest.mark.parametrize('damage', [b'', b'{}', b'{"val_loss": 1.0'])
def test_a_damaged_metrics_file_is_rewritten_from_the_checkpoint(tiny_config, tmp_path, capsys, damage):
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path, keep=1)
  for step, val_loss in zip([1, 2, 3], [1.0, 3.0, 2.0]):
    checkpoints.save(step, state, config, tokenizer, val_loss)
  checkpoints.close()
  metrics = tmp_path / 'checkpoints' / '1' / 'metrics' / 'metrics'
  assert json.loads(metrics.read_text()) == {'val_loss': 1.0}  # Orbax's record of the best: what is repaired
  metrics.write_bytes(damage)  # Orbax, opening the folder, read it and stopped (JSONDecodeError / KeyError)
  assert Checkpoints(tmp_path, read_only=True).select('best') == 1  # reading does not need it
  capsys.readouterr()
  checkpoints = Checkpoints(tmp_path, keep=1)
  assert capsys.readouterr().err == (f'the metrics file of the checkpoint at step 1 in {tmp_path / "checkpoints"} '
                                     'was unreadable; rewrote it from the checkpoint\n')
  assert json.loads(metrics.read_text()) == {'val_loss': 1.0}
  checkpoints.save(4, state, config, tokenizer, 5.0)  # and the best is still kept
  checkpoints.close()
  assert Checkpoints(tmp_path, read_only=True).steps() == [1, 4]


def test_a_metrics_file_is_not_removed_when_the_machine_keeps_its_checkpoint_from_being_read(tiny_config, tmp_path,
                                                                                             monkeypatch, capsys):
  """A read failing for the machine's reasons (permissions, I/O) says nothing about the files: removing the best
  step's score would let the next save delete it."""
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path, keep=1)
  checkpoints.save(1, state, config, tokenizer, 1.0)
  checkpoints.close()
  metrics = tmp_path / 'checkpoints' / '1' / 'metrics' / 'metrics'
  metrics.write_bytes(b'{"val_loss": 1.0')  # damaged ...

  def unreadable(self, step):  # ... and its checkpoint's record cannot be read now
    raise PermissionError(errno.EACCES, 'Permission denied')

  monkeypatch.setattr(Checkpoints, 'meta', unreadable)
  capsys.readouterr()
  with pytest.raises(json.JSONDecodeError):  # Orbax, opening the folder, meets the damaged file
    Checkpoints(tmp_path, keep=1)
  assert metrics.read_bytes() == b'{"val_loss": 1.0' and capsys.readouterr().err == ''


def test_a_damaged_metrics_file_whose_checkpoint_record_is_damaged_too_is_removed(tiny_config, tmp_path, capsys):
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path, keep=1)
  for step, val_loss in zip([1, 2], [1.0, 2.0]):
    checkpoints.save(step, state, config, tokenizer, val_loss)
  checkpoints.close()
  metrics = tmp_path / 'checkpoints' / '1' / 'metrics' / 'metrics'
  metrics.write_bytes(b'{"val_loss": 1.0')
  for file in (tmp_path / 'checkpoints' / '1' / 'meta').iterdir():
    file.write_bytes(b'')
  capsys.readouterr()
  Checkpoints(tmp_path, keep=1).close()  # opens: the step's score is gone, not left to stop Orbax
  assert capsys.readouterr().err == (f'the metrics file of the checkpoint at step 1 in {tmp_path / "checkpoints"} '
                                     'was unreadable; removed it\n')
  assert not metrics.exists()


def test_a_checkpoint_trained_on_other_characters_is_refused_before_its_arrays_are_read(tiny_config, tmp_path):
  config, state = tiny_config(), small_state()
  checkpoints = Checkpoints(tmp_path)
  checkpoints.save(1, state, config, Tokenizer('ab'), 1.0)
  checkpoints.wait()
  with pytest.raises(config_lib.ConfigError, match=r'^the checkpoint at step 1 in .* was trained on other characters '
                                                   r"than this data has \(2 characters, this data 2; differing: 'bc'\)"):
    checkpoints.restore_latest_good(state, config, tokenizer=Tokenizer('ac'))
  assert checkpoints.restore_latest_good(state, config, tokenizer=Tokenizer('ab'))[0] == 1 and checkpoints.steps() == [1]
  with pytest.raises(config_lib.ConfigError, match=r"^the checkpoint at step 1 in .* was trained with other BPE "
                                                   r"merges than this data's train split gives \(they were learned"):
    checkpoints.restore_latest_good(state, config, tokenizer=Tokenizer('ab', [(0, 1)]))
  checkpoints.close()


def test_best_leaves_out_a_step_whose_record_is_unreadable(tiny_config, tmp_path, capsys):
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path, keep=3)
  for step, val_loss in zip([1, 2, 3], [1.0, 2.0, 3.0]):
    checkpoints.save(step, state, config, tokenizer, val_loss)
  checkpoints.close()
  for file in (tmp_path / 'checkpoints' / '1' / 'meta').iterdir():
    file.write_bytes(b'')
  assert Checkpoints(tmp_path, read_only=True).select('best') == 2
  assert capsys.readouterr().err.startswith('left out of --checkpoint best: the checkpoint at step 1 (')


def test_best_of_a_run_that_kept_no_best_says_so(tiny_config, tmp_path, capsys):
  config, tokenizer, state = tiny_config(**{'checkpoint.keep_best': False}), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path, keep=2, keep_best=False)
  for step, val_loss in zip([1, 2, 3], [1.0, 3.0, 2.0]):  # the best, step 1, is gone
    checkpoints.save(step, state, config, tokenizer, val_loss)
  checkpoints.wait()
  checkpoints.close()
  opened, step, _ = checkpoint_lib.load_meta(tmp_path, 'best')
  opened.close()
  assert step == 3 and capsys.readouterr().err == (
      'note: this run did not keep its best checkpoint (checkpoint.keep_best=False): step 3 is the best of those '
      'kept\n')
  checkpoint_lib.load_meta(tmp_path, 'latest')[0].close()
  assert capsys.readouterr().err == ''


def test_a_folder_of_runs_names_one_of_them_instead_of_saying_train_first(tmp_path):
  """E.g. `--mode eval --workdir` a sweep's folder: its points hold the checkpoints."""
  with pytest.raises(CheckpointError, match=r'; train first or pass the workdir of a run$'):
    checkpoint_lib.load_meta(tmp_path)
  for point in ('num_layers=4', 'num_layers=2', 'plots'):
    (tmp_path / point / ('checkpoints' if point != 'plots' else 'other')).mkdir(parents=True)
  with pytest.raises(CheckpointError, match=rf'^no checkpoints in {tmp_path}, a folder of 2 runs; pass one of them, '
                                            rf'e.g. --workdir {tmp_path / "num_layers=2"}$'):
    checkpoint_lib.load_meta(tmp_path)


def test_processes_that_see_different_checkpoints_stop(tiny_config, tmp_path, monkeypatch):
  """Each process lists the folder itself (e.g. NFS caching, or a workdir on a local disk): restoring different
  steps would leave the replicas in different states, or one process waiting for the others."""
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path)
  checkpoints.save(5, state, config, tokenizer, 1.0)
  checkpoints.wait()
  checkpoints.save(7, state, config, tokenizer, 1.0)
  checkpoints.wait()
  gathered = []

  def process_1_lists_only_step_7(value):  # the same latest step, a list that differs below it
    gathered.append(value)
    other = zlib.crc32(b'7') & 0x7FFFFFFF if len(gathered) == 1 else 7
    return np.array([value, other])

  for module in (checkpoint_lib, sharding_lib):  # (sharding.first_process_differing gathers too)
    monkeypatch.setattr(module, 'gather_from_processes', process_1_lists_only_step_7)
  with pytest.raises(CheckpointError, match=r'^the processes see different checkpoints in .* \(latest step by '
                                            r'process: 7, 7\); the workdir must be one folder'):
    checkpoints.restore_latest_good(None, config)
  assert gathered == [zlib.crc32(b'5,7') & 0x7FFFFFFF, 7]
  checkpoints.close()


def test_the_best_survives_a_resume(tiny_config, tmp_path, caplog):
  """A resumed run's manager scores the earlier session's steps too (Orbax keeps their metrics on disk)."""
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  for session in ([(1, 3.0), (2, 1.0), (3, 2.0)], [(4, 4.0), (5, None), (6, 5.0)]):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step, val_loss in session:
      checkpoints.save(step, state, config, tokenizer, val_loss)
    checkpoints.wait()
    checkpoints.close()
  checkpoints = Checkpoints(tmp_path, read_only=True)
  assert checkpoints.steps() == [2, 5, 6] and checkpoints.best_step() == 2
  assert 'did not provide metrics' not in caplog.text  # a step saved without an evaluation is not a warning


def test_a_failed_asynchronous_save_is_reported_with_its_own_step(tiny_config, tmp_path, monkeypatch):
  """Orbax reports a failed background save when the next save waits for it: the error names the failed step."""
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path)
  checkpoints.save(5, state, config, tokenizer)

  def disk_full():
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(checkpoints.manager, 'wait_until_finished', disk_full)
  with pytest.raises(CheckpointError, match=r'cannot write the checkpoint of step 5 in .*No space left on device'):
    checkpoints.save(10, state, config, tokenizer)

  def long_disk_full():  # tensorstore's message names the file first, the cause last
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params/0.0" in OCDBT database at local file "{"x" * 300}": '
                     "Failed to write 653636 bytes to file 7: No space left on device [os_error_code='28']")

  monkeypatch.setattr(checkpoints.manager, 'wait_until_finished', long_disk_full)
  with pytest.raises(CheckpointError, match=r'\(ValueError: RESOURCE_EXHAUSTED: Error writing .{1,200} \.\.\. '
                                            r'.{1,120}No space left on device'):
    checkpoints.save(10, state, config, tokenizer)
  monkeypatch.undo()
  checkpoints.close()


def test_a_stop_right_after_an_evaluation_keeps_its_val_loss(tiny_config, tmp_path, monkeypatch):
  """Stopped at step 3 (evaluated, not a checkpoint step): the checkpoint it saves carries step 3's val loss."""
  polls = iter(range(100))
  monkeypatch.setattr(train_lib.StopRequest, 'requested', lambda self: next(polls) == 2)  # after step 3
  config = tiny_config(**{'train.num_steps': 12, 'eval.every': 3, 'checkpoint.every': 6})
  metrics = train_lib.train_and_evaluate(config, tmp_path)
  assert 'stopped_by' in metrics
  checkpoints = Checkpoints(tmp_path, read_only=True)
  assert checkpoints.steps() == [3] and checkpoints.meta(3)['val_loss'] == metrics['val_loss']


def test_the_checkpoint_a_stop_saves_is_left_out_of_the_eta(tiny_config, tmp_path, monkeypatch):
  """The ETA times the checkpoints on schedule: the one a stop saves off it (step 3) is not one of those to come."""
  polls = iter(range(100))
  monkeypatch.setattr(train_lib.StopRequest, 'requested', lambda self: next(polls) == 2)  # after step 3
  took = []
  monkeypatch.setattr(train_lib.MetricsLogger, 'took', lambda self, what, step, *_: took.append((what, step)))
  config = tiny_config(**{'train.num_steps': 12, 'eval.every': 6, 'checkpoint.every': 2})
  assert 'stopped_by' in train_lib.train_and_evaluate(config, tmp_path)
  assert Checkpoints(tmp_path, read_only=True).steps() == [2, 3]
  assert took == [('checkpoint', 2)]


def test_a_run_already_at_its_last_step_returns_the_val_loss_of_its_checkpoint(tiny_config, tmp_path):
  config = tiny_config(**{'train.num_steps': 2, 'eval.every': 2, 'checkpoint.every': 2})
  metrics = train_lib.train_and_evaluate(config, tmp_path)
  again = train_lib.train_and_evaluate(config, tmp_path)  # nothing to do
  assert again == {'val_loss': metrics['val_loss']}
  assert metrics['val_loss'] == Checkpoints(tmp_path, read_only=True).meta(2)['val_loss']


def test_a_run_with_nothing_to_do_drops_what_a_crashed_session_logged_past_its_checkpoint(tiny_config, tmp_path):
  config = tiny_config(**{'train.num_steps': 2, 'train.warmup_steps': 1, 'train.decay_steps': 2, 'eval.every': 2,
                          'checkpoint.every': 2, 'train.log_every': 1})
  train_lib.train_and_evaluate(config, tmp_path)
  path = tmp_path / 'metrics.jsonl'
  logged = path.read_text()
  # A session with train.num_steps=4 crashed after logging step 3 (its checkpoint at 4 never written).
  path.write_text(logged + json.dumps({'step': 3, 'train/loss': 1.0}) + '\n')
  train_lib.train_and_evaluate(config, tmp_path)  # train.num_steps=2 again: nothing to do
  assert path.read_text() == logged


def test_a_resumed_run_that_diverges_before_its_first_save_names_the_checkpoint_it_resumed_from(tiny_config, tmp_path,
                                                                                                  monkeypatch):
  settings = {'train.num_steps': 2, 'eval.every': 2, 'checkpoint.every': 2}
  train_lib.train_and_evaluate(tiny_config(**settings), tmp_path)
  monkeypatch.setattr(train_lib, 'evaluate', lambda trainer, dataset: {'train_loss': 1.0, 'eval_loss': float('nan')})
  with pytest.raises(FloatingPointError, match=r'^val loss became nan at step 4; the last good checkpoint \(step 2\) '
                                               r'is kept'):
    train_lib.train_and_evaluate(tiny_config(**{**settings, 'train.num_steps': 4}), tmp_path)
  assert Checkpoints(tmp_path, read_only=True).steps() == [2]


def test_resuming_with_another_steps_per_call_realigns_and_continues_the_run(tiny_config, tmp_path):
  """Stopped at step 3 with single steps, resumed with 2 steps per call: step 4 runs alone, then pairs."""
  settings = {'train.num_steps': 6, 'train.decay_steps': 6, 'train.log_every': 2, 'eval.every': 6,
              'checkpoint.every': 6, 'train.steps_per_call': 2}
  train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'whole')
  train_lib.train_and_evaluate(tiny_config(**{**settings, 'train.num_steps': 3, 'train.steps_per_call': 1}),
                               tmp_path / 'split')
  train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'split')
  whole, split = train_losses(tmp_path / 'whole'), train_losses(tmp_path / 'split')
  assert sorted(split) == [2, 3, 4, 6]
  # Not bit-identical: a scanned pair of steps and two single steps round differently (~1e-9).
  np.testing.assert_allclose([split[s] for s in (2, 4, 6)], [whole[s] for s in (2, 4, 6)], rtol=1e-6)
  (step_w, params_w), (step_s, params_s) = final_params(tmp_path / 'whole'), final_params(tmp_path / 'split')
  assert step_w == step_s == 6
  for a, b in zip(jax.tree.leaves(params_w), jax.tree.leaves(params_s)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The first pair (steps 5-6) compiles: its time is not a speed, so step 6 reports none (the whole run does).
  speeds = lambda d: {r['step'] for r in map(json.loads, (d / 'metrics.jsonl').read_text().splitlines())
                      if 'train/ms_per_step' in r}
  assert 6 in speeds(tmp_path / 'whole') and 6 not in speeds(tmp_path / 'split')


def test_restores_onto_a_different_device_count(tiny_config, tmp_path):
  config = tiny_config(**{'train.num_steps': 4, 'checkpoint.every': 4})
  train_lib.train_and_evaluate(config, tmp_path)  # 8 devices, data parallel
  checkpoints = Checkpoints(tmp_path, read_only=True)
  for devices, mesh_cfg in ((1, {}), (2, {'tensor': 2, 'data': 1}), (4, {'fsdp': 2, 'data': 2})):
    config_n = tiny_config(**{f'mesh.{k}': v for k, v in mesh_cfg.items()})
    mesh = sharding_lib.make_mesh(config_n.mesh, jax.devices()[:devices])
    trainer = train_lib.create_trainer(config_n, config_lib.model_config(config_n, 48), mesh, init=False)
    step, state, _ = checkpoints.restore_latest_good(trainer.abstract_state, config_n)
    assert step == 4 and int(state[1]['step'][...]) == 4
    restored, targets = jax.tree.leaves(state), jax.tree.leaves(trainer.abstract_state)
    assert len(restored) == len(targets)
    for array, target in zip(restored, targets):  # each array laid out as the new mesh's rules say
      assert array.sharding.is_equivalent_to(target.sharding, array.ndim), (array.sharding, target.sharding)
      assert array.addressable_shards[0].data.shape == target.sharding.shard_shape(target.shape)
    fc = state[0]['blocks'][0]['mlp']['fc'][...]
    assert fc.sharding.mesh.size == devices and fc.sharding.is_fully_replicated == (devices == 1)
    assert_trees_equal(jax.device_get(nnx.to_pure_dict(state[0])), final_params(tmp_path)[1])


@pytest.mark.parametrize('impl, dtype', [('cudnn', 'bfloat16'), ('xla', 'float16')])
def test_a_model_trained_with_gpu_only_attention_loads_and_runs_here(tiny_config, tmp_path, impl, dtype):
  """Only NVIDIA GPUs run cuDNN attention, and XLA's CPU backend has no float16 'xla' attention: here the loaded
  model attends with 'auto' (uncached sampling too)."""
  config = tiny_config(**{'model.attention_impl': impl, 'model.dtype': dtype})
  with nnx.use_eager_sharding(False):
    model = Decoder(config_lib.model_config(config, 2), nnx.Rngs(params=0))
  checkpoints = Checkpoints(tmp_path)
  checkpoints.save(1, nnx.state((model, nnx.Linear(2, 2, rngs=nnx.Rngs(0)))), config, Tokenizer('ab'))
  checkpoints.wait()
  checkpoints.close()
  loaded, _, saved_config, _ = checkpoint_lib.load_model(tmp_path)
  assert saved_config.model.attention_impl == impl and loaded.cfg.attention_impl == 'auto'
  config.model.attention_impl = 'einsum'
  with nnx.use_eager_sharding(False):  # the same initial weights, attending with the formula
    reference = Decoder(config_lib.model_config(config, 2), nnx.Rngs(params=0))
  tokens = np.array([[0, 1, 1, 0, 1]], np.int32)
  np.testing.assert_array_equal(loaded(tokens)[0], reference(tokens)[0])


def test_refuses_a_checkpoint_of_another_shape(tiny_config, tmp_path):
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 2, 'checkpoint.every': 2}), tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r'different model shape: model.num_layers=2 \(config says 3\)'):
    train_lib.train_and_evaluate(tiny_config(**{'model.num_layers': 3}), tmp_path)


# Orbax's failed read of the corrupt step leaves a callback for an asyncio loop it has closed; harmless.
@pytest.mark.filterwarnings('ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning')
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path, capsys):
  config = tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5, 'eval.every': 5, 'checkpoint.keep': 3})
  train_lib.train_and_evaluate(config, tmp_path)

  def damage(step):
    for file in (tmp_path / 'checkpoints' / str(step) / 'params').rglob('*'):
      if file.is_file() and file.stat().st_size > 0 and 'd' in file.parent.name:
        file.write_bytes(b'garbage')

  damage(10)
  # Sampling or evaluating (read-only) refuses it in one line and moves nothing.
  with pytest.raises(CheckpointError, match=r'^cannot read the checkpoint at step 10 in .*; pass --checkpoint with '
                                            r'another step \(5\), or rerun training'):
    checkpoint_lib.load_model(tmp_path, 'latest')
  assert checkpoint_lib.load_model(tmp_path, 5)[3] == 5
  assert Checkpoints(tmp_path, read_only=True).steps() == [5, 10]
  capsys.readouterr()
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 12, 'checkpoint.every': 5, 'eval.every': 5,
                                              'checkpoint.keep': 3}), tmp_path)
  out = capsys.readouterr().out
  assert 'checkpoint at step 10 is unreadable' in out and 'moved it to 10.corrupt, falling back to the one at step 5' in out
  assert 'resumed from the checkpoint at step 5' in out
  assert (tmp_path / 'checkpoints' / '10.corrupt').is_dir()
  assert Checkpoints(tmp_path, read_only=True).steps() == [5, 10, 12]
  damage(12)  # the same disk fails the step saved again (and the next)
  damage(10)
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 14, 'checkpoint.every': 5, 'eval.every': 5,
                                              'checkpoint.keep': 3}), tmp_path)
  out = capsys.readouterr().out
  assert 'moved it to 12.corrupt' in out and 'moved it to 10-2.corrupt, falling back to the one at step 5' in out
  assert sorted(p.name for p in (tmp_path / 'checkpoints').glob('*.corrupt')) == ['10-2.corrupt', '10.corrupt',
                                                                                 '12.corrupt']


def test_an_unreadable_latest_step_falls_back_to_the_newest_earlier_one_with_its_own_state(tiny_config, tmp_path):
  config, tokenizer = tiny_config(), Tokenizer('ab')
  states = {step: nnx.state((nnx.Linear(2, 2, rngs=nnx.Rngs(step)), nnx.Linear(2, 2, rngs=nnx.Rngs(10 + step))))
            for step in (1, 2, 3)}
  checkpoints = Checkpoints(tmp_path, keep=3)
  for step, state in states.items():
    checkpoints.save(step, state, config, tokenizer, float(step))
  checkpoints.wait()
  (tmp_path / 'checkpoints' / '3' / 'params' / '_METADATA').unlink()
  messages = []
  step, state, meta = checkpoints.restore_latest_good(small_state(), config, log=messages.append)
  assert step == meta['step'] == 2 and checkpoints.steps() == [1, 2]
  assert_trees_equal(jax.device_get(nnx.to_pure_dict(state)), jax.device_get(nnx.to_pure_dict(states[2])))
  assert len(messages) == 1 and messages[0].startswith('checkpoint at step 3 is unreadable (')
  assert messages[0].endswith('; moved it to 3.corrupt, falling back to the one at step 2')
  checkpoints.close()


def test_a_step_saved_without_a_val_loss_goes_once_it_is_not_among_the_latest(tiny_config, tmp_path):
  config, tokenizer, state = tiny_config(), Tokenizer('ab'), small_state()
  checkpoints = Checkpoints(tmp_path, keep=1)
  for step, val_loss in zip([1, 2, 3], [1.0, None, 2.0]):
    checkpoints.save(step, state, config, tokenizer, val_loss)
  checkpoints.wait()
  checkpoints.close()
  assert Checkpoints(tmp_path, read_only=True).steps() == [1, 3]  # the latest and the best, not step 2


def test_a_save_cut_short_leaves_nothing_after_the_next_start(tiny_config, tmp_path):
  # A second Ctrl-C (or a kill) during an asynchronous save leaves the step's temporary folder behind.
  config = tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5, 'eval.every': 5})
  train_lib.train_and_evaluate(config, tmp_path)
  leftover = tmp_path / 'checkpoints' / '15.orbax-checkpoint-tmp-1795830420'
  shutil.copytree(tmp_path / 'checkpoints' / '10', leftover)
  assert Checkpoints(tmp_path, read_only=True).steps() == [5, 10] and leftover.is_dir()  # readers touch nothing
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 12, 'checkpoint.every': 5, 'eval.every': 5}),
                               tmp_path)
  assert not leftover.exists()
  assert Checkpoints(tmp_path, read_only=True).steps()[-1] == 12


def test_a_checkpoint_without_its_array_metadata_is_set_aside_not_called_another_model(tiny_config, tmp_path, capsys):
  settings = {'checkpoint.every': 5, 'eval.every': 5, 'checkpoint.keep': 3}
  train_lib.train_and_evaluate(tiny_config(**settings, **{'train.num_steps': 10}), tmp_path)
  (tmp_path / 'checkpoints' / '10' / 'params' / '_METADATA').unlink()
  capsys.readouterr()
  train_lib.train_and_evaluate(tiny_config(**settings, **{'train.num_steps': 12}), tmp_path)
  out = capsys.readouterr().out
  assert 'checkpoint at step 10 is unreadable' in out and 'resumed from the checkpoint at step 5' in out
  assert (tmp_path / 'checkpoints' / '10.corrupt').is_dir()


@pytest.mark.slow
def test_a_checkpoint_missing_its_manifest_is_handled_without_tracebacks(corpus_file, tmp_path):
  """The other reads of a failed restore finish after Orbax closed their event loop: nothing of that is printed."""
  from test_launch import TINY, launch
  train = ['--config', 'experiments/cpu.py', '--config.data.source=text', f'--config.data.text_path={corpus_file}',
           *TINY, '--config.checkpoint.every=6', '--workdir', str(tmp_path)]
  assert launch(*train).returncode == 0
  (tmp_path / 'checkpoints' / '12' / 'params' / 'manifest.ocdbt').unlink()
  sample = launch('--mode', 'sample', '--workdir', str(tmp_path), '--max_new_tokens', '5')
  assert sample.returncode == 2 and 'error: cannot read the checkpoint at step 12' in sample.stderr, sample.stderr
  resumed = launch(*train, '--config.train.num_steps=18')
  assert resumed.returncode == 0 and 'resumed from the checkpoint at step 6' in resumed.stdout, resumed.stderr
  for result in (sample, resumed):
    assert 'Traceback' not in result.stderr and 'Event loop is closed' not in result.stderr, result.stderr[-3000:]


def test_read_only_loading_refuses_in_one_line(tiny_config, tmp_path, monkeypatch, capsys):
  """Restoring can fail for reasons that are not the files; 'best' reads every step's metadata."""
  config = tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5, 'eval.every': 5, 'checkpoint.keep': 3})
  train_lib.train_and_evaluate(config, tmp_path)

  def out_of_memory(*args, **kwargs):
    raise MemoryError('no room')

  monkeypatch.setattr(Checkpoints, 'restore', out_of_memory)
  with pytest.raises(CheckpointError, match=r'^cannot read the checkpoint at step 10 in .* \(MemoryError: no room\); '
                                            r'fix the cause \(memory, permissions, file system\) and rerun$'):
    checkpoint_lib.load_model(tmp_path, 10)
  monkeypatch.undo()
  for file in (tmp_path / 'checkpoints' / '5' / 'meta').rglob('*'):
    if file.is_file():
      file.write_text('{not json')
  with pytest.raises(CheckpointError, match=r'^cannot read the checkpoint at step 5 .*; pass --checkpoint with '
                                            r'another step \(10\)'):
    checkpoint_lib.load_model(tmp_path, 5)
  capsys.readouterr()
  assert checkpoint_lib.load_model(tmp_path, 'best')[3] == 10  # the best of those that read
  assert capsys.readouterr().err.startswith('left out of --checkpoint best: the checkpoint at step 5 (')
  assert checkpoint_lib.load_model(tmp_path, 'latest')[3] == 10


def test_a_record_that_lacks_its_tokenizer_is_an_unreadable_step_not_a_traceback(tiny_config, tmp_path):
  config = tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5, 'eval.every': 5, 'checkpoint.keep': 3})
  train_lib.train_and_evaluate(config, tmp_path)
  record = tmp_path / 'checkpoints' / '10' / 'meta' / 'metadata'
  record.write_text(record.read_text().replace('"tokenizer"', '"tokenizes"'))  # one flipped byte, still JSON
  with pytest.raises(CheckpointError, match=r"^cannot read the checkpoint at step 10 in .* \(KeyError: 'tokenizer'\); "
                                            r'pass --checkpoint with another step \(5\)'):
    checkpoint_lib.load_model(tmp_path, 'latest')


def test_reading_while_the_run_trains_on_takes_the_step_that_replaced_the_one_being_read(tiny_config, tmp_path,
                                                                                        monkeypatch):
  """A run training in the workdir saves a newer step and deletes an older one while a sampler reads it."""
  config = tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5, 'eval.every': 5, 'checkpoint.keep': 3})
  train_lib.train_and_evaluate(config, tmp_path)
  directory = tmp_path / 'checkpoints'
  restore = Checkpoints.restore

  def run_saves_and_deletes(new_step, deleted_step):
    def restore_while_the_run_trains(self, *args, **kwargs):
      if (directory / str(deleted_step)).is_dir():
        shutil.copytree(directory / str(deleted_step), directory / str(new_step))
        shutil.rmtree(directory / str(deleted_step))
      return restore(self, *args, **kwargs)
    monkeypatch.setattr(Checkpoints, 'restore', restore_while_the_run_trains)

  run_saves_and_deletes(15, 10)
  assert checkpoint_lib.load_model(tmp_path, 'latest')[3] == 15
  run_saves_and_deletes(20, 5)  # a step asked for by number is not replaced
  with pytest.raises(CheckpointError, match=r'^the checkpoint at step 5 in .* was deleted while it was read \(a run '
                                            r'training there keeps only its latest checkpoint.keep steps\); rerun '
                                            r'with --checkpoint latest or a step it keeps \(15, 20\)$'):
    checkpoint_lib.load_model(tmp_path, 5)


def test_a_workdir_held_by_another_run_is_refused(tiny_config, tmp_path):
  lock = checkpoint_lib.WorkdirLock(tmp_path)
  lock.acquire()
  try:
    with pytest.raises(CheckpointError, match=rf'workdir {tmp_path} is in use by another run \(pid {os.getpid()}\)'):
      train_lib.train_and_evaluate(tiny_config(), tmp_path)
  finally:
    lock.release()


def test_a_lock_whose_pid_could_not_be_written_is_released(tmp_path, monkeypatch):
  def full_disk(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')

  lock = checkpoint_lib.WorkdirLock(tmp_path)
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint_lib.os, 'fsync', full_disk)
    with pytest.raises(OSError, match='No space left') as failure:  # (its traceback keeps the lock file open)
      lock.acquire()
  lock.release()
  other = checkpoint_lib.WorkdirLock(tmp_path)
  other.acquire()  # not 'in use by another run'
  other.release()
  assert failure.value.errno == errno.ENOSPC


def test_a_restore_error_that_is_not_about_the_files_moves_nothing(tiny_config, tmp_path, monkeypatch):
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 4, 'checkpoint.every': 2}), tmp_path)
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  for error in (MemoryError('out of memory'), PermissionError(errno.EACCES, 'Permission denied'),
                jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 4.0GiB')):
    def fail(self, step, abstract_state):
      raise error

    monkeypatch.setattr(Checkpoints, 'restore_state', fail)
    with pytest.raises(CheckpointError, match=rf'cannot read the checkpoint at step 4 in .* \({type(error).__name__}: '
                                              r'.*\); it is left in place'):
      train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 6, 'checkpoint.every': 2}), tmp_path)
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before


def test_no_restorable_checkpoint_stops_instead_of_starting_over(tiny_config, tmp_path, monkeypatch, capsys):
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 4, 'checkpoint.every': 2}), tmp_path)

  def unreadable(self, step, abstract_state):
    raise ValueError(f'DATA_LOSS: checksum mismatch in step {step}')

  monkeypatch.setattr(Checkpoints, 'restore_state', unreadable)
  message = r'no checkpoint in .* restores \(set aside as unreadable: 2.corrupt, 4.corrupt\); rename one back'
  with pytest.raises(CheckpointError, match=message):
    train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 6, 'checkpoint.every': 2}), tmp_path)
  out = capsys.readouterr().out  # each step set aside names what comes next, never a fallback that is not there
  assert 'moved it to 4.corrupt, falling back to the one at step 2' in out
  assert 'moved it to 2.corrupt, no earlier checkpoint is left' in out
  monkeypatch.undo()
  with pytest.raises(CheckpointError, match=message):  # the next start too: the run does not begin again at step 0
    train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 6, 'checkpoint.every': 2}), tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2.corrupt', '4.corrupt']


@pytest.mark.slow
@pytest.mark.parametrize('signum, checkpoint_every', [(signal.SIGTERM, 100000), (signal.SIGTERM, 1),
                                                     (signal.SIGINT, 100000)],
                         ids=['between saves', 'during asynchronous saves', 'Ctrl-C'])
def test_a_signal_saves_a_checkpoint_and_the_next_start_resumes(corpus_file, tmp_path, signum, checkpoint_every):
  from test_launch import TINY, launch
  workdir = tmp_path / 'run'
  args = ['--config', 'experiments/cpu.py', '--config.data.source=text', f'--config.data.text_path={corpus_file}',
          *TINY, '--config.train.num_steps=100000', '--config.train.decay_steps=100000',
          f'--config.checkpoint.every={checkpoint_every}', '--config.eval.every=100000', '--workdir', str(workdir)]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.Popen([sys.executable, 'launch.py', *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    metrics = workdir / 'metrics.jsonl'
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 2):
      time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  name = signal.Signals(signum).name
  assert proc.returncode == 128 + signum, err[-2000:]  # 143 for SIGTERM, 130 for Ctrl-C
  assert f'stopped by {name} after step' in out and 'Traceback' not in err
  stopped_at = int(out.split(f'stopped by {name} after step ')[1].split(';')[0])
  steps = Checkpoints(workdir, read_only=True).steps()
  assert steps[-1] == stopped_at and (checkpoint_every == 1 or steps == [stopped_at])
  result = launch(*args[:-2], f'--config.train.num_steps={stopped_at + 6}', '--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'resumed from the checkpoint at step {stopped_at}' in result.stdout
  assert f'step {stopped_at + 6} |' in result.stdout


def test_a_run_resumed_with_another_vocab_size_is_refused_naming_it(tiny_config):
  """data.vocab_size sizes the embeddings and the LM head: it is part of the model's shape."""
  saved, config = tiny_config(**{'data.vocab_size': 512}), tiny_config(**{'data.vocab_size': 256})
  with pytest.raises(config_lib.ConfigError, match=r'^checkpoint in RUN has a different model shape: '
                                                   r'data.vocab_size=512 \(config says 256\); use the same values'):
    checkpoint_lib.check_model_matches(saved.to_dict(), config, 'RUN')
  older = tiny_config().to_dict()
  del older['data']['vocab_size']  # saved before the field existed: characters
  checkpoint_lib.check_model_matches(older, tiny_config(), 'RUN')
  with pytest.raises(config_lib.ConfigError, match=r'data.vocab_size=0 \(config says 256\)'):
    checkpoint_lib.check_model_matches(older, config, 'RUN')
