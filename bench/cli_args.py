"""Argument types shared by the benchmark scripts: a bad value stops the script before any work, in one line."""

import argparse
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
  """'1,8' -> [1, 8]."""
  return [positive_int(part) for part in text.split(',')]


def shape(text: str) -> str:
  """The name of an experiment file under experiments/ ('cpu', 'base', 'gpt2_small')."""
  if not (REPO / 'experiments' / f'{text}.py').is_file():
    names = ', '.join(sorted(p.stem for p in (REPO / 'experiments').glob('*.py')))
    raise argparse.ArgumentTypeError(f'no experiment file experiments/{text}.py; one of: {names}')
  return text


def shapes(text: str) -> list[str]:
  return [shape(part) for part in text.split(',')]


def out_file(text: str) -> pathlib.Path:
  """A JSON file to write: not a folder, in a folder that exists or can be made."""
  path = pathlib.Path(text)
  if path.is_dir():
    raise argparse.ArgumentTypeError(f'{text} is a folder; give a file path, e.g. {path / "results.json"}')
  folder = unwritable_folder(path.resolve())
  if folder is not None:
    raise argparse.ArgumentTypeError(f'cannot write {text}: {folder} is not a writable folder')
  return path
