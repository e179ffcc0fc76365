"""Sweeps: expanding points, naming workdirs, skipping finished points, resuming interrupted ones."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from nanodecoder import sweep as sweep_lib
from nanodecoder import train as train_lib
from nanodecoder.config import ConfigError, load_config_file


def test_a_dict_sweeps_the_product_last_field_fastest(tiny_config):
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'model.num_layers': [1, 2], 'model.head_size': [8, 16],
                                              'train.learning_rate': [1e-3]})
  assert [p.name for p in sweep.points] == [
      'num_layers=1,head_size=8,learning_rate=0.001', 'num_layers=1,head_size=16,learning_rate=0.001',
      'num_layers=2,head_size=8,learning_rate=0.001', 'num_layers=2,head_size=16,learning_rate=0.001']
  assert sweep.fields == ['model.num_layers', 'model.head_size', 'train.learning_rate']
  assert [p.index for p in sweep.points] == [0, 1, 2, 3]
  config = sweep_lib.point_config(base, sweep.points[2])
  assert (config.model.num_layers, config.model.head_size, config.train.learning_rate) == (2, 8, 1e-3)
  assert base.model.num_layers == 2 and base.model.head_size == 8  # the base is not changed
  assert str(sweep.workdir('runs/s', sweep.points[1])) == 'runs/s/num_layers=1,head_size=16,learning_rate=0.001'


def test_a_list_gives_the_points_one_by_one_and_clashing_names_stay_dotted(tiny_config):
  sweep = sweep_lib.make_sweep('x.py', tiny_config(), [{'model.dropout': 0.1}, {'model.dropout': 0.0, 'eval.every': 5}])
  assert [p.name for p in sweep.points] == ['dropout=0.1', 'dropout=0,every=5']
  sweep = sweep_lib.make_sweep('x.py', tiny_config(), [{}, {'model.num_layers': 1}])  # the base config is a point
  assert [p.name for p in sweep.points] == ['base', 'num_layers=1']
  sweep = sweep_lib.make_sweep('x.py', tiny_config(), {'eval.every': [10], 'checkpoint.every': [10, 20],
                                                       'data.text_path': ['a/b.txt']})
  assert [p.name for p in sweep.points] == ['eval.every=10,checkpoint.every=10,text_path=a_b.txt',
                                            'eval.every=10,checkpoint.every=20,text_path=a_b.txt']


@pytest.mark.parametrize('declaration, message', [
    ({'model.num_layer': [1]}, r"sweep point 0 \(num_layer=1\): unknown config field 'model.num_layer'"),
    ({'model.num_layers': ['two']}, r"point 0 \(num_layers=two\): config field 'model.num_layers' cannot take 'two'"),
    ({'model.num_layers': [2, 0]}, r'point 1 \(num_layers=0\): model.num_layers must be a positive integer, got 0'),
    ({'model.num_layers': []}, r"sweep field 'model.num_layers' needs a non-empty list of values"),
    ({'model.num_layers': 4}, r"sweep field 'model.num_layers' needs a non-empty list of values, got 4"),
    ({'model.num_layers': '24'}, r"sweep field 'model.num_layers' needs a non-empty list of values, got '24'"),
    ([{'eval.every': 10}, {'eval.every': 10}], r"sweep points 0 and 1 have the same folder name 'every=10'; make "),
    ({'train.learning_rate': [1e-3, 1.0000001e-3]}, r"same folder name 'learning_rate=0.001'; make their values"),
    ({}, r'get_sweep\(\) returned \{\}; return \{field: \[values\]\} with at least one field'),
    ('model.num_layers', r'get_sweep\(\) must return'),
])
def test_bad_sweeps_fail_before_training(tiny_config, declaration, message):
  with pytest.raises(ConfigError, match=message):
    sweep_lib.make_sweep('x.py', tiny_config(), declaration)


@pytest.mark.parametrize('arg, name, fields, count', [
    ('blocks', 'sweep_blocks', ['model.num_layers'], 4),
    ('head_size', 'sweep_head_size', ['model.head_size'], 4),
    ('context', 'sweep_context', ['model.context_length'], 4),
    ('shape', 'sweep_shape', ['model.num_layers', 'model.head_size'], 9),
    ('vocab', 'sweep_vocab', ['data.vocab_size'], 4),
    ('blocks,base', 'sweep_blocks_base', ['model.num_layers'], 4),
])
def test_the_experiment_sweeps_expand_and_validate(arg, name, fields, count):
  spec = f'{REPO}/experiments/sweep.py:{arg}'
  base = load_config_file(spec)
  sweep = sweep_lib.make_sweep(spec, base, sweep_lib.load_declaration(spec))
  assert (sweep.name, sweep.fields, len(sweep.points)) == (name, fields, count)
  expected_recipe = load_config_file(REPO / 'experiments' / ('base.py' if arg.endswith(',base') else 'cpu.py'))
  assert base.train.num_steps == expected_recipe.train.num_steps


def test_unknown_experiment_sweep_and_plain_configs(tmp_path):
  with pytest.raises(ConfigError, match=r"^unknown sweep 'nope' in experiments/sweep.py; use NAME or NAME,RECIPE"):
    sweep_lib.load_declaration(f'{REPO}/experiments/sweep.py:nope')
  assert sweep_lib.load_declaration(REPO / 'experiments' / 'cpu.py') is None
  returns_none = tmp_path / 'returns_none.py'
  returns_none.write_text('def get_config():\n  return None\n\n\ndef get_sweep():\n  return None\n')
  with pytest.raises(ConfigError, match=r'^get_sweep\(\) in .*returns_none.py returned None; return'):
    sweep_lib.load_declaration(returns_none)
  broken = tmp_path / 'broken.py'  # the file's own mistakes: one line naming them, no traceback
  broken.write_text('def get_config():\n  return None\n\n\ndef get_sweep():\n  return {"seed": SEEDS}\n')
  with pytest.raises(ConfigError, match=r"^get_sweep\(\) in .*broken.py failed: NameError: name 'SEEDS' is not "
                                        r'defined; fix the experiment file$'):
    sweep_lib.load_declaration(broken)
  with pytest.raises(ConfigError, match=r"^get_sweep\('x'\) in .*broken.py:x failed: TypeError: .*get_sweep\(\) "
                                        r'takes 0 positional arguments but 1 was given; fix the experiment file$'):
    sweep_lib.load_declaration(f'{broken}:x')


def test_folder_names_join_a_sequence_and_replace_separators():
  assert sweep_lib.format_value((16, 2.5e-4)) == '16-0.00025'
  assert sweep_lib.format_value('a=b, c/d\\e') == 'a_b__c_d_e'  # no '=' or ',' that would split the name


def test_child_env_shares_out_the_listed_gpus():
  env = {'CUDA_VISIBLE_DEVICES': '0,1,2,3', 'OTHER': 'x'}
  assert [sweep_lib.child_env(slot, 2, env)['CUDA_VISIBLE_DEVICES'] for slot in (0, 1)] == ['0,1', '2,3']
  assert sweep_lib.child_env(1, 1, env)['CUDA_VISIBLE_DEVICES'] == '0,1,2,3'
  two = {'CUDA_VISIBLE_DEVICES': '0,1'}  # as many GPUs as points: one each
  assert [sweep_lib.child_env(slot, 2, two)['CUDA_VISIBLE_DEVICES'] for slot in (0, 1)] == ['0', '1']
  assert 'CUDA_VISIBLE_DEVICES' not in sweep_lib.child_env(0, 2, {'OTHER': 'x'})
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in sweep_lib.child_env(0, 2, env)  # a GPU each: JAX's default


def test_child_env_splits_the_gpu_memory_when_points_share_gpus():
  fraction = lambda slot, parallel, env: sweep_lib.child_env(slot, parallel, env).get('XLA_PYTHON_CLIENT_MEM_FRACTION')
  assert [fraction(slot, 3, {}) for slot in (0, 1, 2)] == ['0.3'] * 3  # CUDA_VISIBLE_DEVICES unset
  assert fraction(1, 2, {'CUDA_VISIBLE_DEVICES': '0'}) == '0.45'  # fewer GPUs than points
  assert fraction(0, 4, {'CUDA_VISIBLE_DEVICES': '0,1,2'}) == '0.225'
  assert fraction(0, 2, {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.2'}) == '0.2'  # the user's setting wins
  assert fraction(0, 1, {}) is None  # one point at a time: JAX's default


class FakeProcess:
  """Finishes after `polls` polls with `code`; records which points run at the same time."""

  running = set()
  most_at_once = 0

  def __init__(self, name, code=0, polls=3):
    self.name, self.code, self.polls = name, code, polls
    FakeProcess.running.add(name)
    FakeProcess.most_at_once = max(FakeProcess.most_at_once, len(FakeProcess.running))

  def poll(self):
    self.polls -= 1
    if self.polls > 0:
      return None
    FakeProcess.running.discard(self.name)
    return self.code


def test_run_keeps_n_points_going_with_distinct_slots(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2, 3, 4, 5]})
  slots = {}

  FakeProcess.running, FakeProcess.most_at_once = set(), 0

  def start(point, slot):
    assert not any(name in FakeProcess.running for name, held in slots.items() if held == slot)  # a free slot
    slots[point.name] = slot
    if point.index == 4:  # saved its last checkpoint, then a Ctrl-C killed it on its way out
      (sweep.workdir(tmp_path, point) / 'checkpoints' / str(base.train.num_steps)).mkdir(parents=True)
    # seed=3: killed by a SIGTERM that came before its handler was installed (-15), i.e. stopped, not failed
    return FakeProcess(point.name, code={2: -15, 3: 1, 4: -2}.get(point.index, 0), polls=2 + point.index % 2)

  log = []
  results, stopped = sweep_lib.run(sweep, base, tmp_path, start, parallel=2, log=log.append)
  assert FakeProcess.most_at_once == 2 and set(slots.values()) == {0, 1} and stopped is None
  assert results == {'seed=1': 0, 'seed=2': 0, 'seed=3': -15, 'seed=4': 1, 'seed=5': 0}
  assert '[point 3 of 5] seed=4: failed (exit status 1) after 0s' in log and '[point 0 of 5] seed=1: starting' in log
  assert '[point 2 of 5] seed=3: stopped after 0s' in log
  assert '[point 4 of 5] seed=5: finished after 0s' in log


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_sweep_stops_its_running_points(tiny_config, tmp_path, monkeypatch, signum):
  """`kill -INT` or `kill -TERM` of the sweep's process alone: the running point is asked to save and stop (as a
  point does on SIGTERM), the points after it do not start."""
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2]})

  class Point:
    def __init__(self):
      self.received, self.polls = [], 0

    def send_signal(self, sent):
      self.received.append(sent)

    def poll(self):
      self.polls += 1
      if self.polls == 1:
        os.kill(os.getpid(), signum)  # Python runs the sweep's handler before the next line
      if self.received:
        return 128 + signal.SIGTERM
      return 1 if self.polls > 1000 else None  # never asked to stop: ends as a failure, the test fails

  points, log = [], []
  handler = signal.getsignal(signum)
  results, stopped = sweep_lib.run(sweep, base, tmp_path, lambda point, slot: points.append(Point()) or points[-1],
                                   log=log.append)
  assert stopped == signum and len(points) == 1 and points[0].received == [signal.SIGTERM]
  assert results == {'seed=1': 128 + signal.SIGTERM} and '[point 0 of 2] seed=1: stopped after 0s' in log
  assert signal.getsignal(signum) is handler  # the sweep's handler is gone again

  def starting(point, slot):  # the signal comes while the point's process starts
    os.kill(os.getpid(), signum)
    points.append(Point())
    points[-1].polls = 1  # (sends no signal itself)
    return points[-1]

  points.clear()
  results, stopped = sweep_lib.run(sweep, base, tmp_path, starting, log=log.append)
  assert stopped == signum and len(points) == 1 and points[0].received == [signal.SIGTERM]
  assert results == {'seed=1': 128 + signal.SIGTERM}


def test_a_point_killed_by_a_signal_is_logged_with_its_name(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()
  codes = {1: -signal.SIGKILL, 2: -signal.SIGSEGV, 3: 128 + signal.SIGKILL}
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': list(codes)})
  log = []
  results, _ = sweep_lib.run(sweep, base, tmp_path, lambda point, slot: FakeProcess(point.name, codes[point.index + 1]),
                             log=log.append)
  assert results == {'seed=1': -9, 'seed=2': -11, 'seed=3': 137}
  assert [line for line in log if 'failed' in line] == [
      '[point 0 of 3] seed=1: failed (killed by SIGKILL: out of memory?) after 0s',
      '[point 1 of 3] seed=2: failed (killed by SIGSEGV) after 0s',
      '[point 2 of 3] seed=3: failed (exit status 137) after 0s']  # e.g. a wrapper's own status


def test_a_stopped_point_loses_its_failure_record_and_a_killed_one_replaces_it(tiny_config, tmp_path, monkeypatch):
  """Each exit status of a point that Ctrl-C or SIGTERM stopped is 'stopped'; a record a point killed by a signal
  finds is an earlier session's (it had no time to write one)."""
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()
  codes = [128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL]
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': list(range(len(codes)))})
  for point in sweep.points:
    sweep_lib.record_failure(sweep.workdir(tmp_path, point), 'failed (an earlier session)')
  log = []
  results, _ = sweep_lib.run(sweep, base, tmp_path, lambda point, slot: FakeProcess(point.name, codes[point.index]),
                             log=log.append)
  assert list(results.values()) == codes
  assert [line.split(': ', 1)[1] for line in log if 'after' in line] == ['stopped after 0s'] * 4 + [
      'failed (killed by SIGKILL: out of memory?) after 0s']
  assert [sweep_lib.recorded_failure(sweep.workdir(tmp_path, p)) for p in sweep.points] == [None] * 4 + [
      'failed (killed by SIGKILL: out of memory?)']


