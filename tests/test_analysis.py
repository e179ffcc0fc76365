"""Analysis of a checkpoint: attention maps (causal, rows summing to 1, drawn as PNGs) and the eval report."""

import json
import math
import re
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from matplotlib import image as mpimg

from conftest import REPO, make_tiny_config
from nanodecoder import analysis
from nanodecoder import checkpoint as checkpoint_lib
from nanodecoder import data as data_lib
from nanodecoder import train as train_lib
from nanodecoder.data import DataError


@pytest.fixture(scope='module')
def run(corpus_file, tmp_path_factory):
  """A tiny run whose evaluations are exact (every window of the validation text)."""
  workdir = tmp_path_factory.mktemp('run')
  train_lib.train_and_evaluate(make_tiny_config(corpus_file, **{'eval.all_windows': True}), workdir)
  return workdir


def test_attention_maps_are_causal_and_rows_sum_to_one(run):
  model, tokenizer, config, _ = checkpoint_lib.load_model(run)
  maps, shown = analysis.attention_maps(model, tokenizer, 'the quick')
  assert shown == list('the quick') and maps.shape == (2, 2, 9, 9) and maps.dtype == np.float32
  np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
  assert (maps[..., np.triu_indices(9, k=1)[0], np.triu_indices(9, k=1)[1]] == 0).all()  # no looking ahead
  assert (np.diagonal(maps, axis1=-2, axis2=-1) > 0).all() and maps[..., 0, 0].tolist() == [[1.0, 1.0]] * 2
  long = 'KING: Alas! poor Yorick; the lazy dog'
  maps, shown = analysis.attention_maps(model, tokenizer, long)
  assert shown == list(long[-16:]) and maps.shape == (2, 2, 16, 16)  # cut to the context, keeping the end
  with pytest.raises(DataError, match='characters not in the vocabulary'):
    analysis.attention_maps(model, tokenizer, 'the ~~~')
  with pytest.raises(DataError, match='^the prompt is empty; pass the text'):
    analysis.attention_maps(model, tokenizer, '')


def test_attention_pngs_one_per_layer_with_a_heatmap_per_head(run, tmp_path):
  model, tokenizer, _, _ = checkpoint_lib.load_model(run)
  maps, shown = analysis.attention_maps(model, tokenizer, 'the quick brown')
  (tmp_path / 'maps').mkdir()
  (tmp_path / 'maps' / 'layer_2.png').write_bytes(b'')  # a deeper model's, drawn here before
  (tmp_path / 'maps' / 'layer_0_notes.png').write_bytes(b'')  # not one of ours
  paths = analysis.plot_attention(maps, shown, tmp_path / 'maps', title='tiny, ')
  assert paths == [tmp_path / 'maps' / 'layer_0.png', tmp_path / 'maps' / 'layer_1.png']
  assert sorted((tmp_path / 'maps').iterdir()) == [paths[0], tmp_path / 'maps' / 'layer_0_notes.png', paths[1]]
  for path in paths:
    pixels = mpimg.imread(path)
    assert pixels.shape[0] >= 250 and pixels.shape[1] >= 500 and pixels[..., :3].std() > 0.05
  assert analysis.char_label('\n') == '\\n' and analysis.char_label(' ') == '␣' and analysis.char_label('a') == 'a'
  assert analysis.token_label(' the') == '␣the' and analysis.token_label(' whatsoever') == '␣whatso…'
  assert analysis.token_label('a一丁') == 'aU+4E00…' and analysis.token_label('ab一丁') == 'ab…' and analysis.token_label('ab\x07') == 'abU+0007'


