"""Bad input, tried as a new user would: one clear line naming the field or file, exit status 2, nothing half-written."""

import errno
import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from nanodecoder import checkpoint as checkpoint_lib
from nanodecoder import config as config_lib
from nanodecoder import train as train_lib
from nanodecoder.checkpoint import CheckpointError, Checkpoints
from conftest import REPO, make_tiny_config
from test_launch import TINY, launch, launch_all

pytestmark = pytest.mark.slow


def assert_user_error(result, message):
  """Exit status 2, exactly one 'error:' line starting with `message`, no traceback."""
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def files_in(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob('*')) if path.exists() else []


def tiny_args(corpus_file, *extra):
  return ['--config', 'experiments/cpu.py', '--config.data.source=text', f'--config.data.text_path={corpus_file}',
          *TINY, *extra]


@pytest.fixture(scope='module')
def trained(corpus_file, tmp_path_factory):
  """A workdir with a finished tiny run (checkpoint at step 12)."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  result = launch(*tiny_args(corpus_file), '--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


CONFIG_CASES = [
    (['--config.model.num_layers=0'], 'model.num_layers must be a positive integer, got 0'),
    (['--config.model.dropout=1.5'], 'model.dropout must be in [0, 1), got 1.5'),
    (['--config.model.num_heads=3', '--config.mesh.data=1', '--config.mesh.tensor=2'],
     'mesh.tensor=2 does not divide model.num_heads=3'),
    (['--config.model.attention_impl=cudnn', '--config.model.dtype=bfloat16'],
     "model.attention_impl='cudnn' needs NVIDIA GPUs, but the mesh is on cpu devices"),
    (['--config.model.attention_impl=xla', '--config.model.dtype=float16'],
     "model.attention_impl='xla' with model.dtype='float16' does not run on cpu devices"),
    (['--config.train.batch_size=7'], 'train.batch_size=7 (micro-batch 7) is not divisible by the data-parallel size 2'),
    (['--config.mesh.data=3', '--config.train.batch_size=6'],
     'mesh.data=3, mesh.fsdp=1, mesh.tensor=1 use 3 devices but there are 2'),
    (['--config.mesh.data=3'], 'train.batch_size=4 (micro-batch 4) is not divisible by the data-parallel size 3'),
    (['--config.train.grad_accum_steps=3'], 'train.batch_size=4 is not divisible by train.grad_accum_steps=3'),
    # with the default mesh.cpu_devices=0 the device count is chosen from the mesh sizes: checked first
    (['--config.mesh.cpu_devices=0', '--config.mesh.tensor=0'],
     'mesh.tensor must be a positive integer or -1 (all devices left over), got 0'),
    (['--config.mesh.cpu_devices=0', '--config.train.grad_accum_steps=0'],
     'train.grad_accum_steps must be a positive integer, got 0'),
    (['--config.mesh.cpu_devices=3'], 'train.batch_size=4 (micro-batch 4) is not divisible by the data-parallel size '
                                      '3 (mesh data x fsdp); pick a multiple of 3 (or lower mesh.cpu_devices=3'),
    (['--config.seed=-1'], 'seed must be an integer >= 0, got -1'),
    (['--config.train.weight_decay=nan'], 'train.weight_decay must be a finite number, got nan'),
    (['--config.train.num_steps=1', '--config.train.warmup_steps=5', '--config.train.decay_steps=12'],
     'train.warmup_steps=5 is longer than the run (train.num_steps=1)'),
    (['--config.train.steps_per_call=5'], 'train.num_steps=12 is not a multiple of train.steps_per_call=5'),
    (['--config.model.dtype=float64'], "model.dtype must be one of 'float32', 'bfloat16', 'float16', got 'float64'"),
    (['--config.data.eval_split=valid'], "split 'valid' (in data.eval_split='valid') does not exist in text file"),
]


@pytest.fixture(scope='module')
def bad_config_results(corpus_file, tmp_path_factory):
  """{(extra, message): (workdir, launch.py's result)} of every CONFIG_CASES case, launched up front two at a time."""
  workdirs = [tmp_path_factory.mktemp('bad_config') / 'run' for _ in CONFIG_CASES]
  results = launch_all([[*tiny_args(corpus_file, *extra), '--workdir', str(workdir)]
                        for (extra, _), workdir in zip(CONFIG_CASES, workdirs)])
  return {(tuple(extra), message): case for (extra, message), case in zip(CONFIG_CASES, zip(workdirs, results))}


@pytest.mark.parametrize('extra, message', CONFIG_CASES, ids=[c[1][:40] for c in CONFIG_CASES])
def test_bad_config(bad_config_results, extra, message):
  workdir, result = bad_config_results[tuple(extra), message]
  assert_user_error(result, message)
  assert files_in(workdir) == []  # refused before anything was written


def test_xla_flags_and_another_cpu_device_count_are_refused(corpus_file, tmp_path):
  forced = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  result = launch(*tiny_args(corpus_file), '--workdir', str(tmp_path / 'run'), env=forced)  # TINY: cpu_devices=2
  assert_user_error(result, 'mesh.cpu_devices=2 asks for another CPU device count than XLA_FLAGS, whose '
                            '--xla_force_host_platform_device_count=4 wins; drop one of the two')
  assert files_in(tmp_path / 'run') == []
  result = launch(*tiny_args(corpus_file, '--config.mesh.cpu_devices=0', '--config.mesh.data=8',
                             '--config.train.batch_size=16'), '--workdir', str(tmp_path / 'run'), env=forced)
  assert_user_error(result, 'use 8 devices but there are 4; make their product equal the device count (or set one '
                            'to -1); on CPU, mesh.cpu_devices=8 splits the host into 8 devices once XLA_FLAGS drop '
                            '--xla_force_host_platform_device_count=4')


def write(path, content):
  if content is not None:
    path.write_bytes(content)
  return path


BAD_TEXTS = [
    (None, 'does not exist; point it at a UTF-8 text file'),
    ('dir', 'cannot be read (Is a directory)'),
    ('file/', 'cannot be read (Not a directory)'),  # a file used as a folder
    (b'', 'is empty; it needs the training text'),
    (b'to be or not to be', "has 16 tokens, fewer than one window of context_length + 1 = 17"),
    (b'caf\xe9 au lait' * 100, 'is not UTF-8 (bad byte at offset 3); convert it'),
]


@pytest.fixture(scope='module')
def bad_text_results(tmp_path_factory):
  """{(content, message): (workdir, launch.py's result)} of every BAD_TEXTS case, launched up front two at a time."""
  commands, workdirs = [], []
  for content, _ in BAD_TEXTS:
    folder = tmp_path_factory.mktemp('bad_text')
    path = folder / 'corpus.txt'
    if content == 'dir':
      path.mkdir()
    elif content == 'file/':
      path = write(path, b'text') / 'input.txt'
    else:
      write(path, content)
    workdirs.append(folder / 'run')
    commands.append([*tiny_args(path), '--workdir', str(folder / 'run')])
  return {case: found for case, found in zip(BAD_TEXTS, zip(workdirs, launch_all(commands)))}


@pytest.mark.parametrize('content, message', BAD_TEXTS)
def test_bad_text_file(bad_text_results, content, message):
  workdir, result = bad_text_results[content, message]
  assert_user_error(result, message)
  assert files_in(workdir) == []


def test_offline_tfds_without_the_file_fails_within_seconds(tmp_path):
  # An offline machine, also where the network works: the child's sitecustomize makes every connection fail.
  offline = tmp_path / 'offline'
  offline.mkdir()
  (offline / 'sitecustomize.py').write_text(
      'import socket\n\n\ndef refuse(*args, **kwargs):\n  raise OSError("network disabled by the test")\n\n\n'
      'socket.create_connection = refuse\n')
  python_path = os.pathsep.join(filter(None, [str(offline), os.environ.get('PYTHONPATH')]))
  (tmp_path / 'tfds').mkdir()  # a fresh TFDS data folder: nothing prepared in it yet
  env_free = ['--config.data.manual_dir=', f'--config.data.tfds_data_dir={tmp_path / "tfds"}']
  result = launch('--config', 'experiments/cpu.py', *TINY, *env_free, '--workdir', str(tmp_path / 'run'),
                  timeout=60, env={'NANODECODER_MANUAL_DIR': '', 'PYTHONPATH': python_path})
  assert 'network disabled by the test' in result.stderr
  assert_user_error(result, "cannot download tfds 'tiny_shakespeare'")
  assert 'NANODECODER_MANUAL_DIR' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no TFDS warnings about the empty folder


@pytest.mark.parametrize('override, message', [
    ('--config.model.head_size=4', 'has a different model shape: model.head_size=8 (config says 4)'),
    # a longer context than the checkpoint's positional table
    ('--config.model.context_length=32', 'has a different model shape: model.context_length=16 (config says 32)'),
])
def test_checkpoint_of_another_shape_is_refused(trained, corpus_file, override, message):
  before = files_in(trained)
  result = launch(*tiny_args(corpus_file, override, '--config.train.num_steps=24'), '--workdir', str(trained))
  assert_user_error(result, message)
  assert files_in(trained) == before


def test_a_shape_change_in_the_override_form_is_refused_before_any_work(trained):
  """(Was refused on restore, after the data, the model line and a warning that the merges ran out.)"""
  before = files_in(trained)
  result = launch('--workdir', str(trained), '--config.model.head_size=4', '--config.data.vocab_size=60')
  assert_user_error(result, 'has a different model shape: model.head_size=8 (config says 4), data.vocab_size=0 '
                            '(config says 60); use the same values or another --workdir')
  assert 'model:' not in result.stdout and files_in(trained) == before


def test_a_config_file_with_other_settings_does_not_resume_a_started_run(trained, corpus_file, tmp_path):
  """The quick-look trap: the full recipe after a short run in the same workdir would continue from a decayed
  schedule (and config.json would claim the new settings for the whole run). Length and intervals may change."""
  before = files_in(trained)
  result = launch(*tiny_args(corpus_file, '--config.train.num_steps=24', '--config.train.decay_steps=24'),
                  '--workdir', str(trained))
  assert_user_error(result, f'{trained} holds a run trained with train.decay_steps=12, not 24 as --config '
                            'experiments/cpu.py and its overrides say; pass another --workdir, or continue that run '
                            f'with the new values on purpose: --workdir {trained} --config.train.decay_steps=24')
  result = launch(*tiny_args(corpus_file, '--config.seed=7', '--config.train.learning_rate=0.003'),
                  '--workdir', str(trained))
  assert_user_error(result, f'{trained} holds a run trained with seed=1337, not 7 (and train.learning_rate) as --config')
  assert '--config.seed=7 --config.train.learning_rate=0.003' in result.stderr
  assert files_in(trained) == before
  # Allowed: the length, the intervals, and the memory remedies (recomputation, micro-batches).
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  result = launch(*tiny_args(corpus_file, '--config.train.num_steps=18', '--config.eval.every=3',
                             '--config.model.remat=block', '--config.train.grad_accum_steps=2'), '--workdir', str(workdir))
  assert result.returncode == 0 and 'step 18 |' in result.stdout, result.stderr[-2000:]


def test_a_bad_value_beside_a_started_run_is_named_as_a_bad_value(trained, corpus_file):
  """Not as a setting the run was not trained with, whose fix ('continue with the new value') would fail too."""
  before = files_in(trained)
  result = launch(*tiny_args(corpus_file, '--config.data.source=txt'), '--workdir', str(trained))
  assert_user_error(result, "error: data.source must be one of 'tfds', 'text', got 'txt'")
  assert files_in(trained) == before


def test_resuming_on_text_with_other_characters_is_refused(trained, corpus_file, tmp_path):
  """Same vocabulary size, one character swapped: token ids would silently change meaning."""
  text = corpus_file.read_text()
  swapped = next(c for c in 'zqxjkv' if c in text)
  assert '~' not in text
  other = tmp_path / 'other.txt'
  other.write_text(text.replace(swapped, '~'))
  before = files_in(trained)
  resume_on_other = ['--workdir', str(trained), f'--config.data.text_path={other}', '--config.train.num_steps=24']
  result = launch(*resume_on_other)
  assert_user_error(result, f"was trained on other characters than this data has ({len(set(text))} characters, "
                            f"this data {len(set(text))}; differing: '{swapped}~')")
  assert files_in(trained) == before
  # Another number of characters changes the embedding's shape: still named as other characters, not as arrays.
  other.write_text(text + '~')
  result = launch(*resume_on_other)
  assert_user_error(result, f"was trained on other characters than this data has ({len(set(text))} characters, "
                            f"this data {len(set(text)) + 1}; differing: '~')")
  assert files_in(trained) == before


def test_second_run_in_a_held_workdir_is_refused(trained, corpus_file):
  with open(trained / '.lock', 'a+') as held:  # what a live run holds
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    result = launch(*tiny_args(corpus_file), '--workdir', str(trained))
  assert_user_error(result, f'workdir {trained} is in use by another run')


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(trained, corpus_file, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  result = launch('--workdir', str(workdir), '--config.train.learning_rate=1e30', '--config.train.min_learning_rate=1e29',
                  '--config.train.grad_clip=0', '--config.train.num_steps=24', '--config.train.decay_steps=24')
  assert_user_error(result, ' became ')
  assert re.search(r'error: (loss|gradient norm) became (nan|inf) at step 1[3-9]; the last good checkpoint \(step 12\) is kept',
                   result.stderr)
  assert Checkpoints(workdir, read_only=True).steps() == [12]
  ok = launch('--mode', 'sample', '--workdir', str(workdir), '--max_new_tokens', '5')
  assert ok.returncode == 0, ok.stderr[-2000:]



@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
def test_a_full_standard_output_is_named_not_blamed_on_the_paths(trained):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  with open('/dev/full', 'w') as full:
    result = subprocess.run([sys.executable, 'launch.py', '--mode', 'sample', '--workdir', str(trained),
                             '--max_new_tokens', '5'], cwd=REPO, env=env, stdout=full, stderr=subprocess.PIPE,
                            text=True, timeout=180)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert result.stderr == ('error: cannot write the output: No space left on device; check where the standard '
                           'output goes (a full disk?)\n')

@pytest.mark.parametrize('flags, message', [
    (['--prompt', 'the €'], "characters not in the vocabulary: '€'; use only characters"),
    (['--temperature', '-1'], 'error: --temperature must be >= 0 (0 = greedy), got -1.0'),
    (['--top_p', '0'], 'error: --top_p must be in (0, 1] (1 = off), got 0.0'),
    (['--top_p', '1.5'], 'error: --top_p must be in (0, 1] (1 = off), got 1.5'),
    (['--checkpoint', '7'], 'no checkpoint at step 7'),
    (['--prompt_file', '/no/such/prompt.txt'], "cannot read --prompt_file '/no/such/prompt.txt'"),
])
def test_bad_sampling_options(trained, flags, message):
  result = launch('--mode', 'sample', '--workdir', str(trained), *flags)
  assert_user_error(result, message)


def test_a_terminal_that_cannot_show_a_character_gets_an_escape_not_a_traceback(corpus_file, tmp_path):
  # An ASCII-only standard output raised UnicodeEncodeError while printing a sample with other characters.
  text = tmp_path / 'accents.txt'
  text.write_text(corpus_file.read_text().replace('e', 'é'), encoding='utf-8')
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(make_tiny_config(text, **{'train.num_steps': 2, 'train.warmup_steps': 1,
                                                         'train.decay_steps': 2, 'eval.every': 2}), workdir)
  result = launch('--mode', 'sample', '--workdir', str(workdir), '--prompt', 'thé', '--max_new_tokens', '3',
                  env={'PYTHONIOENCODING': 'ascii'})
  assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert result.stdout.splitlines()[1].startswith('th\\xe9'), result.stdout


@pytest.mark.parametrize('flags, options', [
    (['--temperature', '0', '--seed', '1'], dict(temperature=0.0, seed=1)),
    (['--temperature', '1', '--top_k', '5', '--top_p', '0.9', '--seed', '3', '--num_samples', '2'],
     dict(temperature=1.0, top_k=5, top_p=0.9, seed=3, num_samples=2)),
    (['--temperature', '1', '--top_k', '1', '--seed', '4'], dict(temperature=0.0)),  # top-1 is greedy
    (['--temperature', '1', '--seed', '5', '--nokv_cache'], dict(temperature=1.0, seed=5, use_cache=False)),
])
def test_sampling_flags_reach_the_sampler(trained, flags, options):
  """The command prints exactly what `sampling.generate` makes of the same options, in this process."""
  from nanodecoder.checkpoint import load_model
  from nanodecoder.sampling import SamplingOptions, generate

  result = launch('--mode', 'sample', '--workdir', str(trained), '--prompt', 'KING:', '--max_new_tokens', '40', *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  model, tokenizer, _, step = load_model(trained)
  expected = lambda **kw: ['KING:' + tokenizer.decode(row) for row in generate(
      model, tokenizer.encode('KING:'), SamplingOptions(max_new_tokens=40, **kw))]
  samples = expected(**options)
  assert result.stdout == ''.join(f'--- sample {i + 1}/{len(samples)} (checkpoint step {step}) ---\n{text}\n'
                                  for i, text in enumerate(samples))
  if options.get('temperature'):  # and the seed matters: another seed gives other text
    assert expected(**{**options, 'seed': options['seed'] + 10}) != samples


def test_sampling_a_workdir_without_checkpoints(tmp_path):
  assert_user_error(launch('--mode', 'sample', '--workdir', str(tmp_path)), f'no checkpoints in {tmp_path}')


BAD_FLAGS = [
    (['--mode', 'sample', '--out', '{tmp}'], '--out {tmp} is a directory; give a file path'),
    (['--mode', 'eval', '--out', '{tmp}/file/report.json'],
     'cannot write --out {tmp}/file/report.json: {tmp}/file is not a writable directory'),
    (['--mode', 'sample', '--stream', '--num_samples', '2'],
     '--stream prints one sample, got --num_samples=2; use --num_samples=1'),
    (['--mode', 'sample', '--prompt', 'a', '--prompt_file', '{tmp}/file'],
     '--prompt and --prompt_file both give the prompt; pass only one of them'),
    (['--mode', 'attention', '--prompt', 'a', '--out', '{tmp}/file'], '--out {tmp}/file is a file; give a folder'),
    (['--mode', 'sample', '--out', '/dev/null'], '--out /dev/null is not a regular file'),  # not replaced by a file
    (['--mode', 'eval', '--out', '{tmp}/' + 'x' * 300], 'cannot write --out {tmp}/xxx'),  # File name too long
    (['--mode', 'sample', '--out', '{tmp}/run/config.json'],
     "--out {tmp}/run/config.json is among the run's own files (config.json); give another file"),
    (['--mode', 'eval', '--out', '{tmp}/run/checkpoints/e.json'], "is among the run's own files (checkpoints/e.json)"),
    (['--mode', 'attention', '--prompt', 'a', '--out', '{tmp}/run/checkpoints/20'],
     "--out {tmp}/run/checkpoints/20 is among the run's own files (checkpoints/20); give another folder"),
    (['--mode', 'sample', '--out', '{tmp}/run/events.out.tfevents.1795830420.host.7.0'],
     "is among the run's own files (events.out.tfevents.1795830420.host.7.0); give another file"),
    (['--seed', '3'], '--seed is for --mode sample, not --mode train (the training seed is --config.seed); remove it'),
    (['--mode', 'summary', '--out', '{tmp}/x'], '--out is for --mode sample or eval or attention, not --mode summary'),
    (['--mode', 'sample', '--split', 'train'], '--split is for --mode eval, not --mode sample'),
    (['--mode', 'sample', '--prompt', ''], "--prompt '' is empty; give at least one character (e.g. a newline)"),
    (['--mode', 'sample', '--prompt_file', '{tmp}/empty.txt'], "--prompt_file '{tmp}/empty.txt' is empty; give at"),
    (['--mode', 'sample', '--prompt_file', ''], "--prompt_file '' names no file; give the path of a UTF-8 text file"),
    (['--mode', 'sample', '--prompt_file', '{tmp}/latin1.txt'],
     "cannot read --prompt_file '{tmp}/latin1.txt': it is not UTF-8 text (invalid continuation byte at byte 3); "
     'save it as UTF-8'),
    (['--mode', 'attention', '--prompt_file', '{tmp}'], "cannot read --prompt_file '{tmp}': Is a directory; give the"),
    (['--mode', 'sample', '--out', ''], "--out '' names no file; give a file path, or leave --out out to print only"),
    (['--config', 'experiments/cpu.py:blocks'], 'cannot load the --config file experiments/cpu.py:blocks: TypeError: get_config() takes 0 '
                                                'positional arguments but 1 was given; an experiment file is'),
    (['--config', 'experiments/cpu.py', '--num_processes=2'],
     'jax.distributed.initialize: coordinator_address should be defined'),
    (['--config', 'experiments/cpu.py', '--num_processes=2', '--distributed_timeout=0'],
     '--distributed_timeout=0 must be positive: the seconds to wait for every process to join'),
    (['--mode', 'sample', '--distributed_timeout=60'], '--distributed_timeout is for --mode train, not --mode sample'),
    (['--mode', 'sample', '--config.train.num_steps=5'], '--config.train.num_steps overrides a field of the config, '
                                                         'which only training takes; --mode sample uses the config'),
    (['--mode', 'eval', '--config.model.num_layers=1'], '--config.model.num_layers would change what --mode eval '
     'scores (the checkpoint on the data it trained on); it takes only where that data is now: '
     '--config.data.manual_dir, --config.data.text_path, --config.data.tfds_data_dir; remove it'),
    (['--mode', 'eval', '--config.mesh.cpu_devices=8'], '--config.mesh.cpu_devices is a setting of training, which '
     "--mode eval does not use (it scores on its own devices); it takes only where the run's data is now: "),
    (['--mode', 'eval', '--config.data.text_path={tmp}/file', '--config.data.eval_split=test'],
     '--config.data.eval_split would change what --mode eval scores (the checkpoint on the data it trained on) '
     '(another split: --split)'),
    (['--mode', 'eval', '--config.data.text_pth={tmp}/file'], '--config.data.text_pth: the config has no field '
     'data.text_pth; did you mean --config.data.text_path? --mode eval takes only --config.data.manual_dir, '),
    (['--mode', 'eval', '--config.data.text_path'], '--config.data.text_path needs a value: --config.data.text_path='),
    (['--mode', 'attention', '--prompt', 'a', '--config.data.text_path={tmp}/file'],
     "--config.data.text_path says where the run's data is, which --mode attention does not read (--mode eval does)"),
    (['--mode', 'eval', '--config', 'experiments/cpu.py'], '--config is for --mode train, not --mode eval (it reads '
                                                           'the config saved with the run)'),
    (['--config', 'experiments/cpu.py', '--config.name=../elsewhere'], "name must be a plain folder name"),
    (['--config', 'experiments/cpu.py', '--config.train.profile_steps=5', '--config.train.num_steps=50'],
     'train.profile_start=100 is not below train.num_steps=50: the trace of train.profile_steps would never start'),
    (['--config', 'experiments/sweep.py', '--sweep_index=0', '--sweep_parallel=2'],
     '--sweep_index trains one point, --sweep_parallel=2 several at once'),
]


@pytest.fixture(scope='module')
def bad_flags_results(tmp_path_factory):
  """{(flags, message): (folder, launch.py's result)} of every BAD_FLAGS case, each in a folder of its own holding
  the files the flags name, launched up front two at a time."""
  commands, folders = [], []
  for flags, _ in BAD_FLAGS:
    folder = tmp_path_factory.mktemp('bad_flags')
    (folder / 'file').write_text('KING:')
    (folder / 'empty.txt').write_text('')
    (folder / 'latin1.txt').write_bytes('café\n'.encode('latin-1'))
    folders.append(folder)
    commands.append([*[flag.format(tmp=folder) for flag in flags], '--workdir', str(folder / 'run')])
  cases = zip(folders, launch_all(commands))
  results = {(tuple(flags), message): case for (flags, message), case in zip(BAD_FLAGS, cases)}
  assert len(results) == len(BAD_FLAGS)  # no case twice
  return results


@pytest.mark.parametrize('flags, message', BAD_FLAGS)
def test_bad_flags_are_refused_before_loading_a_checkpoint(bad_flags_results, flags, message):
  """The workdir has no checkpoint: a check made after loading one would report that instead."""
  folder, result = bad_flags_results[tuple(flags), message]
  assert_user_error(result, message.format(tmp=folder))


def test_a_mistake_inside_get_config_is_not_blamed_on_overrides(tmp_path):
  """ml_collections raises AttributeError/KeyError for a misspelt override and for one in get_config() alike."""
  experiment = tmp_path / 'typo.py'
  experiment.write_text(f'import sys\nsys.path.insert(0, {str(REPO / "experiments")!r})\nimport cpu\n\n\n'
                        'def get_config():\n  config = cpu.get_config()\n  config.modle.num_layers = 2\n  return config\n')
  for overrides in ([], ['--config.seed=3']):
    result = launch('--config', str(experiment), *overrides, '--workdir', str(tmp_path / 'run'))
    assert_user_error(result, f"cannot load the --config file {experiment}: AttributeError: 'modle' (did you mean "
                              "'model'?); an experiment file is Python with get_config()")
  result = launch('--config', 'experiments/cpu.py', '--config.modle.num_layers=2', '--workdir', str(tmp_path / 'run'))
  assert_user_error(result, "unknown config field in --config.modle.num_layers=2: 'modle' (did you mean 'model'?)")
  assert files_in(tmp_path) == ['typo.py']


@pytest.mark.parametrize('sweep_flags', [['--sweep_list'], ['--sweep_index=0'], []])
def test_a_sweep_root_that_is_a_file_is_refused(tmp_path, sweep_flags):
  (tmp_path / 'file').write_text('KING:')
  result = launch('--config', 'experiments/sweep.py', *sweep_flags, '--workdir', str(tmp_path / 'file'))
  assert_user_error(result, f'--workdir {tmp_path / "file"} is a file; give the sweep a folder (its points go in '
                            'folders under it)')


def test_refused_commands_leave_no_folders_behind(tmp_path):
  attention = launch('--mode', 'attention', '--prompt', 'ab', '--workdir', str(tmp_path / 'typo'))
  assert_user_error(attention, f'no checkpoints in {tmp_path / "typo"}')
  evaluation = launch('--mode', 'eval', '--workdir', str(tmp_path / 'typo'), '--out', str(tmp_path / 'new/sub/e.json'))
  assert_user_error(evaluation, f'no checkpoints in {tmp_path / "typo"}')
  assert_user_error(launch('--mode', 'sample', '--workdir', str(tmp_path / ('x' * 300))), 'File name too long')
  assert files_in(tmp_path) == []


@pytest.mark.parametrize('stream', [[], ['--stream']])
def test_samples_go_to_out_even_when_stdout_closes_and_to_the_target_of_a_link(trained, tmp_path, stream):
  (tmp_path / 'target.txt').write_text('old')
  (tmp_path / 'link.txt').symlink_to(tmp_path / 'target.txt')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  reader = subprocess.Popen([sys.executable, 'launch.py', '--mode', 'sample', '--workdir', str(trained), *stream,
                             '--max_new_tokens', '40', '--out', str(tmp_path / 'link.txt')], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  reader.stdout.close()  # as `| head` does once it has what it wants
  err = reader.stderr.read()
  assert reader.wait(timeout=120) == 1 and 'Traceback' not in err and 'error' not in err, err[-2000:]
  text = (tmp_path / 'target.txt').read_text()
  assert (tmp_path / 'link.txt').is_symlink() and text.startswith('--- sample 1 ---\n\n')
  assert len(text) == len('--- sample 1 ---\n\n') + 40 + 1  # the whole sample: the prompt (a newline) + 40 tokens


def test_a_prompt_file_is_read_as_it_is(trained, tmp_path):
  (tmp_path / 'prompt.txt').write_bytes(b'KING:\r\n')  # the corpus has no '\r': read_text would hide it
  result = launch('--mode', 'sample', '--workdir', str(trained), '--prompt_file', str(tmp_path / 'prompt.txt'))
  assert_user_error(result, "characters not in the vocabulary: '\\r'")


@pytest.mark.parametrize('mode', ['sample', 'attention'])
def test_a_prompt_outside_the_vocabulary_is_refused_before_the_weights_are_read(trained, tmp_path, mode):
  """The tokenizer is saved in the checkpoint's meta: the prompt is checked before the parameters, however large,
  are read. Here they cannot be read: a check made after reading them would report that instead."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  (workdir / 'checkpoints' / '12' / 'params' / 'manifest.ocdbt').unlink()
  result = launch('--mode', mode, '--workdir', str(workdir), '--prompt', 'the €')
  assert_user_error(result, "characters not in the vocabulary: '€'; use only characters of the training corpus")
  result = launch('--mode', mode, '--workdir', str(workdir), '--prompt', 'the')  # a prompt it can encode
  assert_user_error(result, 'cannot read the checkpoint at step 12')


def test_a_workdir_that_is_a_file_is_refused(corpus_file, tmp_path):
  (tmp_path / 'run').write_text('not a folder')
  result = launch(*tiny_args(corpus_file), '--workdir', str(tmp_path / 'run'))
  assert_user_error(result, f'workdir {tmp_path}/run is a file; pass a folder as --workdir')


@pytest.mark.parametrize('path, extra', [
    ('checkpoints', []),
    ('plugins', ['--config.train.profile_steps=2', '--config.train.profile_start=2']),
    ('metrics.jsonl/', []),
])
def test_a_file_where_the_run_writes_a_folder_is_refused_before_training(corpus_file, tmp_path, path, extra):
  """(was: found only when the first checkpoint was written, the profile ended or the first line was logged: the
  steps before it lost, and for the profile a traceback)"""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  if path.endswith('/'):
    (workdir / path).mkdir()
    message = f'{workdir / path[:-1]} is a folder, where the run writes a file'
  else:
    (workdir / path).write_text('not a folder')
    message = f'{workdir / path} is a file, where the run writes a folder'
  result = launch(*tiny_args(corpus_file, *extra), '--workdir', str(workdir))
  assert_user_error(result, message)
  assert 'step ' not in result.stderr + result.stdout


def test_failing_to_write_out_is_one_line(tmp_path, monkeypatch):
  from nanodecoder import cli

  def disk_full(path, data):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(cli, 'atomic_write', disk_full)
  assert cli._write_out(tmp_path / 'samples.txt', 'text') == (
      f'cannot write --out {tmp_path}/samples.txt: No space left on device (the results are printed above); give a '
      'path in a writable folder')


@pytest.fixture
def parsed():
  """launch.py's flags in this process: parsed(*args) parses them as launch.py does; unparsed again afterwards."""
  from absl import flags, logging

  from nanodecoder import cli

  if 'mode' not in flags.FLAGS:
    cli.define_flags()
  verbosity = logging.get_verbosity()

  def parse(*args):
    flags.FLAGS.unparse_flags()
    return cli.parse_flags(['launch.py', *args])

  yield parse
  flags.FLAGS.unparse_flags()
  cli.data_locations.clear()
  logging.set_verbosity(verbosity)


def test_each_mode_specific_flag_is_refused_by_the_modes_that_would_ignore_it(parsed, capsys):
  from nanodecoder import cli

  for mode, flag in [('train', '--nokv_cache'), ('train', '--stream'), ('eval', '--num_samples=2'),
                     ('attention', '--max_new_tokens=5'), ('train', '--temperature=0'), ('eval', '--top_k=3'),
                     ('train', '--top_p=0.5'), ('eval', '--prompt=a'), ('summary', '--prompt_file=p.txt'),
                     ('train', '--checkpoint=best'), ('attention', '--split=test'), ('sample', '--distributed=on'),
                     ('sample', '--coordinator_address=h:1'), ('eval', '--num_processes=2'),
                     ('summary', '--process_id=0')]:
    name = flag.partition('=')[0]  # (--nokv_cache as typed)
    parsed(f'--mode={mode}', flag)
    with pytest.raises(SystemExit) as exit:
      cli._refuse_flags_of_other_modes()
    assert exit.value.code == 2 and capsys.readouterr().err.startswith(f'error: {name} is for --mode '), flag
  for mode, flag in [('sample', '--nokv_cache'), ('attention', '--prompt=a'), ('eval', '--checkpoint=best'),
                     ('eval', '--split=test'), ('train', '--distributed=off')]:
    parsed(f'--mode={mode}', flag)
    cli._refuse_flags_of_other_modes()  # its own mode's flag: taken


def test_stray_arguments_and_runtime_errors_of_a_mode(parsed, monkeypatch, capsys):
  import jax

  from nanodecoder import cli

  parsed('--mode=summary', '--workdir=sweep')
  with pytest.raises(SystemExit) as exit:
    cli.main(['launch.py', 'stray'])
  assert exit.value.code == 2 and capsys.readouterr().err == 'error: unexpected arguments: stray\n'

  def raising(error):
    def mode():
      raise error
    return mode

  for error, message in [
      (jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 4.0GiB'),
       'error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 4.0GiB); free memory on this machine or '
       'use one with more\n'),
      (jax.errors.JaxRuntimeError('Out of memory while trying to allocate 4.0GiB'),  # XLA's CPU client
       'error: out of memory (Out of memory while trying to allocate 4.0GiB); free memory on this machine or use one '
       'with more\n'),
      (FileNotFoundError(errno.ENOENT, 'No such file or directory', 'sweep/sweep.json'),
       'error: cannot use sweep/sweep.json: No such file or directory; check the paths in the flags and config '
       'fields\n'),
      (OSError(errno.ENOSPC, 'No space left on device', 'sweep/summary.csv'),  # a file's: not the standard output
       'error: cannot use sweep/summary.csv: No space left on device; check the paths in the flags and config '
       'fields\n')]:
    monkeypatch.setitem(cli.MODES, 'summary', raising(error))
    with pytest.raises(SystemExit) as exit:
      cli.main(['launch.py'])
    assert exit.value.code == 2 and capsys.readouterr().err == message
  monkeypatch.setitem(cli.MODES, 'summary', raising(jax.errors.JaxRuntimeError('INTERNAL: a bug')))
  with pytest.raises(jax.errors.JaxRuntimeError, match='INTERNAL: a bug'):  # not a user's error: its traceback
    cli.main(['launch.py'])


def test_eval_takes_the_data_locations_out_of_its_flags(parsed, capsys):
  from nanodecoder import cli

  assert parsed('--mode=eval', '--config.data.text_path', '/data/a.txt', '--workdir=run',
                '--config.data.manual_dir=/data/tfds') == ['launch.py']
  assert cli.data_locations == {'text_path': '/data/a.txt', 'manual_dir': '/data/tfds'}
  with pytest.raises(SystemExit) as exit:
    parsed('--mode=eval', '--workdir=run', '--config.data.text_path')  # the last argument: no value follows
  assert exit.value.code == 2 and capsys.readouterr().err == ('error: --config.data.text_path needs a value: '
                                                              '--config.data.text_path=PATH\n')


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections loading the --config file
def test_a_sweep_index_below_zero_and_no_parallel_points_are_refused(parsed, tiny_config, tmp_path, monkeypatch,
                                                                    capsys):
  from nanodecoder import cli
  from nanodecoder import sweep as sweep_lib

  monkeypatch.setattr(cli, 'train_point', lambda config, workdir: pytest.fail(f'trained {workdir}'))
  monkeypatch.setattr(sweep_lib, 'check_saved_configs', lambda *args: pytest.fail('went on past the flags'))
  sweep = sweep_lib.make_sweep('x.py', tiny_config(), {'seed': [1, 2]})
  parsed('--sweep_index=-1')
  with pytest.raises(SystemExit) as exit:  # (not the last point, as a Python index)
    cli.sweep_point_command(sweep, tiny_config(), tmp_path)
  assert exit.value.code == 2 and capsys.readouterr().err.startswith('error: --sweep_index=-1 is out of range: the '
                                                                     'sweep has 2 points, 0 to 1')
  parsed(f'--config={REPO / "experiments" / "sweep.py"}', '--sweep_parallel=0', f'--workdir={tmp_path}')
  with pytest.raises(SystemExit) as exit:
    cli.main(['launch.py'])
  assert exit.value.code == 2 and capsys.readouterr().err == 'error: --sweep_parallel must be >= 1, got 0\n'
  assert list(tmp_path.iterdir()) == []


def test_the_prompt_file_is_read_less_its_byte_order_mark_and_the_default_prompt_is_not_given(parsed, tmp_path):
  from nanodecoder import cli

  (tmp_path / 'prompt.txt').write_bytes(b'\xef\xbb\xbfKING:\r\n')  # as Windows editors save it
  parsed('--mode=sample', f'--prompt_file={tmp_path / "prompt.txt"}')
  assert cli._given_prompt() == 'KING:\r\n'
  parsed('--mode=sample')
  assert cli._given_prompt() is None  # sampling starts from a newline, if the model has one
  parsed('--mode=sample', '--prompt=\n')
  assert cli._given_prompt() == '\n'


def test_the_runs_own_files_are_found_also_through_a_link_to_its_folder(tmp_path):
  from nanodecoder import cli

  run = tmp_path / 'run'
  run.mkdir()
  (tmp_path / 'link').symlink_to(run)
  for name in ('metrics.jsonl', 'tokenizer.json', '.lock', 'sweep.json', 'failed.txt', 'summary.csv',
               'checkpoints/12/params', 'plugins/profile', 'events.out.tfevents.1.host'):
    assert cli._run_own(run / name, tmp_path / 'link') == pathlib.Path(name), name
  assert cli._run_own(run / 'samples.txt', tmp_path / 'link') is None
  assert cli._run_own(run / 'maps' / 'events.out.tfevents.1.host', run) is None  # (TensorBoard's are in the run's own)


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc, a folder no file can be made in')
@pytest.mark.parametrize('stream', [[], ['--stream']])
def test_samples_that_cannot_be_written_to_out_are_still_printed(trained, stream):
  result = launch('--mode', 'sample', '--workdir', str(trained), *stream, '--max_new_tokens', '8', '--out',
                  '/proc/samples.txt')
  assert result.stdout.startswith('--- sample 1/1 (checkpoint step ') and len(result.stdout.splitlines()) >= 2
  assert_user_error(result, 'cannot write --out /proc/samples.txt: No such file or directory (the results are '
                            'printed above); give a path in a writable folder')


def test_parallel_sweep_prepares_the_tfds_dataset_once_before_its_points(tmp_path):
  """The parent loads the corpus (points starting together would race on the TFDS prepare): a bad name fails once."""
  result = launch('--config', 'experiments/sweep.py:blocks', '--config.data.tfds_name=tiny_shakespear',
                  '--sweep_parallel=2', '--workdir', str(tmp_path / 'sweep'))
  assert_user_error(result, "sweep point 0 (num_layers=1): data.tfds_name 'tiny_shakespear' is not a TFDS dataset; "
                            "use e.g. 'tiny_shakespeare'")
  assert files_in(tmp_path / 'sweep') == []  # nothing written, no point started


def test_failed_save_keeps_the_previous_checkpoint(tiny_config, tmp_path, monkeypatch):
  """Disk full (or a read-only workdir) during a save: a clear error; the last checkpoint still restores."""
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5}), tmp_path)
  import orbax.checkpoint as ocp

  def disk_full(self, step, *args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full)
  with pytest.raises(CheckpointError, match=r'cannot write the checkpoint of step 15 in .* \(OSError: .*No space left '
                                            r'on device\); the checkpoint at step 10 is intact'):
    train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 20, 'checkpoint.every': 5}), tmp_path)
  monkeypatch.undo()
  assert Checkpoints(tmp_path, read_only=True).steps()[-1] == 10
  metrics = train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 20, 'checkpoint.every': 5}), tmp_path)
  assert Checkpoints(tmp_path, read_only=True).steps()[-1] == 20 and metrics['val_loss'] > 0


