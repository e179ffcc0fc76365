"""Argument types shared by the benchmark scripts: a bad value stops the script before any work, in one line."""

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanodecoder.files import unwritable_folder  # noqa: E402  (light: no JAX import)


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
  return value


def positive_ints(text: str) -> list[int]:
  """'1,8' -> [1, 8]; each value once."""
  values = [positive_int(part) for part in text.split(',')]
  if len(set(values)) < len(values):
    raise argparse.ArgumentTypeError(f'{text!r} lists a value twice; give each once')
  return values


def shape(text: str) -> str:
  """The name of an experiment file under experiments/ ('cpu', 'base', 'gpt2_small')."""
  if not (REPO / 'experiments' / f'{text}.py').is_file():
    names = ', '.join(sorted(p.stem for p in (REPO / 'experiments').glob('*.py')))
    raise argparse.ArgumentTypeError(f'no experiment file experiments/{text}.py; one of: {names}')
  return text


def shapes(text: str) -> list[str]:
  return [shape(part) for part in text.split(',')]


def out_file(text: str) -> pathlib.Path:
  """A JSON file to write: not a folder, in a folder that exists or can be made. A symbolic link stands for its
  target; anything else but a regular file (a device such as /dev/null, a pipe) is refused: the file is written
  beside it and renamed over it, which would replace it."""
  path = pathlib.Path(os.path.realpath(text))
  if path.is_dir():
    example = pathlib.Path(text) / 'results.json'
    raise argparse.ArgumentTypeError(f'{text} is a folder; give a file path, e.g. {example}')
  if path.exists() and not path.is_file():
    raise argparse.ArgumentTypeError(f'{text} is not a regular file; give the path of a file to write')
  folder = unwritable_folder(path)
  if folder is not None:
    raise argparse.ArgumentTypeError(f'cannot write {text}: {folder} is not a writable folder')
  return path


def load_config(path: str | pathlib.Path, overrides: list[str]):
  """The experiment file at `path` with `--set FIELD=JSON` overrides applied."""
  from nanodecoder import config as config_lib

  config = config_lib.load_config_file(path)
  for item in overrides:
    key, value = item.split('=', 1)
    config_lib.set_field(config, key, json.loads(value))
  return config


def override(text: str) -> str:
  """'FIELD=JSON' (e.g. model.dtype='"bfloat16"'): the form `load_config` applies."""
  field, eq, value = text.partition('=')
  if not eq or not field:
    raise argparse.ArgumentTypeError(f'expected FIELD=JSON, e.g. model.num_layers=2, got {text!r}')
  try:
    json.loads(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f'the value of {text!r} is not JSON; quote strings, e.g. '
                                     f'{field}=\'"{value}"\'') from None
  return text


def text_file(text: str) -> str:
  """The path of a UTF-8 text file."""
  if not pathlib.Path(text).is_file():
    raise argparse.ArgumentTypeError(f'{text} is not a file')
  try:
    pathlib.Path(text).read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    raise argparse.ArgumentTypeError(f'{text} is not UTF-8 text ({e.reason} at byte {e.start})') from None
  return text


def checked_configs(parser: argparse.ArgumentParser, specs, overrides: list[str]) -> list:
  """The experiment files `specs` with `overrides`, each validated: a bad field is one parser error, before any work."""
  from nanodecoder import config as config_lib

  configs = []
  for spec in specs:
    try:
      configs.append(load_config(spec, overrides))
      config_lib.validate(configs[-1])
    except config_lib.ConfigError as e:
      shown = pathlib.Path(spec).relative_to(REPO) if pathlib.Path(spec).is_relative_to(REPO) else spec
      parser.error(f'{shown}: {e}')
  return configs
