"""Inputs a user gets wrong, met by the data layer: folders that are files
or missing, tokenizer files that are not what they should be, text files
that are not UTF-8 text, settings that would fail late.

Every test writes real files (in the real formats) under tmp_path; none
downloads anything.
"""

import codecs
import os
import re
import sys

import pytest
import sentencepiece as spm

from configs import lm1b as lm_config
from htransformer import input_pipeline
from htransformer import tasks
from htransformer.data import cache
from htransformer.data import image
from htransformer.data import imdb
from htransformer.data import lm
from htransformer.data import listops
from htransformer.data import lm1b
from htransformer.data import pathfinder as pf
from htransformer.data import retrieval
from htransformer.data import text as text_lib
from htransformer.data import tokenizer as tokenizer_lib
from tests.scripts_helper import ROOT

# --- data_dir: missing, or a file. ---

LOADERS = {
    "imdb": lambda d: imdb.load_sources(d, max_length=16),
    "retrieval": lambda d: retrieval.load_sources(d, max_length=16),
    "image": image.load_sources,
    "pathfinder": lambda d: pf.find_data_dir(d, None),
    "lm1b": lambda d: lm1b.load_sentences(d, 10),
    "listops": lambda d: listops.find_data_dir(d, None),
}


@pytest.mark.parametrize("task", sorted(LOADERS))
def test_data_dir_missing_or_a_file_says_which(task, tmp_path):
  """A typo in data_dir, or an archive passed unpacked, is named as such
  (before: "is not an aclImdb folder", "lacks ...", "holds no ..." for
  both, and Pathfinder's "does not exist" for a file that exists)."""
  archive = tmp_path / "data.tar.gz"
  archive.write_bytes(b"\x1f\x8b not unpacked")
  missing = tmp_path / "no_such_folder"
  for path, problem in ((archive, "is a file, not a folder"),
                        (missing, "does not exist")):
    with pytest.raises(FileNotFoundError, match=problem) as e:
      LOADERS[task](str(path))
    assert str(path) in str(e.value)


def test_cache_dir_that_is_a_file(tmp_path):
  """Was FileExistsError ("File exists"), an OSError that the command line
  shows as a traceback."""
  path = tmp_path / "cache"
  path.write_text("")

  def write(folder):
    raise AssertionError("nothing is built in a file")
  with pytest.raises(ValueError, match=re.escape(str(path))
                     + ".*is a file, not a folder"):
    cache.build_once(str(path), "entry", write)


# --- Tokenizer: a given SentencePiece model is checked before it is used. ---


def _data_config(**fields):
  c = lm_config.get_config("quick").data
  c.update(vocab="sentencepiece", vocab_size=40, spm_train_chars=10_000,
           **fields)
  return c


LINES = [f"the market said {i} that the government would grow"
         for i in range(40)]


def test_bad_spm_model_is_named_and_never_copied(tmp_path):
  """A model with SentencePiece's default ids (pad -1, eos 2) or a file
  that is no model was copied into the workdir first and then refused
  there: the error named the workdir's copy, and every later run in that
  workdir loaded the copy and failed again, whatever spm_model said."""
  default_ids = str(tmp_path / "default")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(LINES), model_prefix=default_ids,
      vocab_size=40, hard_vocab_limit=False, minloglevel=2)
  junk = tmp_path / "junk.model"
  junk.write_text("not a model")
  workdir = tmp_path / "w"
  for bad, problem in ((default_ids + ".model", "expected pad id 0"),
                       (str(junk), "not a SentencePiece model")):
    with pytest.raises(ValueError, match="config.data.spm_model: "
                       + re.escape(bad) + ".*" + problem):
      tokenizer_lib.get_tokenizer(_data_config(spm_model=bad), str(workdir),
                                  lambda: LINES)
    assert not (workdir / tokenizer_lib.TOKENIZER_FILE).exists()
  # A folder was "copied" with IsADirectoryError (a traceback).
  with pytest.raises(FileNotFoundError, match="config.data.spm_model is a "
                     "folder, not a model file: " + re.escape(str(tmp_path))):
    tokenizer_lib.get_tokenizer(_data_config(spm_model=str(tmp_path)),
                                str(workdir), lambda: LINES)
  good = tokenizer_lib.train_sentencepiece(LINES, str(tmp_path / "good.model"),
                                           40)
  tok = tokenizer_lib.get_tokenizer(_data_config(spm_model=good.path),
                                    str(workdir), lambda: LINES)
  assert tok.path == str(workdir / tokenizer_lib.TOKENIZER_FILE)
  assert tok.encode(LINES[0]) == good.encode(LINES[0])
  assert 0 not in tok.encode("zzz \u4e2d")  # unknown: unk (2), never pad


