"""A Ctrl-C that Python drops is remembered: the command, training and its loop act on it."""

import gc
import os
import signal
import sys

import pytest

from nanodecoder import interrupts
from nanodecoder import train as train_lib


@pytest.fixture
def reported(monkeypatch):
  """Installs the hook; the errors that reach the previous one (Python's printout) land in the returned list."""
  errors = []
  monkeypatch.setattr(interrupts, '_dropped', False)
  monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: errors.append(unraisable.exc_value))
  interrupts.install()
  return errors


class Finalized:
  def __del__(self):  # Python drops what a finalizer raises (as it does in JAX's garbage-collection callback)
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # the handler runs between bytecodes, here
      pass


def test_a_ctrl_c_that_python_drops_is_raised_at_the_next_check(reported):
  interrupts.check()  # nothing pending
  Finalized()
  gc.collect()
  assert reported == []  # no 'Exception ignored' printout
  with pytest.raises(KeyboardInterrupt):
    interrupts.check()
  interrupts.check()  # once
  Finalized()
  gc.collect()
  with pytest.raises(KeyboardInterrupt):  # the training loop checks before it starts
    with train_lib.StopRequest():
      pass
  with train_lib.StopRequest() as stop:  # and after every call, where it is a Ctrl-C: first a stop, then the abort
    Finalized()
    gc.collect()
    assert stop.requested() and stop.name() == 'SIGINT'
    Finalized()
    gc.collect()
    with pytest.raises(KeyboardInterrupt):
      stop.requested()
  assert reported == []


def test_other_unraisable_errors_are_still_reported(reported):
  class Broken:
    def __del__(self):
      raise ValueError('a finalizer failed')

  Broken()
  gc.collect()
  assert [str(e) for e in reported] == ['a finalizer failed']
  interrupts.check()  # and are not taken for a Ctrl-C


class Raises:
  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


def test_filters_of_dropped_errors_install_once_and_pass_on_the_rest(monkeypatch):
  printed, filtered = [], []
  monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: printed.append(unraisable.exc_value))

  def handled(unraisable):
    filtered.append(unraisable.exc_value)
    return isinstance(unraisable.exc_value, ValueError)

  interrupts.filter_unraisable('test', handled)
  interrupts.install()
  interrupts.filter_unraisable('test', handled)  # already in the chain: not again
  taken, passed = ValueError('taken'), TypeError('passed on')
  Raises(taken)
  Raises(passed)
  gc.collect()
  assert filtered == [taken, passed] and printed == [passed]


BLOCKED_IN_A_COMPILED_CALL = '''
import jax
from nanodecoder import interrupts

forever = jax.jit(lambda x: jax.lax.while_loop(lambda v: v > 0, lambda v: v + 1.0, x))  # stops growing at 2^24
with interrupts.exit_on_ctrl_c():
  print('running', flush=True)
  forever(1.0).block_until_ready()
'''


@pytest.mark.parametrize('stderr_gone', [False, True])
def test_ctrl_c_exits_at_once_from_a_compiled_call_that_never_returns(tmp_path, stderr_gone):
  """Python raises KeyboardInterrupt only between bytecodes: a sampling call of millions of tokens ran on. Also
  when stderr's reader went away (`2>&1 | tee log`: the same Ctrl-C ends tee)."""
  import subprocess
  import time

  process = subprocess.Popen([sys.executable, '-c', BLOCKED_IN_A_COMPILED_CALL], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  try:
    assert process.stdout.readline() == 'running\n'
    if stderr_gone:
      process.stderr.close()
    time.sleep(1.0)  # compiled and looping (or still compiling: the same either way)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=20)
  finally:
    process.kill()
  assert process.returncode == 130, '' if stderr_gone else process.stderr.read()[-2000:]


INTERRUPTED_COMPILATION = '''
import os, signal, sys, threading, time
import jax, jax.numpy as jnp
from nanodecoder import cli

def main(argv):  # a command whose Ctrl-C lands in a long XLA compilation (a second Ctrl-C while training compiles)
  def long_to_compile(x):
    for i in range(1500):
      x = jnp.sin(x @ x.T)[:64 + i % 7].sum(0, keepdims=True) * x + jnp.cos(x)
    return x
  lowered = jax.jit(long_to_compile).lower(jnp.ones((64, 64)))
  threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
  print('compiling', flush=True)
  lowered.compile()

cli.main = main
cli.run()
'''


def test_ctrl_c_during_a_compilation_exits_at_once_with_130(tmp_path):
  """XLA compiles on in its threads after the KeyboardInterrupt: the interpreter's shutdown waited for it (seconds to
  minutes) and then crashed under it (a segmentation fault)."""
  import subprocess
  import time

  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  process = subprocess.Popen([sys.executable, '-c', INTERRUPTED_COMPILATION], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
  try:
    assert process.stdout.readline() == 'compiling\n'
    started = time.time()
    process.wait(timeout=120)
    took = time.time() - started
  finally:
    process.kill()
  assert process.returncode == 130, process.stderr.read()[-2000:]
  assert took < 5, took  # the compilation itself takes 15 s on two cores
