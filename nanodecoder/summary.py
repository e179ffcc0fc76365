"""Tables and plots of a sweep's points, from what the runs wrote (metrics.jsonl, config.json, checkpoints).

Written into the sweep's root folder (it never trains anything):
  summary.csv      one row per point: its swept fields, status, checkpoint step, parameter count, best val
                   loss, its step and the val bits per character there, final val and train loss (the last
                   evaluation), median tokens/s and the wall time of all its sessions; all of them (and the
                   plots) up to its latest checkpoint, at most num_steps (the steps a resume trains again are
                   left out)
  summary.md       the same as a Markdown table, best val loss in bold (bits per character where the points'
                   BPE vocabularies differ), with the plots below it
  val_loss.png     best val loss (or bits per character, likewise) against the first swept field (one line
                   per value of the other fields)
  loss_curves.png  train and val loss of every point against the step (val bits per character likewise)

The root is a sweep's folder (its points listed in sweep.json), or any folder
whose subfolders are runs (names `field=value,...` give the fields), or a
single run's workdir.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
import statistics
from typing import Any

from nanodecoder import config as config_lib
from nanodecoder import saved_config
from nanodecoder import sweep as sweep_lib
from nanodecoder.config import ConfigError
from nanodecoder.files import atomic_write, exclusive
from nanodecoder.metrics import format_duration
from nanodecoder.tokenizer import Tokenizer

METRIC_COLUMNS = ['status', 'step', 'num_steps', 'params', 'best_val_loss', 'best_val_step', 'best_val_bits_per_char',
                  'final_val_loss', 'final_train_loss', 'tokens_per_s', 'wall_time_s']


@dataclasses.dataclass
class RunMetrics:
  """A run's metrics.jsonl by kind, one record per step (a resumed run's later record of a step wins)."""

  train: dict[int, dict[str, Any]]  # step -> {'train/loss', 'train/tokens_per_s', ...}
  evals: dict[int, dict[str, Any]]  # step -> {'eval/train_loss', 'eval/val_loss'}
  wall_time_s: float | None  # sum over sessions of (last record - session start)


def read_metrics(workdir: str | pathlib.Path, up_to_step: int | None = None) -> RunMetrics:
  """The records of a run's metrics.jsonl, those of steps past `up_to_step` (if given; 0: all) left out."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  records = []
  if path.is_file():
    for line in path.read_text(encoding='utf-8', errors='replace').splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a crash (or damaged)
        continue
  train, evals, sessions = {}, {}, {}
  for record in records:
    if up_to_step is not None and isinstance(record.get('step'), int) and record['step'] > up_to_step:
      continue
    if 'train/loss' in record:
      train[record['step']] = record
    if 'eval/val_loss' in record:
      evals[record['step']] = record
    if 'time' in record:
      start = record.get('session_start')
      first, last = sessions.get(start, (record['time'], record['time']))
      sessions[start] = (min(first, record['time']), max(last, record['time']))
  wall = sum(last - (first if start is None else start) for start, (first, last) in sessions.items())
  return RunMetrics(dict(sorted(train.items())), dict(sorted(evals.items())), wall if sessions else None)


def count_parameters(workdir: str | pathlib.Path, tokenizer: Tokenizer | None) -> int | None:
  """Parameters of a run's model (shapes only, nothing computed), from its saved config (saved_config.run_config)
  and its tokenizer (checkpoint.run_tokenizer's); None where either cannot be read."""
  from nanodecoder.model import abstract_decoder, count_params

  if tokenizer is None:
    return None
  try:
    config, _ = saved_config.run_config(workdir)
  except Exception:  # noqa: BLE001 (unreadable files, or a damaged or missing record: no parameter count)
    return None
  return count_params(abstract_decoder(config_lib.model_config(config, tokenizer.vocab_size)))


def saved_num_steps(workdir: str | pathlib.Path) -> int | None:
  """train.num_steps of a run's saved config (its config.json: the settings of its last session), None without one."""
  try:
    return saved_config.run_config(workdir)[0].train.num_steps
  except (OSError, ValueError):
    return None


def reported_step(workdir: str | pathlib.Path, num_steps: int | None) -> int:
  """The last step the summary reports a run at: its latest checkpoint (0: none), at most `num_steps`.

  A run resumes from its latest checkpoint: the steps it logged after it are trained again, so are not its own yet.
  """
  latest = sweep_lib.latest_step(workdir)
  return latest if num_steps is None else min(latest, num_steps)


_NOT_READ = object()  # run_row's `tokenizer` when the caller has not read it


