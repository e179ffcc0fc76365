"""What `launch.py` does: its flags, and one function per mode.

User errors (bad config, data, checkpoint or sampling options) print one line
starting with 'error:' and exit with status 2.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import traceback
from typing import Callable

import jax
import ml_collections
from absl import flags

from nanodecoder import config as config_lib
from nanodecoder import interrupts, saved_config, sharding
from nanodecoder import sweep as sweep_lib
from nanodecoder.checkpoint import CheckpointError, WorkdirInUse, set_aside_steps
from nanodecoder.config import ConfigError
from nanodecoder.data import DataError
from nanodecoder.files import WORKDIR_LOCK, atomic_write, unwritable_folder
from nanodecoder.metrics import discard
from nanodecoder.sampling import SamplingError, SamplingOptions

USER_ERRORS = (ConfigError, DataError, CheckpointError, SamplingError, FloatingPointError)
CACHE_ENV = 'NANODECODER_COMPILATION_CACHE'
FLAGS = flags.FLAGS


def define_flags() -> None:
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. experiments/cpu.py; --config.a.b=v overrides.')
  flags.DEFINE_string('workdir', None, 'Run directory (default runs/<config.name>); holds checkpoints and logs.')
  flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'attention', 'summary'],
                    'train: train (or resume) the config in the workdir, or every point of a sweep; '
                    'sample: generate text from the workdir\'s checkpoint (needs no --config); '
                    'eval: loss, perplexity and bits/char of a checkpoint over every window of --split (data moved: '
                    '--config.data.text_path=FILE); '
                    'attention: draw the attention maps of --prompt as PNGs (into --out); '
                    'summary: (re)write summary.csv/.md and plots of the sweep in --workdir.')
  flags.DEFINE_string('prompt', '\n', 'sample: text to continue; attention: text whose attention to draw.')
  flags.DEFINE_string('prompt_file', None, 'sample, attention: read the prompt from this file instead.')
  flags.DEFINE_integer('num_samples', 1, 'sample: how many samples.')
  flags.DEFINE_integer('max_new_tokens', 500, 'sample: tokens generated per sample.')
  flags.DEFINE_float('temperature', 0.8, 'sample: softmax temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'sample: keep the k most likely tokens (0 = off).')
  flags.DEFINE_float('top_p', 1.0, 'sample: nucleus sampling mass in (0, 1] (1 = off).')
  flags.DEFINE_integer('seed', 0, 'sample: PRNG seed.')
  flags.DEFINE_string('checkpoint', 'latest', 'sample, eval, attention: latest, best (lowest val loss) or a step '
                      'number.')
  flags.DEFINE_string('out', None, 'sample: also write the samples to this file; eval: also write the report to this '
                      'JSON file; attention: folder for the PNGs (default <workdir>/attention).')
  flags.DEFINE_string('split', None, "eval: split(s) to score, '+' joins them, e.g. 'validation+test' or 'train' "
                      "(default: the run's data.eval_split).")
  flags.DEFINE_integer('sweep_index', None, 'Sweep: train only point i (0-based; see --sweep_list), e.g. '
                       '--sweep_index=$SLURM_ARRAY_TASK_ID in a cluster array job.')
  flags.DEFINE_bool('sweep_list', False, 'Sweep: print the points (index, status, workdir) and exit.')
  flags.DEFINE_integer('sweep_parallel', 1, 'Sweep: points trained at once on this machine, each in its own '
                       'process (on CPU each gets cores / N devices; with CUDA_VISIBLE_DEVICES, its share of them).')
  flags.DEFINE_bool('stream', False, 'sample: print tokens as they come (one compiled call per token).')
  flags.DEFINE_bool('kv_cache', True, 'sample: decode with a KV cache (--nokv_cache re-runs the whole context).')
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'], 'Multi-host: join the other processes with '
                    'jax.distributed.initialize (auto: when a coordinator is given or SLURM / Open MPI / a TPU slice '
                    'started several processes).')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
  flags.DEFINE_integer('distributed_timeout', 300, 'Multi-host: seconds to wait for every process to join (JAX\'s '
                       'initialization_timeout); then stop with an error.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.x.y` field reported in one line (exit 2)."""
  from absl import logging

  argv = _overrides_of_a_saved_config(argv)
  try:
    argv = FLAGS(argv)
    if not FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # JAX / Orbax / TFDS chatter; --verbosity=0 shows it
    return argv
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):  # config_flags ran the file: its traceback is in the message
      _config_load_failed([line for line in str(e).splitlines() if line.strip()][-1].strip())
    fail(f'{e} (see --helpfull)')
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config does not have
    message = _missing_field(e)
    if "has no attribute 'get_config" in message or _raised_in_config_file(e, argv):  # the file's own mistake
      _config_load_failed(e)
    fail(f'unknown config field in {_override_naming(message, argv)}: {message}; see experiments/base.py for the '
         'fields')
  except Exception as e:  # noqa: BLE001 (with overrides, config_flags runs the --config file here)
    _config_load_failed(e)


SAVED_CONFIG_FILE = pathlib.Path(__file__).with_name('saved_config.py')


def _flag_values(argv: list[str]) -> dict[str, str | None]:
  """Flag name -> its value (None for a bare boolean), from --name=value or --name value, before absl parses."""
  args = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  values = {}
  for i, arg in enumerate(args):
    if arg.startswith('-'):
      name, eq, value = arg.lstrip('-').partition('=')
      following = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith('-') else None
      values[name] = value if eq else following
  return values


