"""Bad data gets an error naming the file (and line) and the problem.

Every test writes real files in the LRA release's layout (README.md)
under tmp_path: empty splits, malformed rows and labels, corrupt images and
batch files.
"""

import os
import pickle
import re
import struct

import numpy as np
import pytest

from configs import listops as listops_config
from configs import pathfinder as pathfinder_config
from configs import retrieval as retrieval_config
from htransformer import tasks
from htransformer.data import image
from htransformer.data import imdb
from htransformer.data import listops
from htransformer.data import pathfinder as pf
from htransformer.data import png
from htransformer.data import retrieval
from tests.test_lra_data import _write_acl_imdb, _write_aan, _write_cifar

# --- ListOps. ---

LISTOPS_ROWS = ["( ( ( [MAX 2 ) 9 ) ] )\t9", "( ( ( [MIN 2 ) 9 ) ] )\t2",
                "( ( ( [SM 4 ) 9 ) ] )\t3"]


def _write_listops(folder, rows=None, val_rows=None):
  """basic_{train,val,test}.tsv with the LRA header."""
  os.makedirs(folder, exist_ok=True)
  for split in listops.SPLITS:
    lines = val_rows if split == "val" and val_rows is not None else (
        rows or LISTOPS_ROWS)
    with open(os.path.join(folder, f"basic_{split}.tsv"), "w") as f:
      f.write("Source\tTarget\n" + "".join(l + "\n" for l in lines))
  return folder


def _listops_config(data_dir):
  c = listops_config.get_config("quick")
  c.data_dir = data_dir
  c.max_length = 16
  return c


def _assert_empty_split(load, where, sizes, config):
  """``load()`` refuses the data naming ``where`` and every split's size
  (``sizes``), and so does the task (the run stops at once)."""
  with pytest.raises(ValueError, match=re.escape(where)) as e:
    load()
  assert sizes in str(e.value)
  with pytest.raises(ValueError, match="val 0"):
    tasks.get_task(config)


def test_listops_header_only_val_split(tmp_path):
  d = _write_listops(str(tmp_path / "listops-1000"), val_rows=[])
  _assert_empty_split(lambda: listops.load_sources(d, max_length=16),
                      os.path.join(d, "basic_val.tsv"),
                      "train 3, val 0, test 3",
                      _listops_config(str(tmp_path)))
  # The same files with a non-empty val split load.
  _write_listops(d)
  task = tasks.get_task(_listops_config(str(tmp_path)))
  assert {s: len(v) for s, v in task.sources.items()} == {
      "train": 3, "val": 3, "test": 3}


BAD_LISTOPS_ROWS = [
    ("( ( ( [MAX 2 ) 9 ) ] )\t9\t7", "exactly one tab"),  # extra column
    ("( ( ( [MAX 2 ) 9 ) ] )\t9\t", "exactly one tab"),  # empty extra one
    ("( ( ( [MAX 2 ) 9 ) ] ) 9", "exactly one tab"),  # no tab
    ("( ( ( [MAX 2 ) 9 ) ] )\t0_3", "not one of the digits"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t+3", "not one of the digits"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t-0", "not one of the digits"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t3.0", "not one of the digits"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t10", "not one of the digits"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t", "not one of the digits"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t\u0663", "not one of the digits"),  # Arabic 3
]


@pytest.mark.parametrize("row,problem", BAD_LISTOPS_ROWS)
def test_listops_bad_rows_name_file_and_line(tmp_path, row, problem):
  path = str(tmp_path / "basic_train.tsv")
  with open(path, "w", encoding="utf-8") as f:
    f.write("Source\tTarget\n" + LISTOPS_ROWS[0] + "\n\n" + row + "\n")
  with pytest.raises(ValueError,
                     match=re.escape(f"{path}:4:") + f".*{problem}"):
    listops.read_split(path)


def test_listops_label_forms(tmp_path):
  """[0-9]+ from 0 to 9 (and CRLF rows) load; int()'s other forms do not."""
  path = str(tmp_path / "basic_train.tsv")
  with open(path, "wb") as f:
    f.write(b"Source\tTarget\r\n( [MAX 2 ) 9 ] )\t09\r\n[SM 3 ]\t3 \r\n")
  seqs, labels = listops.read_split(path)
  assert labels.tolist() == [9, 3]
  assert [s.tolist() for s in seqs] == [[12, 4, 11, 16], [15, 5, 16]]
  for label in ("+3", "0_3", " 3_0", "-0"):
    with open(path, "w") as f:
      f.write(f"Source\tTarget\n[SM 3 ]\t{label}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: label")):
      listops.read_split(path)


