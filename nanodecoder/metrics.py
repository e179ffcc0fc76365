"""Where training metrics go: the console, `metrics.jsonl` and TensorBoard event files in the workdir.

  console         one line per `write`; on a terminal also a progress bar with
                  the ETA under them, redrawn at every write; elsewhere (CI
                  logs, files) plain lines that end with the progress and ETA.
  metrics.jsonl   one JSON object per `write`: {'step', 'time', 'session_start',
                  <metric>: value, ...}; `session_start` (unix time the process
                  started logging) tells the sessions of a resumed run apart.
                  A resumed session drops the records an earlier one wrote
                  past the checkpoint it resumes from (see `start`).
  events.out.*    TensorBoard scalars (one tag per metric) and the flattened
                  config as hparams; `tensorboard --logdir runs` shows every run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import shutil
import socket
import sys
import time
from typing import Any, Mapping

import ml_collections
from absl import logging as absl_logging

from nanodecoder.files import atomic_write

_file_counter = itertools.count()


@contextlib.contextmanager
def quiet_absl():
  """Only errors from absl logging (the warnings and notes of Orbax, TFDS, ...) inside the block."""
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(min(previous, absl_logging.ERROR))
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def format_metrics(step: int, metrics: dict[str, float]) -> str:
  parts = [f'step {step}']
  for name, value in metrics.items():
    short = name.split('/', 1)[-1]
    if short == 'lr':
      parts.append(f'{short} {value:.2e}')
    elif short == 'tokens_per_s':
      parts.append(f'{value / 1000:.1f}k tokens/s')
    elif short == 'ms_per_step':
      parts.append(f'{value:.1f} ms/step')
    else:
      parts.append(f'{short} {value:.4f}')
  return ' | '.join(parts)


def flatten_config(config: ml_collections.ConfigDict | Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'model.num_layers': 4, ...}: the leaves of a config, with dotted names."""
  items = config.items() if isinstance(config, Mapping) else config.to_dict().items()
  flat = {}
  for key, value in items:
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