def test_saved_steps_are_the_numbered_checkpoint_folders_in_step_order(tmp_path):
  for name in ('100', '5', '20.orbax-checkpoint-tmp-1', '10'):  # a step Orbax still writes: not complete
    (tmp_path / 'checkpoints' / name).mkdir(parents=True)
  (tmp_path / 'checkpoints' / '30').write_text('')  # a file, not a checkpoint
  assert sweep_lib.saved_steps(tmp_path) == [5, 10, 100] and sweep_lib.latest_step(tmp_path) == 100
  assert sweep_lib.saved_steps(tmp_path / 'none') == [] and sweep_lib.latest_step(tmp_path / 'none') == 0


def test_a_run_of_unknown_length_is_new_until_its_first_checkpoint(tmp_path):
  assert sweep_lib.point_status(tmp_path, None) == sweep_lib.Status('new', 0, None)
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  assert sweep_lib.point_status(tmp_path, None) == sweep_lib.Status('unknown', 10, None)  # finished or not


def test_finished_points_are_skipped_and_interrupted_ones_resume(tiny_config, tmp_path):
  base = tiny_config(**{'checkpoint.every': 10})
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2, 3]})  # one model shape: compiles once
  done, partial, new = (sweep.workdir(tmp_path, p) for p in sweep.points)
  train_lib.train_and_evaluate(sweep_lib.point_config(base, sweep.points[0]), done)
  interrupted = sweep_lib.point_config(base, sweep.points[1])
  interrupted.train.num_steps = 10  # as if stopped after the checkpoint at step 10
  train_lib.train_and_evaluate(interrupted, partial)
  done_metrics = (done / 'metrics.jsonl').read_text()

  listing = sweep_lib.listing(sweep, base, tmp_path).splitlines()
  assert listing[0] == f'sweep tiny: 3 points in {tmp_path} (fields: seed)'
  assert [line.split()[:2] for line in listing[1:]] == [['0', 'finished'], ['1', 'partial'], ['2', 'new']]
  assert 'partial (10/20)' in listing[2] and listing[2].endswith(str(partial))

  class Done:  # trains in this process; a finished "process"
    def __init__(self, point):
      self.code = 0
      train_lib.train_and_evaluate(sweep_lib.point_config(base, point), sweep.workdir(tmp_path, point))

    def poll(self):
      return self.code

  log = []
  results, _ = sweep_lib.run(sweep, base, tmp_path, lambda point, slot: Done(point), log=log.append)
  assert results == {'seed=2': 0, 'seed=3': 0}
  assert log[0] == '[point 0 of 3] seed=1: finished (step 20); skipped'
  assert '[point 1 of 3] seed=2: resuming from step 10' in log and '[point 2 of 3] seed=3: starting' in log
  assert (done / 'metrics.jsonl').read_text() == done_metrics  # not touched
  lines = [json.loads(line) for line in (partial / 'metrics.jsonl').read_text().splitlines()]
  sessions = sorted({line['session_start'] for line in lines})
  assert len(sessions) == 2
  assert [line['step'] for line in lines if line['session_start'] == sessions[1] and 'train/loss' in line] == [20]
  assert all(sweep_lib.point_status(sweep.workdir(tmp_path, p), 20).state == 'finished' for p in sweep.points)


