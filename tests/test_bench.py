"""The benchmark scripts run end to end (tiny settings) and write what they print; bad arguments stop them."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

TINY = ['model.num_layers=1', 'model.num_heads=2', 'model.head_size=8', 'model.context_length=16',
        'train.batch_size=4', 'train.num_steps=20', 'train.warmup_steps=2', 'train.decay_steps=20',
        'train.log_every=10', 'eval.every=10', 'eval.batches=2', 'mesh.cpu_devices=2', 'train.profile_start=10',
        'train.profile_steps=10']


def bench(script, *args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # each script picks its devices
  env['NANODECODER_COMPILATION_CACHE'] = ''  # not the user's cache
  result = subprocess.run([sys.executable, f'bench/{script}', *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_train_speed_reports_consistent_numbers(corpus_file, tmp_path):
  out = bench('train_speed.py', '--shapes', 'cpu', '--steps', '2', '--repeats', '1', '--text', str(corpus_file),
              '--out', str(tmp_path / 'speed.json'))
  row, = json.loads((tmp_path / 'speed.json').read_text())['results']
  assert row['shape'] == 'cpu' and row['steps'] == 10  # rounded up to whole calls of train.steps_per_call
  assert row['tokens_per_s'] == pytest.approx(row['batch_size'] * row['context_length'] / (row['ms_per_step'] / 1000))
  assert row['gflops'] == pytest.approx(row['tflop_per_step'] * 1000 / (row['ms_per_step'] / 1000))
  assert 0 < row['fraction_of_matmul_ceiling'] and row['peak_rss_mib'] > 0 and row['compile_s'] > 0
  assert 'matmul ceiling (measured here)' in out and f'{row["ms_per_step"]:.1f}' in out


def test_recipe_run_and_trace_summary(corpus_file, tmp_path):
  thirty = ['train.num_steps=30', 'train.decay_steps=30']
  overrides = [x for item in ['data.source="text"', f'data.text_path="{corpus_file}"', *TINY, *thirty]
               for x in ('--set', item)]
  bench('recipe_run.py', '--config', 'experiments/cpu.py', *overrides, '--workdir', str(tmp_path / 'run'),
        '--out', str(tmp_path / 'recipe.json'))
  result = json.loads((tmp_path / 'recipe.json').read_text())
  assert result['steps_done'] == result['steps'] == 30 and result['stopped_by'] is None
  assert math.isfinite(result['best_val_loss']) and result['best_val_loss'] <= result['final_val_loss']
  assert result['best_val_bits_per_char'] == pytest.approx(result['best_val_loss'] / math.log(2))  # characters
  # Three log windows: steps 1-10 (the compiling call) and 11-20 (profiled) are not timed, 21-30 is.
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  timed = [r for r in records if 'train/ms_per_step' in r and r['step'] == 30]
  assert result['median_ms_per_step'] == timed[0]['train/ms_per_step'] and result['wall_s'] > 0
  # FLOPs of the model of this corpus's 40 characters (the LM head), not tiny-shakespeare's 65.
  from nanodecoder import config as config_lib, model
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  for key, value in (item.split('=') for item in TINY + thirty):
    section, field = key.split('.')
    config[section][field] = type(config[section][field])(value)
  flops = model.train_flops_per_token(config_lib.model_config(config, len(set(corpus_file.read_text()))))
  assert result['tflops'] == pytest.approx(flops * result['tokens_per_s'] / 1e12)
  out = bench('trace_summary.py', str(tmp_path / 'run' / 'plugins' / 'profile'), '--top', '3')
  assert out.startswith('trace: ') and '.trace.json.gz' in out.splitlines()[0]
  # Run again there, training would resume from the last checkpoint (here: nothing to do) and the report time
  # only that: refused.
  again = subprocess.run([sys.executable, 'bench/recipe_run.py', '--config', 'experiments/cpu.py', *overrides,
                          '--workdir', str(tmp_path / 'run'), '--out', str(tmp_path / 'again.json')], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
  assert again.returncode == 2 and not (tmp_path / 'again.json').exists(), again.stderr[-3000:]
  assert again.stderr.splitlines()[-1] == (f'recipe_run.py: error: --workdir {tmp_path / "run"} holds checkpoints of '
                                           'an earlier run; a recipe is timed from step 0: give a new or empty folder')


def test_sample_speed_and_compile_time(tmp_path):
  out = bench('sample_speed.py', '--shape', 'cpu', '--tokens', '8', '--uncached_tokens', '4', '--batch_sizes', '1',
              '--repeats', '1', '--out', str(tmp_path / 'sample.json'))
  written = json.loads((tmp_path / 'sample.json').read_text())
  rows = written['results']
  assert (written['platform'], written['device_kind']) == ('cpu', 'cpu')  # what ran, beside the host's CPU
  assert [(r['batch_size'], r['kv_cache'], r['tokens']) for r in rows] == [(1, True, 8), (1, False, 4)]
  assert 'vs nanoGPT uncached' in out and all(r['tokens_per_s'] > 0 for r in rows)
  out = bench('compile_time.py', '--shape', 'cpu', '--layers', '1', '--out', str(tmp_path / 'compile.json'))
  rows = json.loads((tmp_path / 'compile.json').read_text())['results']
  assert [(r['layers'], r['scan_layers']) for r in rows] == [(1, False), (1, True)]
  assert all(r['compile_s'] > 0 for r in rows) and 'trace+lower s' in out


@pytest.mark.parametrize('script, args, message', [
    ('train_speed.py', ['--steps', '0'], 'argument --steps: expected a positive integer, got \'0\''),
    ('train_speed.py', ['--shapes', 'cpu,nope'], 'argument --shapes: no experiment file experiments/nope.py'),
    ('sample_speed.py', ['--out', '.'], 'argument --out: . is a folder; give a file path'),
    ('train_speed.py', ['--set', 'model.dtype=bfloat16'],
     'argument --set: the value of \'model.dtype=bfloat16\' is not JSON; quote strings, e.g. model.dtype=\'"bfloat16"\''),
    ('train_speed.py', ['--shapes', 'cpu', '--set', 'model.num_layers=0'],
     'experiments/cpu.py: model.num_layers must be a positive integer, got 0'),
    ('recipe_run.py', ['--config', 'nope.py', '--workdir', 'unused'], "nope.py: config file 'nope.py' does not exist"),
    ('recipe_run.py', ['--config', 'experiments/cpu.py', '--workdir', 'unused', '--out', '.'],
     'argument --out: . is a folder'),
    ('embed_grad.py', ['--text', 'nope.txt'], 'argument --text: nope.txt is not a file'),
    ('compile_time.py', ['--layers', '4,x'], "argument --layers: expected a positive integer, got 'x'"),
    ('sample_speed.py', ['--batch_sizes', '2,2'], "argument --batch_sizes: '2,2' lists a value twice; give each once"),
    # gpu_hlo.py: before the check for JAX's CUDA plugin (which said to install it, whatever the mistake)
    ('tokenizer_speed.py', ['--text', 'nope.txt'], 'argument --text: nope.txt is not a file'),
    ('gpu_hlo.py', ['--shape', 'nope'], 'argument --shape: no experiment file experiments/nope.py'),
    ('gpu_hlo.py', ['--devices', '0'], "argument --devices: expected a positive integer, got '0'"),
    ('gpu_hlo.py', ['--set', 'model.num_layers=0'],
     'experiments/gpt2_small.py: model.num_layers must be a positive integer, got 0'),
])
def test_bad_arguments_stop_before_any_work(script, args, message):
  result = subprocess.run([sys.executable, f'bench/{script}', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 2 and f'{script}: error: {message}' in result.stderr.splitlines()[-1], result.stderr


def test_torch_reference_without_pytorch_is_one_line():
  """PyTorch is not a project dependency: without it the mirror says so in one line (was: an import traceback)."""
  hide_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['bench/torch_reference.py']; "
                "runpy.run_path('bench/torch_reference.py', run_name='__main__')")
  result = subprocess.run([sys.executable, '-c', hide_torch], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith('torch_reference.py: error: it needs PyTorch, which is not a project dependency')
  assert result.stderr.strip().endswith('pip install torch==2.13.0')


def test_a_text_too_short_or_not_utf8_stops_embed_grad_in_one_line(tmp_path):
  short, latin1 = tmp_path / 'short.txt', tmp_path / 'latin1.txt'
  short.write_text('to be or not to be\n' * 100)
  latin1.write_bytes('café\n'.encode('latin-1') * 10_000)
  for path, message in ((short, f'--text {short} has 1,900 characters; the largest timed batch takes 32,768'),
                        (latin1, f'argument --text: {latin1} is not UTF-8 text (invalid continuation byte at byte 3)')):
    result = subprocess.run([sys.executable, 'bench/embed_grad.py', '--text', str(path), '--out',
                             str(tmp_path / 'out.json')], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith(f'embed_grad.py: error: {message}'), result.stderr
    assert not (tmp_path / 'out.json').exists()


def test_a_text_shorter_than_a_window_stops_train_speed_before_any_work(tmp_path):
  (tmp_path / 'short.txt').write_text('x' * 64)  # the CPU shape's windows are 65 characters
  result = subprocess.run([sys.executable, 'bench/train_speed.py', '--shapes', 'cpu', '--text',
                           str(tmp_path / 'short.txt'), '--out', str(tmp_path / 'out.json')], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.splitlines()[-1] == (f'train_speed.py: error: --text {tmp_path / "short.txt"} has 64 '
                                            'characters; shape cpu trains on windows of context_length + 1 = 65: '
                                            'give a longer text')


def test_a_mesh_the_devices_do_not_fit_stops_train_speed_in_one_line(tmp_path):
  """Found only in the shape's own process (the parent starts no JAX backend): one error line, then the failed
  shapes (was: the child's traceback)."""
  (tmp_path / 'ceiling.json').write_text(json.dumps({'matmul_gflops': 100.0, 'platform': 'cpu'}))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, 'bench/train_speed.py', '--shapes', 'cpu', '--set', 'mesh.cpu_devices=1',
                           '--set', 'mesh.data=2', '--ceiling-from', str(tmp_path / 'ceiling.json'), '--out',
                           str(tmp_path / 'speed.json')], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.splitlines() == [
      'train_speed.py: error: shape cpu: mesh.data=2, mesh.fsdp=1, mesh.tensor=1 use 2 devices but there are 1; make '
      'their product equal the device count (or set one to -1); on CPU, mesh.cpu_devices=2 splits the host into 2 '
      'devices', 'failed: cpu']
  assert not (tmp_path / 'speed.json').exists()


