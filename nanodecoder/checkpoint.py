"""Orbax checkpoints of a run: save, keep, restore onto any mesh, and guard the workdir.

A run's checkpoints live in `workdir/checkpoints/<step>/` with three items:
  params     the model parameters,
  opt_state  the optimizer state (moments and step count),
  meta       JSON: step, validation loss (if evaluated at that step), the
             resolved config, the tokenizer and the data's fingerprint
(and Orbax's own `metrics`, the val loss it keeps the best by).
The data position and dropout keys are functions of (seed, step), so these
are all a run needs to resume exactly, and `params` + `meta` all sampling
needs. Orbax writes each step into a temporary folder and renames it when
complete, so a crash never leaves a half-written step behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from nanodecoder import config as config_lib
from nanodecoder import orbax_errors
from nanodecoder import sweep as sweep_lib
from nanodecoder.config import ConfigError
from nanodecoder.files import WORKDIR_LOCK, atomic_write, lock_owner
from nanodecoder.metrics import quiet_absl
from nanodecoder.model import abstract_decoder
from nanodecoder.sharding import digest, first_process_differing, gather_from_processes
from nanodecoder.tokenizer import Tokenizer

# The model fields a checkpoint's arrays depend on (scan_layers: blocks stored stacked or one by one): a checkpoint
# restores only into the same values.
SHAPE_FIELDS = ('num_layers', 'num_heads', 'head_size', 'context_length', 'mlp_ratio', 'use_bias', 'tie_embeddings',
                'param_dtype', 'scan_layers')


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint that cannot be written."""


class WorkdirInUse(CheckpointError):
  """The workdir is locked by another live run."""


