"""Generated datasets in a cache folder, built once and never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

COMPLETE_MARKER = "COMPLETE"


def is_complete(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def build_once(cache_dir: str, name: str,
               write: Callable[[str], None]) -> str:
  """Returns ``cache_dir/name``, calling ``write(folder)`` to fill it first
  if it is not complete yet.

  ``write`` fills a temporary folder, which gets a completion marker and is
  then renamed into place, so a crash never leaves a folder that looks
  finished. If another process finished the same folder first, its copy is
  used.
  """
  final = os.path.join(cache_dir, name)
  if is_complete(final):
    return final
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=cache_dir)
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
  return final
