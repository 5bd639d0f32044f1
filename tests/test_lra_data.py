"""Loaders of the LRA Text, Retrieval and Image tasks, on data in the real
on-disk layouts made by the tests (tfds through tfds.testing.mock_data)."""

import dataclasses
import importlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from htransformer import input_pipeline
from htransformer import tasks
from htransformer.data import byte_source
from htransformer.data import image
from htransformer.data import imdb
from htransformer.data import png
from htransformer.data import retrieval
from tests.scripts_helper import ROOT, child_env

# A port nothing listens on: a tfds download that a regression lets start
# fails at once instead of reaching the internet.
NO_NETWORK = {k: "http://127.0.0.1:9" for k in
              ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}


def _tfds_or_skip():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f"tensorflow_datasets is not installed ({e}); the tfds "
                "loaders are untested here, the local-file ones are.")
  return tfds


def _mock_or_skip(tfds, fn, **kw):
  try:
    with tfds.testing.mock_data(**kw):
      return fn()
  except ImportError as e:  # mock_data needs TensorFlow for some datasets
    pytest.skip(f"tfds.testing.mock_data needs what is not installed: {e}")


# --- Bytes. ---


def test_byte_ids_fixed():
  ids = byte_source.encode_bytes("é a\x00".encode())
  assert ids.tolist() == [0xC3 + 1, 0xA9 + 1, 33, 98, 1]  # 0 byte -> 1
  assert byte_source.decode_ids(list(ids) + [0, 0]) == "é a\x00".encode()
  assert byte_source.VOCAB_SIZE == 257
  packed = byte_source.PackedBytes([b"abc", b"", b"\xff" * 9], 5)
  assert packed.padded(0).tolist() == [98, 99, 100, 0, 0]
  assert packed.padded(1).tolist() == [0] * 5
  assert packed.padded(2).tolist() == [256] * 5
  assert packed.lengths.tolist() == [3, 0, 9]


# --- Text (IMDb). ---


def _write_acl_imdb(root):
  reviews = {}
  for split in ("train", "test"):
    for label, cls in enumerate(("neg", "pos")):
      d = os.path.join(root, "aclImdb", split, cls)
      os.makedirs(d)
      for i in range(3):
        text = f"{split} {cls} review {i} <br /> caf\u00e9 " * (i + 1)
        with open(os.path.join(d, f"{i}_{1 + 9 * label}.txt"), "wb") as f:
          f.write(text.encode())
        reviews[(split, cls, i)] = text.encode()
  unsup = os.path.join(root, "aclImdb", "train", "unsup")
  os.makedirs(unsup)
  open(os.path.join(unsup, "0_0.txt"), "w").write("unlabelled")
  return reviews


def test_imdb_local_folder(tmp_path):
  reviews = _write_acl_imdb(str(tmp_path))
  for d in (str(tmp_path), str(tmp_path / "aclImdb")):
    srcs = imdb.load_sources(d, max_length=50)
    assert {k: len(v) for k, v in srcs.items()} == {
        "train": 6, "val": 6, "test": 6}
  assert srcs["val"] is srcs["test"]  # LRA: test doubles as validation
  src = srcs["train"]
  assert src.labels.tolist() == [0, 0, 0, 1, 1, 1]
  item = src[4]
  x = item["inputs"]
  assert x.shape == (50,) and x.dtype == np.int32 and int(item["targets"]) == 1
  text = reviews[("train", "pos", 1)]
  assert len(text) > 50  # truncated to max_length
  assert byte_source.decode_ids(x) == text[:50]
  short = srcs["test"][0]["inputs"]
  n = len(reviews[("test", "neg", 0)])
  assert (short[:n] > 0).all() and (short[n:] == 0).all()
  assert pickle.loads(pickle.dumps(src))[4]["inputs"].tolist() == x.tolist()
  assert src[-2]["inputs"].tolist() == x.tolist()  # from the end, as lists
  for index in (6, -7):
    with pytest.raises(IndexError, match="out of range for 6 examples"):
      src[index]  # pylint: disable=pointless-statement
  with pytest.raises(FileNotFoundError, match="aclImdb"):
    imdb.load_sources(str(tmp_path / "aclImdb" / "train"))