def started_point(workdir, config, step):
  """A point's workdir as a session of `config` stopped at `step` leaves it (config.json, the checkpoint folder)."""
  (workdir / 'checkpoints' / str(step)).mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json(indent=2))


def test_points_started_under_other_settings_are_refused(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()  # 20 steps, decay over 20
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2]})
  quick_look = tiny_config(**{'train.num_steps': 10, 'train.decay_steps': 10})
  for point in sweep.points:
    started_point(sweep.workdir(tmp_path, point), sweep_lib.point_config(quick_look, point), 10)
  started = []

  def start(point, slot):
    started.append(point.name)
    return FakeProcess(point.name)

  message = lambda i: (rf'^sweep point {i} \(seed={i + 1}\) in {re.escape(str(tmp_path / f"seed={i + 1}"))} was '
                       r'trained with train.decay_steps=10, not 20; pass another --workdir, or delete that folder '
                       r'to train the point again$')
  with pytest.raises(ConfigError, match=message(0)):
    sweep_lib.check_saved_configs(sweep, base, tmp_path)
  with pytest.raises(ConfigError, match=message(1)):
    sweep_lib.check_saved_configs(sweep, base, tmp_path, sweep.points[1:])  # as `--sweep_index 1` checks
  with pytest.raises(ConfigError, match=r'trained with train.learning_rate=0.001, not 0.5 \(and train.decay_steps\); '):
    sweep_lib.check_saved_configs(sweep, tiny_config(**{'train.learning_rate': 0.5}), tmp_path)  # all are named

  # Length, mesh and cadence may change on resume; a point without checkpoints starts afresh whatever it saved.
  # (and a text path saved relative to this folder, before paths were made absolute, is the same path)
  resumable = tiny_config(**{'train.num_steps': 10, 'mesh.cpu_devices': 1, 'eval.every': 5, 'train.log_every': 5,
                             'checkpoint.every': 5, 'data.text_path': os.path.relpath(base.data.text_path)})
  started_point(sweep.workdir(tmp_path, sweep.points[0]), sweep_lib.point_config(resumable, sweep.points[0]), 10)
  (sweep.workdir(tmp_path, sweep.points[1]) / 'checkpoints' / '10').rmdir()
  sweep_lib.check_saved_configs(sweep, base, tmp_path)
  results, _ = sweep_lib.run(sweep, base, tmp_path, start, log=lambda m: None)
  assert started == ['seed=1', 'seed=2'] and results == {'seed=1': 0, 'seed=2': 0}