def test_listops_tokens_outside_the_vocabulary_are_reported(tmp_path,
                                                            caplog):
  """A copy written by a CSV tool (quoted sources): the quotes would be
  read as <unk> tokens in silence."""
  path = str(tmp_path / "basic_train.tsv")
  with open(path, "w") as f:
    f.write('Source\tTarget\n[SM 3 ]\t3\n"( [MAX 2 9 ] )"\t9\n')
  with caplog.at_level("WARNING"):
    source = listops.ListOpsSource(path, 20)
  assert source[1]["inputs"][:6].tolist() == [1, 12, 4, 11, 16, 1]
  assert ("1 of 2 examples hold tokens outside the ListOps vocabulary, read "
          "as <unk> (the first: example 1)") in caplog.text
  caplog.clear()
  with open(path, "w") as f:
    f.write("Source\tTarget\n( [MAX 2 9 ] )\t9\n")
  with caplog.at_level("WARNING"):
    listops.ListOpsSource(path, 20)
  assert "outside the ListOps vocabulary" not in caplog.text


# --- Retrieval. ---


def test_retrieval_empty_eval_file(tmp_path):
  folder = str(tmp_path / "tsv_data")
  _write_aan(folder)
  path = os.path.join(folder, "new_aan_pairs.eval.tsv")
  open(path, "wb").close()  # 0 bytes
  c = retrieval_config.get_config("quick")
  c.data_dir = folder
  _assert_empty_split(lambda: retrieval.load_sources(folder, max_length=16),
                      path, "train 5, val 0, test 5", c)


def test_retrieval_label_forms(tmp_path):
  """0, 1, 0.0 and 1.0 (the release's forms) load; anything else is an
  error at its line, never rounded (0.7 was read as 0, inf crashed)."""
  path = str(tmp_path / "new_aan_pairs.train.tsv")
  with open(path, "w") as f:
    for label in ("0", "1", "0.0", "1.0"):
      f.write(f"{label}\tid1\tid2\tdoc one\tdoc two\n")
  assert retrieval.read_split(path)[2].tolist() == [0, 1, 0, 1]
  for label in ("0.7", "inf", "-inf", "nan", "1e0", "0.5", "01.0", "1.00",
                "", "true", "2"):
    with open(path, "w") as f:
      f.write(f"1\ta\tb\tx\ty\n{label}\ta\tb\tx\ty\n")
    with pytest.raises(ValueError,
                       match=re.escape(f"{path}:2: label") + ".*not one of"):
      retrieval.read_split(path)


# --- Pathfinder. ---


def _write_pathfinder(folder, n, labels=None, image=None):
  """n images and metadata/0.npy in the release layout; returns paths."""
  os.makedirs(os.path.join(folder, "imgs", "0"))
  os.makedirs(os.path.join(folder, "metadata"))
  rng = np.random.default_rng(0)
  lines, paths = [], []
  for j in range(n):
    pixels = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    path = os.path.join(folder, "imgs", "0", f"sample_{j}.png")
    with open(path, "wb") as f:
      f.write(png.encode_gray(pixels) if image is None else image)
    label = j % 2 if labels is None else labels[j]
    lines.append(f"imgs/0 sample_{j}.png {j} {label} 14 4 5\n")
    paths.append(path)
  meta = os.path.join(folder, "metadata", "0.npy")
  with open(meta, "w") as f:
    f.write("".join(lines))
  return paths, meta


def test_pathfinder_small_sets_fill_every_split(tmp_path):
  folder = str(tmp_path / "curv_contour_length_14")
  _write_pathfinder(folder, 4)
  srcs = pf.load_sources(folder, 32)
  assert {s: len(v) for s, v in srcs.items()} == {
      "train": 2, "val": 1, "test": 1}  # round() alone gave 3/0/1
  for n in (3, 5, 6, 7):
    sizes = [len(i) for i in pf.split_indices(n).values()]
    assert sum(sizes) == n and min(sizes) >= 1, (n, sizes)


def test_pathfinder_too_few_images(tmp_path):
  folder = str(tmp_path / "curv_contour_length_14")
  paths, _ = _write_pathfinder(folder, 4)
  open(paths[0], "wb").close()  # empty: skipped, as in the release
  os.remove(paths[1])  # missing: skipped
  c = pathfinder_config.get_config("quick")
  c.data_dir = folder
  _assert_empty_split(lambda: pf.load_sources(folder, 32), folder,
                      "train 2, val 0, test 0", c)