def test_imdb_tfds_mock():
  tfds = _tfds_or_skip()
  srcs = _mock_or_skip(tfds, lambda: imdb.load_sources(None, max_length=64),
                       num_examples=5)
  assert len(srcs["train"]) == 5
  item = srcs["train"][0]
  assert item["inputs"].shape == (64,) and int(item["targets"]) in (0, 1)


@pytest.mark.parametrize("name", ["imdb_reviews", "cifar10"])
def test_tfds_builders_can_prepare(name, tmp_path):
  """What `tfds.data_source` does before it downloads: find the builder's
  code and its download checksums (needs importlib_resources, which
  requirements.txt installs; without it every first use of a tfds task
  failed with ModuleNotFoundError). Nothing is downloaded."""
  tfds = _tfds_or_skip()
  builder = tfds.builder(name, data_dir=str(tmp_path))
  urls = builder.url_infos
  assert urls and all(u.startswith("http") for u in urls)
  assert all(info.checksum for info in urls.values())


def test_imdb_without_tfds_says_so(monkeypatch):
  import builtins
  real = builtins.__import__

  def no_tfds(name, *a, **k):
    if name.startswith("tensorflow_datasets"):
      raise ImportError("no tfds")
    return real(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", no_tfds)
  with pytest.raises(ImportError, match="aclImdb|local alternative"):
    imdb.load_sources(None)


# --- Retrieval (AAN). ---


def _write_aan(folder, n=5, crlf=False):
  os.makedirs(folder)
  rows = {}
  for split, fname in (("train", "train"), ("val", "eval"), ("test", "test")):
    lines = []
    rows[split] = []
    for i in range(n):
      label = i % 2
      t1 = f"paper {split} {i} a" * (i + 1)
      t2 = f"cited {i}\u00e9 b\tc" * (i + 1)  # a tab inside text2
      lab = f"{label}.0" if i % 3 else str(label)
      lines.append(f"{lab}\tid{i}a\tid{i}b\t{t1}\t{t2}")
      rows[split].append((label, t1.encode(), t2.encode()))
    sep = "\r\n" if crlf else "\n"
    with open(os.path.join(folder, f"new_aan_pairs.{fname}.tsv"), "wb") as f:
      f.write((sep.join(lines) + sep).encode())
  return rows


def test_retrieval_loader(tmp_path):
  folder = str(tmp_path / "lra_release" / "tsv_data")
  rows = _write_aan(folder, crlf=True)
  for d in (str(tmp_path), str(tmp_path / "lra_release"), folder):
    assert retrieval.find_data_dir(d) == folder
  srcs = retrieval.load_sources(str(tmp_path), max_length=30)
  assert {k: len(v) for k, v in srcs.items()} == {
      "train": 5, "val": 5, "test": 5}
  for split, src in srcs.items():
    for i in range(5):
      item = src[i]
      label, t1, t2 = rows[split][i]
      assert item["inputs"].shape == (2, 30)
      assert item["inputs"].dtype == np.int32
      assert int(item["targets"]) == label
      assert byte_source.decode_ids(item["inputs"][0]) == t1[:30]
      assert byte_source.decode_ids(item["inputs"][1]) == t2[:30]
  with pytest.raises(FileNotFoundError, match="data_dir"):
    retrieval.load_sources("")
  with pytest.raises(FileNotFoundError, match="new_aan_pairs"):
    retrieval.find_data_dir(str(tmp_path / "lra_release" / "tsv_data" /
                                ".."/ ".."/ ".."))  # not the release root
  bad = tmp_path / "bad.tsv"
  bad.write_text("1\tid\tonly three\n")
  with pytest.raises(ValueError, match="5 tab-separated"):
    retrieval.read_split(str(bad))


def test_retrieval_data_dir_is_the_folder_holding_every_split(tmp_path):
  """A folder holding some of the files (a copy of the training file
  beside the release) is not the data: its tsv_data/, which holds all
  three, is; without all three anywhere, the error names the files."""
  folder = str(tmp_path / "tsv_data")
  rows = _write_aan(folder)
  with open(tmp_path / "new_aan_pairs.train.tsv", "w") as f:
    f.write("1\tx\ty\tstray copy\tof one file\n")
  assert retrieval.find_data_dir(str(tmp_path)) == folder
  train = retrieval.load_sources(str(tmp_path), max_length=16)["train"]
  assert len(train) == 5
  assert byte_source.decode_ids(train[0]["inputs"][0]) == rows["train"][0][1]
  os.remove(os.path.join(folder, "new_aan_pairs.eval.tsv"))
  with pytest.raises(FileNotFoundError, match="lacks new_aan_pairs"):
    retrieval.find_data_dir(str(tmp_path))


# --- Image (CIFAR-10). ---


def _write_cifar(root, n_per_batch=10):
  d = os.path.join(root, "cifar-10-batches-py")
  os.makedirs(d)
  rng = np.random.default_rng(0)
  out = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    data = rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8)
    data[0] = 0  # an all-black image
    labels = rng.integers(0, 10, n_per_batch).tolist()
    with open(os.path.join(d, name), "wb") as f:
      pickle.dump({b"data": data, b"labels": labels}, f)
    out[name] = (data, labels)
  return out


