"""Small filesystem helpers: every file the project writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import stat
import tempfile


def _read_umask() -> int:
  # os.umask can only be read by setting it; done once, at import, before other threads could create files.
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


_UMASK = _read_umask()

WORKDIR_LOCK = '.lock'  # in a run's workdir: the lock its live run holds (checkpoint.WorkdirLock)


def _open_mode(path: pathlib.Path) -> int:
  """The permissions a plain open(path, 'w') leaves: an existing file's own, else 0o666 less the umask."""
  try:
    return stat.S_IMODE(path.stat().st_mode)
  except FileNotFoundError:
    return 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over `path`.

  The file gets the permissions open() would give it (mkstemp's are owner-only).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, mode, **({} if mode == 'wb' else {'encoding': 'utf-8'})) as f:
      os.fchmod(f.fileno(), _open_mode(path))
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def unwritable_folder(path: str | os.PathLike) -> pathlib.Path | None:
  """The nearest existing folder above `path` when it is not a writable folder (so `path` cannot be made), else None."""
  folder = next(parent for parent in pathlib.Path(path).absolute().parents if parent.exists())
  return None if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) else folder


def lock_holder(path: str | os.PathLike) -> str | None:
  """The first word of lock file `path` (the pid its owner wrote there) while a live process holds an exclusive
  `flock` on it, else None (also when there is no such file). See `probing_lock`."""
  with probing_lock(path) as holder:
    return holder


@contextlib.contextmanager
def probing_lock(path: str | os.PathLike):
  """Yields `lock_holder(path)`; when that is None, the block runs holding a shared lock on `path` (if it exists),
  so that no process takes it exclusively meanwhile: a taker that tries is refused, so takers retry (see
  `checkpoint.WorkdirLock.acquire`)."""
  try:
    file = open(path, 'rb')
  except OSError:
    yield None
    return
  with file:
    try:
      fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = lock_owner(path)
    else:
      holder = None
    yield holder  # (closing the file releases the shared lock)


def lock_owner(path: str | os.PathLike) -> str:
  """The first word of a held lock file `path`: the pid its owner wrote there ('unknown' before it wrote)."""
  try:
    return (pathlib.Path(path).read_text(encoding='utf-8', errors='replace').split() or ['unknown'])[0]
  except OSError:
    return 'unknown'


@contextlib.contextmanager
def exclusive(path: str | os.PathLike):
  """Holds an exclusive `flock` on lock file `path` (made if missing) for the block, waiting for other holders:
  e.g. one process at a time reads, changes and rewrites a file that several share."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as file:
    fcntl.flock(file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(file, fcntl.LOCK_UN)