def test_a_failed_point_is_recorded_until_a_rerun_finishes_or_stops_it(tiny_config, tmp_path, monkeypatch):
  from nanodecoder import summary
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2, 3]})
  sweep_lib.write_manifest(tmp_path, sweep, base)
  workdirs = [sweep.workdir(tmp_path, point) for point in sweep.points]

  def statuses():
    summary.write_summary(tmp_path)
    return [row['status'] for row in csv.DictReader((tmp_path / 'summary.csv').open())]

  def failing(point, slot):
    if point.index == 0:  # killed (out of memory) after its checkpoint at step 10
      started_point(workdirs[0], sweep_lib.point_config(base, point), 10)
    if point.index == 2:  # its own process recorded its error, then exited with status 2
      sweep_lib.record_failure(workdirs[2], 'failed (DataError: bad text)')
    return FakeProcess(point.name, {0: -signal.SIGKILL, 1: 1, 2: 2}[point.index])

  sweep_lib.run(sweep, base, tmp_path, failing, log=lambda m: None)
  assert [(w / sweep_lib.FAILED).read_text() for w in workdirs] == [
      'failed (killed by SIGKILL: out of memory?)\n', 'failed (exit status 1)\n', 'failed (DataError: bad text)\n']
  assert statuses() == ['failed', 'failed', 'failed']
  assert [line.split(None, 1)[1][:14] for line in sweep_lib.listing(sweep, base, tmp_path).splitlines()[1:]] == [
      'failed (10/20)', 'failed (0/20) ', 'failed (0/20) ']

  def rerun(point, slot):  # point 0 finishes, point 1 stops (SIGTERM), point 2 fails again
    if point.index == 0:
      started_point(workdirs[0], sweep_lib.point_config(base, point), 20)
    return FakeProcess(point.name, {0: 0, 1: 128 + signal.SIGTERM, 2: 1}[point.index])

  log = []
  sweep_lib.run(sweep, base, tmp_path, rerun, log=log.append)
  assert '[point 0 of 3] seed=1: resuming from step 10' in log
  assert [(w / sweep_lib.FAILED).is_file() for w in workdirs] == [False, False, True]
  assert statuses() == ['finished', 'new', 'failed']