# The overrides `--mode eval` takes: where the run's data lives now (field of config.data -> path), e.g. after the
# text file moved; set while parsing the flags.
LOCATION_OVERRIDES = {f'config.data.{field}' for field in config_lib.PATH_FIELDS}
data_locations: dict[str, str] = {}


def _overrides_of_a_saved_config(argv: list[str]) -> list[str]:
  """`--workdir RUN --config.a.b=v` without --config (training): the overrides apply to RUN/config.json (through
  nanodecoder/saved_config.py, so that they are parsed as an experiment file's are). With --mode eval, the
  overrides of the data's location (LOCATION_OVERRIDES) are taken out of argv into `data_locations`."""
  values = _flag_values(argv)
  overrides = [n for n in values if n.startswith(('config.', 'noconfig.'))]
  mode = values.get('mode', 'train')
  if overrides and 'config' not in values and mode != 'train':
    _refuse_overrides_of_a_reading_mode(overrides, mode)
    return _take_data_locations(argv)
  if not overrides or 'config' in values or 'flagfile' in values:
    return argv
  workdir = values.get('workdir')
  if not workdir or not ((pathlib.Path(workdir) / config_lib.SAVED_CONFIG).is_file()
                         or sweep_lib.saved_steps(workdir)):
    fail(f'--{overrides[0]} overrides a field of a --config file: pass --config FILE, or the --workdir of a run '
         'to change its saved config.json')
  _read_saved_config(pathlib.Path(workdir))  # a broken one fails here in one line, not inside config_flags
  return [argv[0], f'--config={SAVED_CONFIG_FILE}:{workdir}', *argv[1:]]


def _refuse_overrides_of_a_reading_mode(overrides: list[str], mode: str) -> None:
  """Refuses a config override given to a mode that reads a run (sample, eval, attention), but the data's location
  given to --mode eval: those modes use the config saved with the checkpoint, which fixes what they compute."""
  for name in overrides:
    if mode == 'eval' and name in LOCATION_OVERRIDES:
      continue
    if mode == 'eval':
      takes = ', '.join(f'--{f}' for f in sorted(LOCATION_OVERRIDES))
      field = name.removeprefix('config.')
      if field not in config_lib.FIELDS:  # a misspelt location, most likely
        close = difflib.get_close_matches(name, sorted(LOCATION_OVERRIDES), n=1)
        hint = f'did you mean --{close[0]}? ' if close else ''
        fail(f'--{name}: the config has no field {field}; {hint}--mode eval takes only {takes}')
      if not field.startswith(('data.', 'model.')):  # how the run trained, logged or saved (mesh, steps, ...)
        fail(f'--{name} is a setting of training, which --mode eval does not use (it scores on its own devices); it '
             f'takes only where the run\'s data is now: {takes}; remove it')
      split = ' (another split: --split)' if name.endswith('_split') else ''
      fail(f'--{name} would change what --mode eval scores (the checkpoint on the data it trained on){split}; it '
           f'takes only where that data is now: {takes}; remove it')
    if name in LOCATION_OVERRIDES:
      fail(f'--{name} says where the run\'s data is, which --mode {mode} does not read (--mode eval does); remove it')
    fail(f'--{name} overrides a field of the config, which only training takes; --mode {mode} uses the config saved '
         'with the run: remove it')


def _take_data_locations(argv: list[str]) -> list[str]:
  """argv less its --config.data.<path field>=PATH (or `--config.data.<path field> PATH`), which go into
  `data_locations`."""
  end = argv.index('--') if '--' in argv else len(argv)
  kept, i = [argv[0]], 1
  while i < end:
    name, eq, value = argv[i].lstrip('-').partition('=')
    if not argv[i].startswith('-') or name not in LOCATION_OVERRIDES:
      kept.append(argv[i])
      i += 1
      continue
    if not eq:  # the value is the next argument
      if i + 1 >= end or argv[i + 1].startswith('-'):
        fail(f'--{name} needs a value: --{name}=PATH')
      value = argv[i + 1]
      i += 1
    data_locations[name.removeprefix('config.data.')] = value
    i += 1
  return kept + argv[end:]


def _missing_field(error: AttributeError | KeyError) -> str:
  """ml_collections' message for a field a config does not have, in one line: 'num_layrs' (did you mean ...?)."""
  message = str(error.args[0] if error.args else error).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
  message = ' '.join(message.split())  # a top-level field's message spans two lines (its closing quote is gone)
  suggestion = re.match(r"'?([\w.]+)'? Did you mean \"([\w.]+)\"", message)
  if suggestion:  # ml_collections' "'num_layrs' Did you mean "num_layers" instead of "num_layrs"?"
    message = f'{suggestion[1]!r} (did you mean {suggestion[2]!r}?)'
  return message


def _override_naming(message: str, argv: list[str]) -> str:
  """The override (--config.a.b=v) whose path holds the unknown field that `message` names first, else 'the
  overrides'."""
  field = message.split()[0].strip("'") if message else ''
  for name, value in _flag_values(argv).items():
    if name.startswith('config.') and field in name.split('.')[1:]:
      return f'--{name}' if value is None else f'--{name}={value}'
  return 'the overrides'


def _raised_in_config_file(error: Exception, argv: list[str]) -> bool:
  """Whether `error` came out of the code of the --config file (its get_config()), not out of an override."""
  values = _flag_values(argv)
  path = (values.get('config') or '').partition(':')[0]
  if not path:
    return False
  frames = traceback.extract_tb(error.__traceback__)
  return any(os.path.abspath(frame.filename) == os.path.abspath(path) for frame in frames)


