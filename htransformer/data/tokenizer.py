"""Tokenizers for language modelling: byte-level and SentencePiece.

Both use the same special ids: 0 is padding (never produced by encoding) and
1 is end-of-sequence (appended after every document or sentence, so it also
starts the next one in a packed stream).

``ByteTokenizer``: the UTF-8 bytes of the text, shifted by 2 (vocabulary 258).

``SentencePieceTokenizer``: a SentencePiece unigram model trained with
``sentencepiece.SentencePieceTrainer`` with pad 0, eos 1, unk 2 (distinct
from pad) and no bos. ``get_tokenizer`` trains it once on the first
``max_chars`` characters of the training text and saves it as
``WORKDIR/tokenizer.model``; a resumed run and ``htransformer.sample`` load
that file instead of training again.
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2  # SentencePiece only.
TOKENIZER_FILE = "tokenizer.model"
VOCABS = ("byte", "sentencepiece")
# SentencePiece skips training sentences longer than this many bytes.
_MAX_SENTENCE_BYTES = 1 << 16


class ByteTokenizer:
  """UTF-8 bytes + 2; pad 0, eos 1."""

  kind = "byte"
  vocab_size = 258
  pad_id = PAD_ID
  eos_id = EOS_ID

  def encode(self, text: str) -> list[int]:
    return [b + 2 for b in text.encode("utf-8")]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) - 2 for i in ids if int(i) >= 2)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained SentencePiece model (pad 0, eos 1, unk 2, no bos)."""

  kind = "sentencepiece"
  pad_id = PAD_ID
  eos_id = EOS_ID

  def __init__(self, model_path: str):
    """Loads ``model_path``; ValueError naming it if it is not a
    SentencePiece model or lacks pad id 0 and eos id 1."""
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = model_path
    # A file that is not a model raises RuntimeError ("could not parse
    # ModelProto"); a missing one OSError, which says so.
    try:
      self.sp = spm.SentencePieceProcessor(model_file=model_path)
    except RuntimeError as e:
      raise ValueError(f"{model_path}: not a SentencePiece model ({e})."
                       ) from None
    if (self.sp.pad_id(), self.sp.eos_id()) != (PAD_ID, EOS_ID):
      raise ValueError(
          f"{model_path}: expected pad id {PAD_ID} and eos id {EOS_ID}, got "
          f"{self.sp.pad_id()} and {self.sp.eos_id()} (train it with "
          f"pad_id={PAD_ID} eos_id={EOS_ID} unk_id={UNK_ID} bos_id=-1).")
    self.vocab_size = self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids if int(i) > EOS_ID])


def _pieces(line: str) -> list[str]:
  """[line] (none if empty), or for a line longer than SentencePiece takes,
  pieces of at most a quarter as many characters (so they fit in UTF-8),
  each cut after its last space if it has one."""
  if len(line.encode("utf-8")) <= _MAX_SENTENCE_BYTES:
    return [line] if line else []
  size, out = _MAX_SENTENCE_BYTES // 4, []
  while len(line) > size:
    cut = line.rfind(" ", 0, size) + 1 or size
    out.append(line[:cut].strip())
    line = line[cut:].strip()
  return out + ([line] if line else [])


def train_sentencepiece(texts: Iterable[str], model_path: str,
                        vocab_size: int, max_chars: int = 10_000_000,
                        seed: int = 0) -> SentencePieceTokenizer:
  """Trains a unigram model on the first ``max_chars`` characters of texts.

  Each text is split into lines (SentencePiece's "sentences"; a line too
  long for SentencePiece, which would skip it, is cut at spaces into
  pieces that fit); lines are taken in order until ``max_chars``
  characters. Training is single-threaded with a fixed seed, so the same
  text gives the same model.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  lines, total = [], 0
  for text in texts:
    for line in (p for raw in text.splitlines()
                 for p in _pieces(raw.strip())):
      lines.append(line[: max_chars - total])
      total += len(lines[-1])
      if total >= max_chars:
        break
    if total >= max_chars:
      break
  if not lines:
    raise ValueError("No text to train the SentencePiece model on.")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        model_type="unigram", vocab_size=vocab_size, character_coverage=1.0,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        hard_vocab_limit=False, max_sentence_length=_MAX_SENTENCE_BYTES,
        minloglevel=2)
  except RuntimeError as e:
    # E.g. "INTERNAL: src/trainer_interface.cc(638) [<condition>] Vocabulary
    # size is smaller than required_chars. 20 vs 64. ...": the text after
    # the condition says what is wrong.
    reason = str(e).rsplit("] ", 1)[-1].strip() or str(e).strip()
    raise ValueError(
        f"SentencePiece could not train a vocabulary of {vocab_size} "
        f"(config.data.vocab_size) on this text: {reason}") from None
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  tmp = model_path + f".tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)
  return SentencePieceTokenizer(model_path)


def get_tokenizer(data_config, workdir: str | None, train_texts=None):
  """The tokenizer of a run: byte-level, or SentencePiece from the workdir.

  SentencePiece: ``WORKDIR/tokenizer.model`` if it exists; else a copy of
  ``data_config.spm_model`` if that is set (checked before it is copied: a
  file that is not a model with pad id 0 and eos id 1 is an error naming
  it, and the workdir keeps nothing); else trained on ``train_texts()`` (a
  callable returning an iterable of strings) and saved there. With several
  processes, process 0 trains and the others wait.
  """
  vocab = data_config.vocab
  if vocab == "byte":
    return ByteTokenizer()
  if vocab != "sentencepiece":
    raise ValueError(f"config.data.vocab must be one of {VOCABS}, got "
                     f"{vocab!r}.")
  if workdir is None:
    raise ValueError("A SentencePiece tokenizer needs a workdir.")
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(path):
    print(f"Tokenizer: loaded {path}", flush=True)
    return SentencePieceTokenizer(path)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    if data_config.spm_model:
      if not os.path.isfile(data_config.spm_model):
        problem = ("is a folder, not a model file"
                   if os.path.isdir(data_config.spm_model) else
                   "does not exist")
        raise FileNotFoundError(
            f"config.data.spm_model {problem}: {data_config.spm_model}")
      try:
        SentencePieceTokenizer(data_config.spm_model)
      except ValueError as e:
        raise ValueError(f"config.data.spm_model: {e}") from None
      os.makedirs(workdir, exist_ok=True)
      tmp = path + f".tmp{os.getpid()}"
      shutil.copyfile(data_config.spm_model, tmp)
      os.replace(tmp, path)
      print(f"Tokenizer: copied {data_config.spm_model} to {path}",
            flush=True)
    else:
      print(f"Tokenizer: training a SentencePiece unigram model "
            f"(vocabulary {data_config.vocab_size}) on the first "
            f"{data_config.spm_train_chars:,} characters of the training "
            f"text; saving it to {path}", flush=True)
      train_sentencepiece(train_texts(), path, data_config.vocab_size,
                          data_config.spm_train_chars)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("tokenizer")
  return SentencePieceTokenizer(path)


def load_for_workdir(workdir: str, vocab: str):
  """The tokenizer a finished run used (for sampling)."""
  if vocab == "byte":
    return ByteTokenizer()
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {TOKENIZER_FILE} in {workdir}.")
  return SentencePieceTokenizer(path)


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
