"""Generated datasets in a cache folder, built once and never half-written."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable

try:
  import fcntl
except ImportError:  # Not POSIX.
  fcntl = None

COMPLETE_MARKER = "COMPLETE"


def is_complete(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def build_once(cache_dir: str, name: str,
               write: Callable[[str], None]) -> str:
  """Returns ``cache_dir/name``, calling ``write(folder)`` to fill it first
  if it is not complete yet.

  ``write`` fills a temporary folder, which gets a completion marker and is
  then renamed into place, so a crash never leaves a folder that looks
  finished. Processes on one host that ask for the same folder at once
  (runs of a sweep started together) take turns on a lock file: the first
  builds it, the others wait and then use it. If the lock is unavailable
  (no ``fcntl``), each builds its own copy and the first one renamed into
  place is kept. Temporary folders of this entry left by a killed build
  are removed under the lock before building.
  """
  final = os.path.join(cache_dir, name)
  if is_complete(final):
    return final
  if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise ValueError(
        f"The cache folder {cache_dir} is a file, not a folder: point "
        "config.cache_dir (or $HTRANSFORMER_CACHE) at a folder.")
  os.makedirs(cache_dir, exist_ok=True)
  lock_path = os.path.join(cache_dir, f".{name}.lock")
  with open(lock_path, "a") as lock:
    if fcntl is not None:
      fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not is_complete(final):
      if fcntl is not None:  # Under the lock: no live process owns them.
        remove_stale_tmp(cache_dir, name)
      _build(cache_dir, name, final, write)
  # Once the folder is complete nobody builds it again (they return before
  # taking the lock), so the lock file can go.
  try:
    os.remove(lock_path)
  except FileNotFoundError:
    pass
  return final


def _tmp_prefix(name: str) -> str:
  return f".{name}.tmp"


def remove_stale_tmp(cache_dir: str, name: str) -> list[str]:
  """Removes the temporary folders of entry ``name`` left by builds that
  were killed (SIGKILL skips their cleanup); returns their paths.

  Call it only while holding the entry's lock: a build of the entry holds
  the lock until its temporary folder is gone, so any found then is stale.
  Other entries' folders (``.{name}.tmpX.tmpY``) are left alone.
  """
  pattern = re.compile(re.escape(_tmp_prefix(name)) + r"[A-Za-z0-9_]+")
  removed = []
  for entry in sorted(os.listdir(cache_dir)):
    path = os.path.join(cache_dir, entry)
    if pattern.fullmatch(entry) and os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def _build(cache_dir, name, final, write):
  tmp = tempfile.mkdtemp(prefix=_tmp_prefix(name), dir=cache_dir)
  try:
    write(tmp)
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
      f.write("ok\n")
    if os.path.isdir(final) and not is_complete(final):
      shutil.rmtree(final, ignore_errors=True)  # stale, incomplete
    try:
      os.rename(tmp, final)
    except OSError:
      if not is_complete(final):
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
