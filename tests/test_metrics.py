"""Metrics: metrics.jsonl, TensorBoard event files, the progress bar and plain lines."""

import io
import json
import os
import re

import ml_collections
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

from nanodecoder import train as train_lib
from nanodecoder.metrics import MetricsLogger, Progress, flatten_config, format_duration
from nanodecoder.summary import read_metrics

TRAIN = {'train/loss': 2.5, 'train/lr': 1e-3, 'train/grad_norm': 0.5, 'train/ms_per_step': 4.0,
         'train/tokens_per_s': 32000.0}
EVAL = {'eval/train_loss': 2.4, 'eval/val_loss': 2.6}


class Terminal(io.StringIO):
  def isatty(self):
    return True


def load_events(workdir):
  accumulator = event_accumulator.EventAccumulator(str(workdir))
  accumulator.Reload()
  return accumulator


def hparams_of(accumulator):
  content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
  hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  return {name: getattr(value, value.WhichOneof('kind')) for name, value in hparams.items()}


def test_jsonl_and_tensorboard_hold_the_same_scalars_and_the_config(tiny_config, tmp_path):
  config = tiny_config()
  logger = MetricsLogger(tmp_path, stream=io.StringIO(), total_steps=20, config=config)
  logger.write(10, TRAIN)
  logger.write(10, EVAL)
  logger.write(20, {**TRAIN, 'train/loss': 2.0})
  # On disk at each write, before the file closes: TensorBoard shows a run while it trains.
  assert [(e.step, e.value) for e in load_events(tmp_path).Scalars('train/loss')] == [(10, 2.5), (20, 2.0)]
  logger.close()

  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines] == [10, 10, 20]
  assert lines[0].items() >= TRAIN.items() and lines[1].items() >= EVAL.items()
  assert len({line['session_start'] for line in lines}) == 1
  assert all(line['time'] >= line['session_start'] for line in lines)

  events = load_events(tmp_path)
  assert set(events.Tags()['scalars']) == set(TRAIN) | set(EVAL)
  assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [(10, 2.5), (20, 2.0)]
  assert [(e.step, pytest.approx(e.value)) for e in events.Scalars('eval/val_loss')] == [(10, 2.6)]
  assert events.Scalars('train/tokens_per_s')[0].value == 32000.0
  hparams = hparams_of(events)
  assert hparams == {k: v for k, v in flatten_config(config).items() if v is not None}
  assert hparams['model.num_layers'] == 2 and hparams['data.source'] == 'text' and hparams['model.use_bias'] is False


def test_a_resumed_session_replaces_what_was_logged_past_its_checkpoint(tmp_path):
  first = MetricsLogger(tmp_path, stream=io.StringIO())
  first.start(0)
  for step in (10, 20, 30):
    first.write(step, {'train/loss': 3.0})
  first.close()  # crashed after step 30; resumes from a checkpoint at step 20, logging every 4 steps
  second = MetricsLogger(tmp_path, stream=io.StringIO())
  second.start(20)
  for step in (24, 28, 32):
    second.write(step, {'train/loss': 1.0})
  second.close()
  expected = [(10, 3.0), (20, 3.0), (24, 1.0), (28, 1.0), (32, 1.0)]
  assert [(e.step, e.value) for e in load_events(tmp_path).Scalars('train/loss')] == expected
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['train/loss']) for r in records] == expected
  sessions = [r['session_start'] for r in records]
  assert sessions[:2] == [sessions[0]] * 2 and sessions[2:] == [sessions[2]] * 3 and sessions[2] > sessions[0]


def test_a_session_that_writes_nothing_drops_only_what_it_replaces_and_opens_nothing(tmp_path, monkeypatch):
  from nanodecoder import metrics as metrics_lib
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': step, 'train/loss': 3.0}) + '\n' for step in (10, 20)))
  monkeypatch.setattr(metrics_lib, 'open', lambda *a, **k: pytest.fail('opened metrics.jsonl'), raising=False)
  for start, kept in ((20, [10, 20]), (10, [10])):  # resumed at its last record's step: nothing to drop
    logger = MetricsLogger(tmp_path, stream=io.StringIO(), tensorboard=False)
    logger.start(start)
    logger.drop_replaced()
    logger.close()
    assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == kept


def test_a_record_cut_short_by_a_crash_does_not_swallow_the_next_sessions_first(tmp_path):
  first = MetricsLogger(tmp_path, stream=io.StringIO(), tensorboard=False)
  first.write(100, {'train/loss': 3.0})
  first.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as file:
    file.write('{"step": 200, "train/lo')  # the process died mid-write
  second = MetricsLogger(tmp_path, stream=io.StringIO(), tensorboard=False)
  second.write(200, {'train/loss': 2.0})
  second.close()
  assert sorted(read_metrics(tmp_path).train) == [100, 200]


