"""Sweep summaries: summary.csv / summary.md numbers against the runs' own metrics, and the plots."""

import collections
import csv
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import warnings

import numpy as np
import pytest
from matplotlib import image as mpimg

from conftest import REPO, make_tiny_config
from nanodecoder import checkpoint as checkpoint_lib
from nanodecoder import summary as summary_lib
from nanodecoder import sweep as sweep_lib
from nanodecoder import train as train_lib
from nanodecoder.config import ConfigError
from nanodecoder.model import count_params


@pytest.fixture(scope='module')
def sweep_root(corpus_file, tmp_path_factory):
  """A sweep of three points: two trained for 20 steps, the third not started."""
  root = tmp_path_factory.mktemp('sweep')
  base = make_tiny_config(corpus_file)
  sweep = sweep_lib.make_sweep('tiny.py', base, {'seed': [1, 2, 3]})
  sweep_lib.write_manifest(root, sweep, base)
  for point in sweep.points[:2]:
    train_lib.train_and_evaluate(sweep_lib.point_config(base, point), sweep.workdir(root, point))
  summary_lib.write_summary(root)
  return root


def records(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_summary_csv_numbers_are_the_runs_own(sweep_root):
  rows = list(csv.DictReader((sweep_root / 'summary.csv').open()))
  assert [(r['point'], r['seed'], r['status']) for r in rows] == [
      ('seed=1', '1', 'finished'), ('seed=2', '2', 'finished'), ('seed=3', '3', 'new')]
  for row in rows[:2]:
    workdir = sweep_root / row['point']
    lines = records(workdir)
    evals = [r for r in lines if 'eval/val_loss' in r]
    best = min(evals, key=lambda r: r['eval/val_loss'])
    speeds = [r['train/tokens_per_s'] for r in lines if r.get('train/tokens_per_s', 0) > 0]
    model, _, _, step = checkpoint_lib.load_model(workdir)
    assert float(row['best_val_loss']) == best['eval/val_loss'] and int(row['best_val_step']) == best['step']
    assert float(row['best_val_bits_per_char']) == pytest.approx(best['eval/val_loss'] / math.log(2))  # characters
    assert float(row['final_val_loss']) == evals[-1]['eval/val_loss']
    assert float(row['final_train_loss']) == evals[-1]['eval/train_loss']
    assert float(row['tokens_per_s']) == statistics.median(speeds)
    assert float(row['wall_time_s']) == pytest.approx(lines[-1]['time'] - lines[0]['session_start'])
    assert int(row['params']) == count_params(model)
    assert (int(row['step']), int(row['num_steps'])) == (step, 20) == (20, 20)
  assert rows[2] == {'point': 'seed=3', 'seed': '3', 'status': 'new', 'step': '0', 'num_steps': '20', 'params': '',
                     'best_val_loss': '', 'best_val_step': '', 'best_val_bits_per_char': '', 'final_val_loss': '',
                     'final_train_loss': '', 'tokens_per_s': '', 'wall_time_s': ''}


def test_summary_md_is_the_same_table(sweep_root):
  text = (sweep_root / 'summary.md').read_text()
  rows = {r['point']: r for r in csv.DictReader((sweep_root / 'summary.csv').open())}
  best = min((r for r in rows.values() if r['best_val_loss']), key=lambda r: float(r['best_val_loss']))
  assert text.startswith('# Summary of sweep tiny (tiny.py)\n\n3 points, 2 finished. Lowest val loss: '
                         f'{float(best["best_val_loss"]):.4f} ({best["point"]}, step 20).')
  header = ('| point | seed | status | step | params | best val loss | final val loss | final train loss | tokens/s | '
            'wall time |')
  assert header in text
  for name in ('seed=1', 'seed=2'):
    r = rows[name]
    loss = f'{float(r["best_val_loss"]):.4f}'
    loss = f'**{loss}**' if r is best else loss
    assert (f'| {name} | {r["seed"]} | finished | 20/20 | {int(r["params"]):,} | {loss} | {float(r["final_val_loss"]):.4f} | '
            f'{float(r["final_train_loss"]):.4f} | {float(r["tokens_per_s"]):,.0f} |') in text
  assert '| seed=3 | 3 | new | 0/20 |  |  |  |  |  |  |' in text
  assert '![val_loss.png](val_loss.png)' in text and '![loss_curves.png](loss_curves.png)' in text


@pytest.mark.parametrize('name, min_size', [('val_loss.png', (300, 450)), ('loss_curves.png', (300, 800))])
def test_plots_are_written_and_not_blank(sweep_root, name, min_size):
  pixels = mpimg.imread(sweep_root / name)
  assert pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1] and pixels.shape[2] in (3, 4)
  assert pixels[..., :3].std() > 0.05  # axes, lines and text, not an empty canvas
  assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.005  # some dark ink


