"""launch.py end to end, in a subprocess, as a user runs it."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from nanodecoder import checkpoint as checkpoint_lib
from nanodecoder.model import count_params

TINY = ['--config.model.num_layers=1', '--config.model.num_heads=2', '--config.model.head_size=8',
        '--config.model.context_length=16', '--config.train.batch_size=4', '--config.train.num_steps=12',
        '--config.train.warmup_steps=2', '--config.train.decay_steps=12', '--config.train.log_every=6',
        '--config.train.steps_per_call=1',
        '--config.eval.every=6', '--config.eval.batches=2', '--config.mesh.cpu_devices=2']


def launch(*args, timeout=180, env=None):
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, **(env or {})}  # launch.py picks its devices
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def launch_all(arg_lists):
  """launch(*args) of each list, two at a time: each is a new Python importing JAX, Flax and Orbax (~1.7 s of one
  core) while pytest waits, and the machines running the suite have two cores."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return list(pool.map(lambda args: launch(*args), arg_lists))


@pytest.fixture(scope='module')
def tiny_run(corpus_file, tmp_path_factory):
  """launch.py training the tiny config: (its workdir, the finished process)."""
  workdir = tmp_path_factory.mktemp('launch') / 'run'
  result = launch('--config', 'experiments/cpu.py', '--config.data.source=text',
                  f'--config.data.text_path={corpus_file}', *TINY, '--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
def test_launch_trains_a_tiny_config(tiny_run, corpus_file):
  workdir, result = tiny_run
  out = result.stdout
  assert 'on 2 cpu devices' in out
  assert 'step 12 |' in out and 'ms/step' in out and 'tokens/s' in out
  assert 'final: train loss' in out and 'val loss' in out
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['num_layers'] == 1 and saved['data']['text_path'] == str(corpus_file)


@pytest.mark.slow
def test_a_workdir_alone_resumes_with_its_saved_config(tiny_run):
  workdir, _ = tiny_run
  result = launch('--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming with the config saved in {workdir / "config.json"}' in result.stdout
  assert 'resumed from the checkpoint at step 12' in result.stdout and 'nothing to do' in result.stdout
  model, _, _, _ = checkpoint_lib.load_model(workdir)  # the model line first, with the checkpoint's count
  assert result.stdout.index(f'model: {count_params(model):,} parameters, 1 layer,') < result.stdout.index('resumed')


def test_a_workdir_with_checkpoints_but_no_readable_config_says_what_is_missing(tmp_path):
  (tmp_path / 'run' / 'checkpoints' / '12').mkdir(parents=True)  # a step without its record
  result = launch('--workdir', str(tmp_path / 'run'))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith(f'error: the checkpoint at step 12 in {tmp_path / "run" / "checkpoints"} has no '
                                  'readable config (') and result.stderr.endswith('); pass --config to train\n')


def test_a_workdir_whose_checkpoints_were_all_set_aside_says_so(tmp_path):
  (tmp_path / 'run' / 'checkpoints' / '40.corrupt').mkdir(parents=True)  # and no config.json
  result = launch('--workdir', str(tmp_path / 'run'))
  assert result.returncode == 2 and result.stderr == (
      f'error: {tmp_path / "run"} has no config.json and no readable checkpoint (set aside as unreadable: '
      '40.corrupt); rename one back to its step number to retry it, or pass --config to train afresh\n'), result.stderr


@pytest.mark.slow
def test_a_run_copied_without_its_config_resumes_with_its_latest_checkpoints(tiny_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns('config.json', 'tokenizer.json'))
  where = f'the checkpoint at step 12 in {workdir / "checkpoints"}'
  result = launch('--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming with the config saved in {where}\n' in result.stdout and 'nothing to do' in result.stdout
  result = launch('--workdir', str(workdir), '--config.train.num_steps=18')  # train on for 6 more steps
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming with the config saved in {where} and the overrides train.num_steps=18' in result.stdout
  assert 'resumed from the checkpoint at step 12' in result.stdout and 'step 18 |' in result.stdout
  saved = json.loads((workdir / 'config.json').read_text())  # written again, with the override
  expected = json.loads((tiny_run[0] / 'config.json').read_text())
  expected['train']['num_steps'] = 18
  assert saved == expected


@pytest.mark.slow
def test_overrides_without_config_apply_to_the_saved_config(tiny_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run[0], workdir)
  saved = (workdir / 'config.json').read_text()
  result = launch('--workdir', str(workdir), '--config.model.dropout=0.5')  # finished: trains nothing ...
  assert result.returncode == 0 and 'nothing to do' in result.stdout, result.stderr[-3000:]
  assert (workdir / 'config.json').read_text() == saved  # ... so the run's config stays the one it trained with
  result = launch('--workdir', str(workdir), '--config.train.num_steps=18')  # train on for 6 more steps
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f'resuming with the config saved in {workdir / "config.json"} and the overrides train.num_steps=18'
          in result.stdout)
  assert 'resumed from the checkpoint at step 12' in result.stdout and 'step 18 |' in result.stdout
  config = json.loads((workdir / 'config.json').read_text())
  assert config['train']['num_steps'] == 18 and config['model']['num_layers'] == 1
  result = launch('--mode', 'sample', '--workdir', str(workdir), '--config.train.num_steps=18')  # train mode only
  assert result.returncode == 2 and result.stderr == ('error: --config.train.num_steps overrides a field of the '
                                                      'config, which only training takes; --mode sample uses the '
                                                      'config saved with the run: remove it\n')
  (workdir / 'config.json').write_text('[1, 2]')
  result = launch('--workdir', str(workdir), '--config.train.num_steps=24')
  assert result.returncode == 2 and result.stderr == (f'error: cannot read {workdir / "config.json"} (not a JSON '
                                                      'object); pass --config to train\n')
  result = launch('--workdir', str(tmp_path / 'nothing'), '--config.train.num_steps=18')
  assert result.returncode == 2 and result.stderr.startswith('error: --config.train.num_steps overrides a field '
                                                             'of a --config file: pass --config FILE, or the '
                                                             '--workdir of a run'), result.stderr


@pytest.mark.slow
def test_sample_stream_out_prompt_file_and_nokv_cache_give_one_text(tiny_run, tmp_path):
  """Greedy within the context: streamed with the KV cache == compiled without it == both --out files."""
  workdir, _ = tiny_run
  (tmp_path / 'prompt.txt').write_text('the quick', encoding='utf-8')  # + 7 new characters = the context, 16
  sample = ['--mode', 'sample', '--workdir', str(workdir), '--prompt_file', str(tmp_path / 'prompt.txt'),
            '--temperature', '0', '--max_new_tokens', '7']
  streamed = launch(*sample, '--stream', '--out', str(tmp_path / 'streamed.txt'))
  uncached = launch(*sample, '--nokv_cache', '--out', str(tmp_path / 'new' / 'uncached.txt'))
  assert streamed.returncode == 0 and uncached.returncode == 0, streamed.stderr[-2000:] + uncached.stderr[-2000:]
  header = '--- sample 1/1 (checkpoint step 12) ---\n'
  text = streamed.stdout.removeprefix(header).removesuffix('\n')
  assert text.startswith('the quick') and len(text) == 16, streamed.stdout
  assert streamed.stdout == uncached.stdout == f'{header}{text}\n'
  for out in (tmp_path / 'streamed.txt', tmp_path / 'new' / 'uncached.txt'):
    assert out.read_text(encoding='utf-8') == f'--- sample 1 ---\n{text}\n'


@pytest.mark.slow
def test_a_run_with_bpe_merges_trains_resumes_samples_and_scores_bits_per_character(corpus_file, tmp_path):
  from nanodecoder import analysis, data as data_lib
  from nanodecoder.tokenizer import Tokenizer

  train = ['--config', 'experiments/cpu.py', '--config.data.source=text', f'--config.data.text_path={corpus_file}',
           *TINY, '--config.eval.all_windows=true', '--config.data.vocab_size=70', '--workdir', str(tmp_path)]
  result = launch(*train)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'vocab 70 (48 characters + 22 BPE merges);' in result.stdout
  corpus = data_lib.load_corpus(data_lib.ml_collections.ConfigDict({'source': 'text', 'text_path': str(corpus_file),
                                                                       'text_eval_fraction': 0.1}))
  tokenizer = Tokenizer.from_json((tmp_path / 'tokenizer.json').read_text())
  assert tokenizer == corpus.tokenizer(70, 'train') and tokenizer.unit == 'token'
  report_path = tmp_path / 'eval.json'
  sample, scored = launch_all([
      ['--mode', 'sample', '--workdir', str(tmp_path), '--prompt', 'the lazy', '--max_new_tokens', '12',
       '--temperature', '0', '--stream'],
      ['--mode', 'eval', '--workdir', str(tmp_path), '--out', str(report_path)]])
  # Sampling: 12 tokens, streamed one at a time, hold more characters than that.
  assert sample.returncode == 0, sample.stderr[-3000:]
  text = sample.stdout.removeprefix('--- sample 1/1 (checkpoint step 12) ---\n').removesuffix('\n')
  model, _, _, _ = checkpoint_lib.load_model(tmp_path)
  greedy = [int(i) for i in tokenizer.encode('the lazy')]
  for _ in range(12):
    greedy.append(int(model(np.asarray([greedy[-16:]]))[0][0, -1].argmax()))
  assert text == tokenizer.decode(greedy) and len(text) > len('the lazy') + 12, text
  prompt = 'KING: Alas! poor Yorick; the quick brown fox jumps over the lazy dog'
  maps, shown = analysis.attention_maps(model, tokenizer, '\x07 ' + prompt)  # cut to the last 16 tokens (the
  assert maps.shape == (1, 2, 16, 16) and prompt.endswith(''.join(shown)) and len(''.join(shown)) > 16  # \x07 too)
  # Eval: the loss per token of every window, and bits per character from the characters those tokens hold.
  assert scored.returncode == 0, scored.stderr[-3000:]
  report, val_text = json.loads(report_path.read_text()), corpus.text('validation+test')
  tokens = tokenizer.encode(val_text)
  assert (report['unit'], report['characters'], report['tokens'], report['predicted']) == (
      'token', len(val_text), len(tokens), len(tokens) - 1)
  predicted_chars = len(val_text) - len(tokenizer.decode(tokens[:1]))
  assert report['bits_per_char'] == pytest.approx(report['loss'] * (len(tokens) - 1) / predicted_chars / np.log(2))
  last_eval = [r for r in map(json.loads, (tmp_path / 'metrics.jsonl').read_text().splitlines())
               if 'eval/val_loss' in r][-1]
  assert report['loss'] == pytest.approx(last_eval['eval/val_loss'], rel=1e-5)
  # Training logs the val loss in bits per character too, with the split's characters per token (comparable across
  # tokenizers, as summaries use it); over every window it is the report's up to the first token's characters.
  assert last_eval['eval/val_bits_per_char'] == pytest.approx(
      last_eval['eval/val_loss'] * len(tokens) / len(val_text) / np.log(2), rel=1e-6)
  assert last_eval['eval/val_bits_per_char'] == pytest.approx(report['bits_per_char'], rel=1e-3)
  assert f"val_bits_per_char {last_eval['eval/val_bits_per_char']:.4f}" in result.stdout
  assert result.stdout.splitlines()[-1] == (f"final: train loss {last_eval['eval/train_loss']:.4f} | val loss "
                                            f"{last_eval['eval/val_loss']:.4f} | val bits/char "
                                            f"{last_eval['eval/val_bits_per_char']:.4f}")
  assert report['predicted_characters'] == predicted_chars
  assert scored.stdout.splitlines()[0].endswith(f"{len(tokens) - 1:,} tokens predicted ({predicted_chars:,} characters)")
  assert ' nats/token | perplexity ' in scored.stdout
  # A resume trains the same merges again (each launch learns them from the text) and goes on.
  resumed = launch(*train, '--config.train.num_steps=18', '--config.train.decay_steps=12')
  assert resumed.returncode == 0 and 'resumed from the checkpoint at step 12' in resumed.stdout, resumed.stderr[-3000:]
  assert 'step 18 |' in resumed.stdout


@pytest.mark.slow
def test_sampling_more_than_memory_holds_is_one_line_naming_the_sampling_flags(tiny_run):
  # Refused before any work by the estimate (a lower bound) of what the generation holds
  result = launch('--mode', 'sample', '--workdir', str(tiny_run[0]), '--num_samples', str(10**9))
  assert result.returncode == 2 and result.stderr.startswith('error: out of memory: 1,000,000,000 samples of 500 '
                                                             'tokens need at least '), result.stderr[-2000:]
  assert result.stderr.endswith('; lower --num_samples or --max_new_tokens\n') and result.stderr.count('\n') == 1
  # and past the estimate: 64 x 2^30 tokens (256 GiB of token ids alone) fail inside the compiled call, which
  # jaxlib 0.10 turned into an abort (SIGABRT) when the result was read without waiting for it first.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  code = ('import runpy, sys; from nanodecoder import sampling; sampling.memory_available = lambda: None; '
          f'sys.argv = ["launch.py", "--mode", "sample", "--workdir", {str(tiny_run[0])!r}, "--num_samples", "64", '
          f'"--max_new_tokens", "{2**30}"]; runpy.run_path("launch.py", run_name="__main__")')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert result.stderr.startswith('error: out of memory (') and result.stderr.count('\n') == 1, result.stderr[-2000:]
  assert result.stderr.endswith('; lower --num_samples or --max_new_tokens (the memory sampling needs grows with '
                                'both)\n')


BAD_INPUT = [
    (['--config', 'experiments/nope.py'], "error: cannot load the --config file experiments/nope.py: [Errno 2] No such file or directory"),
    (['--config', 'experiments/cpu.py', '--config.model.num_layer=3'],
     "error: unknown config field in --config.model.num_layer=3: 'num_layer' (did you mean 'num_layers'?); see experiments/base.py"),
    (['--config', 'experiments/cpu.py', '--config.train.nonexist=3'],  # no suggestion: the override still named
     'error: unknown config field in --config.train.nonexist=3: nonexist; see experiments/base.py'),
    (['--config', 'experiments/cpu.py', '--config.modle.num_layers=3'],  # a top-level typo: a two-line message
     "error: unknown config field in --config.modle.num_layers=3: 'modle' (did you mean 'model'?); see experiments/base.py"),
    (['--config', 'pyproject.toml'], 'error: cannot load the --config file pyproject.toml: SyntaxError: '),
    (['--config', 'pyproject.toml', '--config.seed=3'], 'error: cannot load the --config file pyproject.toml: SyntaxError: '),
    (['--config', 'nanodecoder/files.py'], 'error: cannot load the --config file nanodecoder/files.py: it defines no get_config()'),
    (['--config', 'nanodecoder/files.py', '--config.seed=3'],
     'error: cannot load the --config file nanodecoder/files.py: it defines no get_config()'),
    ([], 'error: --config is required to train, e.g. --config experiments/cpu.py (or --workdir of a run, to resume'),
    (['--config', 'experiments/cpu.py', '--config.model.num_layers=three'], "error: flag --config.model.num_layers=three: invalid literal for int()"),
    (['--config', 'experiments/cpu.py', '--config.model.num_heads=0'], 'error: model.num_heads must be a positive integer, got 0'),
    (['--config', 'experiments/cpu.py', '--config.data.source=text', '--config.data.text_path=/no/such.txt'],
     "error: data.text_path '/no/such.txt' does not exist; point it at a UTF-8 text file"),
]


@pytest.fixture(scope='module')
def bad_input_results(tmp_path_factory):
  """{(args, message): launch.py's result} of every BAD_INPUT case, launched up front two at a time."""
  commands = [[*args, '--workdir', str(tmp_path_factory.mktemp('bad_input') / 'run')] for args, _ in BAD_INPUT]
  return {(tuple(args), message): result for (args, message), result in zip(BAD_INPUT, launch_all(commands))}


@pytest.mark.parametrize('args, message', BAD_INPUT)
def test_launch_bad_input_is_one_line_and_exit_2(args, message, bad_input_results):
  result = bad_input_results[tuple(args), message]
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_a_relative_text_path_is_saved_absolute_so_the_workdir_evaluates_from_anywhere(corpus_file, tmp_path):
  workdir = tmp_path / 'run'
  trained = launch('--config', 'experiments/cpu.py', '--config.data.source=text',
                   f'--config.data.text_path={os.path.relpath(corpus_file, REPO)}', *TINY, '--workdir', str(workdir))
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert json.loads((workdir / 'config.json').read_text())['data']['text_path'] == str(corpus_file)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  evaluated = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--mode', 'eval', '--workdir', str(workdir)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
  assert evaluated.returncode == 0 and 'bits/char' in evaluated.stdout, evaluated.stderr[-3000:]


def test_on_windows_launch_says_to_use_wsl():
  """Workdir locks (fcntl) and signals are POSIX: Windows gets that said, not a missing module."""
  result = subprocess.run([sys.executable, '-c', "import sys, runpy; sys.platform = 'win32'; "
                           "sys.argv = ['launch.py', '--help']; runpy.run_path('launch.py', run_name='__main__')"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == ('ImportError: nanodecoder runs on Linux and macOS; on Windows, run it '
                                            'under WSL')