def test_progress_bar_with_eta_on_a_terminal(tmp_path):
  out = Terminal()
  logger = MetricsLogger(tmp_path, stream=out, total_steps=40, tensorboard=False)
  logger.info('model: 1,234 parameters')
  logger.write(10, TRAIN)
  logger.write(20, TRAIN)
  logger.write(20, EVAL)
  logger.info('a message')
  logger.write(40, {**TRAIN, 'train/loss': 1.5})
  logger.close()
  text = out.getvalue()
  assert text.startswith('model: 1,234 parameters\nstep 10 |')  # no bar before the first step
  assert '\r\x1b[K' in text and text.endswith('\n')
  # The bar keeps the latest training loss through an evaluation's line.
  assert re.search(r'\r\x1b\[Ka message\n\[#+\.+\] 20/40 50%, ETA \d+s \| loss 2\.5000\r', text)
  assert re.search(r'\[#{5,}\.{10,}\] 10/40 25%, ETA \d+s \| loss 2\.5000', text)
  assert re.search(r'\[#+\] 40/40 100% done \| loss 1\.5000\n$', text)
  # Each line is printed whole after the bar is cleared; the bar is redrawn below it.
  assert '\r\x1b[Ka message\n[' in text
  visible = [line.rsplit('\r\x1b[K', 1)[-1] for line in text.split('\n')]
  assert 'step 20 | loss 2.5000 | lr 1.00e-03 | grad_norm 0.5000 | 4.0 ms/step | 32.0k tokens/s' in visible


def test_the_bar_fits_a_narrow_terminal(tmp_path, monkeypatch):
  # (a longer line would wrap, and '\r' then clear only its last row: the next redraw stacks bars)
  monkeypatch.setenv('COLUMNS', '40')
  out = Terminal()
  logger = MetricsLogger(tmp_path, stream=out, total_steps=40, tensorboard=False)
  logger.write(10, TRAIN)
  assert out.getvalue().split('\n')[-1] == '[##........] 10/40 25%, ETA 0s | loss 2'  # 10 cells at least, 39 columns


def test_plain_lines_elsewhere(tmp_path):
  out = io.StringIO()
  logger = MetricsLogger(tmp_path, stream=out, total_steps=40, tensorboard=False)
  logger.write(10, TRAIN)
  logger.write(10, EVAL)
  logger.write(40, TRAIN)
  logger.close()
  lines = out.getvalue().splitlines()
  assert '\r' not in out.getvalue() and '\x1b' not in out.getvalue()
  assert re.fullmatch(r'step 10 \| loss 2\.5000 \| .* \| 32\.0k tokens/s \| 25%, ETA \d+s', lines[0])
  assert lines[1] == 'step 10 | train_loss 2.4000 | val_loss 2.6000'
  assert lines[2].endswith('| 100% done')


def test_eta_is_the_steps_left_at_the_logged_speed_plus_the_pauses_to_come():
  progress = Progress(total_steps=1000)
  assert progress.eta is None and progress.text() == '0%'
  progress.update(100, {'train/ms_per_step': 40.0})
  progress.update(200, {'train/ms_per_step': 60.0})
  assert progress.eta == pytest.approx(800 * 0.05)  # the mean speed
  progress.took('evaluation', 200, 30.0, every=200)  # the session's first: it compiled, not counted
  progress.update(200, {'eval/val_loss': 2.0})
  assert progress.eta == pytest.approx(40)
  progress.update(300, {'train/ms_per_step': 50.0})
  progress.took('evaluation', 400, 10.0, every=200)
  progress.took('checkpoint', 300, 0.0, every=300)
  progress.took('checkpoint', 300, 2.0, every=300)
  progress.update(400, {})
  # Evaluations at 600, 800, 1000; checkpoints at 600, 900 and the last step.
  assert progress.eta == pytest.approx(600 * 0.05 + 3 * 10 + 3 * 2)
  assert progress.text() == '40%, ETA 1m06s'
  progress.update(1000, {'train/ms_per_step': 50.0})
  assert progress.eta == pytest.approx(10 + 2) and progress.text() == '100% done'  # (the last ones to come)
  assert [format_duration(s) for s in (5, 65, 3725)] == ['5s', '1m05s', '1h02m']


def test_durations_round_to_the_second_and_change_unit_at_a_minute_and_an_hour():
  expected = {0.4: '0s', 59.4: '59s', 59.6: '1m00s', 60: '1m00s', 3599: '59m59s', 3600: '1h00m', 7199: '1h59m',
              -2: '0s'}
  assert {seconds: format_duration(seconds) for seconds in expected} == expected