def test_read_metrics_keeps_the_last_record_of_a_step_and_sums_sessions(tmp_path):
  lines = [
      {'step': 10, 'time': 105.0, 'session_start': 100.0, 'train/loss': 3.0, 'train/tokens_per_s': 0.0},
      {'step': 20, 'time': 110.0, 'session_start': 100.0, 'train/loss': 2.9, 'train/tokens_per_s': 1000.0},
      {'step': 20, 'time': 111.0, 'session_start': 100.0, 'eval/train_loss': 2.8, 'eval/val_loss': 2.95},
      {'step': 30, 'time': 115.0, 'session_start': 100.0, 'train/loss': 2.7, 'train/tokens_per_s': 1000.0},
      # crashed after step 30, resumed from the checkpoint at step 20:
      {'step': 30, 'time': 212.0, 'session_start': 200.0, 'train/loss': 2.75, 'train/tokens_per_s': 3000.0},
      {'step': 30, 'time': 213.0, 'session_start': 200.0, 'eval/train_loss': 2.6, 'eval/val_loss': 2.9},
  ]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines) + '{"step": 40, "ti')
  metrics = summary_lib.read_metrics(tmp_path)
  assert {s: r['train/loss'] for s, r in metrics.train.items()} == {10: 3.0, 20: 2.9, 30: 2.75}
  assert {s: r['eval/val_loss'] for s, r in metrics.evals.items()} == {20: 2.95, 30: 2.9}
  assert metrics.wall_time_s == 15.0 + 13.0
  (tmp_path / 'checkpoints' / '30').mkdir(parents=True)
  row = summary_lib.run_row(tmp_path, num_steps=50)
  assert (row['status'], row['step'], row['num_steps']) == ('partial', 30, 50)
  assert (row['best_val_loss'], row['best_val_step'], row['final_train_loss']) == (2.9, 30, 2.6)
  assert row['tokens_per_s'] == 2000.0  # median of the timed windows (0 marks a window without timed steps)
  # A run trained past the sweep's length is reported at that length: losses, speed and wall time
  cut = summary_lib.read_metrics(tmp_path, up_to_step=20)
  assert (sorted(cut.train), sorted(cut.evals), cut.wall_time_s) == ([10, 20], [20], 11.0)
  row = summary_lib.run_row(tmp_path, num_steps=20)
  assert (row['best_val_loss'], row['final_train_loss'], row['tokens_per_s'], row['wall_time_s']) == (
      2.95, 2.8, 1000.0, 11.0)