def test_a_point_process_records_its_own_failure(tiny_config, tmp_path, monkeypatch):
  from nanodecoder import cli
  from nanodecoder.checkpoint import WorkdirInUse

  during = []

  def train_command(config, workdir, while_locked):
    if isinstance(outcome, WorkdirInUse):
      raise outcome
    with while_locked():  # this session holds the workdir
      during.append(record.read_text())  # what it leaves if killed now (SIGKILL: no handler runs)
      if outcome is not None:
        raise outcome

  monkeypatch.setattr(cli, 'train_command', train_command)
  record = tmp_path / sweep_lib.FAILED
  for outcome, recorded in [(FloatingPointError('loss became nan at step 3;\n lower it'),
                             'failed (FloatingPointError: loss became nan at step 3; lower it)\n'),
                            (SystemExit(128 + signal.SIGTERM), None),  # stopped after saving
                            (SystemExit(2), 'failed (exit status 2)\n'),  # its error line printed
                            (None, None), (KeyboardInterrupt(), None),
                            # another live run holds the point (a second job started for it): that run's record
                            (WorkdirInUse('workdir x is in use by another run (pid 1)'),
                             'failed (an earlier session)\n')]:
    record.write_text('failed (an earlier session)\n')
    during.clear()
    if outcome is None:
      cli.train_point(tiny_config(), tmp_path)
    else:
      with pytest.raises(type(outcome)):
        cli.train_point(tiny_config(), tmp_path)
    assert (record.read_text() if record.exists() else None) == recorded, outcome
    assert during == ([] if isinstance(outcome, WorkdirInUse) else [sweep_lib.UNEXPLAINED + '\n']), outcome


def test_a_point_that_a_live_run_holds_is_running_and_left_to_it(tiny_config, tmp_path, monkeypatch):
  from nanodecoder.checkpoint import WorkdirLock
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2, 3]})
  workdirs = [sweep.workdir(tmp_path, point) for point in sweep.points]
  held = WorkdirLock(workdirs[0])  # e.g. a `--sweep_index 0` job, started before the sweep
  held.acquire()
  try:
    assert sweep_lib.live_run(workdirs[0]) == str(os.getpid()) and sweep_lib.live_run(workdirs[1]) is None
    assert str(sweep_lib.point_status(workdirs[0], 20)) == 'running (0/20)'
    assert sweep_lib.listing(sweep, base, tmp_path).splitlines()[1].split()[:3] == ['0', 'running', '(0/20)']
    assert [p.index for p in sweep_lib.to_train(sweep, base, tmp_path)] == [1, 2]
    started_point(workdirs[0], sweep_lib.point_config(tiny_config(**{'train.learning_rate': 0.5}), sweep.points[0]), 10)
    sweep_lib.check_saved_configs(sweep, base, tmp_path)  # trained under other settings, but the live run's to train
    late = WorkdirLock(workdirs[1])  # a job that takes point 1 after the sweep looked: its process is refused

    def start(point, slot):
      if point.index == 1:
        late.acquire()
        return FakeProcess(point.name, 2)
      sweep_lib.record_failure(workdirs[2], sweep_lib.UNEXPLAINED)  # then it exited, saying nothing
      return FakeProcess(point.name, 1)

    for workdir in workdirs[:2]:
      sweep_lib.record_failure(workdir, 'failed (an earlier session)')
    log = []
    results, _ = sweep_lib.run(sweep, base, tmp_path, start, log=log.append)
    late.release()
  finally:
    held.release()
  assert results == {'seed=1': None, 'seed=2': None, 'seed=3': 1}
  assert log == [f'[point 0 of 3] seed=1: trained by another live run (pid {os.getpid()}); left to it',
                 '[point 1 of 3] seed=2: starting',
                 f'[point 1 of 3] seed=2: trained by another live run (pid {os.getpid()}); left to it',
                 '[point 2 of 3] seed=3: starting', '[point 2 of 3] seed=3: failed (exit status 1) after 0s']
  assert [sweep_lib.recorded_failure(w) for w in workdirs] == ['failed (an earlier session)'] * 2 + [
      'failed (exit status 1)']  # the live runs' records are theirs to change
  assert sweep_lib.live_run(workdirs[0]) is None and str(sweep_lib.point_status(workdirs[0], 20)) == 'failed (10/20)'
  with pytest.raises(ConfigError, match=r'^sweep point 0 \(seed=1\) in .* was trained with train.learning_rate=0.5, '):
    sweep_lib.check_saved_configs(sweep, base, tmp_path)  # now this command's to resume


def test_the_sweep_writes_a_points_record_holding_off_other_runs_and_leaves_a_run_that_took_it_alone(
    tiny_config, tmp_path, monkeypatch):
  from nanodecoder.checkpoint import WorkdirInUse, WorkdirLock
  from nanodecoder.files import WORKDIR_LOCK
  monkeypatch.setattr(sweep_lib.time, 'sleep', lambda s: None)
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2, 3]})
  workdirs = [sweep.workdir(tmp_path, point) for point in sweep.points]
  record_failure = sweep_lib.record_failure

  def record_holding_off_other_runs(workdir, outcome):
    with pytest.raises(WorkdirInUse):  # a run taking the point just then is refused (and retries)
      WorkdirLock(workdir).acquire()
    record_failure(workdir, outcome)

  monkeypatch.setattr(sweep_lib, 'record_failure', record_holding_off_other_runs)
  late = WorkdirLock(workdirs[2])

  def start(point, slot):
    workdirs[point.index].mkdir(parents=True)
    (workdirs[point.index] / WORKDIR_LOCK).touch()  # (its session's lock, released)
    if point.index == 2:  # it finishes, and a --sweep_index job takes the point before the sweep looks
      late.acquire()
      record_failure(workdirs[2], sweep_lib.UNEXPLAINED)
    return FakeProcess(point.name, [0, 1, 0][point.index])

  try:
    results, _ = sweep_lib.run(sweep, base, tmp_path, start, log=lambda line: None)
  finally:
    late.release()
  assert results == {'seed=1': 0, 'seed=2': 1, 'seed=3': 0}
  assert [sweep_lib.recorded_failure(w) for w in workdirs] == [None, 'failed (exit status 1)', sweep_lib.UNEXPLAINED]