def test_characters_the_font_cannot_draw_are_labelled_by_code_point(tmp_path):
  """CJK text (not in matplotlib's default DejaVu Sans) drew empty boxes with a warning per glyph."""
  assert [analysis.char_label(c) for c in 'aé一\r\x07\u200b'] == ['a', 'é', 'U+4E00', '\\r', 'U+0007', 'U+200B']
  maps = np.full((1, 2, 3, 3), 1 / 3, np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # matplotlib's "Glyph 19968 missing from font(s)"
    analysis.plot_attention(maps, '一丁\r', tmp_path)
  assert (tmp_path / 'layer_0.png').stat().st_size > 0  # (U+200B, a zero-width space the font has, would draw nothing)


def test_attention_figures_label_every_key_and_query_and_leave_spare_cells_empty(tmp_path, monkeypatch):
  from nanodecoder import summary

  figures = []
  monkeypatch.setattr(summary, 'save_png', lambda figure, path: figures.append(figure))
  analysis.plot_attention(np.full((2, 5, 4, 4), 0.25, np.float32), 'ab c', tmp_path)  # 5 heads: 2 rows of 4
  assert len(figures) == 2
  heatmaps = [ax for ax in figures[0].axes if ax.images]
  assert [ax.get_title() for ax in heatmaps] == [f'head {h}' for h in range(5)]
  assert sum(not ax.axison for ax in figures[0].axes) == 3
  for ax in heatmaps:
    assert [t.get_text() for t in ax.get_xticklabels()] == [t.get_text() for t in ax.get_yticklabels()] == [
        'a', 'b', '␣', 'c']
  text = 'abcdefghij' * 13  # 130 characters: every third labelled, at its place
  analysis.plot_attention(np.full((1, 1, 130, 130), 1 / 130, np.float32), text, tmp_path)
  ax = figures[-1].axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == list(text[::3]) and ax.get_xticks().tolist() == list(
      range(0, 130, 3))


def test_eval_report_is_the_exact_loss_over_every_window(run, monkeypatch):
  read = []
  restore = checkpoint_lib.ocp.StandardCheckpointHandler.restore
  reading = lambda self, directory, *args, **kwargs: read.append(directory.name) or restore(self, directory, *args,
                                                                                            **kwargs)
  monkeypatch.setattr(checkpoint_lib.ocp.StandardCheckpointHandler, 'restore', reading)
  report = analysis.evaluate_split(run)
  assert read == ['params']  # not the optimizer state, twice the parameters' size
  last_eval = [r for r in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()) if 'eval/val_loss' in r][-1]
  assert report['step'] == 20 and report['split'] == 'validation+test'
  assert report['loss'] == pytest.approx(last_eval['eval/val_loss'], rel=1e-5)  # training's all-windows eval
  assert report['perplexity'] == pytest.approx(math.exp(report['loss']))
  assert report['bits_per_char'] == pytest.approx(report['loss'] / math.log(2))
  config = make_tiny_config(json.loads((run / 'config.json').read_text())['data']['text_path'])
  text = data_lib.load_corpus(config.data).text('validation+test')
  assert (report['characters'], report['predicted']) == (len(text), len(text) - 1)
  train_report = analysis.evaluate_split(run, 'best', 'train')
  train_text = data_lib.load_corpus(config.data).text('train')
  assert train_report['split'] == 'train' and train_report['predicted'] == len(train_text) - 1
  with pytest.raises(DataError, match=r"split 'nope' \(in 'validation\+nope'\) does not exist"):
    analysis.evaluate_split(run, 'latest', 'validation+nope')
  with pytest.raises(DataError, match=r"split '' \(in ''\) does not exist"):  # (--split '': not the default)
    analysis.evaluate_split(run, 'latest', '')



def test_eval_while_the_run_trains_on_takes_the_step_that_replaced_the_one_being_read(run, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  shutil.copytree(run, workdir)
  directory, restore = workdir / 'checkpoints', checkpoint_lib.Checkpoints.restore
  latest = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())

  def restore_while_the_run_trains(self, *args, **kwargs):  # it saves step latest + 5 and deletes step latest
    if (directory / str(latest)).is_dir():
      shutil.copytree(directory / str(latest), directory / str(latest + 5))
      shutil.rmtree(directory / str(latest))
    return restore(self, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.Checkpoints, 'restore', restore_while_the_run_trains)
  assert analysis.evaluate_split(workdir)['step'] == latest + 5


def test_eval_of_a_checkpoint_saved_before_data_fingerprints_reads_the_text(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run, workdir)
  record = workdir / 'checkpoints' / '20' / 'meta' / 'metadata'
  meta = json.loads(record.read_text())
  del meta['data_fingerprint']
  record.write_text(json.dumps(meta))
  assert analysis.evaluate_split(workdir)['step'] == 20  # no fingerprint: nothing to compare the text with