def run_row(workdir: str | pathlib.Path, num_steps: int | None = None, metrics: RunMetrics | None = None,
            tokenizer: Tokenizer | None | object = _NOT_READ) -> dict[str, Any]:
  """The summary numbers of one run (None where it has none yet).

  `num_steps`: the sweep manifest's, which wins over the run's config.json (the
  settings of its last session); None: the config.json's. Losses, speed and
  wall time are those of the steps up to `reported_step`: a run trained further
  since (a sweep extended, then listed with its first command) is reported at
  num_steps, an unfinished one at its latest checkpoint. `metrics`: the run's
  `read_metrics(workdir, reported_step(workdir, num_steps))`, when the caller
  has read them already; `tokenizer`: its checkpoint.run_tokenizer(workdir) (None: unreadable), likewise.
  """
  workdir = pathlib.Path(workdir)
  if num_steps is None:
    num_steps = saved_num_steps(workdir)
  metrics = read_metrics(workdir, reported_step(workdir, num_steps)) if metrics is None else metrics
  if tokenizer is _NOT_READ:
    from nanodecoder.checkpoint import run_tokenizer

    tokenizer = run_tokenizer(workdir)
  status = sweep_lib.point_status(workdir, num_steps)
  row = dict.fromkeys(METRIC_COLUMNS)
  row.update(status=status.state, step=status.step, num_steps=num_steps, params=count_parameters(workdir, tokenizer),
             wall_time_s=metrics.wall_time_s)
  if metrics.evals:
    last = metrics.evals[max(metrics.evals)]
    row.update(final_val_loss=last['eval/val_loss'], final_train_loss=last.get('eval/train_loss'))
    finite = [(step, r['eval/val_loss']) for step, r in metrics.evals.items() if math.isfinite(r['eval/val_loss'])]
    if finite:  # a diverged run's NaN is no one's best
      best_step, best = min(finite, key=lambda item: item[1])
      row.update(best_val_loss=best, best_val_step=best_step,
                 best_val_bits_per_char=_bits_per_char(metrics.evals[best_step], tokenizer))
  speeds = [r['train/tokens_per_s'] for r in metrics.train.values() if r.get('train/tokens_per_s', 0) > 0]
  if speeds:
    row['tokens_per_s'] = statistics.median(speeds)
  return row


def _bits_per_char(evaluation: dict[str, float], tokenizer: Tokenizer | None) -> float | None:
  """The val loss of an evaluation record in bits per character: as logged (train.py), or for a run from before
  it was, the loss / ln 2 without BPE merges (it is per character) and None with them."""
  if 'eval/val_bits_per_char' in evaluation:
    return evaluation['eval/val_bits_per_char']
  if tokenizer is not None and not tokenizer.merges:
    return evaluation['eval/val_loss'] / math.log(2)
  return None


def _parse_value(text: str) -> Any:
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _is_run(folder: pathlib.Path) -> bool:
  """Whether a folder holds a run's files (what is left of them: e.g. only its checkpoints)."""
  return ((folder / 'metrics.jsonl').is_file() or (folder / config_lib.SAVED_CONFIG).is_file()
          or (folder / 'checkpoints').is_dir())


def find_points(root: pathlib.Path) -> tuple[str, list[str], list[tuple[str, dict[str, Any], int | None]]]:
  """(title, short field names, [(folder name, {short field: value}, num_steps or None)]) of the runs under `root`."""
  manifest = root / sweep_lib.MANIFEST
  if manifest.is_file():
    try:
      data = json.loads(manifest.read_text(encoding='utf-8'))
      names = sweep_lib.short_names(data['fields'])
      points = [(p['name'], {names[f]: v for f, v in p.get('values', p['overrides']).items() if f in names},
                 p.get('num_steps')) for p in data['points']]
      return f'sweep {data["name"]} ({pathlib.Path(data["config"]).name})', list(names.values()), points
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ConfigError(f'{manifest} is damaged ({type(e).__name__}: {e}); rerun the sweep command, which rewrites '
                        'it, or delete it to summarise the run folders under it') from None
  if _is_run(root):
    return f'run {root.name}', [], [('.', {}, None)]
  points = []
  for folder in sorted(p for p in root.iterdir() if _is_run(p)):
    pairs = [part.partition('=') for part in folder.name.split(',')]
    points.append((folder.name, {k: _parse_value(v) for k, eq, v in pairs if eq}, None))
  fields = list(dict.fromkeys(f for _, values, _ in points for f in values))
  return f'runs in {root.resolve().name}', fields, points


def _number(value: Any, digits: int = 4) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def ranking_column(rows: list[dict[str, Any]], same_tokens: bool) -> str | None:
  """The column that compares the rows' val losses: best_val_loss when they are per token of one tokenizer (or per
  character: `same_tokens`), else best_val_bits_per_char where every evaluated row has it, else None."""
  if same_tokens:
    return 'best_val_loss'
  scored = [r for r in rows if r['best_val_loss'] is not None]
  return 'best_val_bits_per_char' if all(r['best_val_bits_per_char'] is not None for r in scored) else None