def test_a_run_without_evaluations_gets_curves_but_no_val_loss_plot(tmp_path):
  lines = [{'step': s, 'time': 100.0 + s, 'session_start': 100.0, 'train/loss': 3.0 - s / 100} for s in (10, 20)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  (tmp_path / 'checkpoints' / '20').mkdir(parents=True)
  (tmp_path / 'val_loss.png').write_bytes(b'an earlier summary drew it')
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # e.g. matplotlib's legend without labels
    written = summary_lib.write_summary(tmp_path)
  assert [p.name for p in written] == ['summary.csv', 'summary.md', 'loss_curves.png']
  assert not (tmp_path / 'val_loss.png').exists()  # not left beside a summary.md that does not show it
  assert '| ' + tmp_path.name + ' | unknown | 20/? |  |  |  |  |  | 20s |' in (tmp_path / 'summary.md').read_text()


def test_summary_of_a_folder_of_runs_and_of_one_run(sweep_root, tmp_path):
  runs = tmp_path / 'runs'
  runs.mkdir()
  (runs / 'lr=0.5,tag=a').symlink_to(sweep_root / 'seed=1')
  (runs / 'lr=0.25,tag=b').symlink_to(sweep_root / 'seed=2')
  written = summary_lib.write_summary(runs)
  assert [p.name for p in written] == ['summary.csv', 'summary.md', 'val_loss.png', 'loss_curves.png']
  rows = list(csv.DictReader((runs / 'summary.csv').open()))
  assert [(r['point'], r['lr'], r['tag']) for r in rows] == [('lr=0.25,tag=b', '0.25', 'b'),
                                                             ('lr=0.5,tag=a', '0.5', 'a')]
  summary_lib.write_summary(sweep_root / 'seed=1')
  one = list(csv.DictReader((sweep_root / 'seed=1' / 'summary.csv').open()))
  assert len(one) == 1 and one[0]['point'] == 'seed=1' and one[0]['status'] == 'finished'
  assert '\n1 point, 1 finished.' in (sweep_root / 'seed=1' / 'summary.md').read_text()
  with pytest.raises(FileNotFoundError, match='no runs in'):
    summary_lib.write_summary(tmp_path / 'runs' / 'lr=0.5,tag=a' / 'checkpoints')


def test_a_run_copied_without_its_config_is_read_from_its_latest_checkpoint(sweep_root, tmp_path):
  import shutil

  runs = tmp_path / 'runs'
  for name, drop in (('with_config', ()), ('no_config', ('config.json', 'tokenizer.json')),
                     ('only_checkpoints', ('config.json', 'tokenizer.json', 'metrics.jsonl', 'summary.csv',
                                           'summary.md', 'loss_curves.png'))):
    shutil.copytree(sweep_root / 'seed=1', runs / name, ignore=shutil.ignore_patterns(*drop))
  shutil.copytree(sweep_root / 'seed=1', runs / 'damaged_tokenizer')
  (runs / 'damaged_tokenizer' / 'tokenizer.json').write_text('{"kind": "char", "cha')  # the checkpoint's is read
  summary_lib.write_summary(runs)
  rows = {r.pop('point'): r for r in csv.DictReader((runs / 'summary.csv').open())}
  assert rows['with_config']['status'] == 'finished' and rows['with_config']['params'] != ''
  assert rows['no_config'] == rows['with_config']  # status 'finished', step 20 of 20, its parameter count, its losses
  assert rows['damaged_tokenizer'] == rows['with_config']
  no_losses = dict(rows['with_config'], best_val_loss='', best_val_step='', best_val_bits_per_char='',
                   final_val_loss='', final_train_loss='', tokens_per_s='', wall_time_s='')
  assert rows['only_checkpoints'] == no_losses
  step = sweep_lib.latest_step(runs / 'no_config')
  (runs / 'no_config' / 'checkpoints' / str(step) / 'meta' / 'metadata').write_text('{"config": 3')  # damaged
  summary_lib.write_summary(runs)
  rows = {r.pop('point'): r for r in csv.DictReader((runs / 'summary.csv').open())}
  row = rows['no_config']  # its length unknown: neither finished nor not, but its checkpoint's losses
  assert (row['status'], row['step'], row['num_steps'], row['params']) == ('unknown', '20', '', '')
  assert row['final_val_loss'] == rows['with_config']['final_val_loss'] != ''


def test_summary_mode_rewrites_the_files(sweep_root):
  (sweep_root / 'summary.md').unlink()
  (sweep_root / 'val_loss.png').unlink()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, 'launch.py', '--mode', 'summary', '--workdir', str(sweep_root)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('# Summary of sweep tiny (tiny.py)')
  assert f'wrote {sweep_root / "summary.csv"}, {sweep_root / "summary.md"}' in result.stdout
  assert (sweep_root / 'summary.md').is_file() and (sweep_root / 'val_loss.png').stat().st_size > 1000


def fake_run(workdir, config=None, step=20, val_loss=None, bits_per_char=None):
  """A run's files without training: a checkpoint at `step`, config.json, a log line and an evaluation there
  (with `bits_per_char`, as a BPE run logs it)."""
  (workdir / 'checkpoints' / str(step)).mkdir(parents=True, exist_ok=True)
  if config is not None:
    (workdir / 'config.json').write_text(config.to_json(indent=2))
  when = {'step': step, 'time': 110.0, 'session_start': 100.0}
  lines = [{**when, 'train/loss': 2.6}]
  if val_loss is not None:
    lines.append({**when, 'eval/train_loss': 2.5, 'eval/val_loss': val_loss})
    if bits_per_char is not None:
      lines[-1]['eval/val_bits_per_char'] = bits_per_char
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))