def _config_load_failed(error: Exception | str) -> None:
  """One line for a --config file that does not run or defines no get_config() (or the line saying why)."""
  if isinstance(error, str):
    reason = error
  elif isinstance(error, OSError):
    reason = error.strerror or str(error).strip().splitlines()[-1].strip()
  elif isinstance(error, AttributeError) and "attribute 'get_config'" in str(error):
    reason = 'it defines no get_config()'
  elif isinstance(error, (AttributeError, KeyError)):  # e.g. a misspelt field in get_config()
    reason = f'{type(error).__name__}: {_missing_field(error)}'
  else:
    reason = f'{type(error).__name__}: {" ".join(str(error).split())}'
  spec = _flag_values(sys.argv).get('config')
  fail(f'cannot load the --config file{f" {spec}" if spec else ""}: {reason}; an experiment file is Python with get_config() (to resume a '
       'run from its saved config.json, pass only its --workdir)')


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def setup_jax(config: ml_collections.ConfigDict | None = None) -> None:
  """Process-wide JAX settings; must run before the first computation."""
  if config is not None:
    sharding.set_cpu_devices(sharding.cpu_device_count(config, sharding.usable_cores()), config.mesh.cpu_devices)
  cache = os.environ.get(CACHE_ENV, str(pathlib.Path.home() / '.cache' / 'nanodecoder' / 'jax'))
  if cache and os.path.exists(cache) and not os.path.isdir(cache):
    fail(f"{CACHE_ENV}={cache} is not a folder; point it at one (made if missing), or set it to '' to compile "
         'without the persistent cache')
  if cache:  # NANODECODER_COMPILATION_CACHE='' turns the persistent cache off
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def default_workdir(config: ml_collections.ConfigDict) -> str:
  return str(pathlib.Path('runs') / config.name)


def run() -> None:
  """launch.py: flags, then the mode they ask for. Ctrl-C anywhere outside the training loop (which saves a
  checkpoint first) exits 130 without a traceback."""
  from absl import app

  interrupts.install()
  for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a sample's characters gets escapes for them
    if stream is not None:  # (None: that file descriptor was closed)
      stream.reconfigure(errors='backslashreplace')
  define_flags()
  try:
    interrupts.check()
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    print(file=sys.stderr)
    # Out at once, without the interpreter's shutdown (the `finally` blocks on the way have closed the run's files):
    # a compilation that the Ctrl-C interrupted goes on in XLA's threads, and JAX's exit handler tearing the
    # backend down under it waited for it and then crashed (a segmentation fault, exit status -11).
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (AttributeError, OSError):  # closed, or a reader that went away
        pass
    os._exit(128 + signal.SIGINT)


# The modes that read each mode-specific flag; given to another mode, it would be ignored, so it is refused.
_FLAG_MODES = {
    **dict.fromkeys(('num_samples', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed', 'stream',
                     'kv_cache'), ('sample',)),
    **dict.fromkeys(('prompt', 'prompt_file'), ('sample', 'attention')),
    **dict.fromkeys(('checkpoint', 'out'), ('sample', 'eval', 'attention')),
    'split': ('eval',),
    **dict.fromkeys(('config', 'distributed', 'coordinator_address', 'distributed_timeout', 'num_processes',
                     'process_id'), ('train',)),
}
_INSTEAD = {('seed', 'train'): ' (the training seed is --config.seed)',
            ('checkpoint', 'train'): ' (training resumes from the latest checkpoint)',
            **{('config', mode): ' (it reads the config saved with the run)' for mode in ('sample', 'eval', 'attention')},
            ('config', 'summary'): ' (it reads the configs saved with the runs)'}


def _refuse_flags_of_other_modes() -> None:
  for name, modes in _FLAG_MODES.items():
    if FLAGS[name].present and FLAGS.mode not in modes:
      given = f'--no{name}' if FLAGS[name].boolean and not FLAGS[name].value else f'--{name}'  # as typed
      fail(f'{given} is for --mode {" or ".join(modes)}, not --mode {FLAGS.mode}'
           f'{_INSTEAD.get((name, FLAGS.mode), "")}; remove it')


_MEMORY_HINTS = {
    'train': 'lower train.batch_size (or raise train.grad_accum_steps), model.context_length or the model size, or '
             'set model.remat',
    'sample': 'lower --num_samples or --max_new_tokens (the memory sampling needs grows with both)',
}


def _is_out_of_memory(error: Exception) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(error) or 'Out of memory' in str(error)  # (XLA's CPU client says the latter)


def _out_of_memory(error: Exception) -> str:
  first = ' '.join(str(error).split())[:160]
  hint = _MEMORY_HINTS.get(FLAGS.mode, 'free memory on this machine or use one with more')
  return f'out of memory ({first}); {hint}'


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  _refuse_flags_of_other_modes()
  try:
    declaration = sweep_declaration()
    if declaration is not None:
      sweep_command(declaration)
    elif FLAGS.mode in MODES:
      MODES[FLAGS.mode]()
    else:
      train_command()
  except USER_ERRORS as e:
    fail(str(e))
  except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
    discard(sys.stdout)  # no second error when Python flushes stdout
    sys.exit(1)
  except OSError as e:  # a path given in a flag or a config field that is not what it must be
    if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):  # a stream: stdout
      fail(f'cannot write the output: {e.strerror}; check where the standard output goes (a full disk?)')
    where = f' {e.filename}' if e.filename else ''
    fail(f'cannot use{where}: {e.strerror or e}; check the paths in the flags and config fields')
  except jax.errors.JaxRuntimeError as e:
    if not _is_out_of_memory(e):
      raise
    fail(_out_of_memory(e))


