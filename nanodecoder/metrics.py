"""Where training metrics go: the console and `metrics.jsonl` in the workdir."""

from __future__ import annotations

import json
import pathlib
import sys
import time


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


class MetricsLogger:
  """Appends one JSON line per `write` to workdir/metrics.jsonl and prints it (process 0 only)."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, stream=None):
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self._file = None
    if enabled:
      path = pathlib.Path(workdir) / 'metrics.jsonl'
      path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(path, 'a', encoding='utf-8')

  def info(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.stream, flush=True)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps({'step': step, 'time': time.time(), **metrics}) + '\n')
    self._file.flush()
    self.info(format_metrics(step, metrics))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