def test_points_with_different_fields_get_every_column(tiny_config, tmp_path):
  base = tiny_config()
  sweep = sweep_lib.make_sweep('tiny.py', base, [{'model.dropout': 0.1}, {'model.dropout': 0.0, 'eval.every': 5}])
  sweep_lib.write_manifest(tmp_path, sweep, base)
  for point, loss in zip(sweep.points, (2.5, 2.4)):
    fake_run(sweep.workdir(tmp_path, point), val_loss=loss)
  written = summary_lib.write_summary(tmp_path)
  assert [p.name for p in written] == ['summary.csv', 'summary.md', 'val_loss.png', 'loss_curves.png']
  rows = list(csv.DictReader((tmp_path / 'summary.csv').open()))
  assert [(r['point'], r['dropout'], r['every'], r['best_val_loss']) for r in rows] == [
      ('dropout=0.1', '0.1', '10', '2.5'), ('dropout=0,every=5', '0.0', '5', '2.4')]  # 10: the base config's
  text = (tmp_path / 'summary.md').read_text()
  assert '| dropout=0.1 | 0.1 | 10 | finished | 20/20 |' in text
  assert '| dropout=0,every=5 | 0.0 | 5 | finished | 20/20 |' in text

  runs = tmp_path / 'runs'  # a folder of runs: 'tag=c' has no x value (lr), so no point of the plot
  for name, loss in (('lr=0.5', 2.5), ('lr=0.25,tag=b', 2.4), ('tag=c', 2.3)):
    fake_run(runs / name, val_loss=loss)
  assert [p.name for p in summary_lib.write_summary(runs)][:3] == ['summary.csv', 'summary.md', 'val_loss.png']
  rows = list(csv.DictReader((runs / 'summary.csv').open()))
  assert [(r['point'], r['lr'], r['tag']) for r in rows] == [('lr=0.25,tag=b', '0.25', 'b'), ('lr=0.5', '0.5', ''),
                                                             ('tag=c', '', 'c')]
  fake_run(runs / 'lr=0.5')
  fake_run(runs / 'lr=0.25,tag=b')
  assert 'val_loss.png' not in [p.name for p in summary_lib.write_summary(runs)]  # only tag=c has a val loss


def test_status_counts_to_the_manifests_num_steps(tiny_config, tmp_path):
  base = tiny_config(**{'train.num_steps': 40, 'train.decay_steps': 40})
  sweep = sweep_lib.make_sweep('tiny.py', base, {'seed': [1, 2]})
  for point in sweep.points:  # both stopped at step 20 by an earlier session of 20 steps
    fake_run(sweep.workdir(tmp_path, point), sweep_lib.point_config(tiny_config(**{'train.decay_steps': 40}), point))
  sweep_lib.write_manifest(tmp_path, sweep, base)
  summary_lib.write_summary(tmp_path)
  rows = list(csv.DictReader((tmp_path / 'summary.csv').open()))
  assert [(r['status'], r['step'], r['num_steps']) for r in rows] == [('partial', '20', '40')] * 2
  assert sweep_lib.listing(sweep, base, tmp_path).count('partial (20/40)') == 2