def train_command(config: ml_collections.ConfigDict | None = None, workdir: str | pathlib.Path | None = None,
                  while_locked: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
  """Trains FLAGS.config (or `config`) in --workdir (or `workdir`); see train.train_and_evaluate for `while_locked`."""
  from ml_collections import config_flags

  from nanodecoder import train  # after argument parsing: keeps `--help` fast

  config_file = None  # the --config file, when the config is one (not the run's own saved config)
  config = FLAGS.config if config is None else config
  if config is None:
    config = _saved_config()
  elif FLAGS.config is config and config_flags.get_config_filename(FLAGS['config']).startswith(
      f'{SAVED_CONFIG_FILE}:'):
    overrides = config_flags.get_override_values(FLAGS['config'])
    _, where = _read_saved_config(pathlib.Path(FLAGS.workdir))
    print(f'resuming with the config saved in {where} and the overrides '
          f'{" ".join(f"{k}={v!r}" for k, v in overrides.items())}', flush=True)
  elif FLAGS.config is config:
    config_file = config_flags.get_config_filename(FLAGS['config'])
  try:
    config.get('name')  # config_flags defers a failed load to the first access
  except Exception as e:  # noqa: BLE001
    _config_load_failed(e)
  config_lib.make_paths_absolute(config)
  workdir = pathlib.Path(workdir or FLAGS.workdir or default_workdir(config))
  _refuse_other_settings_for_a_started_run(config, config_file, workdir)
  setup_jax(config)
  sharding.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  FLAGS.distributed_timeout)
  metrics = train.train_and_evaluate(config, workdir, while_locked)
  if 'stopped_by' in metrics:  # checkpoint saved; exit as the signal would have (130 for Ctrl-C, 143 for SIGTERM)
    sys.exit(128 + int(getattr(signal, metrics['stopped_by'], signal.SIGTERM)))
  if 'train_loss' in metrics and jax.process_index() == 0:
    print(f'final: train loss {metrics["train_loss"]:.4f} | val loss {metrics["val_loss"]:.4f} | '
          f'val bits/char {metrics["val_bits_per_char"]:.4f}')


def _refuse_other_settings_for_a_started_run(config: ml_collections.ConfigDict, config_file: str | None,
                                             workdir: pathlib.Path) -> None:
  """A --config file (with its overrides) whose settings differ from those a started run's config.json records
  (its last session's), outside config.RESUMABLE_CHANGES, is refused: resumed, the run would silently continue
  under other settings, e.g. the full recipe after a short quick look in the same runs/<name>, from a schedule
  that has already decayed. Without a file (`config_file` None: the run's own config and overrides, or a sweep's
  point) only another model shape is refused here, before any data is read (the restore would refuse it later)."""
  from nanodecoder import checkpoint

  if not sweep_lib.saved_steps(workdir):
    return  # a new run: validated after the join, so that every process says what one of them refuses
  config_lib.validate(config)  # a bad value is named as such, not as a change to the run's settings
  try:
    saved, _ = saved_config.run_config(workdir)
  except (OSError, ValueError):
    return  # no readable record of the settings: the checkpoint's own checks decide
  checkpoint.check_model_matches(saved.to_dict(), config, str(workdir))  # a shape cannot change on purpose either
  if config_file is None:
    return
  changes = config_lib.changes_on_resume(saved, config)
  if changes:
    overrides = ' '.join(shlex.quote(f'--config.{f}={value}') for f, _, value in changes)
    fail(f'{workdir} holds a run trained with {config_lib.describe_changes(changes)} as --config {config_file} '
         f'and its overrides say; pass another --workdir, or continue that run with the new values on purpose: '
         f'--workdir {shlex.quote(str(workdir))} {overrides}')


def _saved_config() -> ml_collections.ConfigDict:
  """The config.json of --workdir, to resume a run without its --config (and overrides)."""
  saved = pathlib.Path(FLAGS.workdir or '') / config_lib.SAVED_CONFIG
  manifest = pathlib.Path(FLAGS.workdir or '') / sweep_lib.MANIFEST
  if FLAGS.workdir and not saved.is_file() and manifest.is_file():
    try:
      spec = json.loads(manifest.read_text(encoding='utf-8'))['config']
    except (OSError, ValueError, KeyError, TypeError):
      spec = 'FILE:NAME'
    fail(f'{FLAGS.workdir} is the folder of a sweep; resume it with its command: --config {spec} --workdir '
         f'{FLAGS.workdir} (and its overrides)')
  if not FLAGS.workdir or not (saved.is_file() or sweep_lib.saved_steps(FLAGS.workdir)):
    set_aside = set_aside_steps(FLAGS.workdir) if FLAGS.workdir else []
    if set_aside:
      fail(f'{FLAGS.workdir} has no {config_lib.SAVED_CONFIG} and no readable checkpoint (set aside as unreadable: '
           f'{", ".join(set_aside)}); rename one back to its step number to retry it, or pass --config to train '
           'afresh')
    fail('--config is required to train, e.g. --config experiments/cpu.py (or --workdir of a run, to resume it)')
  config, where = _read_saved_config(saved.parent)
  print(f'resuming with the config saved in {where}', flush=True)
  return config