def _three_documents(tmp_path) -> str:
  """Three files of LINES in tmp_path/corpus; their glob."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(3):
    (corpus / f"{i}.txt").write_text("\n".join(LINES) + "\n")
  return str(corpus / "*.txt")


def test_sentence_packing_of_local_text_is_refused_before_training(tmp_path):
  """eval_packing='sentence' with local text was refused only after the
  tokenizer had been trained and saved in the workdir."""
  c = lm_config.get_config("quick")
  c.data.update(text_files=_three_documents(tmp_path), vocab="sentencepiece",
                vocab_size=40, spm_train_chars=10_000,
                eval_packing="sentence")
  c.max_length = 16
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match="eval_packing='sentence' is for lm1b"):
    lm.build(c, str(workdir), str(tmp_path / "cache"))
  assert not (workdir / tokenizer_lib.TOKENIZER_FILE).exists()


def test_training_packing_other_than_stream_is_refused(tmp_path):
  """config.data.packing was never read: "sentence" trained on stream-packed
  rows all the same, and config.json said otherwise."""
  (tmp_path / "a.txt").write_text("\n".join(LINES) + "\n")
  c = lm_config.get_config("quick")
  c.data.update(text_files=str(tmp_path / "*.txt"), packing="sentence")
  c.max_length = 16
  with pytest.raises(ValueError, match=r"config.data.packing must be one of "
                     r"\('stream',\) .*got 'sentence'"):
    lm.build(c, str(tmp_path / "w"), str(tmp_path / "cache"))


def test_sentencepiece_vocabulary_too_small_is_named(tmp_path):
  """A vocab_size below the text's distinct characters, or one without
  room for pad, eos and unk: a ValueError naming config.data.vocab_size,
  also in a dry run, and no tokenizer saved (were SentencePiece's
  RuntimeError and, in a dry run of 0, a ZeroDivisionError: tracebacks)."""
  c = lm_config.get_config("quick")
  c.data.update(text_files=_three_documents(tmp_path), vocab="sentencepiece",
                vocab_size=10, spm_train_chars=10_000)
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=r"^SentencePiece could not train a "
                     r"vocabulary of 10 \(config.data.vocab_size\) on this "
                     r"text: Vocabulary size is smaller than required_chars"):
    lm.build(c, str(workdir), str(tmp_path / "cache"))
  assert not (workdir / tokenizer_lib.TOKENIZER_FILE).exists()
  c.data.vocab_size = 0
  for dry_run in (False, True):
    c.dry_run = dry_run
    with pytest.raises(ValueError,
                       match="config.data.vocab_size must be at least 4"):
      tasks.get_task(c, str(workdir))


def _local_text_flags(text):
  """The ``--config.data.*=VALUE`` flags of a suggestion in ``text``."""
  return {k: v.strip("'") for k, v in
          re.findall(r"--config\.data\.(\w+)=('[^']*'|[^\s`'.]+)", text)}


def test_suggested_local_text_flags_run_on_the_base_config(tmp_path,
                                                           monkeypatch):
  """The flags that the config's docstring, the README and the message of
  a missing tfds give for local text, on the default (lm1b) config: they
  were refused ("eval_packing='sentence' is for lm1b") for lack of
  eval_packing=stream."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(100):  # Documents for every split at 5% each.
    (corpus / f"{i}.txt").write_text(LINES[i % len(LINES)] + "\n")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError) as e:
    lm1b.import_tfds()
  readme = open(os.path.join(ROOT, "README.md")).read()
  start = readme.index("(`--config.data.source=text")
  texts = {"configs/lm1b.py": lm_config.__doc__, "import_tfds": str(e.value),
           "README.md": readme[start:readme.index("`:", start)]}
  for where, text in texts.items():
    flags = _local_text_flags(text.replace("\n", " "))
    assert flags.get("source") == "text", (where, flags)
    c = lm_config.get_config()
    c.data.update(flags, text_files=str(corpus / "*.txt"), vocab="byte")
    c.max_length = 16
    sources, _, _ = lm.build(c, str(tmp_path / "w"), str(tmp_path / "cache"))
    assert len(sources["test"]) > 0, where
  with pytest.raises(ValueError, match="--config.data.eval_packing=stream"):
    c.data.eval_packing = "sentence"
    lm.build(c, str(tmp_path / "w"), str(tmp_path / "cache"))