def test_flatten_config_names_a_nested_field_by_its_whole_path():
  config = ml_collections.ConfigDict({'model': {'attention': {'impl': 'xla', 'window': None}}, 'seed': 0})
  assert flatten_config(config) == {'model.attention.impl': 'xla', 'model.attention.window': None, 'seed': 0}
  assert flatten_config({'a': {'b': {'c': [1]}}, 'd': {}}) == {'a.b.c': [1]}  # (a saved config's JSON: dicts)


def test_training_writes_tensorboard_scalars_equal_to_metrics_jsonl(tiny_config, tmp_path):
  train_lib.train_and_evaluate(tiny_config(), tmp_path)
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  events = load_events(tmp_path)
  for tag in ('train/loss', 'train/lr', 'train/grad_norm', 'train/tokens_per_s', 'eval/val_loss'):
    expected = [(line['step'], pytest.approx(line[tag], rel=1e-6)) for line in lines if tag in line]
    assert [(e.step, e.value) for e in events.Scalars(tag)] == expected, tag
  assert hparams_of(events)['train.num_steps'] == 20
  speeds = [(r['train/tokens_per_s'], r['train/ms_per_step']) for r in lines if 'train/tokens_per_s' in r]
  assert speeds and all(tokens * ms / 1000 == pytest.approx(8 * 16) for tokens, ms in speeds)  # a step's targets


def test_a_damaged_byte_in_the_log_neither_stops_a_resume_nor_the_summary(tmp_path):
  first = MetricsLogger(tmp_path, stream=io.StringIO(), tensorboard=False)
  first.start(0)
  first.write(10, {'train/loss': 3.0})
  first.write(20, {'train/loss': 2.5})
  first.close()
  with open(tmp_path / 'metrics.jsonl', 'ab') as file:
    file.write(b'{"note": "\xff"}\n')  # not UTF-8
  assert sorted(read_metrics(tmp_path).train) == [10, 20]
  second = MetricsLogger(tmp_path, stream=io.StringIO(), tensorboard=False)
  second.start(10)  # resumed from step 10: step 20's record goes, the damaged line stays (not ours)
  second.write(20, {'train/loss': 2.0})
  second.close()
  assert {step: r['train/loss'] for step, r in read_metrics(tmp_path).train.items()} == {10: 3.0, 20: 2.0}
  assert '{"note": "\ufffd"}\n' in (tmp_path / 'metrics.jsonl').read_text(encoding='utf-8')  # (rewritten as U+FFFD)


def test_a_reader_that_went_away_ends_the_console_output_not_the_logging(tmp_path):
  # `launch.py | head`, or `launch.py | tee log` after a Ctrl-C, which ends tee too: training must go on (and a
  # Ctrl-C still save a checkpoint) rather than die at the next log line with a BrokenPipeError.
  read_end, write_end = os.pipe()
  os.close(read_end)
  with open(write_end, 'w') as stream:
    logger = MetricsLogger(tmp_path, stream=stream, total_steps=20, tensorboard=False)
    logger.write(10, TRAIN)
    logger.info('stopped by SIGINT after step 10; checkpoint saved, run the same command to resume')
    logger.write(20, EVAL)
    logger.close()
    print('final: train loss 2.4000 | val loss 2.6000', file=stream, flush=True)  # what comes later goes nowhere
  assert [(r['step'], len(r)) for r in map(json.loads, (tmp_path / 'metrics.jsonl').read_text().splitlines())] == [
      (10, 3 + len(TRAIN)), (20, 3 + len(EVAL))]


def test_dropping_replaced_records_after_the_sessions_first_write_keeps_its_records(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(json.dumps({'step': 20, 'train/loss': 3.0}) + '\n')  # logged past the checkpoint at 10
  logger = MetricsLogger(tmp_path, stream=io.StringIO(), tensorboard=False)
  logger.start(10)
  logger.write(11, {'train/loss': 2.5})  # drops step 20
  logger.drop_replaced()  # nothing more to drop: step 11 is this session's
  logger.write(12, {'train/loss': 2.4})
  logger.close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [11, 12]


def test_a_logger_of_another_process_leaves_metrics_jsonl_to_process_0(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  logged = ''.join(json.dumps({'step': step, 'train/loss': 3.0}) + '\n' for step in (10, 20)) + '{"step": 2'
  path.write_text(logged)
  logger = MetricsLogger(tmp_path, enabled=False, stream=io.StringIO(), tensorboard=False)
  logger.start(10)
  logger.drop_replaced()
  logger.write(11, {'train/loss': 2.5})
  logger.close()
  assert path.read_text() == logged