def _read_saved_config(workdir: pathlib.Path) -> tuple[ml_collections.ConfigDict, str]:
  """saved_config.run_config of `workdir`: (the config of its run, where it was read); one error line if neither
  config.json nor the latest checkpoint gives it."""
  try:
    return saved_config.run_config(workdir)
  except saved_config.UnreadableRecord as e:
    fail(f'{e}; pass --config to train')
  except (OSError, ValueError) as e:
    fail(f'cannot read {workdir / config_lib.SAVED_CONFIG} ({e}); pass --config to train')


def sample_command() -> None:
  from nanodecoder import checkpoint, sampling

  workdir = _require_workdir('sample')
  options = SamplingOptions(max_new_tokens=FLAGS.max_new_tokens, num_samples=FLAGS.num_samples,
                            temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                            use_cache=FLAGS.kv_cache)
  try:
    options.validate()
  except SamplingError as e:  # its message starts with the option's name, which is the flag's
    fail(f'--{e}')
  if FLAGS.stream and options.num_samples != 1:
    fail(f'--stream prints one sample, got --num_samples={options.num_samples}; use --num_samples=1')
  prompt = _given_prompt()
  out = _checked_out(workdir)
  setup_jax()

  def check_prompt(tokenizer, _) -> None:  # before the parameters are read
    if prompt is None and FLAGS.prompt not in tokenizer.chars:
      fail('this model has no newline character, the default prompt; give one with --prompt or --prompt_file')
    tokenizer.encode(FLAGS.prompt if prompt is None else prompt)  # characters outside the vocabulary: DataError

  model, tokenizer, _, step = checkpoint.load_model(workdir, FLAGS.checkpoint, check=check_prompt)
  if prompt is None:
    prompt = FLAGS.prompt  # its default, a newline
  prompt_ids = tokenizer.encode(prompt)
  if FLAGS.stream:
    _stream_sample(model, tokenizer, prompt, prompt_ids, options, step, out)
  else:
    with interrupts.exit_on_ctrl_c():  # one compiled call: nothing to save, and no Python to raise in
      tokens = sampling.generate(model, prompt_ids, options)
    samples = [prompt + tokenizer.decode(row) for row in tokens]
    # The file first: a closed standard output (e.g. `| head`) must not lose it
    failed = out and _write_out(out, ''.join(f'--- sample {i + 1} ---\n{text}\n' for i, text in enumerate(samples)))
    for i, text in enumerate(samples):
      print(f'--- sample {i + 1}/{len(samples)} (checkpoint step {step}) ---')
      print(text)
    if failed:
      fail(failed)


def _stream_sample(model, tokenizer, prompt: str, prompt_ids, options: SamplingOptions, step: int,
                   out: pathlib.Path | None) -> None:
  """Prints one sample token by token, then writes it to `out`; a reader that stops reading (e.g. `| head`)
  ends the printing, and with `out` the sample is still finished for the file."""
  from nanodecoder import sampling

  reader_gone = False

  def show(text: str) -> None:
    nonlocal reader_gone
    if not reader_gone:
      try:
        sys.stdout.write(text)
        sys.stdout.flush()
      except BrokenPipeError:
        if not out:
          raise
        reader_gone = True

  show(f'--- sample 1/1 (checkpoint step {step}) ---\n{prompt}')
  pieces = []
  for token in sampling.stream(model, prompt_ids, options):
    pieces.append(tokenizer.decode(token))
    show(pieces[-1])
  failed = out and _write_out(out, f'--- sample 1 ---\n{prompt}{"".join(pieces)}\n')
  show('\n')
  if failed:
    fail(failed)
  if reader_gone:
    raise BrokenPipeError  # (exits as without --stream)


# Sweeps -------------------------------------------------------------------------

SWEEP_SUMMARY_ENV = 'NANODECODER_SWEEP_SUMMARY'  # '0': a point run by a sweep leaves the summary to the sweep


def sweep_declaration():
  """The --config file's get_sweep() in train mode, else None; the sweep flags without a sweep fail."""
  from ml_collections import config_flags

  declaration = None
  if FLAGS.mode == 'train' and FLAGS.config is not None:
    try:
      FLAGS.config.get('name')
    except Exception:  # noqa: BLE001 (train_command says why the file did not load)
      return None
    declaration = sweep_lib.load_declaration(config_flags.get_config_filename(FLAGS['config']))
  used = [f'--{name}' for name in ('sweep_index', 'sweep_list', 'sweep_parallel') if FLAGS[name].present]
  if used and declaration is None:
    verb = 'needs' if len(used) == 1 else 'need'
    fail(f'{", ".join(used)} {verb} a sweep: --mode=train and a --config file with get_sweep(), '
         'e.g. --config experiments/sweep.py:blocks')
  return declaration