def test_a_failed_asynchronous_save_ends_the_process_at_once_in_one_line(trained, corpus_file, tmp_path):
  """A step folder that cannot be made: Orbax's background threads waited 300 s for its signal, printing
  tracebacks, when the folder was made in the background (orbax-checkpoint 0.12)."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  checkpoints = workdir / 'checkpoints'
  if subprocess.run(['chattr', '+i', str(checkpoints)], capture_output=True).returncode != 0:
    pytest.skip('needs chattr +i (root on a file system with attributes) to make a folder no one can write')
  try:
    result = launch(*tiny_args(corpus_file, '--config.train.num_steps=24', '--config.checkpoint.async_save=true'),
                    '--workdir', str(workdir), timeout=120)
  finally:
    subprocess.run(['chattr', '-i', str(checkpoints)], check=True)
  assert_user_error(result, f'cannot write the checkpoint of step 24 in {checkpoints} (PermissionError: ')
  assert 'the checkpoint at step 12 is intact' in result.stderr and result.stderr.count('\n') == 1, result.stderr


def test_checkpoint_with_other_arrays_is_refused_not_discarded(tiny_config, tmp_path, monkeypatch):
  """Scanned layers store parameters stacked: restoring an unstacked run refuses, and deletes nothing."""
  train_lib.train_and_evaluate(tiny_config(**{'train.num_steps': 10, 'checkpoint.every': 5}), tmp_path)
  before = files_in(tmp_path / 'checkpoints')
  with pytest.raises(config_lib.ConfigError, match=r'different model shape: model.scan_layers=False \(config says True\)'):
    train_lib.train_and_evaluate(tiny_config(**{'model.scan_layers': True}), tmp_path)
  assert files_in(tmp_path / 'checkpoints') == before
  # Arrays that differ in a way the model fields do not name are refused by the arrays themselves.
  monkeypatch.setattr(checkpoint_lib, 'SHAPE_FIELDS', tuple(f for f in checkpoint_lib.SHAPE_FIELDS if f != 'scan_layers'))
  with pytest.raises(config_lib.ConfigError, match=r'the params of the checkpoint at step 10 do not match this config'):
    train_lib.train_and_evaluate(tiny_config(**{'model.scan_layers': True}), tmp_path)
  assert files_in(tmp_path / 'checkpoints') == before


def test_a_sweep_and_a_single_run_do_not_share_a_folder(tmp_path):
  (tmp_path / 'sweep').mkdir()
  (tmp_path / 'sweep' / 'sweep.json').write_text('{"config": "experiments/sweep.py:blocks"}')
  assert_user_error(launch('--workdir', str(tmp_path / 'sweep')),
                    f'{tmp_path}/sweep is the folder of a sweep; resume it with its command: --config '
                    f'experiments/sweep.py:blocks --workdir {tmp_path}/sweep')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{}')
  assert_user_error(launch('--config', 'experiments/sweep.py', '--workdir', str(tmp_path / 'run')),
                    f'--workdir {tmp_path}/run holds a single run (its config.json); give the sweep a folder')
  assert files_in(tmp_path) == ['run', 'run/config.json', 'sweep', 'sweep/sweep.json']


def test_a_compilation_cache_that_is_a_file_is_refused(corpus_file, tmp_path):
  (tmp_path / 'cache').write_text('')
  result = launch(*tiny_args(corpus_file), '--workdir', str(tmp_path / 'run'),
                  env={'NANODECODER_COMPILATION_CACHE': str(tmp_path / 'cache')})
  assert_user_error(result, f"NANODECODER_COMPILATION_CACHE={tmp_path}/cache is not a folder; point it at one")
  assert files_in(tmp_path) == ['cache']