class TensorBoardWriter:
  """Writes scalars and hparams to a new TensorBoard event file in `logdir` (no TensorFlow needed)."""

  def __init__(self, logdir: str | pathlib.Path):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.'
                                f'{next(_file_counter)}')
    self._file = open(self.path, 'wb')
    self._writer = RecordWriter(self._file)
    self._add(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _add(self, event) -> None:
    self._writer.write(event.SerializeToString())
    self._file.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                               for tag, value in values.items()])
    self._add(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def session_start(self, step: int) -> None:
    """Marks a (re)start at `step`: TensorBoard drops events of earlier sessions from `step` on."""
    log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
    self._add(self._event_pb2.Event(wall_time=time.time(), step=step, session_log=log))

  def hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's hyperparameters for TensorBoard's HPARAMS tab (bools, numbers, strings)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
      if isinstance(value, bool):
        info.hparams[name].bool_value = value
      elif isinstance(value, (int, float)):
        info.hparams[name].number_value = value
      elif value is not None:
        info.hparams[name].string_value = str(value)
    data = plugin_data_pb2.HParamsPluginData(session_start_info=info)
    summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(
        tag=metadata.SESSION_START_INFO_TAG, metadata=metadata.create_summary_metadata(data),
        tensor=metadata.NULL_TENSOR)])
    self._add(self._event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

  def close(self) -> None:
    self._file.close()


class Progress:
  """Fraction done and ETA of a run. The ETA is the remaining steps at the training speed (the mean of the logged
  train/ms_per_step, which leaves out evaluations, checkpoints and compilation), plus the evaluations and
  checkpoints still to come at the time the latest of each took (see `took`)."""

  def __init__(self, total_steps: int):
    self.total = total_steps
    self.step = 0
    self._speeds: list[float] = []  # the logged train/ms_per_step
    self._recurring: dict[str, tuple[int, int, float]] = {}  # what -> (every, step of the latest, its seconds)

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    self.step = step
    if metrics.get('train/ms_per_step', 0) > 0:
      self._speeds.append(metrics['train/ms_per_step'])

  def took(self, what: str, step: int, seconds: float, every: int) -> None:
    """`what` (e.g. 'evaluation'), done every `every` steps and at the last step, took `seconds` at `step`.

    The first of a session costs nothing in the ETA: it compiles or sets up once (tiny CPU runs: 15-50 times the
    time of the next), which multiplied by those to come would overestimate the ETA by far.
    """
    self._recurring[what] = (every, step, seconds if what in self._recurring else 0.0)

  @property
  def eta(self) -> float | None:
    """Seconds left; None before a logged training speed."""
    if not self._speeds:
      return None
    left = (self.total - self.step) * sum(self._speeds) / len(self._speeds) / 1000
    for every, latest, seconds in self._recurring.values():
      after = max(latest, self.step - 1)  # those to come: at multiples of `every` and at the last step, from this one
      if after < self.total:
        left += seconds * (self.total // every - after // every + (self.total % every != 0))
    return left

  def text(self) -> str:
    percent = f'{100 * self.step / max(self.total, 1):.0f}%'
    if self.step >= self.total:
      return f'{percent} done'
    eta = self.eta
    return f'{percent}, ETA {format_duration(eta)}' if eta is not None else percent

  def bar(self, loss: float | None, width: int) -> str:
    cells = max(10, min(40, width - 60))
    filled = int(cells * min(self.step / max(self.total, 1), 1.0))
    loss_text = '' if loss is None else f' | loss {loss:.4f}'
    return f'[{"#" * filled}{"." * (cells - filled)}] {self.step}/{self.total} {self.text()}{loss_text}'


def discard(stream) -> None:
  """Points `stream`'s file descriptor at /dev/null: what it still buffers, and what is printed to it later, go
  nowhere instead of failing again (at exit, Python would report the unflushed stdout and exit with status 120)."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, stream.fileno())
  except (OSError, ValueError, AttributeError):  # no file descriptor of its own
    pass
  finally:
    os.close(devnull)


def _kept(line: str, start_step: int | None) -> bool:
  """Whether a line of metrics.jsonl stays when a session starts training at `start_step` (None: unknown)."""
  if not line.endswith('\n'):  # cut short by a crash
    return False
  try:
    return start_step is None or json.loads(line)['step'] <= start_step
  except (ValueError, KeyError, TypeError):  # not a record of ours: leave it
    return True


class MetricsLogger:
  """Logs metrics of process 0 to the console, workdir/metrics.jsonl and TensorBoard.

  `total_steps` turns on the progress (a bar on a terminal, '| 25%, ETA 3m05s'
  at the end of plain lines); `config` goes to TensorBoard as hparams.
  """

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, stream=None, *,
               total_steps: int | None = None, config: ml_collections.ConfigDict | None = None,
               tensorboard: bool = True):
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.session_start = time.time()
    self.progress = Progress(total_steps) if total_steps else None
    isatty = getattr(self.stream, 'isatty', lambda: False)
    self.progress_bar = bool(self.progress) and isatty()  # a bar on a terminal, else the progress in each line
    self._bar_shown = False
    self._console_gone = False  # the console's reader went away
    self._loss: float | None = None
    self._path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._file = None  # opened at the first write
    self._start_step: int | None = None
    self._tb: TensorBoardWriter | None = None
    self._config = config
    self._tensorboard_dir = pathlib.Path(workdir) if enabled and tensorboard else None

  def start(self, step: int) -> None:
    """This session trains from `step` on (0, or the checkpoint it resumed from); call before the first write.

    An earlier session that crashed after its last checkpoint logged steps that this one trains again: their
    records leave metrics.jsonl (TensorBoard hides their events) when this session writes its first. A session
    that writes none drops them from metrics.jsonl at `drop_replaced` (TensorBoard still shows them: it opens
    no event file).
    """
    self._start_step = step

  def drop_replaced(self) -> None:
    """Rewrites metrics.jsonl without the records `start` replaces or a torn line (if it holds any)."""
    if not self.enabled or self._file is not None or not self._path.exists():
      return
    # (a damaged byte becomes U+FFFD: the line stays, as other lines that are not records of ours do)
    lines = self._path.read_text(encoding='utf-8', errors='replace').splitlines(keepends=True)
    kept = [line for line in lines if _kept(line, self._start_step)]
    if kept != lines:
      atomic_write(self._path, ''.join(kept))

  def _open_file(self) -> None:
    """Opens metrics.jsonl to append, first dropping what `drop_replaced` drops."""
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self.drop_replaced()
    self._file = open(self._path, 'a', encoding='utf-8')

  def _open_tensorboard(self, step: int) -> None:
    """Opens this session's event file (with the first metrics: none for a run with nothing to do)."""
    try:
      self._tb = TensorBoardWriter(self._tensorboard_dir)
    except ImportError:  # tensorboard is a dependency; a trimmed install still trains
      self.info('tensorboard is not installed: no TensorBoard event files (pip install tensorboard)')
    self._tensorboard_dir = None
    if self._tb is not None:
      if self._config is not None:
        self._tb.hparams(flatten_config(self._config))
      self._tb.session_start(step if self._start_step is None else self._start_step + 1)

  def _clear_bar(self) -> None:
    if self._bar_shown:
      self.stream.write('\r\x1b[K')
      self._bar_shown = False

  def _draw_bar(self) -> None:
    width = shutil.get_terminal_size((100, 20)).columns
    self.stream.write(self.progress.bar(self._loss, width)[:width - 1])
    self.stream.flush()
    self._bar_shown = True

  def info(self, message: str) -> None:
    if not self.enabled or self._console_gone:
      return
    try:
      self._clear_bar()
      print(message, file=self.stream, flush=True)
      if self.progress_bar and self.progress.step:
        self._draw_bar()
    except BrokenPipeError:  # the reader went away (`| head`, or a `| tee` that the same Ctrl-C ended)
      self._console_gone = True  # the run goes on (and a signal still saves it), logged to the files, as with no stdout
      discard(self.stream)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self._file is None:
      self._open_file()
    self._file.write(json.dumps({'step': step, 'time': time.time(), 'session_start': self.session_start,
                                 **metrics}) + '\n')
    self._file.flush()
    if self._tensorboard_dir is not None:
      self._open_tensorboard(step)
    if self._tb is not None:
      self._tb.scalars(step, metrics)
    line = format_metrics(step, metrics)
    if self.progress is not None:
      self.progress.update(step, metrics)
      self._loss = metrics.get('train/loss', self._loss)
      if not self.progress_bar and 'train/loss' in metrics:
        line += f' | {self.progress.text()}'
    self.info(line)

  def took(self, what: str, step: int, seconds: float, every: int) -> None:
    """Counts a recurring pause in the ETA: see `Progress.took`."""
    if self.progress is not None:
      self.progress.took(what, step, seconds, every)

  def close(self) -> None:
    if self._bar_shown:
      self.stream.write('\n')
      self.stream.flush()
      self._bar_shown = False
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