def test_a_run_trained_past_the_manifests_num_steps_is_reported_at_that_length(tiny_config, tmp_path):
  """A sweep extended to 60 steps, then rerun with its first command (num_steps 40): the table is the 40-step
  sweep's (not step-60 losses under num_steps 40)."""
  base = tiny_config(**{'train.num_steps': 40, 'train.decay_steps': 40})
  sweep = sweep_lib.make_sweep('tiny.py', base, {'seed': [1]})
  workdir = sweep.workdir(tmp_path, sweep.points[0])
  fake_run(workdir, sweep_lib.point_config(base, sweep.points[0]), step=60)
  lines = [{'step': step, 'time': 110.0, 'session_start': 100.0, 'eval/train_loss': loss + 0.1, 'eval/val_loss': loss}
           for step, loss in ((20, 2.7), (40, 2.5), (60, 2.2))]
  with (workdir / 'metrics.jsonl').open('a') as f:
    f.write(''.join(json.dumps(line) + '\n' for line in lines))
  sweep_lib.write_manifest(tmp_path, sweep, base)
  summary_lib.write_summary(tmp_path)
  [row] = csv.DictReader((tmp_path / 'summary.csv').open())
  assert (row['status'], row['step'], row['num_steps']) == ('finished', '60', '40')
  assert (row['final_val_loss'], row['best_val_loss'], row['best_val_step']) == ('2.5', '2.5', '40')


def write_records(workdir, steps, val_losses, session_start=100.0):
  """metrics.jsonl of a session that logged a train and an eval record at each step (time: start + step)."""
  lines = []
  for step, loss in zip(steps, val_losses):
    when = {'step': step, 'time': session_start + step, 'session_start': session_start}
    lines += [{**when, 'train/loss': loss, 'train/tokens_per_s': 100.0 * step},
              {**when, 'eval/train_loss': loss - 0.1, 'eval/val_loss': loss}]
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))


def test_an_unfinished_point_is_reported_at_its_latest_checkpoint(tiny_config, tmp_path):
  """Steps logged after the latest checkpoint are trained again on resume: not in the table, nor in the curves."""
  base = tiny_config(**{'train.num_steps': 40, 'train.decay_steps': 40})
  sweep = sweep_lib.make_sweep('tiny.py', base, {'seed': [1, 2]})
  sweep_lib.write_manifest(tmp_path, sweep, base)
  partial, new = (sweep.workdir(tmp_path, point) for point in sweep.points)
  write_records(partial, [10, 20, 30], [2.7, 2.5, 2.2])  # stopped after step 30, its checkpoint at 20
  (partial / 'checkpoints' / '20').mkdir(parents=True)
  write_records(new, [10], [2.6])  # stopped before its first checkpoint
  summary_lib.write_summary(tmp_path)
  rows = list(csv.DictReader((tmp_path / 'summary.csv').open()))
  assert rows[0] == {'point': 'seed=1', 'seed': '1', 'status': 'partial', 'step': '20', 'num_steps': '40',
                     'params': '', 'best_val_loss': '2.5', 'best_val_step': '20', 'best_val_bits_per_char': '',
                     'final_val_loss': '2.5', 'final_train_loss': '2.4', 'tokens_per_s': '1500.0', 'wall_time_s': '20.0'}
  assert rows[1] == {'point': 'seed=2', 'seed': '2', 'status': 'new', 'step': '0', 'num_steps': '40', 'params': '',
                     'best_val_loss': '', 'best_val_step': '', 'best_val_bits_per_char': '', 'final_val_loss': '',
                     'final_train_loss': '', 'tokens_per_s': '', 'wall_time_s': ''}
  assert '\n2 points, 0 finished. Lowest val loss: 2.5000 (seed=1, step 20).' in (tmp_path / 'summary.md').read_text()
  cut = summary_lib.read_metrics(partial, summary_lib.reported_step(partial, 40))  # what the curves draw
  assert (sorted(cut.train), sorted(cut.evals)) == ([10, 20], [10, 20])
  assert summary_lib.read_metrics(new, summary_lib.reported_step(new, 40)) == summary_lib.RunMetrics({}, {}, None)


def test_a_single_run_is_reported_up_to_its_own_num_steps(tiny_config, tmp_path):
  """A workdir whose metrics.jsonl goes past its config.json's num_steps (20), e.g. reused for a shorter run."""
  (tmp_path / 'config.json').write_text(tiny_config().to_json(indent=2))
  write_records(tmp_path, [10, 20, 30, 40], [2.7, 2.5, 2.3, 2.1])
  (tmp_path / 'checkpoints' / '40').mkdir(parents=True)
  summary_lib.write_summary(tmp_path)
  [row] = csv.DictReader((tmp_path / 'summary.csv').open())
  assert (row['status'], row['step'], row['num_steps']) == ('finished', '40', '20')
  assert (row['best_val_loss'], row['best_val_step'], row['final_val_loss']) == ('2.5', '20', '2.5')
  assert (row['tokens_per_s'], row['wall_time_s']) == ('1500.0', '20.0')