def test_pathfinder_corrupt_images_name_the_file(tmp_path):
  pixels = np.random.default_rng(1).integers(0, 256, (32, 32))
  good = png.encode_gray(pixels.astype(np.uint8))  # ~1.1 kB of IDAT data
  bad = {"signature": (b"GIF89a" + good[6:], "bad signature"),
         "truncated": (good[:len(good) // 2], "truncated stream"),
         "corrupt": (good[:60] + bytes(40) + good[100:], "corrupt"),
         "header": (good[:8] + struct.pack(">I", 13) + b"IHDR" + bytes(5),
                    "IHDR")}
  for name, (data, problem) in bad.items():
    folder = str(tmp_path / name)
    paths, _ = _write_pathfinder(folder, 4)
    with open(paths[2], "wb") as f:
      f.write(data)
    with pytest.raises(ValueError, match=re.escape(paths[2]) + ".*" + problem):
      pf.read_image(paths[2], 32)
    for preload in (True, False):  # decoded at once / on access
      with pytest.raises(ValueError, match=re.escape(paths[2])):
        srcs = pf.load_sources(folder, 32, preload=preload)
        for src in srcs.values():
          src.get_batch(np.arange(len(src)))


@pytest.mark.parametrize("label", ["x", "1.0", "+1"])
def test_pathfinder_bad_metadata_label(tmp_path, label):
  folder = str(tmp_path / "curv_contour_length_14")
  _, meta = _write_pathfinder(folder, 4, labels=[0, 1, label, 1])
  with pytest.raises(ValueError, match=re.escape(f"{meta}:3: label")):
    pf.read_metadata(folder)


def test_pathfinder_binary_metadata(tmp_path):
  folder = str(tmp_path / "curv_contour_length_14")
  _, meta = _write_pathfinder(folder, 4)
  with open(meta, "ab") as f:
    np.save(f, np.arange(5))  # a real .npy: binary, not the release's text
  with pytest.raises(ValueError, match=re.escape(f"{meta}:5: not text")):
    pf.read_metadata(folder)


# --- Image (CIFAR-10 python batches). ---


def _rewrite(root, name, obj=None, raw=None):
  path = os.path.join(root, "cifar-10-batches-py", name)
  with open(path, "wb") as f:
    if raw is not None:
      f.write(raw)
    else:
      pickle.dump(obj, f)
  return path


def _batch(n=10, labels=None, values=3072):
  return {b"data": np.zeros((n, values), np.uint8),
          b"labels": list(range(n)) if labels is None else labels}


@pytest.mark.parametrize("name,kwargs,problem", [
    ("label_12", dict(obj=_batch(labels=[0] * 9 + [12])), "labels must be"),
    ("float_labels", dict(obj=_batch(labels=[0.5] * 10)), "labels must be"),
    ("few_labels", dict(obj=_batch(labels=[1] * 9)), "one label per image"),
    ("shape", dict(obj=_batch(values=3000)), "3072 values per image"),
    ("flat", dict(obj={b"data": np.zeros(3072 * 2, np.uint8),
                       b"labels": [1, 2]}), "3072 values per image"),
    ("pixels", dict(obj={b"data": np.full((2, 3072), 300),
                         b"labels": [1, 2]}), "0-255"),
    ("keys", dict(obj={b"images": 1}), "b'data' and b'labels'"),
    ("empty_file", dict(raw=b""), "EOFError"),
    ("truncated", dict(raw=pickle.dumps(_batch())[:100]), "not a CIFAR-10"),
])
def test_cifar_bad_batch_names_the_file(tmp_path, name, kwargs, problem):
  root = str(tmp_path / name)
  _write_cifar(root)
  path = _rewrite(root, "data_batch_3", **kwargs)
  with pytest.raises(ValueError, match=re.escape(path) + ".*" + problem):
    image.load_sources(root)


def test_cifar_empty_split(tmp_path):
  root = str(tmp_path)
  _write_cifar(root)
  _rewrite(root, "test_batch", obj=_batch(n=0, labels=[]))
  with pytest.raises(ValueError, match="cifar-10-batches-py") as e:
    image.load_sources(root)
  assert "train 45, val 5, test 0" in str(e.value)


# --- Text (IMDb). ---


@pytest.mark.parametrize("split,cls", [("train", "pos"), ("test", "neg")])
def test_imdb_empty_class_folder(tmp_path, split, cls):
  _write_acl_imdb(str(tmp_path))
  folder = os.path.join(str(tmp_path), "aclImdb", split, cls)
  for name in os.listdir(folder):
    os.remove(os.path.join(folder, name))
  with open(os.path.join(folder, "README"), "w") as f:
    f.write("not a review")
  with pytest.raises(FileNotFoundError, match=re.escape(folder)):
    imdb.load_sources(str(tmp_path), max_length=16)


# --- The task-level guard. ---


def test_check_splits_names_the_data_and_sizes(tmp_path):
  d = _write_listops(str(tmp_path), val_rows=[])
  sources = {s: listops.ListOpsSource(os.path.join(d, f"basic_{s}.tsv"), 16)
             for s in listops.SPLITS}
  task = tasks.Task("listops", sources, listops.VOCAB_SIZE,
                    listops.NUM_CLASSES, 16, d)
  with pytest.raises(ValueError, match=re.escape(d)) as e:
    tasks.check_splits(task)
  assert "train 3, val 0, test 3" in str(e.value)
  del sources["test"]
  with pytest.raises(ValueError, match="test missing"):
    tasks.check_splits(task)
  sources["val"] = sources["test"] = sources["train"]
  assert tasks.check_splits(task) is task
