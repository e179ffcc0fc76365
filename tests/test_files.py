"""atomic_write: whole files, with the permissions a plain open() gives; lock probing."""

import os
import pathlib
import stat

import pytest

from nanodecoder import files


def mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_gets_0666_less_the_umask(tmp_path, monkeypatch):
  monkeypatch.setattr(files, '_UMASK', 0o027)
  files.atomic_write(tmp_path / 'sub' / 'a.json', '{}\n')
  assert mode(tmp_path / 'sub' / 'a.json') == 0o640
  assert (tmp_path / 'sub' / 'a.json').read_text() == '{}\n'
  monkeypatch.setattr(files, '_UMASK', 0o022)
  files.atomic_write(tmp_path / 'b.bin', b'\x00\x01')
  assert mode(tmp_path / 'b.bin') == 0o644 and (tmp_path / 'b.bin').read_bytes() == b'\x00\x01'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['b.bin', 'sub']  # no temporary file left


def test_umask_is_the_process_umask(tmp_path):
  with open(tmp_path / 'plain', 'w'):
    pass
  files.atomic_write(tmp_path / 'atomic', '')
  assert mode(tmp_path / 'atomic') == mode(tmp_path / 'plain')


def test_rewriting_keeps_the_file_permissions(tmp_path):
  path = tmp_path / 'summary.csv'
  files.atomic_write(path, 'a\n')
  path.chmod(0o604)
  files.atomic_write(path, 'b\n')
  assert mode(path) == 0o604 and path.read_text() == 'b\n'


def test_unwritable_folder_names_the_nearest_existing_folder(tmp_path):
  assert files.unwritable_folder(tmp_path / 'new' / 'deeper' / 'out.json') is None  # made when written
  (tmp_path / 'a_file').write_text('')
  assert files.unwritable_folder(tmp_path / 'a_file' / 'out.json') == tmp_path / 'a_file'


def test_unwritable_folder_of_a_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.unwritable_folder('out.json') is None
  pathlib.Path('a_file').write_text('')
  assert files.unwritable_folder('a_file/sub/out.json') == tmp_path / 'a_file'


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text('old\n')
  with pytest.raises(UnicodeEncodeError):
    files.atomic_write(path, 'new \ud800\n')  # a lone surrogate: UTF-8 cannot encode it
  assert path.read_text() == 'old\n' and [p.name for p in tmp_path.iterdir()] == ['config.json']


def test_the_data_is_synced_before_the_file_is_replaced(tmp_path, monkeypatch):
  events = []
  fsync, replace = os.fsync, os.replace
  monkeypatch.setattr(os, 'fsync', lambda fd: events.append('fsync') or fsync(fd))
  monkeypatch.setattr(os, 'replace', lambda src, dst: events.append(('replace', pathlib.Path(dst).name)) or
                      replace(src, dst))
  files.atomic_write(tmp_path / 'a.json', '{}\n')
  assert events == ['fsync', ('replace', 'a.json')]


def test_the_umask_is_read_without_changing_it():
  before = os.umask(0o077)
  try:
    assert files._read_umask() == 0o077
    assert os.umask(0o077) == 0o077
  finally:
    os.umask(before)


def test_probing_a_lock_names_its_holder_or_holds_off_takers_for_the_block(tmp_path):
  import fcntl
  path = tmp_path / '.lock'
  with files.probing_lock(path) as holder:  # no lock file: nothing to hold
    assert holder is None and not path.exists()
  path.write_text('')
  with files.probing_lock(path) as holder, open(path, 'a') as taker:
    assert holder is None
    with pytest.raises(BlockingIOError):
      fcntl.flock(taker, fcntl.LOCK_EX | fcntl.LOCK_NB)
  with open(path, 'a') as owner:
    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after the block
    owner.write('1234 token')
    owner.flush()
    with files.probing_lock(path) as holder:
      assert holder == '1234' == files.lock_holder(path)
  assert files.lock_holder(path) is None


def test_probes_of_a_lock_at_the_same_time_do_not_take_each_other_for_its_holder(tmp_path):
  # e.g. a sweep writes a point's record while another job's status check looks whether a run holds the point
  path = tmp_path / '.lock'
  path.write_text('1234 token')  # left by a run that ended
  with files.probing_lock(path) as holder, files.probing_lock(path) as other:
    assert holder is None and other is None and files.lock_holder(path) is None