def test_sweeping_a_field_named_like_a_metric_column_gives_one_column(tiny_config, tmp_path):
  base = tiny_config()
  sweep = sweep_lib.make_sweep('tiny.py', base, {'train.num_steps': [10, 20], 'train.decay_steps': [10, 20]})
  sweep_lib.write_manifest(tmp_path, sweep, base)
  for point in sweep.points:
    fake_run(sweep.workdir(tmp_path, point), sweep_lib.point_config(base, point))
  summary_lib.write_summary(tmp_path)
  header = (tmp_path / 'summary.csv').read_text().splitlines()[0].split(',')
  assert header.count('num_steps') == 1 and header[:3] == ['point', 'num_steps', 'decay_steps']


def test_a_diverged_run_is_not_the_best(tmp_path):
  """NaN compares as neither lower nor higher: min() over it would crown whatever came first."""
  for name, losses in (('lr=1e+06', [float('nan')]), ('lr=0.001', [2.5, 2.4]), ('lr=0.1', [2.3, float('inf')])):
    workdir = tmp_path / name
    workdir.mkdir()
    lines = [{'step': 10 * (i + 1), 'time': 110.0, 'session_start': 100.0, 'eval/val_loss': loss}
             for i, loss in enumerate(losses)]
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    (workdir / 'checkpoints' / str(lines[-1]['step'])).mkdir(parents=True)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # e.g. matplotlib's legend without labels: these runs logged no train loss
    written = summary_lib.write_summary(tmp_path)
  assert [p.name for p in written] == ['summary.csv', 'summary.md', 'val_loss.png', 'loss_curves.png']  # val curves
  rows = {r['point']: r for r in csv.DictReader((tmp_path / 'summary.csv').open())}
  assert rows['lr=1e+06']['best_val_loss'] == '' and rows['lr=1e+06']['final_val_loss'] == 'nan'
  assert (rows['lr=0.1']['best_val_loss'], rows['lr=0.1']['best_val_step']) == ('2.3', '10')
  assert 'Lowest val loss: 2.3000 (lr=0.1, step 10).' in (tmp_path / 'summary.md').read_text()


@pytest.mark.parametrize('text, error', [
    ('{"name": "blocks"', 'JSONDecodeError'), ('[]', 'TypeError'),
    ('{"name": "b", "config": "b.py", "fields": ["seed"], "points": [{"name": "s", "overrides": {}, "values": [1]}]}',
     'AttributeError'),
])
def test_a_damaged_sweep_manifest_is_one_error(tmp_path, text, error):
  (tmp_path / sweep_lib.MANIFEST).write_text(text)
  with pytest.raises(ConfigError, match=rf'sweep.json is damaged \({error}: .*\); rerun the sweep command'):
    summary_lib.write_summary(tmp_path)


def test_a_sweeps_fields_whose_last_parts_clash_stay_dotted(tiny_config, tmp_path):
  base = tiny_config()
  sweep = sweep_lib.make_sweep('tiny.py', base, {'eval.every': [5], 'checkpoint.every': [5, 10]})
  sweep_lib.write_manifest(tmp_path, sweep, base)
  _, fields, points = summary_lib.find_points(tmp_path)
  assert fields == ['eval.every', 'checkpoint.every']
  assert [values for _, values, _ in points] == [{'eval.every': 5, 'checkpoint.every': 5},
                                                 {'eval.every': 5, 'checkpoint.every': 10}]