# --- Local text files. ---


def test_text_encodings(tmp_path):
  """A UTF-8 byte-order mark is not text (it was kept, as U+FEFF, in every
  document); UTF-16 with its mark is decoded (it was read as Latin-1, a NUL
  after every letter); a binary file is an error naming it (it was read as
  Latin-1 garbage); Latin-1 text still reads."""
  words = "Caf\u00e9 na\u00efve \u2014 \U0001F642\nsecond line\n"
  cases = {"bom.txt": codecs.BOM_UTF8 + words.encode("utf-8"),
           "le.txt": words.encode("utf-16"),  # with its byte-order mark
           "be.txt": codecs.BOM_UTF16_BE + words.encode("utf-16-be"),
           "plain.txt": words.encode("utf-8")}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    assert text_lib.read_text(str(tmp_path / name)) == words, name
  (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 \u00bd\n".encode("latin-1"))
  assert text_lib.read_text(str(tmp_path / "latin1.txt")) == "Caf\u00e9 \u00bd\n"
  binary = {"archive.gz": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03abc",
            "utf16_no_mark.txt": "plain words".encode("utf-16-le"),
            "odd_utf16.txt": codecs.BOM_UTF16_LE + b"abc"}
  for name, data in binary.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))
                       + ": not a text file"):
      text_lib.read_text(str(path))
  # Through the globs and the split, as training reads them.
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "archive.gz"))):
    text_lib.split_documents(text_lib.find_files(str(tmp_path / "*")),
                             "text", 0.1, 0.1)


def test_split_by_text_without_line_breaks_is_explained(tmp_path):
  """Files of one long line stay whole in train: the val and test splits
  were left empty without a word, and the run stopped only after the
  tokenizer had been trained, on "the val/test split(s) have no
  examples"."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(2):
    (corpus / f"{i}.txt").write_text(" ".join(LINES))  # one line
  c = lm_config.get_config("quick")
  c.data.update(text_files=str(corpus / "*.txt"), vocab="sentencepiece",
                vocab_size=40, spm_train_chars=10_000, split_by="text")
  c.max_length = 16
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match="split_by='text' leaves the val/test "
                     "split.*line breaks"):
    lm.build(c, str(workdir), str(tmp_path / "cache"))
  assert not (workdir / tokenizer_lib.TOKENIZER_FILE).exists()
  # With line breaks every split gets its part of each file.
  for i in range(2):
    (corpus / f"{i}.txt").write_text("\n".join(LINES) + "\n")
  sources, _, _ = lm.build(c, str(workdir), str(tmp_path / "cache"))
  assert all(len(sources[s]) for s in text_lib.SPLITS)


def test_text_files_naming_a_folder_says_so(tmp_path):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_text("text\n")
  folder = str(tmp_path / "corpus")
  with pytest.raises(FileNotFoundError, match=re.escape(folder)
                     + " is a folder: match the files in it"):
    text_lib.find_files(folder)
  assert text_lib.find_files(os.path.join(folder, "**", "*.txt")) == [
      os.path.join(folder, "a.txt")]


# --- Training order: settings refused at once, not in a reader thread. ---


class Source:
  def __len__(self):
    return 10

  def __getitem__(self, i):
    return {"inputs": [i], "targets": i}


@pytest.mark.parametrize("seed,batch,problem", [
    (-1, 4, "config.data_seed must be a non-negative integer, got -1"),
    (1.5, 4, "config.data_seed must be a non-negative integer, got 1.5"),
    (0, 0, "batch_size must be >= 1, got 0"),
])
def test_bad_seed_or_batch_size_is_refused_at_once(seed, batch, problem):
  """A negative data_seed failed at the first batch, inside grain's reader
  thread, with numpy's "expected non-negative integer"; 1.5 was silently
  read as 1; a batch size of 0 failed with an IndexError."""
  with pytest.raises(ValueError, match=re.escape(problem)):
    input_pipeline.ShuffledBatches(Source(), batch, seed)


@pytest.mark.parametrize("split_seed", [-1, 0.5])
def test_bad_pathfinder_split_seed_is_named(split_seed):
  """numpy's "expected non-negative integer" (a TypeError for 0.5, shown
  as a traceback) did not say which setting was wrong."""
  with pytest.raises(ValueError, match=re.escape(
      f"config.data.split_seed must be a non-negative integer, got "
      f"{split_seed}")):
    pf.split_indices(10, split_seed)
  assert [len(v) for v in pf.split_indices(10, 3).values()] == [8, 1, 1]
