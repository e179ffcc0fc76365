"""Several processes (jax.distributed over 127.0.0.1, CPU collectives) train like one process."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from nanodecoder.checkpoint import WorkdirLock
from test_checkpoint import final_params, train_losses
from test_launch import TINY

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def command(corpus_file, workdir, devices, *extra, kill_after=300):
  overrides = [a for a in TINY if not a.startswith('--config.mesh.cpu_devices')]
  return ['timeout', '-s', 'KILL', str(kill_after), sys.executable, 'launch.py', '--config', 'experiments/cpu.py',
          '--config.data.source=text', f'--config.data.text_path={corpus_file}', *overrides,
          f'--config.mesh.cpu_devices={devices}', '--config.train.log_every=1', '--config.checkpoint.every=6',
          '--workdir', str(workdir), *extra]


def run_processes(commands):
  """[(exit status, stdout, stderr)] of commands run together. Output goes to files: a process blocked on a full
  pipe while the test waits for another would stall them all (collectives wait for every process)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  files = [(tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')) for _ in commands]
  procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
           for c, (out, err) in zip(commands, files)]
  outputs = []
  for p, streams in zip(procs, files):
    p.wait(timeout=330)
    texts = []
    for stream in streams:
      stream.seek(0)
      texts.append(stream.read())
      stream.close()
    outputs.append((p.returncode, *texts))
  return outputs


def test_two_processes_match_one_process(corpus_file, tmp_path):
  port = free_port()
  multi = tmp_path / 'multi'
  results = run_processes([command(corpus_file, multi, 2, f'--coordinator_address=127.0.0.1:{port}',
                                   '--num_processes=2', f'--process_id={i}', '--config.train.profile_start=2',
                                   '--config.train.profile_steps=2') for i in range(2)])
  for rc, out, err in results:
    assert rc == 0, err[-3000:]
  assert 'on 4 cpu devices' in results[0][1] and "mesh {'data': 4" in results[0][1]
  assert len(list((multi / 'plugins' / 'profile').glob('*/*.trace.json.gz'))) == 1  # process 0 traces
  assert 'step ' not in results[1][1] and 'model:' not in results[1][1]  # only process 0 logs
  (rc, out, err), = run_processes([command(corpus_file, tmp_path / 'single', 4)])
  assert rc == 0, err[-3000:]
  multi_losses, single_losses = train_losses(multi), train_losses(tmp_path / 'single')
  assert sorted(multi_losses) == list(range(1, 13))
  # Tolerance: the processes sum gradients in another order than one process does.
  np.testing.assert_allclose([multi_losses[s] for s in sorted(multi_losses)],
                             [single_losses[s] for s in sorted(single_losses)], rtol=1e-5)
  step_m, params_m = final_params(multi)
  step_s, params_s = final_params(tmp_path / 'single')
  assert step_m == step_s == 12
  for a, b in zip(jax.tree.leaves(params_m), jax.tree.leaves(params_s)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_processes_reading_different_texts_stop_with_one_error(corpus_file, tmp_path):
  """Process 1's copy of the corpus lost a line (the same characters): its rows would come from another text."""
  other = tmp_path / 'other.txt'
  other.write_text(''.join(corpus_file.read_text().splitlines(keepends=True)[1:]))
  port = free_port()
  results = run_processes([command(text, tmp_path / 'run', 2, f'--coordinator_address=127.0.0.1:{port}',
                                   '--num_processes=2', f'--process_id={i}', kill_after=120)
                           for i, text in enumerate((corpus_file, other))])
  for rc, out, err in results:
    assert rc == 2 and 'error: process 1 read other data than process 0' in err, (rc, err[-3000:])


@pytest.mark.parametrize('process_id', [0, 1])
def test_processes_that_do_not_all_join_stop_with_one_error_after_the_timeout(corpus_file, tmp_path, process_id):
  """Process 1 alone points at a port where nothing listens; process 0 alone waits for a process 1 that never
  starts. JAX waits (--distributed_timeout; its default is 300 s) in silence, then aborts with a C++ stack trace."""
  address = f'127.0.0.1:{free_port()}'
  start = time.monotonic()
  (rc, out, err), = run_processes([command(corpus_file, tmp_path / 'run', 2, f'--coordinator_address={address}',
                                           '--num_processes=2', f'--process_id={process_id}',
                                           '--distributed_timeout=3', kill_after=60)])
  assert time.monotonic() - start < 60 and rc == 2, (rc, err[-3000:])
  assert (f'joining 2 processes through {address} as process {process_id} (waiting up to 3 s; '
          '--distributed_timeout)\n') in err, err[-3000:]
  assert [line for line in err.splitlines() if line.startswith('error:')] == [
      f'error: the processes did not all join through {address} within 3 s (--distributed_timeout); check that '
      f"{address} is process 0's host and a port reachable from here, that all 2 processes started, or raise "
      '--distributed_timeout'], err[-3000:]
  assert 'Traceback' not in err and 'Check failure' not in err, err[-3000:]


def test_ctrl_c_while_waiting_for_the_other_processes_exits_at_once(corpus_file, tmp_path):
  """JAX's client holds the main thread in C++ while it waits: Python would raise the KeyboardInterrupt only at
  the end of the wait."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  process = subprocess.Popen(command(corpus_file, tmp_path / 'run', 2, f'--coordinator_address=127.0.0.1:{free_port()}',
                                     '--num_processes=2', '--process_id=1', kill_after=120), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    assert process.stderr.readline().startswith('joining 2 processes through 127.0.0.1:')
    time.sleep(1)  # inside the wait
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C would: `timeout` and the Python process under it
    rc = process.wait(timeout=20)  # without the fix: 300 s, the wait's default
  finally:
    with contextlib.suppress(ProcessLookupError):  # (gone already, as it should be)
      os.killpg(process.pid, signal.SIGKILL)
  assert rc == 130 and 'Traceback' not in process.stderr.read()


def test_processes_with_unequal_device_counts_stop_with_one_error(corpus_file, tmp_path):
  """Process 1 splits its host into fewer devices: the collectives between processes cannot run (a traceback)."""
  port = free_port()
  results = run_processes([command(corpus_file, tmp_path / 'run', devices, f'--coordinator_address=127.0.0.1:{port}',
                                   '--num_processes=2', f'--process_id={i}', '--config.train.batch_size=6',
                                   kill_after=90) for i, devices in enumerate((2, 1))])
  for rc, out, err in results:
    assert rc == 2 and 'Traceback' not in err, (rc, err[-3000:])
    assert ('error: the processes have different numbers of devices (process 0: 2, process 1: 1); give every process '
            'the same number (on CPU, the same mesh.cpu_devices)') in err, err[-3000:]


@pytest.mark.parametrize('learning_rate', ['0.01', '-1'])
def test_processes_with_other_settings_stop_with_one_error(corpus_file, tmp_path, learning_rate):
  """Process 1 was started with another learning rate: it would train with its own (a model of neither setting),
  and one that it alone refuses would leave process 0 waiting for it. Where the data lives may differ."""
  port = free_port()
  results = run_processes([command(corpus_file, tmp_path / 'run', 2, f'--coordinator_address=127.0.0.1:{port}',
                                   '--num_processes=2', f'--process_id={i}', *extra, kill_after=90)
                           for i, extra in enumerate([[], [f'--config.train.learning_rate={learning_rate}',
                                                            f'--config.data.text_path={corpus_file.parent}/../'
                                                            f'{corpus_file.parent.name}/{corpus_file.name}']])])
  for (rc, out, err), value in zip(results, ('0.001', str(float(learning_rate)))):
    assert rc == 2 and (f'error: process 1 has another train.learning_rate than process 0 (this process: {value}); '
                        'start every process with the same --config and overrides') in err, (rc, err[-3000:])


def test_a_locked_workdir_stops_every_process_instead_of_hanging(corpus_file, tmp_path):
  """Only process 0 takes the workdir lock; when it cannot, process 1 must not wait for it at a collective."""
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  try:
    port = free_port()
    results = run_processes([command(corpus_file, tmp_path, 2, f'--coordinator_address=127.0.0.1:{port}',
                                     '--num_processes=2', f'--process_id={i}', kill_after=90) for i in range(2)])
  finally:
    lock.release()
  (rc0, _, err0), (rc1, _, err1) = results
  assert rc0 == 2 and f'error: workdir {tmp_path} is in use by another run (pid {os.getpid()})' in err0, err0[-2000:]
  assert rc1 == 2 and 'error: process 0 failed to load the data or lock the workdir' in err1, err1[-2000:]


def test_a_workdir_that_is_not_shared_stops_every_process_instead_of_hanging(corpus_file, tmp_path):
  """Each process writes into a folder of its own (as the same path on each host's local disk would be): found
  before training, not at the first save, which would wait for the other process's files forever."""
  port = free_port()
  results = run_processes([command(corpus_file, tmp_path / f'local_{i}', 2, f'--coordinator_address=127.0.0.1:{port}',
                                   '--num_processes=2', f'--process_id={i}', kill_after=90) for i in range(2)])
  for i, (rc, out, err) in enumerate(results):
    assert rc == 2 and (f'error: workdir {tmp_path / f"local_{i}"} is not one folder for all processes (process 1 '
                        'does not see the lock file that process 0 wrote there)') in err, (rc, err[-3000:])
  assert not (tmp_path / 'local_0' / 'checkpoints').exists()


FAULTY_READS = '''\
"""launch.py with reads of the checkpoints' arrays failing on this process, as a damaged disk or lack of memory would."""
import pathlib
import runpy
import sys

import orbax.checkpoint as ocp

error, step = sys.argv.pop(1), sys.argv.pop(1)
read = ocp.StandardCheckpointHandler.restore


def failing_read(self, directory, *args, **kwargs):
  if step in ('any', pathlib.Path(directory).parent.name):
    raise {'memory': MemoryError('injected: out of memory'), 'damage': ValueError('injected: damaged')}[error]
  return read(self, directory, *args, **kwargs)


ocp.StandardCheckpointHandler.restore = failing_read
sys.argv[0] = 'launch.py'
sys.path[0] = str(pathlib.Path('launch.py').resolve().parent)  # as `python launch.py` would have it
runpy.run_path('launch.py', run_name='__main__')
'''


def test_a_read_failing_on_one_process_stops_or_falls_back_on_every_process(corpus_file, tmp_path):
  """Every process takes the same collective steps whatever one process's restore meets: no hang, one decision."""
  workdir = tmp_path / 'run'
  faulty = tmp_path / 'faulty_reads.py'
  faulty.write_text(FAULTY_READS)

  def run(*extra, faults=None, kill_after=120):
    port = free_port()
    commands = [command(corpus_file, workdir, 2, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                        f'--process_id={i}', *extra, kill_after=kill_after) for i in range(2)]
    if faults:  # process 1 runs launch.py through the wrapper that fails its reads
      commands[1][commands[1].index('launch.py')] = str(faulty)
      commands[1][commands[1].index(str(faulty)) + 1:1] = faults
    return run_processes(commands)

  for rc, out, err in run():
    assert rc == 0, err[-3000:]
  first = train_losses(workdir)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['12', '6']

  # Out of memory on process 1 only: both stop at once with the step left in place, none hangs at a barrier.
  (rc0, _, err0), (rc1, _, err1) = run('--config.train.num_steps=18', faults=['memory', 'any'])
  assert rc0 == 2 and 'cannot read the checkpoint at step 12' in err0 and 'an error on process 1' in err0, err0[-2000:]
  assert rc1 == 2 and 'MemoryError: injected: out of memory' in err1, err1[-2000:]
  assert not list((workdir / 'checkpoints').glob('*.corrupt'))

  # Step 12 unreadable on process 1 only: every process sets it aside and resumes from step 6.
  results = run('--config.train.num_steps=18', faults=['damage', '12'])
  for rc, out, err in results:
    assert rc == 0, err[-3000:]
  assert 'checkpoint at step 12 is unreadable' in results[0][1] + results[0][2]
  assert (workdir / 'checkpoints' / '12.corrupt').is_dir()
  again = train_losses(workdir)
  assert sorted(again) == list(range(1, 19))
  np.testing.assert_array_equal([again[s] for s in range(7, 13)], [first[s] for s in range(7, 13)])