def test_a_folder_of_runs_is_read_by_folder_name(tmp_path, monkeypatch):
  """Fields from the `field=value` parts (ints stay ints; a part without '=' is no field), rows in name order,
  speed the median, and one best val loss in bold where two runs tie."""
  listed = pathlib.Path.iterdir
  monkeypatch.setattr(pathlib.Path, 'iterdir', lambda self: iter(sorted(listed(self), reverse=True)))
  for name, steps, losses in (('layers=10,tag=b', [10], [2.6]), ('layers=2,lr=0.5,baseline', [10], [2.4]),
                              ('layers=4,lr=0.5,tag=a', [10, 20, 60], [2.7, 2.5, 2.4])):
    write_records(tmp_path / name, steps, losses)  # tokens/s: 100 x step
    (tmp_path / name / 'checkpoints' / str(steps[-1])).mkdir(parents=True)
  summary_lib.write_summary(tmp_path)
  rows = list(csv.DictReader((tmp_path / 'summary.csv').open()))
  assert list(rows[0]) == ['point', 'layers', 'tag', 'lr', *summary_lib.METRIC_COLUMNS]
  assert [(r['point'], r['layers'], r['tag'], r['lr'], r['tokens_per_s']) for r in rows] == [
      ('layers=10,tag=b', '10', 'b', '', '1000.0'), ('layers=2,lr=0.5,baseline', '2', '', '0.5', '1000.0'),
      ('layers=4,lr=0.5,tag=a', '4', 'a', '0.5', '2000.0')]
  text = (tmp_path / 'summary.md').read_text()
  assert 'Lowest val loss: 2.4000 (layers=2,lr=0.5,baseline, step 10).' in text and text.count('**') == 2
  assert '| layers=2,lr=0.5,baseline | 2 |  | 0.5 | unknown | 10/? |  | **2.4000** |' in text


def test_a_summary_without_curves_removes_the_earlier_plots(tmp_path):
  (tmp_path / 'checkpoints' / '20').mkdir(parents=True)  # a run copied without its log
  for name in ('val_loss.png', 'loss_curves.png'):
    (tmp_path / name).write_bytes(b'an earlier summary drew it')
  assert [p.name for p in summary_lib.write_summary(tmp_path)] == ['summary.csv', 'summary.md']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoints', 'summary.csv', 'summary.md']  # no sweep lock
  assert '![' not in (tmp_path / 'summary.md').read_text()


def test_runs_of_different_bpe_vocabularies_are_ranked_by_bits_per_character(tmp_path, monkeypatch):
  """Nats per token of 512 tokens and of characters do not compare: the summary names the lowest val bits per
  character instead (logged by a BPE run, val loss / ln 2 for characters) and plots them."""
  from nanodecoder.tokenizer import Tokenizer

  reads, read_tokenizer = collections.Counter(), checkpoint_lib.run_tokenizer
  monkeypatch.setattr(checkpoint_lib, 'run_tokenizer', lambda run: reads.update([run.name]) or read_tokenizer(run))
  figures = {}
  monkeypatch.setattr(summary_lib, 'save_png', lambda figure, path: figures.update({path.name: figure}))
  characters, merges = Tokenizer('abc'), Tokenizer('abc', [(0, 1)])
  for name, loss, tokenizer in (('vocab_size=0', 2.5, characters), ('vocab_size=4', 3.5, merges),
                                ('vocab_size=65', 2.4, characters)):
    fake_run(tmp_path / name, val_loss=loss)  # the BPE run as one from before bits per character were logged
    (tmp_path / name / 'tokenizer.json').write_text(tokenizer.to_json())
  summary_lib.write_summary(tmp_path)
  text = (tmp_path / 'summary.md').read_text()
  assert ('3 points, 0 finished. Val losses are per token of different vocabularies (data.vocab_size), not '
          'comparable: compare the bits per character of `--mode eval`.\n') in text
  assert 'Lowest' not in text and '**' not in text
  assert reads == {'vocab_size=0': 1, 'vocab_size=4': 1, 'vocab_size=65': 1}  # (for parameters and vocabularies alike)
  fake_run(tmp_path / 'vocab_size=4', val_loss=3.5, bits_per_char=3.0)
  summary_lib.write_summary(tmp_path)
  text = (tmp_path / 'summary.md').read_text()
  assert ('3 points, 0 finished. Val losses are per token of different vocabularies (data.vocab_size), not '
          'comparable; bits per character are. Lowest val bits per character: 3.0000 (vocab_size=4, step 20).') in text
  assert '| best val loss | val bits/char |' in text and '| 3.5000 | **3.0000** |' in text
  assert f'| 2.4000 | {2.4 / math.log(2):.4f} |' in text
  rows = {r['point']: r for r in csv.DictReader((tmp_path / 'summary.csv').open())}
  assert float(rows['vocab_size=0']['best_val_bits_per_char']) == pytest.approx(2.5 / math.log(2))
  axes = figures['val_loss.png'].axes[0]
  assert axes.get_ylabel() == 'val bits per character (at the best val loss)'
  assert len(axes.lines) == 1 and axes.lines[0].get_xdata().tolist() == [0, 4, 65]  # ('data.vocab_size' 65: no merges)
  np.testing.assert_allclose(axes.lines[0].get_ydata(), [2.5 / math.log(2), 3.0, 2.4 / math.log(2)])
  train_axes, val_axes = figures['loss_curves.png'].axes  # val curves in bits per character too
  assert (val_axes.get_title(), val_axes.get_ylabel()) == ('val bits per character', 'bits per character')
  np.testing.assert_allclose(sorted(y for line in val_axes.lines for y in line.get_ydata()),
                             [3.0, 2.4 / math.log(2), 2.5 / math.log(2)])
  assert [line.get_marker() for line in train_axes.lines] == ['o'] * 3  # one train record each: a dot, not nothing
  shutil.rmtree(tmp_path / 'vocab_size=4')  # BPE not evaluated yet: the scored ones share tokens, the lowest is named
  fake_run(tmp_path / 'vocab_size=4')
  (tmp_path / 'vocab_size=4' / 'tokenizer.json').write_text(merges.to_json())
  summary_lib.write_summary(tmp_path)
  text = (tmp_path / 'summary.md').read_text()
  assert '3 points, 0 finished. Lowest val loss: 2.4000 (vocab_size=65, step 20).' in text and 'bits/char' not in text
  assert figures['val_loss.png'].axes[0].get_ylabel() == 'best val loss (nats/token)'