def test_a_lock_taken_while_a_status_check_looks_is_not_refused(tmp_path):
  import fcntl
  import threading
  from nanodecoder.checkpoint import WorkdirLock
  (tmp_path / '.lock').write_text('')
  with open(tmp_path / '.lock') as probe:  # what `files.lock_holder` holds for an instant, here for 0.2 s
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.2, lambda: fcntl.flock(probe, fcntl.LOCK_UN)).start()
    lock = WorkdirLock(tmp_path)
    lock.acquire()
  assert sweep_lib.live_run(tmp_path) == str(os.getpid())
  lock.release()


def test_parallel_jobs_rewrite_the_manifest_one_at_a_time(tiny_config, tmp_path):
  import threading
  from nanodecoder import files
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2]})
  sweep_lib.write_manifest(tmp_path, sweep, base)
  longer = tiny_config(**{'train.num_steps': 40})
  with files.exclusive(tmp_path / sweep_lib.MANIFEST_LOCK):  # another job between its read and its write
    job = threading.Thread(target=sweep_lib.write_manifest, args=(tmp_path, sweep, longer, sweep.points[1]))
    job.start()
    job.join(0.5)
    assert job.is_alive()  # it waits for the lock before it reads
    manifest = json.loads((tmp_path / 'sweep.json').read_text())
    manifest['points'][0]['num_steps'] = 30  # the other job's own entry
    (tmp_path / 'sweep.json').write_text(json.dumps(manifest))
  job.join(10)
  assert [p['num_steps'] for p in json.loads((tmp_path / 'sweep.json').read_text())['points']] == [30, 40]


def test_the_sweeps_log_to_a_console_that_went_away_does_not_end_the_sweep(monkeypatch):
  """`launch.py --config SWEEP | tee log` and a Ctrl-C, which ends tee too: the sweep still stops its points."""
  from nanodecoder import cli

  read_end, write_end = os.pipe()
  os.close(read_end)
  console = os.fdopen(write_end, 'w')
  monkeypatch.setattr(sys, 'stdout', console)
  try:
    cli._say('[point 0 of 2] seed=1: stopped after 3s')  # no BrokenPipeError ...
    cli._say('[point 1 of 2] seed=2: stopped after 3s')  # ... and the later lines go nowhere
  finally:
    monkeypatch.undo()
    console.close()


def test_jobs_of_one_sweep_write_its_summary_in_turn(tmp_path, monkeypatch):
  """Two --sweep_index jobs ending together: one reading the points while the other writes would leave a summary
  of the older state, written last."""
  import threading

  from nanodecoder import cli, files, summary

  written = []
  monkeypatch.setattr(summary, '_write_summary', lambda root: written.append(root) or [])
  monkeypatch.delenv(cli.SWEEP_SUMMARY_ENV, raising=False)
  (tmp_path / sweep_lib.MANIFEST).write_text('{}')  # a sweep's folder
  with files.exclusive(tmp_path / sweep_lib.MANIFEST_LOCK):  # another job writing it
    job = threading.Thread(target=cli._update_summary, args=(tmp_path,))
    job.start()
    job.join(0.5)
    assert job.is_alive() and written == []  # it waits before it reads
  job.join(10)
  assert written == [tmp_path]


def test_a_summary_that_fails_after_a_point_failed_does_not_hide_its_error(tmp_path, monkeypatch, capsys):
  from nanodecoder import cli, summary

  def broken(root):
    raise ConfigError(f'{root}/sweep.json is damaged')

  monkeypatch.setattr(summary, 'write_summary', broken)
  monkeypatch.delenv(cli.SWEEP_SUMMARY_ENV, raising=False)
  cli._update_summary(tmp_path, after_error=True)
  assert capsys.readouterr().err == (f'warning: the summary of {tmp_path} was not updated (ConfigError: {tmp_path}/'
                                     'sweep.json is damaged)\n')
  with pytest.raises(ConfigError, match='is damaged'):
    cli._update_summary(tmp_path)  # after a point that finished, its own error


SWEEP_FILE = '''
from nanodecoder.config import load_config_file

def get_config():
  config = load_config_file('{repo}/experiments/cpu.py')
  config.name = 'tiny_sweep'
  return config

def get_sweep():
  return {{'seed': [1, 2]}}  # one model shape: the second point reuses the compiled steps
'''
TINY = ['--config.data.source=text', '--config.model.num_heads=2', '--config.model.head_size=8',
        '--config.model.context_length=16', '--config.train.batch_size=4', '--config.train.num_steps=20',
        '--config.train.warmup_steps=2', '--config.train.decay_steps=20', '--config.train.log_every=10',
        '--config.eval.every=10', '--config.eval.batches=2', '--config.checkpoint.every=10',
        '--config.mesh.cpu_devices=2']


