"""Language-model rows: stream packing and one-sentence rows.

Stream packing (training, and evaluation on local text): every document is
tokenized and followed by eos; the documents are concatenated, in order,
into one token stream that also starts with eos. Row ``i`` is the window
``stream[i*L : i*L + L + 1]``: inputs are its first ``L`` tokens, targets its
last ``L``, so every token after the first is predicted exactly once and the
text before a document boundary in the same row is context. Nothing is
masked at boundaries (eos marks them); hierarchical and full attention see
the same rows. The last, partial row is dropped for training and padded
(weight 0) for evaluation.

One-sentence rows (the lm1b test and validation, as in the paper): inputs
``[eos, t1 .. tn]``, targets ``[t1 .. tn, eos]``, the rest padding with
weight 0; a sentence longer than the row (n >= L) is cut to inputs ``[eos,
t1 .. t(L-1)]`` and targets ``[t1 .. tL]``: its eos and the tokens after
tL are not scored, and no target is one the text does not have.

Rows are random-access sources for grain (``__len__``, ``__getitem__``)
returning ``{"inputs": int32[L], "targets": int32[L], "weights":
float32[L]}``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from htransformer.data import tokenizer as tokenizer_lib


def build_stream(token_lists: Iterable[Sequence[int]],
                 vocab_size: int) -> np.ndarray:
  """[eos] + doc_1 + [eos] + doc_2 + [eos] + ... as one array."""
  eos = tokenizer_lib.EOS_ID
  parts = [np.array([eos], np.int64)]
  for ids in token_lists:
    parts.append(np.asarray(ids, np.int64))
    parts.append(np.array([eos], np.int64))
  return np.concatenate(parts).astype(tokenizer_lib.token_dtype(vocab_size))


def _next_token_item(tokens, seq_len: int) -> dict:
  """Inputs tokens[:-1], targets tokens[1:], weight 1 on those, zero padding
  to ``seq_len``."""
  n = len(tokens) - 1
  inputs = np.zeros(seq_len, np.int32)
  targets = np.zeros(seq_len, np.int32)
  weights = np.zeros(seq_len, np.float32)
  inputs[:n], targets[:n], weights[:n] = tokens[:-1], tokens[1:], 1.0
  return {"inputs": inputs, "targets": targets, "weights": weights}


class PackedRows:
  """Rows of length ``seq_len`` cut from a token stream (see module doc)."""

  def __init__(self, stream: np.ndarray, seq_len: int,
               keep_remainder: bool = False,
               max_rows: int | None = None):
    self.stream = stream
    self.seq_len = seq_len
    n = len(stream) - 1  # Number of targets.
    rows = -(-n // seq_len) if keep_remainder else n // seq_len
    if max_rows:
      rows = min(rows, max_rows)
    self.num_rows = max(rows, 0)

  @property
  def num_tokens(self) -> int:
    """Number of predicted (weight-1) tokens over all rows."""
    return min(self.num_rows * self.seq_len, len(self.stream) - 1)

  def __len__(self):
    return self.num_rows

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < self.num_rows:
      raise IndexError(i)
    start = i * self.seq_len
    window = np.asarray(self.stream[start: start + self.seq_len + 1],
                        np.int32)
    return _next_token_item(window, self.seq_len)


class SentenceRows:
  """One sentence per row (see module doc); tokenized when read."""

  def __init__(self, texts: Sequence[str], encode: Callable[[str], list],
               seq_len: int, max_rows: int | None = None):
    self.texts = texts
    self.encode = encode
    self.seq_len = seq_len
    self.num_rows = min(len(texts), max_rows) if max_rows else len(texts)

  def __len__(self):
    return self.num_rows

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < self.num_rows:
      raise IndexError(i)
    eos = tokenizer_lib.EOS_ID
    ids = list(self.encode(self.texts[i]))
    # A sentence longer than the row is cut after its L-th token, which is
    # then the last target: every target is the text's next token.
    row = np.array(([eos] + ids + [eos])[: self.seq_len + 1], np.int32)
    return _next_token_item(row, self.seq_len)
