"""The language-modelling task: tokenizer, splits and packed rows.

``config.data.source`` picks the corpus: ``"lm1b"`` (tfds One Billion Word,
``htransformer/data/lm1b.py``) or ``"text"`` (local files,
``htransformer/data/text.py``). The tokenizer is ``config.data.vocab``:
``"sentencepiece"`` (trained into the workdir) or ``"byte"``. Rows are
described in ``htransformer/data/packing.py``.
"""

from __future__ import annotations

from htransformer.data import packing
from htransformer.data import tokenizer as tokenizer_lib

SOURCES = ("lm1b", "text")
PACKING = ("stream",)  # Training rows.
EVAL_PACKING = ("stream", "sentence")


def vocab_size_from_config(data_config) -> int:
  """The vocabulary size the config asks for; a ValueError if a
  SentencePiece vocabulary would not hold pad, eos, unk and one piece."""
  if data_config.vocab == "byte":
    return tokenizer_lib.ByteTokenizer.vocab_size
  if data_config.vocab_size < 4:
    raise ValueError(f"config.data.vocab_size must be at least 4 (pad, eos, "
                     f"unk and a piece), got {data_config.vocab_size}.")
  return data_config.vocab_size


def build(config, workdir: str | None, cache_dir: str):
  """Returns (sources, tokenizer, description) for the LM task."""
  d = config.data
  seq_len = config.max_length
  if d.source not in SOURCES:
    raise ValueError(f"config.data.source must be one of {SOURCES}, got "
                     f"{d.source!r}.")
  if d.packing not in PACKING:
    raise ValueError(f"config.data.packing must be one of {PACKING} "
                     f"(training rows are stream-packed), got "
                     f"{d.packing!r}.")
  if d.eval_packing not in EVAL_PACKING:
    raise ValueError(f"config.data.eval_packing must be one of "
                     f"{EVAL_PACKING}, got {d.eval_packing!r}.")
  vocab_size_from_config(d)
  max_val = d.max_eval_rows or None
  max_test = d.max_test_rows or None
  if d.source == "text":
    # Before anything is read or a tokenizer trained (and saved).
    if d.eval_packing == "sentence":
      raise ValueError("eval_packing='sentence' is for lm1b; local text is "
                       "evaluated on stream-packed rows: set "
                       "--config.data.eval_packing=stream.")
    from htransformer.data import text  # pylint: disable=g-import-not-at-top
    files = text.find_files(d.text_files)
    docs = text.split_documents(files, d.split_by, d.val_fraction,
                                d.test_fraction)
    text.check_every_split(docs, len(files))
    tok = tokenizer_lib.get_tokenizer(d, workdir, lambda: docs["train"])
    streams = {s: packing.build_stream(tok.encode_batch(docs[s]),
                                       tok.vocab_size) for s in docs}
    sources = {
        "train": packing.PackedRows(streams["train"], seq_len),
        "val": packing.PackedRows(streams["val"], seq_len,
                                  keep_remainder=True, max_rows=max_val),
        "test": packing.PackedRows(streams["test"], seq_len,
                                   keep_remainder=True, max_rows=max_test)}
    where = (f"{len(files)} file(s) from {d.text_files!r}, "
             f"documents {', '.join(f'{s} {len(docs[s])}' for s in docs)}")
  else:
    from htransformer.data import lm1b  # pylint: disable=g-import-not-at-top
    sents = lm1b.load_sentences(config.data_dir or None,
                                d.lm1b_val_sentences)
    tok = tokenizer_lib.get_tokenizer(d, workdir, sents["train"].iter_texts)
    train = lm1b.token_stream(sents["train"], tok, cache_dir, "train")
    sources = {"train": packing.PackedRows(train, seq_len)}
    for split, cap in (("val", max_val), ("test", max_test)):
      if d.eval_packing == "sentence":
        sources[split] = packing.SentenceRows(sents[split], tok.encode,
                                              seq_len, max_rows=cap)
      else:
        stream = lm1b.token_stream(sents[split], tok, cache_dir, split)
        sources[split] = packing.PackedRows(stream, seq_len,
                                            keep_remainder=True,
                                            max_rows=cap)
    where = (f"tfds lm1b ({config.data_dir or 'tfds default data_dir'}), "
             f"sentences {', '.join(f'{s} {len(v):,}' for s, v in sents.items())}")
  if len(sources["train"]) == 0:
    raise ValueError(
        f"The training text is too short for one row of max_length "
        f"{seq_len} tokens.")
  tokens = {s: getattr(v, "num_tokens", None) for s, v in sources.items()}
  print(f"LM data: {where}; {tok.kind} vocabulary of {tok.vocab_size}; rows "
        f"of {seq_len} tokens: " + ", ".join(
            f"{s} {len(v):,}" + (f" ({tokens[s]:,} tokens)" if tokens[s]
                                 else "") for s, v in sources.items()),
        flush=True)
  return sources, tok, where