def test_eval_of_a_split_of_one_character_is_refused(run, monkeypatch):
  text = data_lib.Corpus.text
  monkeypatch.setattr(data_lib.Corpus, 'text', lambda self, expr: 'a' if expr == 'test' else text(self, expr))
  with pytest.raises(DataError, match=r"^split 'test' has 1 characters; it needs at least 2 to predict one$"):
    analysis.evaluate_split(run, split='test')


def test_eval_of_a_record_that_lacks_its_config_is_an_unreadable_step(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run, workdir)
  record = workdir / 'checkpoints' / '20' / 'meta' / 'metadata'
  record.write_text(record.read_text().replace('"config"', '"confix"'))  # one flipped byte, still JSON
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"^cannot read the checkpoint at step 20 in .* \(KeyError: 'config'\); pass --checkpoint"):
    analysis.evaluate_split(workdir)

def launch(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=180)


def test_attention_and_eval_modes(run, tmp_path):
  result = launch('--mode', 'attention', '--workdir', str(run), '--prompt', 'the lazy dog', '--out', str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('attention maps of 2 layers x 2 heads over 12 characters (checkpoint step 20): ')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['layer_0.png', 'layer_1.png']
  result = launch('--mode', 'eval', '--workdir', str(run), '--checkpoint', '20', '--out', str(tmp_path / 'eval.json'))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'eval.json').read_text())
  assert result.stdout.splitlines() == [
      f"checkpoint step 20 of {run}, split 'validation+test': {report['predicted']:,} characters predicted",
      f"loss {report['loss']:.4f} nats/char | perplexity {report['perplexity']:.3f} | "
      f"{report['bits_per_char']:.4f} bits/char"]


def test_eval_reads_a_checkpoint_on_any_device_count(corpus_file, tmp_path):
  """A run trained on 8 devices (data 4 x FSDP 2, 8 rows) evaluates on 3: data parallel over them, 9 rows."""
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(make_tiny_config(corpus_file, **{
      'mesh.data': 4, 'mesh.fsdp': 2, 'train.batch_size': 8, 'train.num_steps': 4, 'checkpoint.every': 4}), workdir)
  here = analysis.evaluate_split(workdir)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=3'}
  result = subprocess.run([sys.executable, 'launch.py', '--mode', 'eval', '--workdir', str(workdir), '--out',
                           str(tmp_path / 'eval.json')], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'eval.json').read_text())
  assert report['predicted'] == here['predicted'] and report['loss'] == pytest.approx(here['loss'], rel=1e-5)


@pytest.mark.parametrize('args, message', [
    (['--mode', 'attention', '--workdir', 'x'], "error: --mode attention needs the text to look at: --prompt"),
    (['--mode', 'eval'], 'error: --workdir is required for --mode eval'),
    (['--mode', 'attention', '--workdir', 'x', '--prompt', 'ab', '--out', ''], "error: --out '' names no folder"),
    (['--mode', 'summary', '--workdir', '/no/such/sweep'], 'error: /no/such/sweep is not a folder'),
    (['--config', 'experiments/cpu.py', '--sweep_list'], 'error: --sweep_list needs a sweep: --mode=train and a'),
    (['--config', 'experiments/sweep.py:blocks', '--config.model.num_heads=0', '--sweep_list'],
     'error: sweep point 0 (num_layers=1): model.num_heads must be a positive integer, got 0'),
])
def test_bad_analysis_and_sweep_input_is_one_line_and_exit_2(args, message):
  result = launch(*args)
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_eval_of_a_run_whose_text_changed_or_moved_says_so(corpus_file, tmp_path):
  text = tmp_path / 'moved.txt'
  text.write_text(corpus_file.read_text())
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(make_tiny_config(text, **{'train.num_steps': 10, 'train.decay_steps': 10,
                                                         'eval.every': 10}), workdir)
  original = text.read_text()
  text.write_text(original[::-1])  # edited in place: the same characters, other text
  with pytest.raises(DataError, match=rf'^--mode eval scores the data the run trained on \({re.escape(str(text))}, '
                                      r'from the config saved with checkpoint 10\): it holds other text than the '
                                      r'checkpoint was trained on \(edited since\); put that text back$'):
    analysis.evaluate_split(workdir)
  text.write_text(original)
  assert analysis.evaluate_split(workdir)['step'] == 10
  text.unlink()
  with pytest.raises(DataError, match=rf'^--mode eval scores the data the run trained on \({re.escape(str(text))}, '
                                      r'from the config saved with checkpoint 10\): data.text_path .* does not exist'):
    analysis.evaluate_split(workdir)