def test_the_fraction_of_the_matmul_ceiling_counts_every_accelerator_once():
  """The ceiling is one chip's matmul: 8 GPUs at the ceiling each are 100% of it (was: 800%); one CPU device's
  matmul already runs on every core, which the trainer's CPU devices split."""
  sys.path.insert(0, str(REPO / 'bench'))
  try:
    import train_speed
  finally:
    sys.path.remove(str(REPO / 'bench'))
  assert train_speed.fraction_of_ceiling({'gflops': 800.0, 'platform': 'gpu', 'devices': 8}, 100.0) == 1.0
  assert train_speed.fraction_of_ceiling({'gflops': 50.0, 'platform': 'cpu', 'devices': 2}, 100.0) == 0.5


def test_out_is_written_through_a_link_and_refused_where_it_would_replace_a_device_or_pipe(tmp_path):
  """The JSON is written beside --out and renamed over it: /dev/null (as root) or a pipe became a regular file,
  and a symbolic link was replaced by the file instead of leading to it."""
  sys.path.insert(0, str(REPO / 'bench'))
  try:
    import cli_args
  finally:
    sys.path.remove(str(REPO / 'bench'))
  (tmp_path / 'link.json').symlink_to(tmp_path / 'results' / 'speed.json')
  assert cli_args.out_file(str(tmp_path / 'link.json')) == tmp_path / 'results' / 'speed.json'
  os.mkfifo(tmp_path / 'pipe')
  for path in ('/dev/null', str(tmp_path / 'pipe')):  # (checked here, not by a script that would write there)
    with pytest.raises(argparse.ArgumentTypeError, match=f'^{path} is not a regular file; give the path of a file'):
      cli_args.out_file(path)


def test_tokenizer_speed_reports_the_tokenizers_own_numbers(corpus_file, tmp_path):
  from nanodecoder.tokenizer import Tokenizer

  out = bench('tokenizer_speed.py', '--text', str(corpus_file), '--vocab_sizes', '60,80', '--out',
              str(tmp_path / 'tok.json'))
  report = json.loads((tmp_path / 'tok.json').read_text())
  text = corpus_file.read_text(encoding='utf-8')
  train = text[:len(text) * 9 // 10]
  for row, vocab_size in zip(report['results'], (60, 80)):
    tokenizer = Tokenizer.train(text, train, vocab_size)
    assert (row['vocab_size'], row['merges']) == (tokenizer.vocab_size, len(tokenizer.merges))
    assert row['characters_per_token'] == pytest.approx(len(train) / len(tokenizer.encode(train)))
    assert f'{row["vocab_size"]:>6} {row["merges"]:>6}' in out
  result = subprocess.run([sys.executable, 'bench/tokenizer_speed.py', '--text', str(corpus_file), '--vocab_sizes',
                           '10'], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and result.stderr.splitlines()[-1].endswith(
      "error: --vocab_sizes 10 is below the text's 48 characters; give larger ones"), result.stderr
