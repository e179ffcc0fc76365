"""Robustness: random config overrides never crash deep inside JAX; random kills never lose a run."""

import os
import random
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO
from nanodecoder import config as config_lib
from nanodecoder import train as train_lib
from nanodecoder.data import DataError
from nanodecoder.sweep import saved_steps
from test_checkpoint import final_params, train_losses
from test_distributed import command, free_port, run_processes

pytestmark = pytest.mark.slow

OVERRIDES = {
    'model.num_layers': st.integers(-1, 3),
    'model.num_heads': st.integers(-1, 4),
    'model.head_size': st.one_of(st.integers(-1, 9), st.just('eight')),
    'model.context_length': st.integers(-1, 40),
    'model.dropout': st.floats(-0.5, 1.5),
    'model.dtype': st.sampled_from(['float32', 'bfloat16', 'float64', 'int8']),
    'model.remat': st.sampled_from(['none', 'block', 'matmuls', 'everything']),
    'model.scan_layers': st.booleans(),
    'train.batch_size': st.integers(-1, 12),
    'train.learning_rate': st.floats(-1.0, 1.0),
    'train.warmup_steps': st.integers(-2, 4),
    'train.grad_accum_steps': st.integers(0, 4),
    'train.steps_per_call': st.integers(0, 3),
    'mesh.data': st.sampled_from([-1, 0, 1, 2, 3, 8]),
    'mesh.tensor': st.sampled_from([1, 2, 3]),
    'data.eval_split': st.sampled_from(['validation', 'validation+test', 'test', 'nope']),
}


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(sorted(OVERRIDES)), st.none(), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: OVERRIDES[k] for k in keys})))
def test_any_override_trains_or_fails_with_a_validation_error(corpus_file, tmp_path_factory, overrides):
  from conftest import make_tiny_config
  config = make_tiny_config(corpus_file, **{'train.num_steps': 2, 'train.decay_steps': 2, 'train.warmup_steps': 1,
                                           'train.log_every': 1, 'eval.every': 2, 'eval.batches': 1,
                                           'checkpoint.every': 2})
  try:
    for field, value in overrides.items():
      config_lib.set_field(config, field, value)
    metrics = train_lib.train_and_evaluate(config, tmp_path_factory.mktemp('run'))
  except (config_lib.ConfigError, DataError, FloatingPointError) as e:  # diverging: stops naming train.learning_rate
    assert '\n' not in str(e), e
    assert re.search(r'\b(model|train|data|mesh|eval|checkpoint)\.\w+|split ', str(e)), e
    return
  assert np.isfinite(metrics['val_loss'])  # trained


def test_two_process_run_killed_at_random_points_ends_like_an_uninterrupted_one(corpus_file, tmp_path):
  """SIGKILL both processes at random moments (mid-step, mid-save), restart, repeat; compare the final parameters."""
  extra = ['--config.train.num_steps=600', '--config.train.decay_steps=600', '--config.train.log_every=20',
           '--config.eval.every=300', '--config.checkpoint.every=20']

  def processes(workdir):
    port = free_port()
    return [[*command(corpus_file, workdir, 2, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                      f'--process_id={i}'), *extra] for i in range(2)]

  results = run_processes(processes(tmp_path / 'whole'))
  assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:]

  workdir, rng = tmp_path / 'killed', random.Random(0)
  for _ in range(3):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    latest = saved_steps(workdir)[-1:]
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True) for c in processes(workdir)]
    deadline = time.monotonic() + 120  # each round makes progress, however slow the machine: wait for a new save
    while saved_steps(workdir)[-1:] == latest and time.monotonic() < deadline:
      time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 3.0))  # then kill anywhere: mid-step, mid-save, mid-evaluation
    for p in procs:  # the whole process group: `timeout` and the Python process under it
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  results = run_processes(processes(workdir))
  assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:]
  assert 'resumed from the checkpoint at step' in results[0][1]

  step_whole, whole = final_params(tmp_path / 'whole')
  step_killed, killed = final_params(workdir)
  assert step_whole == step_killed == 600
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(killed)):
    np.testing.assert_array_equal(a, b)
  assert train_losses(workdir)[600] == train_losses(tmp_path / 'whole')[600]
