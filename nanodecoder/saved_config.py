"""A run's saved config; also an experiment file: `--config nanodecoder/saved_config.py:RUN` is RUN's config.

`launch.py --workdir RUN --config.a.b=v` (overrides without --config) trains
on with it, so that the overrides are parsed as any experiment file's are.
"""

import pathlib

import ml_collections


class UnreadableRecord(ValueError):
  """A run without config.json whose latest checkpoint's record of its config does not read (the message says which)."""


def run_config(workdir: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, str]:
  """(config, where it was read) of the run in `workdir`: its config.json (the settings of its last session), or
  for a run without one (copied without it) the config saved with its latest checkpoint. OSError or ValueError
  (UnreadableRecord for the checkpoint's record) when it cannot be read."""
  from nanodecoder import config, sweep

  workdir = pathlib.Path(workdir)
  path = workdir / config.SAVED_CONFIG
  step = sweep.latest_step(workdir)
  if path.exists() or not step:
    return config.read_saved_config(workdir), str(path)
  from nanodecoder import checkpoint, orbax_errors

  where = f'the checkpoint at step {step} in {workdir / "checkpoints"}'
  try:
    saved = config.with_added_fields(ml_collections.ConfigDict(checkpoint.read_record(workdir, step)['config']))
    config.check_fields(saved)
  except Exception as e:  # noqa: BLE001 (a damaged record: Orbax's, JSON's or a field's error)
    raise UnreadableRecord(f'{where} has no readable config ({orbax_errors.first_line(e)})') from e
  return saved, where


def get_config(workdir: str):
  return run_config(workdir)[0]
