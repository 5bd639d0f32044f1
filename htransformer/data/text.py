"""Local text files as a language-modelling corpus (no TensorFlow needed).

``config.data.text_files`` is a glob (several separated by commas;
``**`` recurses), relative to the current directory. Each file is one
document, read as UTF-8 (a leading byte-order mark dropped; UTF-16 with its
byte-order mark; Latin-1 where UTF-8 fails). A file holding NUL characters
is not text (an archive, a PDF, an image the glob caught) and is an error
naming it. The split into train, validation and test is deterministic:

* ``split_by="document"``: a document goes to test when
  ``crc32(path relative to the common folder) / 2**32 < test_fraction``, to
  validation when below ``test_fraction + val_fraction``, else to train, so
  adding files inside that common folder never moves the others (a file
  outside it changes the common folder, and so every relative path).
* ``split_by="text"``: every document is cut at line boundaries into its
  first ``1 - val - test`` (train), next ``val`` and last ``test`` fraction
  of characters (for a few large files). A document without a line break
  after those points stays whole in train; the LM task refuses a split
  left empty that way (``check_every_split``) before it trains a tokenizer.

Every split is then stream-packed (``htransformer/data/packing.py``).
"""

from __future__ import annotations

import codecs
import glob
import os
import zlib

SPLITS = ("train", "val", "test")
SPLIT_BY = ("document", "text")


def find_files(patterns: str) -> list[str]:
  """Files matching the comma-separated globs, sorted, without duplicates."""
  files = set()
  for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
    files.update(f for f in glob.glob(os.path.expanduser(pattern),
                                      recursive=True) if os.path.isfile(f))
  if not files:
    folders = [p.strip() for p in patterns.split(",")
               if p.strip() and os.path.isdir(os.path.expanduser(p.strip()))]
    hint = (f" {', '.join(folders)} is a folder: match the files in it, "
            f"e.g. {os.path.join(folders[0], '**', '*.txt')!r}."
            if folders else "")
    raise FileNotFoundError(
        f"config.data.text_files matches no file: {patterns!r} (relative to "
        f"{os.getcwd()}).{hint} For the offline English corpus run "
        "`python scripts/prepare_text_corpus.py` first.")
  return sorted(files)


def read_text(path: str) -> str:
  """The text of a file (see the module doc for the encodings read)."""
  with open(path, "rb") as f:
    data = f.read()
  if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
    try:
      text = data.decode("utf-16")
    except UnicodeDecodeError:
      text = "\x00"  # Not UTF-16 after all: binary.
  else:
    try:
      text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
      text = data.decode("latin-1")
  if "\x00" in text:
    raise ValueError(
        f"{path}: not a text file (it holds NUL characters: binary data, or "
        "text in an encoding other than UTF-8, UTF-16 with a byte-order mark "
        "or Latin-1). Narrow config.data.text_files to the text files, or "
        "save this one as UTF-8.")
  return text


def _cut(text: str, fraction: float) -> int:
  """Index of the first line boundary at or after ``fraction`` of text."""
  i = int(len(text) * fraction)
  j = text.find("\n", i)
  return len(text) if j < 0 else j + 1


def split_documents(files: list[str], split_by: str, val_fraction: float,
                    test_fraction: float) -> dict[str, list[str]]:
  """split -> list of document texts (see module doc)."""
  if split_by not in SPLIT_BY:
    raise ValueError(f"config.data.split_by must be one of {SPLIT_BY}, got "
                     f"{split_by!r}.")
  if not (0 < val_fraction and 0 < test_fraction
          and val_fraction + test_fraction < 1):
    raise ValueError("config.data.val_fraction and test_fraction must be > 0 "
                     "and sum to less than 1.")
  out = {s: [] for s in SPLITS}
  if split_by == "document":
    root = os.path.commonpath([os.path.abspath(f) for f in files])
    if len(files) == 1:
      root = os.path.dirname(root)
    for f in files:
      rel = os.path.relpath(os.path.abspath(f), root).replace(os.sep, "/")
      u = zlib.crc32(rel.encode("utf-8")) / 2**32
      split = ("test" if u < test_fraction else
               "val" if u < test_fraction + val_fraction else "train")
      out[split].append(read_text(f))
    empty = [s for s in SPLITS if not out[s]]
    if empty:
      raise ValueError(
          f"split_by='document' leaves the {'/'.join(empty)} split(s) empty "
          f"with {len(files)} file(s); use --config.data.split_by=text or "
          "more files.")
  else:
    for f in files:
      text = read_text(f)
      a = _cut(text, 1 - val_fraction - test_fraction)
      b = _cut(text, 1 - test_fraction)
      for split, part in zip(SPLITS, (text[:a], text[a:b], text[b:])):
        if part.strip():
          out[split].append(part)
  return out


def check_every_split(docs: dict[str, list[str]], num_files: int) -> None:
  """Raises ValueError if ``split_documents(..., "text", ...)`` left a split
  without documents, saying why (its cuts are at line breaks)."""
  empty = [s for s in SPLITS if not docs[s]]
  if empty:
    raise ValueError(
        f"split_by='text' leaves the {'/'.join(empty)} split(s) empty with "
        f"{num_files} file(s): it cuts each file at line breaks, so a file "
        "of one long line (or with no text on lines after the cut) stays "
        "whole in train. Use files with line breaks, or "
        "--config.data.split_by=document with more files.")