def markdown(title: str, fields: list[str], rows: list[dict[str, Any]], images: list[str],
             same_tokens: bool = True) -> str:
  """The summary table; `same_tokens`: the runs' losses are per token of one tokenizer (or per character), so the
  lowest is named; otherwise the lowest val bits per character (in a column of its own), if every evaluated run
  has them."""
  finished = sum(r['status'] == 'finished' for r in rows)
  key = ranking_column(rows, same_tokens)
  scored = [r for r in rows if key and r[key] is not None]
  best = min(scored, key=lambda r: r[key]) if scored else None
  lines = [f'# Summary of {title}', '', f'{len(rows)} point{"s" if len(rows) != 1 else ""}, {finished} finished.']
  if not same_tokens:
    lines[-1] += (' Val losses are per token of different vocabularies (data.vocab_size), not comparable'
                  + ('; bits per character are.' if best else ': compare the bits per character of `--mode eval`.'))
  if best is not None:
    lines[-1] += (f' Lowest val {"loss" if same_tokens else "bits per character"}: {best[key]:.4f} ({best["point"]}, '
                  f'step {best["best_val_step"]}).')
  header = ['point', *fields, 'status', 'step', 'params', 'best val loss', *([] if same_tokens else ['val bits/char']),
            'final val loss', 'final train loss', 'tokens/s', 'wall time']
  lines += ['', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    scores = [_number(r['best_val_loss']), *([] if same_tokens else [_number(r['best_val_bits_per_char'])])]
    if r is best:
      scores[-1] = f'**{scores[-1]}**'
    cells = [r['point'], *('' if r[f] is None else str(r[f]) for f in fields), r['status'],
             f'{r["step"]}/{r["num_steps"] or "?"}', '' if r['params'] is None else f'{r["params"]:,}', *scores,
             _number(r['final_val_loss']), _number(r['final_train_loss']),
             '' if r['tokens_per_s'] is None else f'{r["tokens_per_s"]:,.0f}',
             '' if r['wall_time_s'] is None else format_duration(r['wall_time_s'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [''] + [f'![{name}]({name})' for name in images]
  return '\n'.join(lines) + '\n'


# Plots --------------------------------------------------------------------------


def new_figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width, height), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  return figure


def save_png(figure, path: pathlib.Path) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png')
  atomic_write(path, buffer.getvalue())


def plot_val_loss(rows: list[dict[str, Any]], fields: list[str], title: str, path: pathlib.Path,
                  column: str = 'best_val_loss') -> bool:
  """Best val loss (`column` best_val_loss), or the val bits per character at its step (best_val_bits_per_char),
  against the first field (rows without it are left out); one line per combination of the others.

  Returns whether it wrote `path` (not when no row has both).
  """
  x_field = fields[0] if fields else 'point'
  groups: dict[tuple, list[tuple[Any, float]]] = {}
  for r in rows:
    if r[column] is not None and r[x_field] is not None:
      groups.setdefault(tuple(r[f] for f in fields[1:]), []).append((r[x_field], r[column]))
  if not groups:
    return False
  xs = [x for points in groups.values() for x, _ in points]
  numeric = all(config_lib.is_number(x) for x in xs)
  categories = list(dict.fromkeys(xs))
  figure = new_figure(6.4, 4.2)
  ax = figure.add_subplot()
  for key, points in groups.items():
    points.sort(key=lambda p: p[0] if numeric else categories.index(p[0]))
    px = [x if numeric else categories.index(x) for x, _ in points]
    label = ', '.join(f'{f} unset' if v is None else f'{f}={v}' for f, v in zip(fields[1:], key)) or None
    ax.plot(px, [y for _, y in points], 'o-', label=label)
  if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
    ax.set_xscale('log', base=2)
  ticks = sorted(set(xs)) if numeric else range(len(categories))
  ax.set_xticks(list(ticks), [str(x) for x in (sorted(set(xs)) if numeric else categories)])
  ax.minorticks_off()
  ax.set_xlabel(x_field)
  ax.set_ylabel('best val loss (nats/token)' if column == 'best_val_loss'
                else 'val bits per character (at the best val loss)')
  ax.set_title(title, wrap=True)
  ax.grid(alpha=0.3)
  if len(groups) > 1:
    ax.legend()
  save_png(figure, path)
  return True


def plot_loss_curves(curves: list[tuple[str, RunMetrics, Tokenizer | None]], title: str, path: pathlib.Path,
                     same_tokens: bool = True) -> None:
  """Train loss (left) and val loss (right) of every point (name, metrics, tokenizer) against the step; where the
  points' BPE vocabularies differ (not `same_tokens`), val bits per character on the right."""
  from matplotlib import colormaps

  figure = new_figure(11, 4.2)
  train_ax, val_ax = figure.subplots(1, 2, sharey=same_tokens)
  cmap = colormaps['tab10' if len(curves) <= 10 else 'viridis']
  for i, (name, metrics, tokenizer) in enumerate(curves):
    color = cmap(i if len(curves) <= 10 else i / max(len(curves) - 1, 1))
    if metrics.train:  # (a marker for a lone point, e.g. a short run logging once)
      train_ax.plot(list(metrics.train), [r['train/loss'] for r in metrics.train.values()], color=color, lw=1,
                    marker='o' if len(metrics.train) == 1 else None, ms=3, label=name)
    evals = {step: r['eval/val_loss'] if same_tokens else _bits_per_char(r, tokenizer)
             for step, r in metrics.evals.items()}
    evals = {step: value for step, value in evals.items() if value is not None}
    if evals:
      val_ax.plot(list(evals), list(evals.values()), 'o-', color=color, ms=3, lw=1.2,
                  label=None if metrics.train else name)  # each name once, on the left if it can
  val_title = 'val loss' if same_tokens else 'val bits per character'
  for ax, what in ((train_ax, 'train loss (one batch)'), (val_ax, val_title)):
    ax.set_xlabel('step')
    ax.set_title(what)
    ax.grid(alpha=0.3)
  train_ax.set_ylabel('loss (nats/token)' if same_tokens else 'loss (nats per token of its vocabulary)')
  if not same_tokens:
    val_ax.set_ylabel('bits per character')
  for ax in (train_ax, val_ax):
    if ax.get_legend_handles_labels()[1]:
      ax.legend(fontsize='small')
  figure.suptitle(title, wrap=True)
  save_png(figure, path)


def write_summary(root: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes summary.csv, summary.md and the plots into `root`; returns the paths written.

  A sweep's processes (its --sweep_index jobs, ending together) take turns, under the manifest's lock: one reading the
  points while another wrote would leave, written last, a summary of the older state.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root} is not a folder; pass the root of a sweep, e.g. runs/sweep_blocks')
  if not (root / sweep_lib.MANIFEST).is_file():
    return _write_summary(root)
  with exclusive(root / sweep_lib.MANIFEST_LOCK):
    return _write_summary(root)


def _write_summary(root: pathlib.Path) -> list[pathlib.Path]:
  title, fields, points = find_points(root)
  if not points:
    raise FileNotFoundError(f'no runs in {root}: pass the root of a sweep (e.g. runs/sweep_blocks) or a run\'s workdir')
  from nanodecoder.checkpoint import run_tokenizer

  rows, curves, vocabularies = [], [], set()
  for name, values, num_steps in points:
    workdir = root / name
    if num_steps is None:  # not a sweep's point: the run's own length
      num_steps = saved_num_steps(workdir)
    metrics = read_metrics(workdir, reported_step(workdir, num_steps))  # (the curves too stop there)
    tokenizer = run_tokenizer(workdir)
    row = {'point': root.name if name == '.' else name, **dict.fromkeys(fields), **values,
           **run_row(workdir, num_steps, metrics, tokenizer)}  # a field the point does not set: None
    rows.append(row)
    if row['best_val_loss'] is not None:
      if tokenizer is not None:
        vocabularies.add(tokenizer.to_json() if tokenizer.merges else 'characters')
      elif row['best_val_bits_per_char'] is not None:  # tokens unknown (no tokenizer reads): compared by its bits
        vocabularies.add(f'the tokens of {name}')
    if metrics.train or metrics.evals:
      curves.append((row['point'], metrics, tokenizer))
  written = []
  buffer = io.StringIO()
  metric_columns = [c for c in METRIC_COLUMNS if c not in fields]  # e.g. a sweep over num_steps: one column
  writer = csv.DictWriter(buffer, fieldnames=['point', *fields, *metric_columns], lineterminator='\n')
  writer.writeheader()
  writer.writerows({k: ('' if v is None else v) for k, v in r.items()} for r in rows)
  atomic_write(root / 'summary.csv', buffer.getvalue())
  written.append(root / 'summary.csv')
  same_tokens = len(vocabularies) <= 1
  column = ranking_column(rows, same_tokens)  # None: BPE runs that did not log bits per character (no plot)
  images = []
  if column and plot_val_loss(rows, fields, f'{title}: ' + ('best val loss' if same_tokens else 'val bits per character'),
                              root / 'val_loss.png', column):
    images.append('val_loss.png')
  if curves:
    plot_loss_curves(curves, title, root / 'loss_curves.png', same_tokens)
    images.append('loss_curves.png')
  for stale in {'val_loss.png', 'loss_curves.png'} - set(images):  # an earlier summary's, of other data
    (root / stale).unlink(missing_ok=True)
  atomic_write(root / 'summary.md', markdown(title, fields, rows, images, same_tokens))
  written.append(root / 'summary.md')
  return written + [root / name for name in images]