def test_bits_per_character_are_the_best_steps_and_a_bpe_run_without_its_tokenizer_is_told_by_them(tmp_path,
                                                                                                    monkeypatch):
  from nanodecoder.tokenizer import Tokenizer

  reads, read_tokenizer = collections.Counter(), checkpoint_lib.run_tokenizer
  monkeypatch.setattr(checkpoint_lib, 'run_tokenizer', lambda run: reads.update([run.name]) or read_tokenizer(run))
  for name, chars, loss in (('seed=1', 'abc', 2.5), ('seed=2', 'abcd', 2.4)):  # other characters: still per character
    fake_run(tmp_path / name, val_loss=loss)
    (tmp_path / name / 'tokenizer.json').write_text(Tokenizer(chars).to_json())
  summary_lib.write_summary(tmp_path)
  assert '2 points, 0 finished. Lowest val loss: 2.4000 (seed=2, step 20).' in (tmp_path / 'summary.md').read_text()
  # A BPE run copied without tokenizer.json or a readable checkpoint record: its logged bits say it is one. Its best
  # val loss is at step 10, not its last evaluation.
  (tmp_path / 'seed=3' / 'checkpoints' / '20').mkdir(parents=True)
  records = [{'step': step, 'time': 110.0, 'session_start': 100.0, 'eval/train_loss': 3.0, 'eval/val_loss': loss,
              'eval/val_bits_per_char': bits} for step, loss, bits in ((10, 3.0, 3.3), (20, 3.1, 3.4))]
  (tmp_path / 'seed=3' / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  reads.clear()
  summary_lib.write_summary(tmp_path)
  text = (tmp_path / 'summary.md').read_text()
  assert 'not comparable; bits per character are. Lowest val bits per character: 3.3000 (seed=3, step 10).' in text
  rows = {r['point']: r for r in csv.DictReader((tmp_path / 'summary.csv').open())}
  assert (rows['seed=3']['best_val_step'], rows['seed=3']['best_val_bits_per_char'], rows['seed=3']['params']) == (
      '10', '3.3', '')
  assert reads == {'seed=1': 1, 'seed=2': 1, 'seed=3': 1}  # (also the one it cannot read)