def launch(*args, timeout=180):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # launch.py picks its own devices
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_launch_runs_lists_and_reruns_a_sweep(corpus_file, tmp_path):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(SWEEP_FILE.format(repo=REPO))
  root = tmp_path / 'runs'
  corpus = tmp_path / 'corpus.txt'
  corpus.write_bytes(corpus_file.read_bytes())
  args = ['--config', str(experiment), f'--config.data.text_path={corpus}', *TINY, '--workdir', str(root)]

  one = launch(*args, '--sweep_index=1')  # as one task of a cluster array job would
  assert one.returncode == 0, one.stderr[-3000:]
  assert f'sweep point 1 of 2: seed=2 in {root / "seed=2"}' in one.stdout and 'final: train loss' in one.stdout
  assert (root / 'summary.csv').is_file()  # a point updates the summary when it ends

  listed = launch(*args, '--sweep_list')
  assert listed.returncode == 0, listed.stderr[-3000:]
  assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [['0', 'new'], ['1', 'finished']]

  full = launch(*args)
  assert full.returncode == 0, full.stderr[-3000:]
  assert '[point 1 of 2] seed=2: finished (step 20); skipped' in full.stdout
  assert '[point 0 of 2] seed=1: starting' in full.stdout and '[point 0 of 2] seed=1: finished after' in full.stdout
  assert '| seed=1 | 1 | finished | 20/20 |' in full.stdout and '| seed=2 | 2 | finished | 20/20 |' in full.stdout
  for name in ('summary.csv', 'summary.md', 'val_loss.png', 'loss_curves.png', 'sweep.json'):
    assert (root / name).stat().st_size > 0, name
  assert json.loads((root / 'seed=1' / 'config.json').read_text())['seed'] == 1

  corpus.rename(tmp_path / 'moved.txt')  # a finished sweep's rerun reads no data
  again = launch(*args)
  assert again.returncode == 0 and again.stdout.count('finished (step 20); skipped') == 2, again.stderr[-3000:]

  wrong = launch(*args, '--sweep_index=2')
  assert wrong.returncode == 2
  assert wrong.stderr.strip().splitlines()[-1] == ('error: --sweep_index=2 is out of range: the sweep has 2 points, '
                                                   '0 to 1 (see --sweep_list)')


@pytest.mark.slow
def test_a_failed_point_still_refreshes_the_summary(corpus_file, tmp_path):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(SWEEP_FILE.format(repo=REPO))
  root = tmp_path / 'runs'
  failed = launch('--config', str(experiment), f'--config.data.text_path={corpus_file}', *TINY,
                  '--config.train.learning_rate=1e30', '--config.train.min_learning_rate=0', '--workdir', str(root),
                  '--sweep_index=0')
  assert failed.returncode == 2 and 'became nan' in failed.stderr, failed.stderr[-3000:]
  rows = list(csv.DictReader((root / 'summary.csv').open()))
  assert [(r['point'], r['status']) for r in rows] == [('seed=1', 'failed'), ('seed=2', 'new')]
  assert (root / 'seed=1' / sweep_lib.FAILED).read_text().startswith('failed (FloatingPointError: loss became nan')


@pytest.mark.slow
def test_a_sweep_leaves_a_point_to_the_job_that_trains_it_and_a_killed_job_leaves_a_record(corpus_file, tmp_path):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(SWEEP_FILE.format(repo=REPO).replace(  # point 0 trains for as long as the test needs
      "{'seed': [1, 2]}", "[{'seed': 1, 'train.num_steps': 10**6, 'train.decay_steps': 10**6}, {'seed': 2}]"))
  root = tmp_path / 'runs'
  held = root / 'seed=1,num_steps=1000000,decay_steps=1000000'
  args = ['--config', str(experiment), f'--config.data.text_path={corpus_file}', *TINY, '--workdir', str(root)]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  job = subprocess.Popen([sys.executable, 'launch.py', *args, '--sweep_index=0'], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    for _ in range(600):  # until it holds the point's workdir
      if sweep_lib.live_run(held) or job.poll() is not None:
        break
      time.sleep(0.2)
    assert sweep_lib.live_run(held) == str(job.pid), job.stderr.read() if job.poll() is not None else ''
    listed = launch(*args, '--sweep_list')
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [['0', 'running'], ['1', 'new']]
    full = launch(*args)
    assert full.returncode == 1, full.stderr[-3000:]
    assert f'[point 0 of 2] {held.name}: trained by another live run (pid {job.pid}); left to it' in full.stdout
    assert '[point 1 of 2] seed=2: finished after' in full.stdout
    assert full.stderr.strip().splitlines()[-1] == (
        f'error: 1 of 2 points is trained by another live run ({held.name}); --sweep_list shows how far, and the '
        'same command resumes any left unfinished')
    again = launch(*args, '--sweep_index=0')  # a second job for the point: refused before it writes anything
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        f'error: sweep point 0 ({held.name}) is trained by another live run (pid {job.pid}) in {held}; wait for it to '
        'end (--sweep_list shows how far)')
    assert job.poll() is None  # untouched
  finally:
    job.kill()  # SIGKILL: nothing in the job can record how it ended
    job.wait()
  assert sweep_lib.recorded_failure(held) == sweep_lib.UNEXPLAINED
  listed = launch(*args, '--sweep_list')
  assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [['0', 'failed'], ['1', 'finished']]


@pytest.mark.slow
def test_a_sweep_over_a_missing_text_file_stops_before_any_point(corpus_file, tmp_path):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(SWEEP_FILE.format(repo=REPO))
  root = tmp_path / 'runs'
  result = launch('--config', str(experiment), '--config.data.text_path=/no/such.txt', *TINY, '--workdir', str(root))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      "error: sweep point 0 (seed=1): data.text_path '/no/such.txt' does not exist; point it at a UTF-8 text file"]
  assert not root.exists()


@pytest.mark.slow
def test_a_tfds_sweep_with_a_bad_split_name_stops_before_any_point(shakespeare_dir, tmp_path):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(SWEEP_FILE.format(repo=REPO).replace(
      "{'seed': [1, 2]}", "[{'seed': 1}, {'seed': 2, 'data.eval_split': 'valid'}]"))
  root = tmp_path / 'runs'
  result = launch('--config', str(experiment), *TINY, '--config.data.source=tfds',
                  f'--config.data.manual_dir={shakespeare_dir}', f'--config.data.tfds_data_dir={tmp_path / "tfds"}',
                  '--workdir', str(root))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1:] == [  # (after TFDS's progress bars, preparing the dataset)
      "error: sweep point 1 (seed=2,eval_split=valid): split 'valid' (in data.eval_split='valid') does not exist in "
      'tfds tiny_shakespeare; available: train, validation, test']
  assert not root.exists()  # point 0 did not train