def test_gray_as_tensorflow_makes_it():
  """Values of tf.image.rgb_to_grayscale (float32, x/255, the weights,
  times 255.5, truncated): where rounding would give another level."""
  rgb = np.array([[0, 1, 0], [0, 0, 5], [3, 0, 0], [1, 1, 1], [100, 100, 100],
                  [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
                 np.uint8)
  np.testing.assert_array_equal(image.to_gray(rgb),
                                [0, 0, 0, 1, 100, 255, 76, 149, 29])


def test_image_local_cifar(tmp_path):
  raw = _write_cifar(str(tmp_path))
  srcs = image.load_sources(str(tmp_path))
  assert {k: len(v) for k, v in srcs.items()} == {
      "train": 45, "val": 5, "test": 10}
  data = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
  labels = sum((raw[f"data_batch_{i}"][1] for i in range(1, 6)), [])
  rgb = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float64)
  # tf.image.rgb_to_grayscale's result: times 255.5 and truncated, not
  # rounded (float64 here; the reader's float32 agrees on these pixels).
  gray = np.floor((rgb[..., 0] * 0.2989 + rgb[..., 1] * 0.5870
                   + rgb[..., 2] * 0.1140) / 255 * 255.5).reshape(-1, 1024)
  for split, offset in (("train", 0), ("val", 45)):
    for i in range(len(srcs[split])):
      item = srcs[split][i]
      assert item["inputs"].shape == (1024,)
      np.testing.assert_array_equal(item["inputs"], gray[offset + i] + 1)
      assert int(item["targets"]) == labels[offset + i]
  black = srcs["test"][0]["inputs"]
  assert (black == 1).all()  # black pixels are tokens (1), not padding (0)
  batch = srcs["train"].get_batch([4, 0, 44])
  for row, i in enumerate((4, 0, 44)):
    np.testing.assert_array_equal(batch["inputs"][row], gray[i] + 1)
    assert batch["targets"][row] == labels[i]


def test_image_tfds_mock():
  tfds = _tfds_or_skip()
  srcs = _mock_or_skip(tfds, lambda: image.load_sources(None),
                       num_examples=20)
  item = srcs["train"][0]
  assert item["inputs"].shape == (1024,) and item["inputs"].min() >= 1


def test_training_batches_shuffle_examples_not_batches(tmp_path):
  _write_cifar(str(tmp_path))
  src = image.load_sources(str(tmp_path))["train"]
  ds = input_pipeline.train_dataset(src, 9, seed=0)
  first = ds[0]["inputs"]
  ids = [next(i for i in range(len(src))
              if np.array_equal(src[i]["inputs"], row)) for row in first]
  assert len(set(ids)) == 9
  # Not a block of consecutive examples (as whole-batch shuffling gives).
  assert sorted(ids) != list(range(min(ids), min(ids) + 9))


# --- tfds: never downloaded by training. ---


def _config(task, **fields):
  c = importlib.import_module(f"configs.{task}").get_config()
  for k, v in fields.items():
    c[k] = v
  return c


@pytest.mark.parametrize("task,name", [("text", "imdb_reviews"),
                                       ("image", "cifar10")])
def test_unprepared_tfds_dataset_is_a_clear_error(task, name, tmp_path,
                                               monkeypatch):
  """No download: a clear error naming the dataset, the folder, the config
  field and the command that prepares it; nothing written there."""
  _tfds_or_skip()
  for k, v in NO_NETWORK.items():
    monkeypatch.setenv(k, v)
  folder = str(tmp_path / "tfds")
  c = _config(task)
  c.data.tfds_data_dir = folder
  with pytest.raises(FileNotFoundError) as e:
    tasks.get_task(c)
  for part in (repr(name), folder, "--config.data.tfds_data_dir=DIR",
               f"tfds build {name} --data_dir=DIR --file_format=array_record",
               "--config.data_dir="):
    assert part in str(e.value), part
  assert not os.path.exists(folder)


def test_text_task_offline_cli_is_a_clear_error(tmp_path):
  """The command a user runs, with tfds's default folder (~ is tmp_path)."""
  _tfds_or_skip()
  env = child_env(HOME=str(tmp_path), **NO_NETWORK)
  env.pop("TFDS_DATA_DIR", None)
  r = subprocess.run(
      [sys.executable, "-m", "htransformer.main", "--config=configs/text.py",
       f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  default = str(tmp_path / "tensorflow_datasets")
  for part in ("'imdb_reviews'", default, "config.data.tfds_data_dir",
               "tfds build imdb_reviews"):
    assert part in r.stderr, (part, r.stderr[-2000:])
  assert not os.path.exists(default)  # no partial folders


# --- Dry runs read and generate no data. ---


def _write_listops(folder):
  os.makedirs(folder)
  for split in ("train", "val", "test"):
    with open(os.path.join(folder, f"basic_{split}.tsv"), "w") as f:
      f.write("Source\tTarget\n( ( [MAX 2 ) 9 ] )\t9\n( ( [MIN 2 ) 9 ] )\t2\n")


def _write_pathfinder(root, resolution, n=4):
  """n random images in the release layout under root."""
  folder = os.path.join(root, f"pathfinder{resolution}",
                        "curv_contour_length_14")
  os.makedirs(os.path.join(folder, "imgs", "0"))
  os.makedirs(os.path.join(folder, "metadata"))
  rng = np.random.default_rng(0)
  lines = []
  for j in range(n):
    pixels = rng.integers(0, 256, (resolution, resolution)).astype(np.uint8)
    with open(os.path.join(folder, "imgs", "0", f"sample_{j}.png"), "wb") as f:
      f.write(png.encode_gray(pixels))
    lines.append(f"imgs/0 sample_{j}.png {j} {j % 2} 14 4 5\n")
  with open(os.path.join(folder, "metadata", "0.npy"), "w") as f:
    f.write("".join(lines))


_DATA = {  # task -> (config overrides, writes its data under a folder)
    "listops": (dict(max_length=16), _write_listops),
    "text": (dict(max_length=64), _write_acl_imdb),
    "retrieval": (dict(max_length=64), _write_aan),
    "image": ({}, _write_cifar),
    "pathfinder": ({}, lambda d: _write_pathfinder(d, 32)),
    "pathx": ({}, lambda d: _write_pathfinder(d, 128)),
}


@pytest.mark.parametrize("data_dir", ["", "missing"])
@pytest.mark.parametrize("task", sorted(_DATA))
def test_dry_run_reads_no_data(task, data_dir, tmp_path):
  """The default config's dry run touches no data_dir, cache or tfds folder
  and builds the same task as a real run, without sources."""
  fields, write = _DATA[task]
  real_dir = str(tmp_path / "data")
  write(real_dir)
  real = tasks.get_task(_config(task, data_dir=real_dir, **fields))
  assert all(len(real.sources[s]) for s in ("train", "val", "test"))
  # Below a regular file: nothing can be read or created there, so a task
  # that tried would fail at once (rather than generate for minutes).
  (tmp_path / "file").write_text("")
  nowhere = str(tmp_path / "file" / "nowhere")
  c = _config(task, dry_run=True, cache_dir=nowhere,
              data_dir=nowhere if data_dir else "", **fields)
  if "tfds_data_dir" in c.get("data", {}):
    c.data.tfds_data_dir = nowhere
  dry = tasks.get_task(c)  # Same vocabulary, classes, kind, length...
  assert dry == dataclasses.replace(real, sources={}, data_dir="")
  # The pixel tasks name the token of a black pixel (what
  # model.mask_black_pixels leaves out of attention); the others have none.
  pixels = task in ("image", "pathfinder", "pathx")
  assert real.black_pixel_token == (1 if pixels else None)
  if task == "image":  # The first image of data_batch_1 is all black.
    black = real.sources["train"][0]["inputs"]
    assert (black == real.black_pixel_token).all()
