"""Where the time goes in a jax.profiler trace: totals per compiled module and per op.

  python bench/trace_summary.py runs/base/plugins/profile        # newest .trace.json.gz under it
  python bench/trace_summary.py trace.json.gz --top 30

Reads the Perfetto trace that `train.profile_steps` (or `jax.profiler.start_trace(...,
create_perfetto_trace=True)`) writes, and prints the wall span of the trace, then the summed
duration and count of the events of each compiled module (`hlo_module`) and of its top ops, and
of the host-side events that are not XLA ops.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib

from cli_args import positive_int


def load_events(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    raise SystemExit(f'{path} does not exist (was the run profiled? train.profile_steps > 0)')
  if path.is_dir():
    traces = sorted(path.rglob('*.trace.json.gz'), key=lambda p: p.stat().st_mtime)
    if not traces:
      raise SystemExit(f'no .trace.json.gz under {path}')
    path = traces[-1]
  print(f'trace: {path}')
  try:
    events = json.loads(gzip.decompress(path.read_bytes()))['traceEvents']
  except (OSError, ValueError, KeyError, TypeError) as e:  # not gzip, not JSON, not a trace
    raise SystemExit(f'{path} is not a jax.profiler trace (.trace.json.gz): {type(e).__name__}: {e}') from None
  return [e for e in events if e.get('ph') == 'X']


def summarize(events: list[dict], top: int) -> None:
  if not events:
    raise SystemExit('the trace holds no timed events')
  span = max(e['ts'] + e.get('dur', 0) for e in events) - min(e['ts'] for e in events)
  print(f'span {span / 1000:.1f} ms, {len(events)} events')
  modules, ops, host = collections.Counter(), collections.Counter(), collections.Counter()
  counts = collections.Counter()
  for e in events:
    module = e.get('args', {}).get('hlo_module')
    if module:
      modules[module] += e['dur']
      ops[module, e['name']] += e['dur']
      counts[module, e['name']] += 1
    else:
      host[e['name']] += e['dur']
      counts[None, e['name']] += 1
  for module, total in modules.most_common():
    print(f'\nmodule {module}: {total / 1000:.1f} ms in its ops')
    mine = [(name, duration) for (m, name), duration in ops.most_common() if m == module]
    for name, duration in mine[:top]:
      print(f'  {duration / 1000:9.2f} ms {counts[module, name]:6d}x  {name[:90]}')
  print('\nother events (host side; nested events overlap):')
  for name, duration in host.most_common(top):
    print(f'  {duration / 1000:9.2f} ms {counts[None, name]:6d}x  {name[:90]}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('path', type=pathlib.Path, help='a .trace.json.gz, or a folder to search for the newest one')
  parser.add_argument('--top', type=positive_int, default=15, help='ops listed per module, and host events')
  args = parser.parse_args()
  summarize(load_events(args.path), args.top)


if __name__ == '__main__':
  main()
