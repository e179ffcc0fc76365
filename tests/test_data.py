"""Corpora, the character tokenizer, and step-keyed batches."""

import errno
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from nanodecoder import data as data_lib
from nanodecoder.data import DataError
from nanodecoder.tokenizer import Tokenizer


def test_tokenizer_round_trip_and_json():
  text = 'Hello, World!\nzebra ~'
  tok = Tokenizer(text)
  assert tok.vocab_size == len(set(text))
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and tok.decode(ids) == text
  # Ids in sorted character order (nanoGPT's): '\n' 0, ' ' 1, '!' 2, ',' 3, 'H' 4, 'W' 5, 'a' 6, ...
  assert tok.encode('\n !,HWa~').tolist() == [0, 1, 2, 3, 4, 5, 6, tok.vocab_size - 1]
  again = Tokenizer.from_json(tok.to_json())
  assert again.chars == tok.chars and again.decode(ids) == text


def test_tokenizer_names_unknown_characters():
  tok = Tokenizer('abc')
  with pytest.raises(DataError, match=r"characters not in the vocabulary: 'x', 'z'; "):
    tok.encode('axbz')


@pytest.fixture(scope='module')
def shakespeare_tfds_dir(shakespeare_dir, tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def shakespeare(shakespeare_dir, shakespeare_tfds_dir):
  return data_lib._tfds_corpus('tiny_shakespeare', shakespeare_tfds_dir, str(shakespeare_dir))


def test_tiny_shakespeare_splits_and_vocabulary(shakespeare, shakespeare_dir):
  sizes = {name: len(text) for name, text in shakespeare.splits.items()}
  assert sizes == {'train': 1_003_854, 'validation': 55_770, 'test': 55_770}
  original = (shakespeare_dir / 'input.txt').read_text(encoding='utf-8')
  # validation+test is the last 10% of the file: nanoGPT's validation text.
  assert shakespeare.text('validation+test') == original[1_003_854:]
  assert shakespeare.text('train') + shakespeare.text('validation+test') == original
  tok = shakespeare.tokenizer()
  assert tok.vocab_size == 65
  assert tok.decode(tok.encode(original[:5000])) == original[:5000]


@pytest.mark.parametrize('winner_finished', [True, False])
def test_a_prepare_race_lost_to_another_process(shakespeare, shakespeare_tfds_dir, shakespeare_dir, monkeypatch,
                                                winner_finished):
  """Two processes prepare at once, the other renames its folder first: go on with its dataset once it is there."""
  import tensorflow_datasets as tfds
  builder_cls = tfds.builder_cls('tiny_shakespeare')
  prepared = iter([False])  # not prepared at the first look; afterwards, as the other process left it
  monkeypatch.setattr(builder_cls, 'is_prepared', lambda self: next(prepared, winner_finished))

  def lose_the_race(self, **kwargs):
    raise FileExistsError(errno.EEXIST, 'File exists', 'tiny_shakespeare/1.0.0')

  monkeypatch.setattr(builder_cls, 'download_and_prepare', lose_the_race)
  if winner_finished:
    corpus = data_lib._tfds_corpus('tiny_shakespeare', shakespeare_tfds_dir, str(shakespeare_dir))
    assert corpus.splits == shakespeare.splits
  else:
    with pytest.raises(FileExistsError):
      data_lib._tfds_corpus('tiny_shakespeare', shakespeare_tfds_dir, str(shakespeare_dir))


def test_a_prepare_race_lost_in_a_new_data_folder_reads_the_dataset_the_other_process_prepared(
    shakespeare, shakespeare_dir, tmp_path, monkeypatch):
  """The builder made before the dataset existed knows no splits: the other process's are read anew."""
  import tensorflow_datasets as tfds
  builder_cls = tfds.builder_cls('tiny_shakespeare')
  prepare = builder_cls.download_and_prepare

  def prepared_by_another_process(self, **kwargs):
    prepare(tfds.builder('tiny_shakespeare', data_dir=str(tmp_path), file_format='array_record'), **kwargs)
    raise FileExistsError(errno.EEXIST, 'File exists', 'tiny_shakespeare/1.0.0')

  monkeypatch.setattr(builder_cls, 'download_and_prepare', prepared_by_another_process)
  assert data_lib._tfds_corpus('tiny_shakespeare', str(tmp_path), str(shakespeare_dir)).splits == shakespeare.splits


def test_unknown_split_lists_the_available_ones(shakespeare):
  with pytest.raises(DataError, match=r"split 'valid' \(in 'train\+valid'\) does not exist.*available: train, validation, test"):
    shakespeare.text('train+valid')
  with pytest.raises(DataError, match=r"^split 'validation' appears twice in 'validation\+validation'; name each"):
    shakespeare.text('validation+validation')  # its text would count twice


def no_network(address, timeout=None, **kwargs):
  raise socket.gaierror(socket.EAI_AGAIN, 'Temporary failure in name resolution')


def test_offline_tfds_without_file_fails_fast(tmp_path, monkeypatch):
  monkeypatch.delenv(data_lib.MANUAL_DIR_ENV, raising=False)
  monkeypatch.setattr(socket, 'create_connection', no_network)  # offline, also on a machine with internet
  start = time.monotonic()
  with pytest.raises(DataError, match=r"cannot download tfds 'tiny_shakespeare' \(gaierror: .*name resolution\); "
                                      r'offline, put https://.*input.txt into a folder.*manual_dir=DIR.*'
                                      r'NANODECODER_MANUAL_DIR'):
    data_lib._tfds_corpus('tiny_shakespeare', str(tmp_path / 'tfds'), '')
  assert time.monotonic() - start < 15
  assert not (tmp_path / 'tfds' / 'tiny_shakespeare').exists()


def test_a_hanging_network_probe_fails_on_time_and_cannot_block_exit(monkeypatch):
  """A DNS lookup has no timeout: the probe gives up on it, and its thread is a daemon (not joined at exit)."""
  release = threading.Event()
  monkeypatch.setattr(socket, 'create_connection', lambda *args, **kwargs: release.wait(30))
  start = time.monotonic()
  try:
    with pytest.raises(DataError, match=r"cannot download tfds 'x' \(TimeoutError: no answer within 1.1 s\)"):
      data_lib._require_network('x', ['https://example.invalid/a.txt'], timeout=0.1)
    assert time.monotonic() - start < 5
    hanging = [t for t in threading.enumerate() if t.is_alive() and t.name.startswith('probe ')]
    assert hanging and all(t.daemon for t in hanging)
  finally:
    release.set()


def test_every_download_host_is_probed_at_its_port(monkeypatch):
  probed = []

  def connect(address, timeout=None, **kwargs):
    probed.append(address)
    if address[0] == 'mirror.invalid':
      raise ConnectionRefusedError(errno.ECONNREFUSED, 'Connection refused')
    return socket.socket()  # (closed at once)

  monkeypatch.setattr(socket, 'create_connection', connect)
  data_lib._require_network('x', ['https://example.com/a.txt', 'http://example.com:8080/b.txt'])  # both answer
  with pytest.raises(DataError, match=r"cannot download tfds 'x' \(ConnectionRefusedError: .*Connection refused\)"):
    data_lib._require_network('x', ['https://example.com/a.txt', 'https://mirror.invalid/b.txt'])  # one does not
  assert sorted(probed) == [('example.com', 443), ('example.com', 443), ('example.com', 8080), ('mirror.invalid', 443)]


def test_a_download_with_other_checksums_than_tfds_expects_is_its_own_error_without_a_manual_dir(tmp_path,
                                                                                                  monkeypatch):
  """(The manual_dir's error names the sizes of the files there: without one, there are none to name.)"""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

  def changed_upstream(self, **kwargs):
    raise NonMatchingChecksumError('https://example.com/input.txt has other checksums')

  monkeypatch.setattr(data_lib, '_require_network', lambda name, urls: None)  # online
  monkeypatch.setattr(tfds.builder_cls('tiny_shakespeare'), 'download_and_prepare', changed_upstream)
  with pytest.raises(NonMatchingChecksumError, match='has other checksums'):
    data_lib._tfds_corpus('tiny_shakespeare', str(tmp_path / 'tfds'), '')


def test_unknown_tfds_name_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(socket, 'getaddrinfo', no_network)  # the name check is local
  with pytest.raises(DataError, match=r"^data.tfds_name 'tiny_shakespear' is not a TFDS dataset; use e.g. "
                                      r"'tiny_shakespeare', or data.source='text' with data.text_path=FILE$"):
    data_lib._tfds_corpus('tiny_shakespear', str(tmp_path / 'tfds'), '')


@pytest.mark.parametrize('name, reason', [
    ('', r'Parsing builder name string  failed\.'),
    ('tiny_shakespeare:9.9.9', r'Dataset tiny_shakespeare cannot be loaded at version 9\.9\.9, only: 1\.0\.0\.'),
    ('tiny_shakespeare/foo', r'BuilderConfig foo not found with version 1\.0\.0\.'),  # (less TFDS's empty list)
])
def test_a_malformed_tfds_name_is_one_clear_error(tmp_path, monkeypatch, name, reason):
  monkeypatch.setattr(socket, 'getaddrinfo', no_network)  # the name check is local
  with pytest.raises(DataError, match=rf"^data.tfds_name {name!r} cannot be loaded \({reason}\); give NAME, "
                                      r"NAME:VERSION or NAME/CONFIG of a TFDS dataset, e.g. 'tiny_shakespeare'$"):
    data_lib._tfds_corpus(name, str(tmp_path / 'tfds'), '')


def test_manual_dir_without_the_file_says_what_is_missing(tmp_path):
  with pytest.raises(DataError, match=r"lacks input.txt; download it from https://"):
    data_lib._tfds_corpus('tiny_shakespeare', str(tmp_path / 'tfds'), str(tmp_path))


def test_manual_dir_with_another_file_says_so(tmp_path):
  (tmp_path / 'input.txt').write_bytes(b'First Citizen:\r\n' * 100)  # e.g. saved again with Windows line endings
  with pytest.raises(DataError, match=r"^data.manual_dir '.*' holds other files than tfds 'tiny_shakespeare' expects "
                                      r'\(checksums differ; input.txt has 1,600 bytes\); put the originals from '
                                      r'https://.*input.txt there, unchanged'):
    data_lib._tfds_corpus('tiny_shakespeare', str(tmp_path / 'tfds'), str(tmp_path))


def test_preparing_tfds_prints_no_progress_bars_or_tensorflow_notices(shakespeare_dir, tmp_path):
  """The first run on a machine prepares the dataset: TFDS's two lines on stdout, nothing on stderr."""
  code = 'import sys\nfrom nanodecoder import data\nprint(len(data._tfds_corpus(*sys.argv[1:]).splits["train"]))'
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_')}
  result = subprocess.run([sys.executable, '-c', code, 'tiny_shakespeare', str(tmp_path / 'tfds'), str(shakespeare_dir)],
                          capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0 and result.stderr == '', result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 3 and lines[-1] == '1003854', result.stdout  # (TFDS's "Downloading and preparing", "prepared")


def test_text_corpus_splits_the_tail_off_for_validation(tmp_path):
  path = tmp_path / 'c.txt'
  path.write_text('abcdefghij' * 10, encoding='utf-8')
  corpus = data_lib._text_corpus(str(path), 0.1)
  assert corpus.splits['train'] == ('abcdefghij' * 10)[:90]
  assert corpus.splits['validation'] == 'abcde' and corpus.splits['test'] == 'fghij'
  assert corpus.text('validation+test') == 'abcdefghij'
  path.write_bytes(b'\xef\xbb\xbf' + b'abcdefghij' * 10)  # a byte-order mark (Windows editors) is no character
  assert data_lib._text_corpus(str(path), 0.1).splits == corpus.splits
  path.write_text('abcdefghij' * 10 + 'k', encoding='utf-8')  # an odd tail (11): validation takes the smaller half
  assert data_lib._text_corpus(str(path), 0.1).splits == {'train': ('abcdefghij' * 9), 'validation': 'abcde',
                                                          'test': 'fghijk'}


@pytest.mark.parametrize('content, message', [
    (None, 'does not exist'),
    (b'', 'is empty'),
    (b'caf\xe9 au lait', r'is not UTF-8 \(bad byte at offset 3\)'),
])
def test_text_corpus_errors(tmp_path, content, message):
  path = tmp_path / 'c.txt'
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(DataError, match=message):
    data_lib._text_corpus(str(path), 0.1)


def test_a_pipe_as_text_path_is_refused_not_waited_on(tmp_path):
  fifo = tmp_path / 'corpus.txt'
  os.mkfifo(fifo)
  # Were the pipe opened, the read would wait for a writer: this one ends it (empty) after 5 s.
  writer = threading.Timer(5, lambda: os.close(os.open(fifo, os.O_WRONLY)))
  writer.daemon = True
  writer.start()
  try:
    with pytest.raises(DataError, match=r"^data.text_path '.*corpus.txt' is not a regular file \(a pipe or a device"):
      data_lib._text_corpus(str(fifo), 0.1)
  finally:
    writer.cancel()


def test_batches_depend_only_on_seed_and_step():
  tokens = np.arange(1000, dtype=np.int32)
  ds = data_lib.Dataset(Tokenizer('ab'), tokens, tokens[:100], context_length=8)
  a = ds.train_batch(seed=3, step=5, batch_size=6)
  np.testing.assert_array_equal(a, ds.train_batch(seed=3, step=5, batch_size=6))
  assert a.shape == (6, 9)
  np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # contiguous windows
  assert not np.array_equal(a, ds.train_batch(seed=3, step=6, batch_size=6))
  assert not np.array_equal(a, ds.train_batch(seed=4, step=5, batch_size=6))
  # Any process's slice of the rows equals the same rows of the global batch.
  np.testing.assert_array_equal(ds.train_batch(3, 5, 6, rows=slice(2, 4)), a[2:4])


def test_eval_batches_are_fixed_and_drawn_from_their_own_split():
  train, held_out = np.arange(1000, dtype=np.int32), np.arange(1000, 1100, dtype=np.int32)  # told apart by value
  ds = data_lib.Dataset(Tokenizer('ab'), train, held_out, context_length=8)
  for split, tokens in (('train', train), ('eval', held_out)):
    batches = [ds.eval_batch(split, seed=3, index=i, batch_size=6) for i in range(3)]
    for i, batch in enumerate(batches):
      np.testing.assert_array_equal(batch, ds.eval_batch(split, seed=3, index=i, batch_size=6))  # every evaluation
      assert batch.shape == (6, 9) and np.isin(batch, tokens).all()
      np.testing.assert_array_equal(np.diff(batch, axis=1), 1)  # contiguous windows of that split
      # Not the windows training sees at step i: a loss on those would measure memorized batches.
      assert not np.array_equal(batch, ds.train_batch(seed=3, step=i, batch_size=6))
    assert not np.array_equal(batches[0], batches[1])  # each batch other windows


def test_random_windows_reach_the_last_full_window_and_nothing_past_it():
  window = 9  # context_length 8 + 1
  for num_tokens in (window, window + 2):  # one possible window; three
    starts = data_lib.window_starts(num_tokens, window, batch_size=300, seed=0, step=0)
    assert set(starts.tolist()) == set(range(num_tokens - window + 1))
  tokens = np.arange(11, dtype=np.int32)
  ds = data_lib.Dataset(Tokenizer('ab'), tokens, tokens, context_length=8)
  rows = {tuple(row) for step in range(20) for row in ds.train_batch(seed=0, step=step, batch_size=8)}
  assert rows == {tuple(range(s, s + window)) for s in range(3)}  # the last one ends at the last token


def test_all_windows_cover_every_target_once():
  tokens = np.arange(1, 24, dtype=np.int32)  # 23 tokens -> 22 targets
  windows, weights = data_lib.all_windows(tokens, context_length=5)
  assert windows.shape == (5, 6) and weights.shape == (5, 5)
  targets = windows[:, 1:][weights > 0]
  np.testing.assert_array_equal(np.sort(targets), tokens[1:])
  assert weights.sum() == 22
  # Targets an exact multiple of the context: the last window is the last full one, with no padded window after.
  tokens = np.arange(1, 22, dtype=np.int32)  # 21 tokens -> 20 targets = 4 windows of 5
  windows, weights = data_lib.all_windows(tokens, context_length=5)
  np.testing.assert_array_equal(windows, [tokens[s:s + 6] for s in range(0, 16, 5)])
  np.testing.assert_array_equal(weights, np.ones((4, 5)))


def test_a_corpus_of_exactly_one_window_is_accepted():
  tokens = np.arange(17, dtype=np.int32)
  ds = data_lib.Dataset(Tokenizer('ab'), tokens, tokens, context_length=16)
  ds.check('train', 'validation')
  np.testing.assert_array_equal(ds.train_batch(seed=0, step=0, batch_size=2), [tokens, tokens])  # its one window


def test_corpus_shorter_than_a_window_is_refused():
  tokens = np.arange(10, dtype=np.int32)
  ds = data_lib.Dataset(Tokenizer('ab'), tokens, tokens, context_length=16)
  with pytest.raises(DataError, match=r"split 'train' has 10 tokens, fewer than one window of context_length \+ 1 = 17"):
    ds.check('train', 'validation')