def sweep_command(declaration) -> None:
  """Lists the points (--sweep_list), trains one (--sweep_index), or trains all that are not finished."""
  from ml_collections import config_flags

  base = FLAGS.config
  config_lib.make_paths_absolute(base)
  sweep = sweep_lib.make_sweep(config_flags.get_config_filename(FLAGS['config']), base, declaration)
  sweep_lib.check_overrides(sweep, list(config_flags.get_override_values(FLAGS['config'])))
  root = pathlib.Path(FLAGS.workdir or default_workdir(base))
  if root.exists() and not root.is_dir():
    fail(f'--workdir {root} is a file; give the sweep a folder (its points go in folders under it)')
  if (root / config_lib.SAVED_CONFIG).is_file():
    fail(f'--workdir {root} holds a single run (its config.json); give the sweep a folder of its own')
  if FLAGS.sweep_list:
    print(sweep_lib.listing(sweep, base, root))
    return
  if FLAGS.sweep_index is not None:
    if FLAGS.sweep_parallel != 1:
      fail(f'--sweep_index trains one point, --sweep_parallel={FLAGS.sweep_parallel} several at once; pass one of them')
    sweep_point_command(sweep, base, root)
    return
  if FLAGS.sweep_parallel < 1:
    fail(f'--sweep_parallel must be >= 1, got {FLAGS.sweep_parallel}')
  jax.config.update('jax_platforms', 'cpu')  # this process only starts points: keep the accelerators free
  parallel = min(FLAGS.sweep_parallel, len(sweep.points))
  cores = sharding.usable_cores()
  script = sys.argv[0] if sys.argv[0].endswith('.py') and os.path.isfile(sys.argv[0]) else str(
      pathlib.Path(__file__).resolve().parents[1] / 'launch.py')

  def start(point, slot: int) -> subprocess.Popen:
    # The same command line for one point; later flags win, so the appended ones take effect.
    command = [sys.executable, script, *sys.argv[1:], f'--workdir={root}', f'--sweep_index={point.index}',
               '--sweep_parallel=1']
    if parallel > 1 and base.mesh.cpu_devices == 0 and sharding.forced_cpu_device_count() is None:
      # each point gets its share of the cores
      devices = sharding.cpu_device_count(sweep_lib.point_config(base, point), max(1, cores // parallel))
      command.append(f'--config.mesh.cpu_devices={devices}')
    env = sweep_lib.child_env(slot, parallel)
    env[SWEEP_SUMMARY_ENV] = '0'
    output = None
    if parallel > 1:  # interleaved output would be unreadable: each point writes its own log
      workdir = sweep.workdir(root, point)
      workdir.mkdir(parents=True, exist_ok=True)
      output = open(workdir / 'launch.log', 'a', encoding='utf-8')
      _say(f'      output: {workdir / "launch.log"}')
    try:
      return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
    finally:
      if output is not None:
        output.close()

  sweep_lib.check_saved_configs(sweep, base, root)
  sweep_lib.prepare_data(sweep, base, sweep_lib.to_train(sweep, base, root))  # (a finished point's data is not read)
  sweep_lib.write_manifest(root, sweep, base)
  _say(f'sweep {sweep.name}: {len(sweep.points)} points in {root}, {parallel} at a time')
  results, stopped_by = sweep_lib.run(sweep, base, root, start, parallel, log=_say)
  failed = [name for name, code in results.items() if code is not None and code != 0]
  elsewhere = [name for name, code in results.items() if code is None]
  _update_summary(root, after_error=bool(failed or elsewhere or stopped_by), show=True)
  if stopped_by is not None:
    _say(f'sweep stopped by {signal.Signals(stopped_by).name}; run the same command to resume it')
    sys.exit(128 + stopped_by)
  problems = []
  if failed:
    problems.append(f'{len(failed)} of {len(sweep.points)} points failed ({", ".join(failed)}); see their output above '
                    'or their launch.log, and run the same command to retry them')
  if elsewhere:
    problems.append(f'{len(elsewhere)} of {len(sweep.points)} points {"is" if len(elsewhere) == 1 else "are"} trained '
                    f'by another live run ({", ".join(elsewhere)}); --sweep_list shows how far, and the same command '
                    'resumes any left unfinished')
  if problems:
    print(f'error: {"; ".join(problems)}', file=sys.stderr)
    sys.exit(1)


def _say(message: str) -> None:
  """Prints a line of the sweep's log; a console whose reader went away (`| head`, or a `| tee` ended by the same
  Ctrl-C) ends the printing, not the sweep, which still stops or finishes its points and records them."""
  try:
    print(message, flush=True)
  except BrokenPipeError:
    discard(sys.stdout)


def sweep_point_command(sweep, base: ml_collections.ConfigDict, root: pathlib.Path) -> None:
  """Trains point --sweep_index in its workdir (unless finished), then updates the sweep's summary."""
  index, count = FLAGS.sweep_index, len(sweep.points)
  if not 0 <= index < count:
    fail(f'--sweep_index={index} is out of range: the sweep has {count} points, 0 to {count - 1} (see --sweep_list)')
  point = sweep.points[index]
  config = sweep_lib.point_config(base, point)
  workdir = sweep.workdir(root, point)
  holder = sweep_lib.live_run(workdir)
  if holder is not None:  # before its manifest entry or status is read: the live run's settings stand
    fail(f'sweep point {index} ({point.name}) is trained by another live run (pid {holder}) in {workdir}; wait for it '
         'to end (--sweep_list shows how far)')
  sweep_lib.check_saved_configs(sweep, base, root, [point])  # this point only: the others may run elsewhere
  sweep_lib.write_manifest(root, sweep, base, only=point)
  status = sweep_lib.point_status(workdir, config.train.num_steps)
  try:
    if status.state == 'finished':
      print(f'sweep point {index} ({point.name}) is finished (step {status.step}); nothing to do')
    else:
      print(f'sweep point {index} of {count}: {point.name} in {workdir}', flush=True)
      train_point(config, workdir)
  except BaseException:  # it failed or was stopped: the summary shows how far it got, its own error is the one told
    _update_summary(root, after_error=True)
    raise
  _update_summary(root)


def _update_summary(root: pathlib.Path, after_error: bool = False, show: bool = False) -> None:
  """Rewrites a sweep's summary (and with `show` prints it), unless this is a point of a sweep that writes it. After
  an error (a failed point, a stop), its own failure is a warning: the error it followed is the one to report."""
  from nanodecoder import summary

  if os.environ.get(SWEEP_SUMMARY_ENV, '1') == '0' or jax.process_index() != 0:
    return
  try:
    paths = summary.write_summary(root)
    if show:
      _say((root / 'summary.md').read_text(encoding='utf-8'))
      _say('wrote ' + ', '.join(map(str, paths)))
  except Exception as e:  # noqa: BLE001
    if not after_error:
      raise
    print(f'warning: the summary of {root} was not updated ({type(e).__name__}: {" ".join(str(e).split())})',
          file=sys.stderr)


def train_point(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """train_command for a sweep point, recording in its workdir whether this session failed (sweep_lib.FAILED).

  From when the session holds the workdir, the record says it ended unexplained (sweep_lib.UNEXPLAINED) until it
  finishes, stops or fails: it stays when nothing could say (SIGKILL, a machine that stopped). The outcome is
  recorded before the workdir is released (a job that takes the point next keeps its own record). A point that
  another live run holds is left as that run leaves it.
  """
  held = False

  @contextlib.contextmanager
  def session_record():
    nonlocal held
    held = True
    sweep_lib.record_failure(workdir, sweep_lib.UNEXPLAINED)
    try:
      yield
    except BaseException as e:
      sweep_lib.record_failure(workdir, _how_it_failed(e))
      raise
    sweep_lib.record_failure(workdir, None)

  try:
    train_command(config, workdir, while_locked=session_record)
  except BaseException as e:  # before the session held the workdir (e.g. a bad setting), or after it finished
    if jax.process_index() == 0 and not held and not isinstance(e, WorkdirInUse):
      sweep_lib.record_failure(workdir, _how_it_failed(e))
    raise


def _how_it_failed(error: BaseException) -> str | None:
  """A sweep point's failure for sweep_lib.record_failure, e.g. 'failed (DataError: ...)'; None: it stopped."""
  if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C
    return None
  if isinstance(error, SystemExit):  # its error line is printed, or it stopped after saving
    code = error.code if isinstance(error.code, int) else 0 if error.code is None else 1
    return None if code == 0 or code in sweep_lib.STOPPED else sweep_lib.failure(code)
  return f'failed ({type(error).__name__}: {" ".join(str(error).split())})'


# Analysis -----------------------------------------------------------------------


def _require_workdir(mode: str) -> pathlib.Path:
  if not FLAGS.workdir:
    what = 'the root folder of a sweep (e.g. runs/sweep_blocks)' if mode == 'summary' else \
        'the run directory holding checkpoints/'
    fail(f'--workdir is required for --mode {mode}: {what}')
  workdir = pathlib.Path(FLAGS.workdir)
  try:
    workdir.exists()
  except OSError as e:  # e.g. a name too long
    fail(f'cannot use --workdir {workdir}: {e.strerror or e}')
  return workdir


def _writable_place(path: pathlib.Path, flag: str) -> None:
  """Refuses `path` unless its nearest existing folder is writable (folders below it are made when writing)."""
  folder = unwritable_folder(path)
  if folder is not None:
    fail(f'cannot write {flag} {path}: {folder} is not a writable directory; give a path in one')


_RUN_FILES = (config_lib.SAVED_CONFIG, 'tokenizer.json', 'metrics.jsonl', 'launch.log', sweep_lib.MANIFEST,
              sweep_lib.FAILED, 'summary.csv', 'summary.md', 'val_loss.png', 'loss_curves.png', WORKDIR_LOCK)
_RUN_FOLDERS = ('checkpoints', 'plugins')
_RUN_FILE_PREFIXES = ('events.out.tfevents.',)  # TensorBoard's event files


def _checked_out(workdir: pathlib.Path) -> pathlib.Path | None:
  """--out (sample, eval) as a path, refused before any work when no file can be written there, or when it is one
  of the run's own files.

  A symbolic link stands for its target; anything but a regular file there (a folder, a device) is refused.
  """
  if FLAGS.out is None:
    return None
  if not FLAGS.out:
    fail("--out '' names no file; give a file path, or leave --out out to print only")
  example = 'report.json' if FLAGS.mode == 'eval' else 'samples.txt'
  try:
    out = pathlib.Path(os.path.realpath(FLAGS.out))
    own = _run_own(out, workdir)
    if own is not None:
      fail(f"--out {FLAGS.out} is among the run's own files ({own}); give another file, e.g. "
           f'--out {pathlib.Path(workdir) / example}')
    if out.is_dir():
      fail(f'--out {FLAGS.out} is a directory; give a file path, e.g. --out {out / example}')
    if out.exists() and not out.is_file():
      fail(f'--out {FLAGS.out} is not a regular file; give the path of a file to write')
    _writable_place(out, '--out')
  except OSError as e:  # e.g. a name too long
    fail(f'cannot write --out {FLAGS.out}: {e.strerror or e}')
  return out


def _run_own(path: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path | None:
  """`path` (resolved) relative to the run's folder if it is one of the run's own files or lies in its checkpoint
  or profile folders, else None."""
  run = pathlib.Path(os.path.realpath(workdir))
  if not path.is_relative_to(run):
    return None
  inside = path.relative_to(run)
  own = (str(inside) in _RUN_FILES or (inside.parts and inside.parts[0] in _RUN_FOLDERS)
         or (len(inside.parts) == 1 and inside.name.startswith(_RUN_FILE_PREFIXES)))
  return inside if own else None


def _checked_out_folder(out: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
  """--out (attention) as a folder, checked before any work (created when the pictures are written)."""
  try:
    own = _run_own(pathlib.Path(os.path.realpath(out)), workdir)
    if own is not None:
      fail(f"--out {out} is among the run's own files ({own}); give another folder, e.g. --out {workdir / 'maps'}")
    if out.exists() and not out.is_dir():
      fail(f'--out {out} is a file; give a folder for the pictures, e.g. --out {out}_maps')
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
      fail(f'cannot write into --out folder {out}; give a writable one')
    _writable_place(out, '--out folder')
  except OSError as e:
    fail(f'cannot write --out folder {out}: {e.strerror or e}')
  return out


def _write_out(out: pathlib.Path, text: str) -> str | None:
  """Writes --out; the one-line error when it cannot (for the caller to report once the results are shown)."""
  try:
    atomic_write(out, text)
  except OSError as e:
    return (f'cannot write --out {out}: {e.strerror or e} (the results are printed above); give a path in a '
            'writable folder')
  return None


def _given_prompt() -> str | None:
  """The text of --prompt_file, else --prompt when given on the command line, else None; both is an error."""
  if FLAGS.prompt_file is not None and FLAGS['prompt'].present:
    fail('--prompt and --prompt_file both give the prompt; pass only one of them')
  if FLAGS.prompt_file is not None:
    if not FLAGS.prompt_file:
      fail("--prompt_file '' names no file; give the path of a UTF-8 text file")
    try:  # the bytes as they are: read_text would turn '\r\n' into '\n', which the model may not know
      prompt = pathlib.Path(FLAGS.prompt_file).read_bytes().decode('utf-8-sig')  # (less a byte-order mark)
    except UnicodeDecodeError as e:
      fail(f'cannot read --prompt_file {FLAGS.prompt_file!r}: it is not UTF-8 text ({e.reason} at byte {e.start}); '
           'save it as UTF-8')
    except OSError as e:
      fail(f'cannot read --prompt_file {FLAGS.prompt_file!r}: {e.strerror or e}; give the path of a UTF-8 text file')
    if not prompt:
      fail(f'--prompt_file {FLAGS.prompt_file!r} is empty; give at least one character (e.g. a newline)')
    return prompt
  if FLAGS['prompt'].present and not FLAGS.prompt:
    fail("--prompt '' is empty; give at least one character (e.g. a newline)")
  return FLAGS.prompt if FLAGS['prompt'].present else None


def eval_command() -> None:
  """Loss, perplexity and bits per character of a checkpoint over every window of --split."""

  from nanodecoder import analysis

  workdir = _require_workdir('eval')
  out = _checked_out(workdir)
  # Data parallel over one CPU device per core, whatever mesh (and mesh.cpu_devices) the run trained on.
  sharding.set_cpu_devices(sharding.usable_cores())
  setup_jax()
  report = analysis.evaluate_split(workdir, FLAGS.checkpoint, FLAGS.split, data_locations)
  print(analysis.format_report(report))
  failed = out and _write_out(out, json.dumps(report, indent=2) + '\n')
  if failed:
    fail(failed)


def attention_command() -> None:
  """Draws the attention maps of every layer and head for --prompt from a checkpoint."""
  from nanodecoder import analysis, checkpoint

  workdir = _require_workdir('attention')
  prompt = _given_prompt()
  if prompt is None:
    fail("--mode attention needs the text to look at: --prompt 'ROMEO: ...' or --prompt_file FILE")
  if FLAGS.out == '':
    fail(f"--out '' names no folder; give a folder for the pictures, or leave --out out for {workdir / 'attention'}")
  out = _checked_out_folder(workdir / 'attention' if FLAGS.out is None else pathlib.Path(FLAGS.out), workdir)
  setup_jax()
  # Characters outside the vocabulary in the part drawn (as attention_maps cuts it) are refused before the
  # parameters are read.
  check_prompt = lambda tokenizer, config: tokenizer.encode_last(prompt, config.model.context_length)
  model, tokenizer, _, step = checkpoint.load_model(workdir, FLAGS.checkpoint, check=check_prompt)
  maps, shown = analysis.attention_maps(model, tokenizer, prompt)
  if len(''.join(shown)) < len(prompt):
    print(f'the prompt is longer than the context ({len(shown)} {tokenizer.unit}s); drawing its last '
          f'{len(shown)} {tokenizer.unit}s')
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    fail(f'cannot create --out folder {out} ({e.strerror or e}); give a path in a writable directory')
  paths = analysis.plot_attention(maps, shown, out, title=f'{workdir} (step {step}), ')
  print(f'attention maps of {maps.shape[0]} layers x {maps.shape[1]} heads over {len(shown)} {tokenizer.unit}s '
        f'(checkpoint step {step}): ' + ', '.join(map(str, paths)))


def summary_command() -> None:
  """(Re)writes summary.csv, summary.md and the plots of the sweep (or runs) in --workdir."""
  from nanodecoder import summary

  root = _require_workdir('summary')
  jax.config.update('jax_platforms', 'cpu')  # parameter counts need shapes only
  try:
    paths = summary.write_summary(root)
  except FileNotFoundError as e:
    fail(str(e))
  print((root / 'summary.md').read_text(encoding='utf-8'))
  print('wrote ' + ', '.join(map(str, paths)))


MODES = {'sample': sample_command, 'eval': eval_command, 'attention': attention_command, 'summary': summary_command}
