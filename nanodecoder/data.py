"""Text corpora, their tokens and batches of random windows.

Sources:
  * 'tfds': a TFDS dataset with one 'text' feature per split (tiny_shakespeare:
    train / validation / test = 90% / 5% / 5% of the file, in order).
  * 'text': a local UTF-8 file; its last `text_eval_fraction` is held out,
    the first half of it as 'validation', the second as 'test' (as above).

A split expression joins splits with '+': 'validation+test' is the last 10%
of tiny-shakespeare, nanoGPT's validation text.

Training batches are windows of `context_length + 1` tokens at random offsets
drawn from a PRNG keyed by (seed, step), so a run's data order depends only on
its seed and step: resuming, or changing the number of devices or hosts,
never changes which windows a step sees.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import socket
import threading
import time
import urllib.parse
import zlib

import ml_collections
import numpy as np

from nanodecoder.metrics import quiet_absl
from nanodecoder.tokenizer import DataError, Tokenizer

MANUAL_DIR_ENV = 'NANODECODER_MANUAL_DIR'
# Independent PRNG streams: training batches, and the fixed batches that estimate train / eval loss.
TRAIN_STREAM, TRAIN_LOSS_STREAM, EVAL_LOSS_STREAM = 0, 1, 2


@dataclasses.dataclass
class Corpus:
  """The raw text of each split of a source."""

  name: str
  splits: dict[str, str]

  def text(self, expr: str) -> str:
    return ''.join(self.splits[name] for name in split_names(expr, self.name, list(self.splits)))

  def tokenizer(self, vocab_size: int = 0, train_split: str = 'train') -> Tokenizer:
    """Every character of every split, plus BPE merges learned on `train_split` up to `vocab_size` tokens (0: none)."""
    return Tokenizer.train(''.join(self.splits.values()), self.text(train_split), vocab_size)


def split_names(expr: str, source: str, available: list[str], field: str = '') -> list[str]:
  """The splits that split expression `expr` joins ('validation+test'); DataError unless each is one of `available`
  (the splits of `source`), named once. `field`: the config field that holds `expr`, named in the error."""
  where = f'{field}={expr!r}' if field else repr(expr)
  names = expr.split('+')
  for i, name in enumerate(names):
    if name in names[:i]:
      raise DataError(f'split {name!r} appears twice in {where}; name each split once')
    if name not in available:
      raise DataError(f'split {name!r} (in {where}) does not exist in {source}; available: {", ".join(available)}')
  return names


def check_splits(data: ml_collections.ConfigDict, source: str, available: list[str]) -> None:
  """DataError unless data.train_split and data.eval_split name splits among `available` (those of `source`)."""
  for field in ('train_split', 'eval_split'):
    split_names(data[field], source, available, f'data.{field}')


def shared_splits(data: ml_collections.ConfigDict) -> list[str]:
  """The splits that data.train_split and data.eval_split both name: a val loss over trained-on text."""
  eval_names = data.eval_split.split('+')
  return [name for name in data.train_split.split('+') if name in eval_names]


_SPLIT_ORDER = ['train', 'validation', 'test']  # (a TFDS dataset's other splits follow these)


def source_splits(data: ml_collections.ConfigDict) -> tuple[str, list[str]]:
  """The name of `data`'s source and its splits, without reading its text: a text file's are fixed; a TFDS
  dataset's come from its info (it is downloaded and prepared first if it is not yet)."""
  if data.source == 'text':
    return f'text file {data.text_path}', list(_SPLIT_ORDER)
  builder = _tfds_builder(data.tfds_name, data.tfds_data_dir, _manual_dir(data))
  return f'tfds {data.tfds_name}', _in_split_order(builder.info.splits)


def _manual_dir(data: ml_collections.ConfigDict) -> str:
  return data.manual_dir or os.environ.get(MANUAL_DIR_ENV, '')


def _in_split_order(names) -> list[str]:
  return sorted(names, key=lambda name: _SPLIT_ORDER.index(name) if name in _SPLIT_ORDER else len(_SPLIT_ORDER))


def load_corpus(data: ml_collections.ConfigDict) -> Corpus:
  if data.source == 'text':
    return _text_corpus(data.text_path, data.text_eval_fraction)
  return _tfds_corpus(data.tfds_name, data.tfds_data_dir, _manual_dir(data))


def _text_corpus(path: str, eval_fraction: float) -> Corpus:
  file = pathlib.Path(path)
  if file.exists() and not file.is_file() and not file.is_dir():  # reading would wait for a writer, or never end
    raise DataError(f'data.text_path {path!r} is not a regular file (a pipe or a device); point it at a UTF-8 text '
                    'file')
  try:
    raw = file.read_bytes()
  except FileNotFoundError:
    raise DataError(f'data.text_path {path!r} does not exist; point it at a UTF-8 text file') from None
  except OSError as e:  # a directory, no permission, a file used as a folder, a name too long, ...
    raise DataError(f'data.text_path {path!r} cannot be read ({e.strerror}); point it at a readable UTF-8 '
                    'text file') from None
  try:
    text = raw.decode('utf-8-sig')  # without a byte-order mark, should the file start with one
  except UnicodeDecodeError as e:
    raise DataError(f'data.text_path {path!r} is not UTF-8 (bad byte at offset {e.start}); convert it, '
                    'e.g. iconv -t UTF-8') from None
  if not text:
    raise DataError(f'data.text_path {path!r} is empty; it needs the training text')
  train_end = int(len(text) * (1.0 - eval_fraction))
  validation_end = (train_end + len(text)) // 2
  return Corpus(f'text file {path}', {
      'train': text[:train_end], 'validation': text[train_end:validation_end], 'test': text[validation_end:]})