class UnreadableCheckpoint(CheckpointError):
  """A chosen step that does not read: damaged, or deleted while read by the run training in its workdir."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


LOCK_ATTEMPTS = 10  # 50 ms apart


class WorkdirLock:
  """An exclusive lock on a workdir, released automatically when the process dies."""

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / WORKDIR_LOCK
    self._file = None

  def acquire(self) -> None:
    if self.path.parent.exists() and not self.path.parent.is_dir():
      raise CheckpointError(f'workdir {self.path.parent} is a file; pass a folder as --workdir')
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      file = open(self.path, 'a+')
    except OSError as e:
      raise CheckpointError(f'cannot use workdir {self.path.parent}: {e.strerror or e}; pass a writable folder '
                            'as --workdir') from None
    for attempt in range(LOCK_ATTEMPTS):  # (a status check, files.lock_holder, holds it for an instant)
      try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if attempt + 1 < LOCK_ATTEMPTS:
          time.sleep(0.05)
          continue
        file.close()
        raise WorkdirInUse(f'workdir {self.path.parent} is in use by another run (pid {lock_owner(self.path)}); '
                           'wait for it to end or pass another --workdir') from None
    self._file = file  # held from here: `release` frees it also when writing the pid below fails
    file.seek(0)
    file.truncate()
    # The pid for the message above; a random token that tells this lock from any other (see check_shared).
    file.write(f'{os.getpid()} {os.urandom(8).hex()}')
    file.flush()
    os.fsync(file.fileno())  # (on a network file system, other hosts read it from the server)

  def check_shared(self) -> None:
    """Refuses a run whose processes do not all see the workdir that process 0 locked: they write each checkpoint
    together into one folder, and with a folder of their own each (the same path on each host's local disk) the
    first save hangs. Each process reads the lock file, written by process 0 with its token; a collective
    that every process calls after process 0 acquired the lock."""
    try:
      seen = self.path.read_bytes()
    except OSError:
      seen = b''
    other = first_process_differing(digest(seen))
    if other is not None:
      raise CheckpointError(f'workdir {self.path.parent} is not one folder for all processes (process {other} does '
                            'not see the lock file that process 0 wrote there); it must be on a file system that every '
                            'process shares')

  def check_paths(self, profiling: bool) -> None:
    """Refuses a workdir holding a file where a run writes a folder (`checkpoints`; `plugins/profile` when
    profiling) or a folder where it writes a file, before any step runs."""
    workdir = self.path.parent
    for name in ('checkpoints', *(('plugins', 'plugins/profile') if profiling else ())):
      if (workdir / name).exists() and not (workdir / name).is_dir():
        raise CheckpointError(f'{workdir / name} is a file, where the run writes a folder; move it away or pass '
                              'another --workdir')
    for name in (config_lib.SAVED_CONFIG, 'tokenizer.json', 'metrics.jsonl'):
      if (workdir / name).is_dir():
        raise CheckpointError(f'{workdir / name} is a folder, where the run writes a file; move it away or pass '
                              'another --workdir')

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of an array tree or of an abstract nnx state."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


def check_model_matches(saved_config: dict, config: ml_collections.ConfigDict, where: str) -> None:
  diffs = [f'model.{f}={saved_config["model"].get(f)!r} (config says {config.model[f]!r})'
           for f in SHAPE_FIELDS if saved_config['model'].get(f) != config.model[f]]
  saved_vocab = saved_config.get('data', {}).get('vocab_size', config_lib.ADDED_FIELDS['data.vocab_size'])
  if saved_vocab != config.data.vocab_size:
    diffs.append(f'data.vocab_size={saved_vocab!r} (config says {config.data.vocab_size!r})')
  if diffs:
    raise ConfigError(f'checkpoint in {where} has a different model shape: {", ".join(diffs)}; '
                      'use the same values or another --workdir')


def check_same_tokenizer(saved_tokenizer: str, tokenizer: Tokenizer, step: int, directory) -> None:
  """A run resumes only on data with exactly its tokens: other ones would change what the ids mean."""
  saved = Tokenizer.from_json(saved_tokenizer)
  if saved.chars != tokenizer.chars:
    different = ''.join(sorted(set(saved.chars) ^ set(tokenizer.chars)))
    raise ConfigError(f'the checkpoint at step {step} in {directory} was trained on other characters than this data '
                      f'has ({len(saved.chars)} characters, this data {len(tokenizer.chars)}; differing: '
                      f'{different!r}); train on the same data or pass another --workdir')
  if saved != tokenizer:
    raise ConfigError(f'the checkpoint at step {step} in {directory} was trained with other BPE merges than this '
                      'data\'s train split gives (they were learned on other text); put that text back or pass another '
                      '--workdir')


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_leaves_with_path(tree)
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _check_same_arrays(saved, target, item: str, step: int) -> None:
  """A checkpoint item must hold exactly the arrays (names and shapes) the current config builds."""
  saved, target = _shapes(saved), _shapes(target)
  if saved != target:
    diffs = sorted(set(saved.items()) ^ set(target.items()))[:3]
    raise ConfigError(f'the {item} of the checkpoint at step {step} do not match this config (e.g. '
                      f'{", ".join(f"{k} {v}" for k, v in diffs)}); train with the same model and optimizer settings '
                      'or use another --workdir')


class Checkpoints:
  """The checkpoints of one workdir: `save` during training, `restore` to resume or sample."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    orbax_errors.quiet_orbax_leftovers()
    if not read_only:
      self._repair_metrics()
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_loss'], reverse=True, n=1,
                                                keep_checkpoints_without_metrics=False))
    with quiet_absl():  # a read-only manager makes Orbax warn that it is read-only
      options = ocp.CheckpointManagerOptions(
          preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
          # best_fn makes Orbax write each step's metrics beside it: without them a resumed run's manager
          # would see the earlier steps unscored and let the best one go.
          best_fn=(lambda m: m['val_loss']) if keep_best else None, best_mode='min',
          enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
          # A step's folder made in the background: when that fails (a full disk, a read-only folder), Orbax's
          # other save threads wait for its signal until their timeout (300 s) before the error reaches us.
          async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
          lightweight_initialize=read_only,  # reading needs no step's metrics (nor a damaged one to stop it)
          cleanup_tmp_directories=not read_only)  # what a save cut short (a second Ctrl-C, a kill) left
      handlers = {'params': ocp.StandardCheckpointHandler(), 'opt_state': ocp.StandardCheckpointHandler(),
                  'meta': ocp.JsonCheckpointHandler()}
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._in_flight: int | None = None  # the step of the last started save (asynchronous: maybe still writing)

  def _repair_metrics(self) -> None:
    """Rewrites a damaged metrics file of a step from the step's meta (Orbax reads them all when it opens the
    folder, and one it cannot parse stops it); removes it when the meta is unreadable too (the step itself is
    then set aside when a restore fails on it). Process 0 writes, the others wait."""
    if jax.process_index() == 0:
      for path in sorted(self.directory.glob('*/metrics/metrics')):
        step = path.parent.parent.name
        try:
          if not step.isdigit() or config_lib.is_number(json.loads(path.read_text(encoding='utf-8')).get('val_loss')):
            continue
        except OSError:  # not the file's fault (permissions, the file system): left as it is
          continue
        except (ValueError, AttributeError):  # it does not parse, or holds no object
          pass
        try:
          val_loss = self.meta(int(step))['val_loss']
        except Exception as e:  # noqa: BLE001 (the step's own files are damaged too)
          if orbax_errors.is_environment_error(e):  # unknown: the file may still say what the step scored
            continue
          val_loss = None
        try:
          if config_lib.is_number(val_loss):
            atomic_write(path, json.dumps({'val_loss': val_loss}))
          else:
            path.unlink()
          done = 'rewrote it from the checkpoint' if config_lib.is_number(val_loss) else 'removed it'
        except OSError as e:  # (before the collective below: the other processes wait there)
          done = f'could not repair it ({e.strerror or e})'
        print(f'the metrics file of the checkpoint at step {step} in {self.directory} was unreadable; {done}',
              file=sys.stderr)
    gather_from_processes(0)  # (a collective: no process opens the folder before process 0 is done)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
           val_loss: float | None = None, data_fingerprint: int | None = None) -> None:
    """Starts writing `state` (an nnx.State of (model, optimizer)) as step `step`; returns at once.

    `data_fingerprint` is the training data's (data.Dataset.fingerprint). Raises CheckpointError if this save or
    the previous (asynchronous) one failed.
    """
    meta = {'step': step, 'val_loss': val_loss, 'config': config.to_dict(), 'tokenizer': tokenizer.to_json(),
            'data_fingerprint': data_fingerprint}
    self.wait()  # Orbax waits for the previous save anyway; waiting here names its step if it failed
    quiet = quiet_absl() if val_loss is None else contextlib.nullcontext()  # Orbax warns of a step without metrics
    with self._failures(step), quiet:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(nnx.to_pure_dict(state[0])),
          opt_state=ocp.args.StandardSave(nnx.to_pure_dict(state[1])),
          meta=ocp.args.JsonSave(meta),
      ), metrics=None if val_loss is None else {'val_loss': val_loss}, force=True)
    self._in_flight = step

  def wait(self) -> None:
    """Blocks until every started save is on disk; CheckpointError if one failed."""
    with self._failures(self._in_flight):
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Closes the manager; a failure here was already reported (or another error is on its way)."""
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001
      pass

  @contextlib.contextmanager
  def _failures(self, step: int | None):
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # disk full, read-only or vanished folder, ...
      reason = orbax_errors.shortened((str(e).strip().splitlines() or [type(e).__name__])[-1])
      good = [s for s in self.steps() if (self.directory / str(s)).is_dir()]
      kept = f'the checkpoint at step {good[-1]} is intact' if good else 'no earlier checkpoint exists'
      what = f'step {step}' if step is not None else 'the last step'
      raise CheckpointError(f'cannot write the checkpoint of {what} in {self.directory} ({type(e).__name__}: {reason}); '
                            f'{kept}: free disk space or fix permissions, then rerun to resume') from e

  # Reading goes to the item handlers, not through the manager: the manager's restore ends at a barrier across
  # processes, which a process whose read failed skips, leaving the others waiting. The callers gather every
  # process's outcome instead, at points all of them reach.
  def _item(self, step: int, name: str) -> pathlib.Path:
    return self.directory / str(step) / name

  def meta(self, step: int) -> dict:
    return read_record(self.directory.parent, step)

  def best_step(self) -> int | None:
    """The step with the lowest validation loss, of those whose record reads (the others are named on stderr)."""
    scored = []
    for step in self.steps():
      try:
        val_loss = self.meta(step)['val_loss']
      except Exception as e:  # noqa: BLE001 (a damaged step is no candidate; the chosen one is read in full later)
        print(f'left out of --checkpoint best: the checkpoint at step {step} ({orbax_errors.first_line(e)})', file=sys.stderr)
        continue
      if val_loss is not None:
        scored.append((val_loss, step))
    return min(scored)[1] if scored else None

  def select(self, which: str | int) -> int:
    """'latest', 'best' or a step number -> an existing step."""
    steps = self.steps()
    if not steps:
      raise CheckpointError(f'no checkpoints in {self.directory}; train first (launch.py --config ... --workdir ...)')
    if which == 'latest':
      return steps[-1]
    if which == 'best':
      best = self.best_step()
      if best is None:
        raise CheckpointError(f'no checkpoint in {self.directory} has a validation loss; use latest or a step number')
      return best
    try:
      step = int(which)
    except ValueError:
      raise CheckpointError(f"--checkpoint {which!r} is not 'latest', 'best' or a step number; pass one of them "
                            f'(saved steps: {", ".join(map(str, steps))})') from None
    if step not in steps:
      raise CheckpointError(f'no checkpoint at step {step} in {self.directory}; '
                            f'saved steps: {", ".join(map(str, steps))}')
    return step

  def restore(self, step: int, abstract_params, abstract_opt_state=None) -> tuple[Any, Any]:
    """(params, opt_state) of step `step`, laid out as the given abstract nnx.States say.

    Without `abstract_opt_state` only the parameters are read (for sampling).
    """
    parts = {'params': abstract_params, 'opt_state': abstract_opt_state}
    parts = {name: part for name, part in parts.items() if part is not None}
    filled = {}
    for name, part in parts.items():
      restored = ocp.StandardCheckpointHandler().restore(
          self._item(step, name), args=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(part))))
      filled[name] = jax.tree.map(lambda x: x, part)  # a copy to fill in
      nnx.replace_by_pure_dict(filled[name], restored)
    return filled['params'], filled.get('opt_state')

  def restore_state(self, step: int, abstract_state):
    """The nnx.State of (model, optimizer) of step `step`, laid out as `abstract_state` says."""
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill in
    state[0], state[1] = self.restore(step, abstract_state[0], abstract_state[1])
    return state

  def restore_latest_good(self, abstract_state, config: ml_collections.ConfigDict, log=print,
                          tokenizer: Tokenizer | None = None):
    """(step, state, meta) of the newest step that restores, or None when there is no checkpoint.

    An unreadable (corrupt or partial) step is set aside as `<step>.corrupt`, with a message, and the previous
    one is tried. CheckpointError, moving nothing, for an error that says nothing about the files (memory,
    permissions, ...); CheckpointError too when steps were set aside and none is left. A checkpoint of another
    model shape, or one trained with another tokenizer than `tokenizer` (the data's, when given), is refused
    (ConfigError). All processes take the same decisions (process 0 moves the folders).
    """
    steps = self.steps()  # each process lists the folder itself: they must see the same steps
    if first_process_differing(digest(','.join(map(str, steps)).encode())) is not None:
      latest = gather_from_processes(steps[-1] if steps else -1)
      raise CheckpointError(f'the processes see different checkpoints in {self.directory} (latest step by process: '
                            f'{", ".join(str(s) if s >= 0 else "none" for s in latest)}); the workdir must be one '
                            'folder on a file system that every process shares')
    for step in reversed(steps):
      restored = error = None
      try:
        restored = self._restore_checked(step, abstract_state, config, tokenizer)
      except Exception as e:  # noqa: BLE001 (sorted out below, the same way on every process)
        error = e
      ok, unreadable, environment, other_model = range(4)  # outcomes, the worst one (highest) decides
      outcome = (ok if error is None else other_model if isinstance(error, ConfigError)
                 else environment if orbax_errors.is_environment_error(error) else unreadable)
      outcomes = gather_from_processes(outcome)
      worst, worst_process = outcomes.max(), int(outcomes.argmax())
      if worst == other_model:
        if outcome == other_model:
          raise error
        raise ConfigError(f'the checkpoint at step {step} in {self.directory} holds another model (process '
                          f'{worst_process} says how); pass another --workdir')
      if worst == environment:
        cause = orbax_errors.first_line(error) if outcome == environment else f'an error on process {worst_process}, in its output'
        raise CheckpointError(f'cannot read the checkpoint at step {step} in {self.directory} ({cause}); it is left '
                              'in place: fix the cause (memory, permissions, file system), then rerun to resume'
                              ) from error
      if worst == ok:
        return restored
      self._set_aside(step, error, log)
    set_aside = set_aside_steps(self.directory.parent)
    if set_aside:
      raise CheckpointError(f'no checkpoint in {self.directory} restores (set aside as unreadable: '
                            f'{", ".join(set_aside)}); rename one back to its step number to retry it, or move them '
                            'out of the folder (or pass another --workdir) to start from scratch')
    return None

  def _restore_checked(self, step: int, abstract_state, config: ml_collections.ConfigDict,
                       tokenizer: Tokenizer | None):
    """(step, state, meta) of step `step`; ConfigError if it holds another model than `config` builds, or
    was trained with another tokenizer than `tokenizer`."""
    meta = self.meta(step)
    check_model_matches(meta['config'], config, str(self.directory.parent))
    if tokenizer is not None:
      check_same_tokenizer(meta['tokenizer'], tokenizer, step, self.directory)
    for name, part in (('params', abstract_state[0]), ('opt_state', abstract_state[1])):
      saved = ocp.StandardCheckpointHandler().metadata(self._item(step, name))
      if not jax.tree_util.tree_leaves(saved):  # its metadata file is missing or empty: damaged, not other
        raise ValueError(f'the {name} of the checkpoint at step {step} list no arrays')
      _check_same_arrays(saved, _abstract(nnx.to_pure_dict(part)), name, step)
    return step, self.restore_state(step, abstract_state), meta

  def _set_aside(self, step: int, error: Exception | None, log) -> None:
    """Process 0 renames step `step` to `<step>.corrupt` (`<step>-2.corrupt`, ... for a step set aside before, e.g.
    saved again on a flaky disk); every process then reloads the list of steps."""
    aside, copy = self.directory / f'{step}.corrupt', 1
    while aside.exists():
      copy += 1
      aside = self.directory / f'{step}-{copy}.corrupt'
    failure = None
    if jax.process_index() == 0:
      try:
        (self.directory / str(step)).rename(aside)
      except OSError as e:
        failure = e
    if gather_from_processes(failure is not None).any():
      what = orbax_errors.first_line(failure) if failure is not None else 'see the output of process 0'
      raise CheckpointError(f'cannot move the unreadable checkpoint at step {step} to {aside} ({what}); '
                            'move or delete it yourself, then rerun') from failure
    self.manager.reload()
    reason = orbax_errors.first_line(error) if error is not None else 'unreadable on another process'
    earlier = [s for s in self.steps() if s < step]
    then = f'falling back to the one at step {earlier[-1]}' if earlier else 'no earlier checkpoint is left'
    log(f'checkpoint at step {step} is unreadable ({reason}); moved it to {aside.name}, {then}')


def set_aside_steps(workdir: str | pathlib.Path) -> list[str]:
  """The folders of the steps a restore set aside as unreadable (`<step>.corrupt`, ...) in a workdir."""
  return sorted(path.name for path in (pathlib.Path(workdir) / 'checkpoints').glob('*.corrupt'))


def read_record(workdir: str | pathlib.Path, step: int) -> dict:
  """The record saved with a checkpoint (step, val_loss, config, tokenizer, data_fingerprint), without opening a
  manager; Orbax's error when it does not read."""
  return ocp.JsonCheckpointHandler().restore(pathlib.Path(workdir).absolute() / 'checkpoints' / str(step) / 'meta')


def run_tokenizer(workdir: str | pathlib.Path) -> Tokenizer | None:
  """The tokenizer of the run in `workdir`: its tokenizer.json, or where that is missing or damaged (a run copied
  without it) its latest checkpoint's record of it; None where neither reads (or there is no run)."""
  workdir = pathlib.Path(workdir)
  try:
    return Tokenizer.from_json((workdir / 'tokenizer.json').read_text(encoding='utf-8'))
  except Exception:  # noqa: BLE001 (missing, unreadable or damaged: the checkpoint's record)
    pass
  try:
    step = sweep_lib.latest_step(workdir)
    return Tokenizer.from_json(read_record(workdir, step)['tokenizer']) if step else None
  except Exception:  # noqa: BLE001 (an unreadable or damaged record)
    return None


def load_meta(workdir: str | pathlib.Path, which: str | int = 'latest') -> tuple[Checkpoints, int, dict]:
  """Opens a workdir read-only and returns (checkpoints, step, meta) of the chosen checkpoint."""
  workdir = pathlib.Path(workdir)
  if not (workdir / 'checkpoints').is_dir():
    runs = sorted(path.parent for path in workdir.glob('*/checkpoints') if path.is_dir())
    if runs:  # e.g. a sweep's folder: its points are the runs
      raise CheckpointError(f'no checkpoints in {workdir}, a folder of {len(runs)} runs; pass one of them, e.g. '
                            f'--workdir {runs[0]}')
    raise CheckpointError(f'no checkpoints in {workdir}; train first or pass the workdir of a run')
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    step = checkpoints.select(which)
    with reading(checkpoints, step):
      meta = checkpoints.meta(step)
    if which == 'best' and not meta['config'].get('checkpoint', {}).get('keep_best', True):
      print(f'note: this run did not keep its best checkpoint (checkpoint.keep_best=False): step {step} is the '
            'best of those kept', file=sys.stderr)
    return checkpoints, step, meta
  except BaseException:
    checkpoints.close()
    raise


@contextlib.contextmanager
def reading(checkpoints: Checkpoints, step: int):
  """Read-only use (sampling, evaluation): a step that does not restore becomes one CheckpointError line."""
  try:
    yield
  except (CheckpointError, ConfigError):
    raise
  except Exception as e:  # noqa: BLE001 (corrupt or partial files, or the machine: memory, permissions, ...)
    where = f'cannot read the checkpoint at step {step} in {checkpoints.directory} ({orbax_errors.first_line(e)})'
    checkpoints.manager.reload()  # the steps as they are now: a run training in the workdir saves and deletes
    others = ', '.join(str(s) for s in checkpoints.steps() if s != step) or 'there is none'
    if not (checkpoints.directory / str(step)).is_dir():
      raise UnreadableCheckpoint(f'the checkpoint at step {step} in {checkpoints.directory} was deleted while it '
                                 'was read (a run training there keeps only its latest checkpoint.keep steps); rerun '
                                 f'with --checkpoint latest or a step it keeps ({others})', step) from e
    if orbax_errors.is_environment_error(e):
      raise CheckpointError(f'{where}; fix the cause (memory, permissions, file system) and rerun') from e
    raise UnreadableCheckpoint(f'{where}; pass --checkpoint with another step ({others}), or rerun training in the '
                               'workdir, which sets unreadable steps aside', step) from e


def load_model(workdir: str | pathlib.Path, which: str | int = 'latest',
               check: Callable[[Tokenizer, ml_collections.ConfigDict], None] | None = None):
  """(model, tokenizer, config, step) from a workdir alone, parameters on the default device.

  `check(tokenizer, config)` runs before the parameters are read: what it refuses (e.g. a prompt with
  characters outside the vocabulary) is refused at once, however large the model. With `which` 'latest' or
  'best', a step that does not read while `which` has come to name another one (a run training in the workdir
  saved a newer step and deleted the one being read) is replaced by that one, a few times over.
  """
  return read_while_training(workdir, which, lambda: _load_model(workdir, which, check))


def read_while_training(workdir: str | pathlib.Path, which: str | int, read: Callable[[], Any]) -> Any:
  """read(), which reads the step `which` names in `workdir`; again while it fails on a step that `which` no longer
  names (a run training in the workdir saved a newer one and deleted it): 'latest' and 'best' move on, a number not."""
  for attempt in range(READ_ATTEMPTS):
    try:
      return read()
    except UnreadableCheckpoint as e:
      retry = which in ('latest', 'best') and attempt < READ_ATTEMPTS - 1
      if not (retry and _names_another_step(workdir, which, e.step)):
        raise


READ_ATTEMPTS = 5  # reads of 'latest' or 'best' while a run training in the workdir replaces them


def _names_another_step(workdir: str | pathlib.Path, which: str, step: int) -> bool:
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    with contextlib.redirect_stderr(io.StringIO()):  # ('best' names the steps it leaves out; the retry says it again)
      return checkpoints.select(which) != step
  except CheckpointError:
    return False
  finally:
    checkpoints.close()


def _load_model(workdir: str | pathlib.Path, which: str | int,
                check: Callable[[Tokenizer, ml_collections.ConfigDict], None] | None):
  checkpoints, step, meta = load_meta(workdir, which)
  try:
    with reading(checkpoints, step):  # a record that lacks its config or tokenizer is damaged too
      config = config_lib.with_added_fields(ml_collections.ConfigDict(meta['config']))
      tokenizer = Tokenizer.from_json(meta['tokenizer'])
    if check is not None:
      check(tokenizer, config)
    here = config_lib.for_reading_here(config, 1, jax.devices()[0])
    model_config = config_lib.model_config(here, tokenizer.vocab_size)
    graphdef, abstract = nnx.split(abstract_decoder(model_config))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    with reading(checkpoints, step):
      params, _ = checkpoints.restore(step, abstract)
  finally:
    checkpoints.close()
  return nnx.merge(graphdef, params), tokenizer, config, step

