"""Checkpoints: exact resume, retention, restore onto other meshes, refusals, signals."""

import json
import os
import signal
import subprocess
import sys
import time

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


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
  settings = {'train.num_steps': 20, 'train.log_every': 1, 'checkpoint.every': 5, 'eval.every': 10,
              'model.dropout': 0.1}
  train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'whole')
  train_lib.train_and_evaluate(tiny_config(**{**settings, 'train.num_steps': 12}), tmp_path / 'split')
  assert Checkpoints(tmp_path / 'split', read_only=True).steps()[-1] == 12
  metrics = train_lib.train_and_evaluate(tiny_config(**settings), tmp_path / 'split')
  whole, split = train_losses(tmp_path / 'whole'), train_losses(tmp_path / 'split')
  assert sorted(split) == list(range(1, 21))
  assert whole == split  # bit-identical losses, every step
  assert_trees_equal(final_params(tmp_path / 'whole'), final_params(tmp_path / 'split'))
  assert metrics['val_loss'] > 0


def test_keeps_the_latest_and_the_best(tiny_config, tmp_path):
  config = tiny_config(**{'train.num_steps': 30, 'checkpoint.every': 5, 'eval.every': 5, 'checkpoint.keep': 2})
  train_lib.train_and_evaluate(config, tmp_path)
  checkpoints = Checkpoints(tmp_path, read_only=True)
  steps = checkpoints.steps()
  val = {s: checkpoints.meta(s)['val_loss'] for s in steps}
  assert steps[-2:] == [25, 30]
  best = checkpoints.best_step()
  assert set(steps) == {25, 30, best} and val[best] == min(val.values())
  meta = checkpoints.meta(30)
  assert meta['step'] == 30 and meta['config']['model']['num_layers'] == 2
  assert checkpoints.select('best') == best and checkpoints.select('30') == 30
  with pytest.raises(CheckpointError, match=r'no checkpoint at step 7 .*saved steps: '):
    checkpoints.select('7')


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
    leaf = state[0]['blocks'][0]['mlp']['fc'][...]
    assert leaf.sharding.mesh.size == devices
    assert_trees_equal(jax.device_get(nnx.to_pure_dict(state[0])), final_params(tmp_path)[1])


def test_refuses_a_checkpoint_of_another_shape(tiny_config, tmp_path):
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 2, 'checkpoint.every': 2}), tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r'different model shape: model.num_layers=2 \(config says 3\)'):
    train_lib.train_and_evaluate(tiny_config(**{'model.num_layers': 3}), tmp_path)


# Orbax's failed read of the corrupt step leaves a callback for an asyncio loop it has closed; harmless.
@pytest.mark.filterwarnings('ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning')
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path, capsys):
  config = tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5, 'eval.every': 5, 'checkpoint.keep': 3})
  train_lib.train_and_evaluate(config, tmp_path)
  params_dir = tmp_path / 'checkpoints' / '10' / 'params'
  for file in params_dir.rglob('*'):
    if file.is_file() and file.stat().st_size > 0 and 'd' in file.parent.name:
      file.write_bytes(b'garbage')
  capsys.readouterr()
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 12, 'checkpoint.every': 5, 'eval.every': 5,
                                              'checkpoint.keep': 3}), tmp_path)
  out = capsys.readouterr().out
  assert 'checkpoint at step 10 is unreadable' in out and 'falling back to the previous one' in out
  assert 'resumed from the checkpoint at step 5' in out
  assert (tmp_path / 'checkpoints' / '10.corrupt').is_dir()
  assert Checkpoints(tmp_path, read_only=True).steps()[-1] == 12


def test_a_workdir_held_by_another_run_is_refused(tiny_config, tmp_path):
  lock = checkpoint_lib.WorkdirLock(tmp_path)
  lock.acquire()
  try:
    with pytest.raises(CheckpointError, match=rf'workdir {tmp_path} is in use by another run \(pid {os.getpid()}\)'):
      train_lib.train_and_evaluate(tiny_config(), tmp_path)
  finally:
    lock.release()


@pytest.mark.slow
@pytest.mark.parametrize('checkpoint_every', [100000, 1], ids=['between saves', 'during asynchronous saves'])
def test_sigterm_saves_a_checkpoint_and_the_next_start_resumes(corpus_file, tmp_path, checkpoint_every):
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
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert 'stopped by SIGTERM after step' in out
  stopped_at = int(out.split('stopped by SIGTERM after step ')[1].split(';')[0])
  steps = Checkpoints(workdir, read_only=True).steps()
  assert steps[-1] == stopped_at and (checkpoint_every == 1 or steps == [stopped_at])
  result = launch(*args[:-2], f'--config.train.num_steps={stopped_at + 6}', '--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'resumed from the checkpoint at step {stopped_at}' in result.stdout
  assert f'step {stopped_at + 6} |' in result.stdout