def _tfds_corpus(name: str, data_dir: str, manual_dir: str) -> Corpus:
  builder = _tfds_builder(name, data_dir, manual_dir)
  splits = {}
  for split in _in_split_order(builder.info.splits):
    source = builder.as_data_source(split=split)
    splits[split] = b''.join(source[i]['text'] for i in range(len(source))).decode('utf-8')
  return Corpus(f'tfds {name}', splits)


def _tfds_builder(name: str, data_dir: str, manual_dir: str):
  """The TFDS builder of dataset `name`, prepared (downloaded first, or read from `manual_dir`)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's start-up chatter
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # and its oneDNN notice (TensorFlow only reads the text here)
  import tensorflow_datasets as tfds  # heavy; only for this source
  tfds.disable_progress_bar()  # a bar per download and split: dozens of lines in a log, or before an error line
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

  make_builder = lambda: tfds.builder(name, data_dir=data_dir or None, file_format='array_record')

  def is_prepared(builder) -> bool:
    with quiet_absl():  # TFDS warns that a fresh data folder holds no dataset_info.json yet
      return builder.is_prepared()

  try:
    builder = make_builder()
  except tfds.core.DatasetNotFoundError:
    raise DataError(f"data.tfds_name {name!r} is not a TFDS dataset; use e.g. 'tiny_shakespeare', or "
                    "data.source='text' with data.text_path=FILE") from None
  except (ValueError, AssertionError) as e:  # a malformed name, or a version or config the dataset lacks
    reason = str(e).strip().splitlines()[0].rsplit('": ', 1)[-1]  # (less TFDS's 'Failed to construct ...' prefix)
    reason = re.sub(r'\s*Here are .*:$', '', reason)  # (a list on the lines below, empty for a dataset without configs)
    raise DataError(f"data.tfds_name {name!r} cannot be loaded ({reason}); give NAME, NAME:VERSION or NAME/CONFIG "
                    "of a TFDS dataset, e.g. 'tiny_shakespeare'") from None
  if not is_prepared(builder):
    url_infos = builder.url_infos or {}  # None for datasets without checksums
    download_config = None
    if manual_dir:
      missing = [info.filename for info in url_infos.values()
                 if info.filename and not (pathlib.Path(manual_dir) / info.filename).is_file()]
      if missing:
        raise DataError(f'data.manual_dir {manual_dir!r} lacks {", ".join(missing)}; '
                        f'download it from {", ".join(url_infos)} into that folder')
      download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    else:
      _require_network(name, list(url_infos))
    try:
      builder.download_and_prepare(download_config=download_config)
    except NonMatchingChecksumError:
      if not manual_dir:
        raise
      found = ', '.join(f'{info.filename} has {(pathlib.Path(manual_dir) / info.filename).stat().st_size:,} bytes'
                        for info in url_infos.values() if info.filename)
      raise DataError(f'data.manual_dir {manual_dir!r} holds other files than tfds {name!r} expects (checksums differ; '
                      f'{found}); put the originals from {", ".join(url_infos)} there, unchanged (not re-saved, '
                      "e.g. with other line endings), or train on your file with data.source='text'") from None
    except FileExistsError:  # another process (e.g. a sweep point) prepared it at the same time
      if not is_prepared(builder):
        raise
      builder = make_builder()  # reads the other process's dataset info
  return builder


def _require_network(name: str, urls: list[str], timeout: float = 5.0) -> None:
  """Fails within seconds when the dataset's download hosts are unreachable.

  The probes run in daemon threads: a DNS lookup that hangs (it has no timeout)
  cannot keep the process alive after the error.
  """
  errors = []

  def connect(url):
    parsed = urllib.parse.urlparse(url)
    try:
      socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except Exception as e:  # DNS failure, refused, timeout: all mean offline
      errors.append(e)

  probes = [threading.Thread(target=connect, args=(url,), name=f'probe {url}', daemon=True) for url in urls]
  for probe in probes:
    probe.start()
  deadline = time.monotonic() + timeout + 1
  for probe in probes:
    probe.join(max(0.0, deadline - time.monotonic()))
  if any(probe.is_alive() for probe in probes):
    errors.append(TimeoutError(f'no answer within {timeout + 1:g} s'))
  if errors:
    files = ', '.join(urls)
    raise DataError(f'cannot download tfds {name!r} ({type(errors[0]).__name__}: {errors[0]}); offline, put {files} '
                    f'into a folder and pass --config.data.manual_dir=DIR (or set {MANUAL_DIR_ENV}=DIR)')


# Batches ----------------------------------------------------------------------


def window_starts(num_tokens: int, window: int, batch_size: int, seed: int, step: int,
                  stream: int = TRAIN_STREAM) -> np.ndarray:
  """Offsets of `batch_size` random windows, a pure function of (seed, stream, step)."""
  rng = np.random.default_rng([seed, stream, step])
  return rng.integers(0, num_tokens - window + 1, size=batch_size)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
  """[len(starts), window] token windows."""
  return tokens[starts[:, None] + np.arange(window)]


def all_windows(tokens: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Every target position exactly once: non-overlapping windows of context_length targets.

  Returns windows [W, context_length + 1] (the last one zero-padded) and the
  weights [W, context_length] of their targets (0 on padding).
  """
  num_targets = len(tokens) - 1
  count = -(-num_targets // context_length)
  padded = np.zeros(count * context_length + 1, tokens.dtype)
  padded[:len(tokens)] = tokens
  starts = np.arange(count) * context_length
  windows = gather_windows(padded, starts, context_length + 1)
  weights = (starts[:, None] + np.arange(1, context_length + 1) < len(tokens)).astype(np.float32)
  return windows, weights


@dataclasses.dataclass
class Dataset:
  """Tokenized train and eval text, and the batches drawn from them."""

  tokenizer: Tokenizer
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  context_length: int

  def check(self, train_split: str, eval_split: str) -> None:
    window = self.context_length + 1
    for split, tokens in ((train_split, self.train_tokens), (eval_split, self.eval_tokens)):
      if len(tokens) < window:
        raise DataError(f'split {split!r} has {len(tokens)} tokens, fewer than one window of context_length + 1 = {window}; '
                        'use more text or a shorter model.context_length')

  def eval_characters_per_token(self) -> float:
    """Characters of the eval text / its tokens (1 without BPE merges)."""
    lengths = np.fromiter(map(len, self.tokenizer.pieces), np.int64, self.tokenizer.vocab_size)
    return float(lengths[self.eval_tokens].sum() / len(self.eval_tokens))

  def fingerprint(self) -> int:
    """A 31-bit checksum of the characters and the train and eval tokens: equal data, equal fingerprint."""
    fingerprint = zlib.crc32(self.tokenizer.chars.encode('utf-8'))
    for tokens in (self.train_tokens, self.eval_tokens):
      fingerprint = zlib.crc32(np.ascontiguousarray(tokens).tobytes(), fingerprint)
    return fingerprint & 0x7FFFFFFF

  def train_batch(self, seed: int, step: int, batch_size: int, rows=slice(None)) -> np.ndarray:
    """Rows `rows` of the global batch of step `step`: [rows, context_length + 1] tokens."""
    return self._windows(self.train_tokens, seed, step, batch_size, rows)

  def eval_batch(self, split: str, seed: int, index: int, batch_size: int) -> np.ndarray:
    """The `index`-th fixed evaluation batch of 'train' or 'eval' (same at every evaluation)."""
    if split == 'train':
      return self._windows(self.train_tokens, seed, index, batch_size, stream=TRAIN_LOSS_STREAM)
    return self._windows(self.eval_tokens, seed, index, batch_size, stream=EVAL_LOSS_STREAM)

  def _windows(self, tokens, seed: int, index: int, batch_size: int, rows=slice(None), stream: int = TRAIN_STREAM):
    window = self.context_length + 1
    starts = window_starts(len(tokens), window, batch_size, seed, index, stream=stream)
    return gather_windows(tokens, starts[rows], window)


def load_dataset(config: ml_collections.ConfigDict, corpus: Corpus | None = None,
                 tokenizer: Tokenizer | None = None) -> Dataset:
  """The training and evaluation tokens of `config.data`, from `corpus` if it was loaded already, encoded by
  `tokenizer` if given (a run's own: every character of the corpus must be among its characters; else the
  corpus's characters, with the merges data.vocab_size asks for)."""
  corpus = load_corpus(config.data) if corpus is None else corpus
  check_splits(config.data, corpus.name, list(corpus.splits))
  if tokenizer is None:
    tokenizer = corpus.tokenizer(config.data.vocab_size, config.data.train_split)
  else:
    extra = sorted(set(''.join(corpus.splits.values())) - set(tokenizer.chars))
    if extra:
      raise DataError(f'the {corpus.name} has characters that the BPE vocabulary the run keeps lacks: '
                      f'{", ".join(map(repr, extra[:10]))}{", ..." if len(extra) > 10 else ""}; train on text of its '
                      f'{len(tokenizer.chars)} characters or pass another --workdir')
  dataset = Dataset(
      tokenizer=tokenizer,
      train_tokens=tokenizer.encode(corpus.text(config.data.train_split)),
      eval_tokens=tokenizer.encode(corpus.text(config.data.eval_split)),
      context_length=config.model.context_length,
  )
  dataset.check(config.data.train_split, config.data.eval_split)
  return dataset
