"""Sweeps: one experiment file, several configs (points), each trained in its own workdir.

An experiment file becomes a sweep by defining `get_sweep(arg)` beside
`get_config(arg)`; it returns the values to try for one or more fields:

  def get_sweep(arg=None):
    return {'model.num_layers': [2, 4], 'model.head_size': [16, 32]}

A dict means the cartesian product, in declaration order with the last field
varying fastest (2 x 2 = 4 points above); a list of dicts lists the points one
by one. Point i trains `get_config()` (with the command line's --config.*
overrides) with its own fields set, in `<root>/<field=value,...>`, root being
--workdir or runs/<config.name>: `runs/sweep_shape/num_layers=2,head_size=16`.

A point is finished when its latest checkpoint is at its train.num_steps;
rerunning a sweep skips finished points and resumes interrupted ones, unless
they were trained under other settings (see `check_saved_configs`), and
leaves a point that another live run trains (e.g. a `--sweep_index` job) to
it. A point whose latest session failed holds `failed.txt` (see
`record_failure`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import pathlib
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Sequence

import ml_collections

from nanodecoder import config as config_lib
from nanodecoder.config import ConfigError
from nanodecoder.files import WORKDIR_LOCK, atomic_write, exclusive, lock_holder, probing_lock
from nanodecoder.metrics import format_duration

MANIFEST = 'sweep.json'
MANIFEST_LOCK = '.sweep.lock'  # held while a process rewrites the manifest or the summary
FAILED = 'failed.txt'  # in a point's workdir: how its latest session failed
# What a point's session records when it starts (see cli.train_point): replaced when it fails, removed when it finishes
# or stops, so it stays when nothing could record how the session ended.
UNEXPLAINED = 'failed (its session ended without saying how: killed, e.g. out of memory, or its machine stopped?)'


@dataclasses.dataclass(frozen=True)
class Point:
  index: int
  name: str  # 'num_layers=2,head_size=16': the folder name
  overrides: dict[str, Any]  # dotted field -> value


@dataclasses.dataclass
class Sweep:
  name: str  # the base config's name
  spec: str  # the experiment file, 'path.py[:arg]'
  fields: list[str]  # dotted fields, in declaration order
  points: list[Point]

  def workdir(self, root: str | pathlib.Path, point: Point) -> pathlib.Path:
    return pathlib.Path(root) / point.name


def load_declaration(spec: str | pathlib.Path):
  """What the experiment file's `get_sweep([arg])` returns, or None when it defines no `get_sweep`."""
  module, arg = config_lib.load_experiment(spec)
  if not hasattr(module, 'get_sweep'):
    return None
  try:
    declaration = module.get_sweep(arg) if arg else module.get_sweep()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 (the experiment file's own mistake: one line, as for get_config)
    call = f'get_sweep({arg!r})' if arg else 'get_sweep()'
    raise ConfigError(f'{call} in {spec} failed: {type(e).__name__}: {" ".join(str(e).split())}; fix the '
                      'experiment file') from None
  if declaration is None:  # not 'no sweep': the file says it is one
    raise ConfigError(f'get_sweep() in {spec} returned None; return {{field: [values]}} or a list of '
                      '{field: value} dicts')
  return declaration


def expand(declaration: dict[str, Sequence[Any]] | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The points of a declaration: {field: values} -> cartesian product (last field fastest); a list as is."""
  if isinstance(declaration, dict):
    if not declaration:
      raise ConfigError('get_sweep() returned {}; return {field: [values]} with at least one field')
    for field, values in declaration.items():
      if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f'sweep field {field!r} needs a non-empty list of values, got {values!r}')
    fields = list(declaration)
    return [dict(zip(fields, combo)) for combo in itertools.product(*declaration.values())]
  if isinstance(declaration, Sequence) and declaration and all(isinstance(p, dict) for p in declaration):
    return [dict(p) for p in declaration]
  raise ConfigError('get_sweep() must return {field: [values]} or a non-empty list of {field: value} dicts, '
                    f'got {declaration!r}')


def format_value(value: Any) -> str:
  if isinstance(value, float):
    text = f'{value:g}'
  elif isinstance(value, (list, tuple)):
    text = '-'.join(map(format_value, value))
  else:
    text = str(value)
  return ''.join('_' if c in '/\\,= \n\t' else c for c in text)


def short_names(fields: Sequence[str]) -> dict[str, str]:
  """The last part of each dotted field, or the whole field where two last parts clash."""
  leaves = [f.rsplit('.', 1)[-1] for f in fields]
  return {f: leaf if leaves.count(leaf) == 1 else f for f, leaf in zip(fields, leaves)}


def make_sweep(spec: str, base: ml_collections.ConfigDict, declaration) -> Sweep:
  """Expands and checks every point: unknown fields, wrong types and bad values fail before any training."""
  overrides = expand(declaration)
  fields = list(dict.fromkeys(f for point in overrides for f in point))
  names = short_names(fields)
  points = []
  for i, point in enumerate(overrides):
    name = ','.join(f'{names[f]}={format_value(v)}' for f, v in point.items()) or 'base'  # {}: the base config
    points.append(Point(i, name, point))
    point_config(base, points[-1])  # raises ConfigError naming the field
  seen = {}
  for point in points:
    if point.name in seen:
      raise ConfigError(f'sweep points {seen[point.name]} and {point.index} have the same folder name {point.name!r}; '
                        'make their values differ (a float is named by its first 6 significant digits), or drop the '
                        'repeated point')
    seen[point.name] = point.index
  return Sweep(base.name, str(spec), fields, points)


def point_config(base: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """The base config with the point's fields set, validated."""
  config = copy.deepcopy(base)
  for field, value in point.overrides.items():
    try:
      config_lib.set_field(config, field, value)
    except ConfigError as e:
      raise ConfigError(f'sweep point {point.index} ({point.name}): {e}') from None
  try:
    config_lib.validate(config)
  except ConfigError as e:
    raise ConfigError(f'sweep point {point.index} ({point.name}): {e}') from None
  return config


def check_overrides(sweep: Sweep, overridden: Sequence[str]) -> None:
  """Refuses command-line overrides of fields that every point sets: they would change nothing."""
  ignored = [field for field in overridden if all(field in point.overrides for point in sweep.points)]
  if ignored:
    raise ConfigError(f'--config.{ignored[0]} has no effect: every point of the sweep sets {ignored[0]}; drop the '
                      'override, or sweep other values in get_sweep()')


def prepare_data(sweep: Sweep, base: ml_collections.ConfigDict, points: Sequence[Point] | None = None) -> None:
  """Loads the text corpus of every point (of `points`, default all) that trains on a text file: a missing or short
  file fails up front. Checks the split names of every point that reads a TFDS dataset against the dataset's info,
  downloading and preparing each such dataset first, once (points started together would race to do it).
  """
  from nanodecoder import data as data_lib

  done = set()  # points that differ only in other fields load their data once
  for point in sweep.points if points is None else points:
    config = point_config(base, point)
    if config.data.source == 'text':
      key = (config.data.to_json(), config.model.context_length)
      load = lambda: data_lib.load_dataset(config)
    else:  # its split names (the points read the text)
      key = (config.data.tfds_name, config.data.tfds_data_dir, config.data.manual_dir, config.data.train_split,
             config.data.eval_split)
      load = lambda: data_lib.check_splits(config.data, *data_lib.source_splits(config.data))
    if key in done:
      continue
    try:
      load()
    except data_lib.DataError as e:
      raise data_lib.DataError(f'sweep point {point.index} ({point.name}): {e}') from None
    done.add(key)


def write_manifest(root: str | pathlib.Path, sweep: Sweep, base: ml_collections.ConfigDict,
                   only: Point | None = None) -> None:
  """`root/sweep.json`: what the summary needs to know about the sweep (after `check_saved_configs`): per point
  its overrides, the value of every swept field (a point that leaves one to the base config included) and its
  num_steps. With `only`, the other points keep their entries (`--sweep_index` with overrides of its own)."""

  def entry(point: Point) -> dict[str, Any]:
    config = point_config(base, point)
    values = {field: config_lib.get_field(config, field) for field in sweep.fields}
    values = {f: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for f, v in values.items()}
    return {'name': point.name, 'overrides': point.overrides, 'values': values, 'num_steps': config.train.num_steps}

  with exclusive(pathlib.Path(root) / MANIFEST_LOCK):  # parallel --sweep_index jobs would lose each other's entries
    _write_manifest(pathlib.Path(root) / MANIFEST, sweep, entry, only)


def _write_manifest(path: pathlib.Path, sweep: Sweep, entry: Callable[[Point], dict[str, Any]], only: Point | None):
  entries = None
  if only is not None:
    try:
      entries = json.loads(path.read_text(encoding='utf-8'))['points']
    except (OSError, ValueError, KeyError, TypeError):
      pass
    current = (isinstance(entries, list) and all(isinstance(e, dict) and 'values' in e for e in entries)
               and [e['name'] for e in entries] == [p.name for p in sweep.points])
    if current:
      entries[only.index] = entry(only)
    else:  # none yet, of other points, or written before the manifest held every point's values
      entries = None
  manifest = {'name': sweep.name, 'config': sweep.spec, 'fields': sweep.fields,
              'points': entries or [entry(p) for p in sweep.points]}
  atomic_write(path, json.dumps(manifest, indent=2) + '\n')


def check_saved_configs(sweep: Sweep, base: ml_collections.ConfigDict, root: str | pathlib.Path,
                        points: Sequence[Point] | None = None) -> None:
  """Refuses (ConfigError) to resume or skip a point whose checkpoints were trained under other settings.

  A point with checkpoints and a config.json must match its config but for config.RESUMABLE_CHANGES; otherwise,
  e.g. a full sweep after a short quick look in the same root, it would continue from a decayed schedule.
  Checks `points` (default: all of them), but those that another live run trains (it is left to that run).
  """
  for point in sweep.points if points is None else points:
    workdir = sweep.workdir(root, point)
    if not (workdir / config_lib.SAVED_CONFIG).is_file() or not saved_steps(workdir) or live_run(workdir):
      continue  # not started, starts from scratch, or not this command's to train
    try:
      saved = config_lib.read_saved_config(workdir)
    except (OSError, ValueError) as e:
      raise ConfigError(f'sweep point {point.index} ({point.name}): cannot read {workdir / config_lib.SAVED_CONFIG} '
                        f'({e}); restore it, or delete that folder to train the point again') from None
    changes = config_lib.changes_on_resume(saved, point_config(base, point))
    if changes:
      raise ConfigError(f'sweep point {point.index} ({point.name}) in {workdir} was trained with '
                        f'{config_lib.describe_changes(changes)}; pass another --workdir, or delete that '
                        'folder to train the point again')


# Progress of a point ------------------------------------------------------------


def saved_steps(workdir: str | pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints in a workdir (Orbax renames a step's folder to its number when done)."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def latest_step(workdir: str | pathlib.Path) -> int:
  """The step of a workdir's latest complete checkpoint, 0 without one."""
  steps = saved_steps(workdir)
  return steps[-1] if steps else 0


def record_failure(workdir: str | pathlib.Path, outcome: str | None) -> None:
  """Records that the point's latest session failed (`outcome`, e.g. 'failed (exit status 1)'), or that it
  finished or stopped (None: no record)."""
  path = pathlib.Path(workdir) / FAILED
  if outcome is None:
    path.unlink(missing_ok=True)
  else:
    atomic_write(path, outcome + '\n')


def live_run(workdir: str | pathlib.Path) -> str | None:
  """The pid of the live run that holds the workdir (it may run on another host), else None."""
  return lock_holder(pathlib.Path(workdir) / WORKDIR_LOCK)


def recorded_failure(workdir: str | pathlib.Path) -> str | None:
  """What `record_failure` recorded in a workdir, None if nothing (or if it cannot be read)."""
  try:
    return (pathlib.Path(workdir) / FAILED).read_text(encoding='utf-8').strip()
  except (OSError, UnicodeDecodeError):
    return None


@dataclasses.dataclass(frozen=True)
class Status:
  state: str  # 'finished', 'running' (by a live run), 'failed' (its latest session), 'partial', 'new' or 'unknown'
  step: int  # latest checkpoint step (0: none)
  num_steps: int | None  # None: unknown (a run whose config cannot be read)

  def __str__(self) -> str:
    if self.state in ('partial', 'failed', 'running'):
      return f'{self.state} ({self.step}/{self.num_steps})'
    return self.state


def point_status(workdir: str | pathlib.Path, num_steps: int | None) -> Status:
  """How far the run in `workdir` is; `num_steps` None (its config cannot be read): 'unknown' once it has a
  checkpoint, as it cannot be told finished or not."""
  step = latest_step(workdir)
  if num_steps is not None and step >= num_steps:
    state = 'finished'
  elif live_run(workdir) is not None:
    state = 'running'
  elif (pathlib.Path(workdir) / FAILED).is_file():
    state = 'failed'
  elif step and num_steps is None:
    state = 'unknown'
  else:
    state = 'partial' if step else 'new'
  return Status(state, step, num_steps)


def listing(sweep: Sweep, base: ml_collections.ConfigDict, root: str | pathlib.Path) -> str:
  """What --sweep_list prints: one line per point (index, status, workdir)."""
  lines = [f'sweep {sweep.name}: {len(sweep.points)} points in {root} (fields: {", ".join(sweep.fields)})']
  for point in sweep.points:
    status = point_status(sweep.workdir(root, point), point_config(base, point).train.num_steps)
    lines.append(f'{point.index:4d}  {str(status):20s}  {sweep.workdir(root, point)}')
  return '\n'.join(lines)


# Running points -----------------------------------------------------------------


# Exit statuses of a point stopped by Ctrl-C or SIGTERM: after saving (130, 143), or killed by the signal
# before its handler was installed (it was still starting).
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)


def failure(code: int) -> str:
  """How a point that ended with exit status `code` failed: 'failed (exit status 1)', or for one that a signal
  killed (a negative status) its name, e.g. 'failed (killed by SIGSEGV)'."""
  if code >= 0:
    return f'failed (exit status {code})'
  try:
    name = signal.Signals(-code).name
  except ValueError:  # no signal this platform names
    name = f'signal {-code}'
  hint = ': out of memory?' if -code == signal.SIGKILL else ''  # what the kernel's OOM killer sends
  return f'failed (killed by {name}{hint})'


def to_train(sweep: Sweep, base: ml_collections.ConfigDict, root: str | pathlib.Path) -> list[Point]:
  """The points that `run` trains: those neither finished nor trained by another live run."""
  return [point for point in sweep.points if point_status(
      sweep.workdir(root, point), point_config(base, point).train.num_steps).state not in ('finished', 'running')]


def run(sweep: Sweep, base: ml_collections.ConfigDict, root: str | pathlib.Path,
        start: Callable[[Point, int], subprocess.Popen], parallel: int = 1, log: Callable[[str], None] = print,
        ) -> tuple[dict[str, int | None], int | None]:
  """Runs every unfinished point, `parallel` at a time, through `start(point, slot)` (a started process).

  Slots are numbered 0 .. parallel - 1; a point gets a slot no running point
  holds (e.g. for its share of the devices). Returns ({point name: exit
  status} of the points it ran, or None for a point that another live run
  trains, left to it; the signal that stopped the sweep or None). SIGTERM is
  passed on to the running points (they save and stop); after SIGTERM or
  Ctrl-C no new point starts. A point's failure is recorded in its workdir
  (`record_failure`), unless the point recorded its own error there; a point
  that finishes or stops loses the record. No run takes a point while its
  record is written, and a point another run took since is left to it. Call
  `check_saved_configs` first.
  """
  total = len(sweep.points)
  results: dict[str, int | None] = {}

  def left_to(point: Point, pid: str | None) -> None:
    results[point.name] = None
    log(f'[point {point.index} of {total}] {point.name}: trained by another live run (pid {pid or "?"}); left to it')

  todo = []
  for point in sweep.points:
    status = point_status(sweep.workdir(root, point), point_config(base, point).train.num_steps)
    if status.state == 'finished':
      log(f'[point {point.index} of {total}] {point.name}: finished (step {status.step}); skipped')
    elif status.state == 'running':
      left_to(point, live_run(sweep.workdir(root, point)))
    else:
      todo.append((point, status))
  running: dict[int, tuple[Point, int, subprocess.Popen, float]] = {}  # slot -> (point, num_steps, process, start)
  stopping: list[int] = []

  def on_signal(signum, frame):
    # The running points save and stop on a SIGTERM, whichever signal came: a SIGINT sent to this process
    # alone (`kill -INT`) reaches no point by itself. After a Ctrl-C, which the points got too (same process
    # group), the SIGTERM changes nothing there: a second Ctrl-C still aborts them.
    stopping.append(signum)
    for _, _, process, _ in running.values():
      process.send_signal(signal.SIGTERM)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    while (todo and not stopping) or running:
      while todo and not stopping and len(running) < parallel:
        slot = min(set(range(parallel)) - running.keys())
        point, status = todo.pop(0)
        how = f'resuming from step {status.step}' if status.step else 'starting'
        log(f'[point {point.index} of {total}] {point.name}: {how}')
        running[slot] = (point, status.num_steps, start(point, slot), time.time())
        if stopping:  # the signal came while it started, before on_signal could see it
          running[slot][2].send_signal(signal.SIGTERM)
      time.sleep(0.1)
      for slot, (point, num_steps, process, started) in list(running.items()):
        code = process.poll()
        if code is None:
          continue
        del running[slot]
        workdir = sweep.workdir(root, point)
        if code != 0 and point_status(workdir, num_steps).state == 'finished':
          code = 0  # it saved its last step, then died while exiting (e.g. a Ctrl-C just then)
        outcome = 'finished' if code == 0 else 'stopped' if code in STOPPED else failure(code)
        with probing_lock(workdir / WORKDIR_LOCK) as holder:  # no run takes the point while its record is written
          if holder is not None and code != 0:  # refused: another run (e.g. a --sweep_index job) took the point
            left_to(point, holder)  # after the sweep looked
            continue
          if holder is None:  # (else another run took the point after this one finished: the record is that run's)
            if not outcome.startswith('failed'):
              record_failure(workdir, None)
            elif code < 0 or recorded_failure(workdir) in (None, UNEXPLAINED):  # a point records its own errors (cli)
              record_failure(workdir, outcome)
        results[point.name] = code
        log(f'[point {point.index} of {total}] {point.name}: {outcome} after {format_duration(time.time() - started)}')
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return results, (stopping[0] if stopping else None)


def child_env(slot: int, parallel: int, environ: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of the point in `slot`: its share of CUDA_VISIBLE_DEVICES when that lists enough GPUs.

  Otherwise the `parallel` points share each GPU: each gets 0.9 / parallel of its memory instead of JAX's
  default 75% (unless XLA_PYTHON_CLIENT_MEM_FRACTION is set); no effect without GPUs.
  """
  env = dict(os.environ if environ is None else environ)
  gpus = [g for g in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if g.strip()]
  if parallel > 1 and len(gpus) >= parallel:
    share = len(gpus) // parallel
    env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus[slot * share:(slot + 1) * share])
  elif parallel > 1:
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / parallel:.3g}')
  return env