def test_an_override_of_a_field_every_point_sets_is_refused(tiny_config):
  sweep = sweep_lib.make_sweep('tiny.py', tiny_config(), [{'seed': 1, 'model.dropout': 0.1}, {'seed': 2}])
  sweep_lib.check_overrides(sweep, ['model.dropout', 'train.num_steps'])  # dropout: the second point takes it
  with pytest.raises(ConfigError, match=r'^--config.seed has no effect: every point of the sweep sets seed; drop'):
    sweep_lib.check_overrides(sweep, ['model.dropout', 'seed'])


def test_the_manifest_gives_every_point_each_swept_value_and_one_index_updates_only_its_own(tiny_config, tmp_path):
  from nanodecoder import summary
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, [{}, {'train.learning_rate': 0.05, 'train.min_learning_rate': 0.05}])
  sweep_lib.write_manifest(tmp_path, sweep, base)
  _, fields, points = summary.find_points(tmp_path)
  assert fields == ['learning_rate', 'min_learning_rate']
  assert points[0][:2] == ('base', {'learning_rate': base.train.learning_rate,  # the base point's values, too
                                    'min_learning_rate': base.train.min_learning_rate})
  longer = tiny_config(**{'train.num_steps': 2 * base.train.num_steps})  # `--sweep_index 1` with an override
  sweep_lib.write_manifest(tmp_path, sweep, longer, only=sweep.points[1])
  assert [num_steps for *_, num_steps in summary.find_points(tmp_path)[2]] == [base.train.num_steps,
                                                                               longer.train.num_steps]
  manifest = json.loads((tmp_path / 'sweep.json').read_text())  # one written before manifests held the values:
  for entry in manifest['points']:
    del entry['values']
  (tmp_path / 'sweep.json').write_text(json.dumps(manifest))
  sweep_lib.write_manifest(tmp_path, sweep, base, only=sweep.points[1])  # rewritten whole
  assert all('values' in entry for entry in json.loads((tmp_path / 'sweep.json').read_text())['points'])
  other = sweep_lib.make_sweep('y.py', base, {'seed': [3, 4]})  # another sweep's index in the same root:
  sweep_lib.write_manifest(tmp_path, other, base, only=other.points[1])  # rewritten whole, not left half the first's
  assert [e['name'] for e in json.loads((tmp_path / 'sweep.json').read_text())['points']] == ['seed=3', 'seed=4']


def test_data_is_prepared_once_per_corpus_before_the_points(tiny_config, monkeypatch):
  from nanodecoder import data as data_lib
  loads = []
  monkeypatch.setattr(data_lib, 'load_dataset', lambda config: loads.append(('text', config.model.context_length)))
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'model.context_length': [8, 16], 'seed': [1, 2]})
  sweep_lib.prepare_data(sweep, base)
  assert loads == [('text', 8), ('text', 16)]  # a text file: checked once per context length
  loads.clear()
  splits = lambda data: loads.append(('tfds', data.tfds_name)) or ('tfds tiny', ['train', 'validation', 'test'])
  monkeypatch.setattr(data_lib, 'source_splits', splits)
  base = tiny_config(**{'data.source': 'tfds', 'data.text_path': ''})
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2, 3]})
  sweep_lib.prepare_data(sweep, base)  # prepared here, once, for its split names
  assert loads == [('tfds', 'tiny_shakespeare')]
  sweep = sweep_lib.make_sweep('x.py', base, [{'seed': 1}, {'seed': 2, 'data.eval_split': 'valid'}])
  with pytest.raises(data_lib.DataError, match=r"^sweep point 1 \(seed=2,eval_split=valid\): split 'valid' \(in "
                                               r"data.eval_split='valid'\) does not exist in tfds tiny; available: "
                                               r'train, validation, test$'):
    sweep_lib.prepare_data(sweep, base)


def test_a_point_whose_saved_config_is_damaged_is_named(tiny_config, tmp_path):
  base = tiny_config()
  sweep = sweep_lib.make_sweep('x.py', base, {'seed': [1, 2]})
  workdir = sweep.workdir(tmp_path, sweep.points[1])
  started_point(workdir, sweep_lib.point_config(base, sweep.points[1]), 10)
  (workdir / 'config.json').write_text('{"model": ')
  with pytest.raises(ConfigError, match=rf'^sweep point 1 \(seed=2\): cannot read {re.escape(str(workdir))}/config.json '
                                        r'\(.*\); restore it, or delete that folder to train the point again$'):
    sweep_lib.check_saved_configs(sweep, base, tmp_path)


def test_a_point_process_leaves_the_record_to_a_run_that_took_the_point_after_its_session(tiny_config, tmp_path,
                                                                                          monkeypatch):
  """A session records how it ended before it releases the workdir; from then on the record is the next run's (e.g.
  a --sweep_index job that took the point), even when the error that ended the session is still on its way out."""
  from nanodecoder import cli
  record = tmp_path / sweep_lib.FAILED
  released = []

  def train_command(config, workdir, while_locked):
    try:
      with while_locked():  # this session holds the workdir
        raise FloatingPointError('loss became nan at step 3')
    finally:  # released: another job takes the point, and its session records itself
      released.append(sweep_lib.recorded_failure(workdir))
      sweep_lib.record_failure(workdir, sweep_lib.UNEXPLAINED)

  monkeypatch.setattr(cli, 'train_command', train_command)
  with pytest.raises(FloatingPointError):
    cli.train_point(tiny_config(), tmp_path)
  assert released == ['failed (FloatingPointError: loss became nan at step 3)']
  assert record.read_text() == sweep_lib.UNEXPLAINED + '\n'
