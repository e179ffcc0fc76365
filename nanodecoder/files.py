"""Small filesystem helpers: every file the project writes appears whole or not at all."""

from __future__ import annotations

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