def test_eval_follows_moved_data_given_its_new_place(corpus_file, tmp_path):
  """--config.data.text_path points --mode eval at a run's moved text (the only overrides it takes: where the data
  is); the text found there must still be the one the checkpoint trained on."""
  text = tmp_path / 'corpus.txt'
  text.write_text(corpus_file.read_text())
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(make_tiny_config(text, **{'train.num_steps': 10, 'train.decay_steps': 10,
                                                         'eval.every': 10}), workdir)
  before = analysis.evaluate_split(workdir)
  moved = tmp_path / 'elsewhere' / 'corpus.txt'
  moved.parent.mkdir()
  text.rename(moved)
  result = launch('--mode', 'eval', '--workdir', str(workdir))
  assert result.returncode == 2 and result.stderr.rstrip().endswith(
      'does not exist; point it at a UTF-8 text file; if it moved, give its new place: '
      '--config.data.text_path=FILE'), result.stderr[-2000:]
  for override in ([f'--config.data.text_path={moved}'], ['--config.data.text_path', str(moved)]):
    out = tmp_path / 'eval.json'
    result = launch('--mode', 'eval', '--workdir', str(workdir), *override, '--out', str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report['predicted'] == before['predicted'] and report['loss'] == pytest.approx(before['loss'], rel=1e-5)
  moved.write_text(moved.read_text()[::-1])  # other text at the new place: the same characters
  result = launch('--mode', 'eval', '--workdir', str(workdir), f'--config.data.text_path={moved}')
  assert result.returncode == 2 and result.stderr == (
      f'error: --mode eval scores the data the run trained on ({moved}, as --config.data.text_path says): it holds '
      'other text than the checkpoint was trained on; point --config.data.text_path at that text\n')
  result = launch('--mode', 'eval', '--workdir', str(workdir), f'--config.data.manual_dir={tmp_path}')
  assert result.returncode == 2 and result.stderr == (
      f'error: --config.data.manual_dir is not read by this run, which trained on {text}; give where that is with '
      '--config.data.text_path\n')


def test_eval_of_a_tfds_run_follows_its_moved_data_folders(shakespeare_dir, tmp_path):
  """A tfds run whose prepared data (data.tfds_data_dir) and downloaded file (data.manual_dir) moved:
  --config.data.tfds_data_dir or --config.data.manual_dir gives their new place; data.text_path, which such a run
  does not read, is refused."""
  from nanodecoder.config import ConfigError

  manual = tmp_path / 'manual'
  manual.mkdir()
  shutil.copy(shakespeare_dir / 'input.txt', manual)
  workdir = tmp_path / 'run'
  config = make_tiny_config('', **{'data.source': 'tfds', 'data.tfds_data_dir': str(tmp_path / 'tfds'),
                                   'data.manual_dir': str(manual), 'train.num_steps': 2, 'train.warmup_steps': 1,
                                   'train.decay_steps': 2, 'eval.every': 2})
  train_lib.train_and_evaluate(config, workdir)
  before = analysis.evaluate_split(workdir, split='test')
  (tmp_path / 'tfds').rename(tmp_path / 'moved')
  shutil.rmtree(manual)
  with pytest.raises(DataError, match=r'data.manual_dir .* lacks input.txt'):  # neither is where the run left it
    analysis.evaluate_split(workdir, split='test')
  after = analysis.evaluate_split(workdir, split='test', data_locations={'tfds_data_dir': str(tmp_path / 'moved')})
  assert after['predicted'] == before['predicted'] == 55_769 and after['loss'] == pytest.approx(before['loss'])
  after = analysis.evaluate_split(workdir, split='test', data_locations={'manual_dir': str(shakespeare_dir)})
  assert after['predicted'] == before['predicted'] and after['loss'] == pytest.approx(before['loss'])
  assert (tmp_path / 'tfds').is_dir()  # prepared again where the run keeps it, from the file at its new place
  with pytest.raises(ConfigError, match=r'^--config.data.text_path is not read by this run, which trained on tfds '
                                        r'tiny_shakespeare; give where that is with --config.data.manual_dir or '
                                        r'--config.data.tfds_data_dir$'):
    analysis.evaluate_split(workdir, data_locations={'text_path': str(shakespeare_dir / 'input.txt')})
