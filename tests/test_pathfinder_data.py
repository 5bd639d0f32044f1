"""Tests for htransformer.data.pathfinder (generator, PNG codec, loader)."""

import io
import os
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
from scipy import ndimage
import pytest

from htransformer.data import pathfinder as pf
from htransformer.data import png
from tests.scripts_helper import ROOT, child_env, load_script

N = 24


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
  base = tmp_path_factory.mktemp("pathfinder")
  out = {}
  for name, seed, workers in [("w1", 0, 1), ("w2", 0, 2), ("seed1", 1, 1)]:
    out[name] = pf.generate(str(base / name), 32, N, seed=seed,
                            workers=workers)
  return out


def _files(folder):
  out = {}
  for dirpath, _, names in os.walk(folder):
    for n in names:
      if n == pf.METADATA_FILE:
        continue  # holds timings
      p = os.path.join(dirpath, n)
      out[os.path.relpath(p, folder)] = open(p, "rb").read()
  return out


def test_layout(gen):
  d = gen["w1"]
  assert d.endswith(os.path.join("pathfinder32", "curv_contour_length_14"))
  assert sorted(os.listdir(d)) == ["imgs", "metadata", pf.METADATA_FILE]
  assert os.listdir(os.path.join(d, "metadata")) == ["0.npy"]
  lines = open(os.path.join(d, "metadata", "0.npy")).read().splitlines()
  assert len(lines) == N
  for j, line in enumerate(lines):
    sub, name, idx, label, cl, dl, nd = line.split(" ")
    assert (sub, name, idx) == ("imgs/0", f"sample_{j}.png", str(j))
    assert label in ("0", "1") and cl == "14"
    data = open(os.path.join(d, sub, name), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # 8-bit gray PNG (IHDR: width, height, depth 8, colour type 0).
    assert struct.unpack(">IIBB", data[16:26]) == (32, 32, 8, 0)
    img = png.decode(data)
    assert img.shape == (32, 32) and img.dtype == np.uint8
    assert img.max() == 255 and img.min() == 0  # normalised to 0-255
    # Anti-aliased: intermediate gray levels, a sparse foreground.
    assert len(np.unique(img)) > 2
    assert 0.03 < (img > 0).mean() < 0.6


def test_deterministic_and_independent_of_workers(gen):
  a, b, c = (_files(gen[k]) for k in ("w1", "w2", "seed1"))
  assert a == b
  assert a.keys() == c.keys() and a != c
  img, label = pf.make_image(0, 32, 5)
  np.testing.assert_array_equal(
      img, png.decode(a[os.path.join("imgs", "0", "sample_5.png")]))


def test_labels_balanced():
  labels = [int(pf.image_rng(0, 32, i).integers(2)) for i in range(4000)]
  assert abs(np.mean(labels) - 0.5) < 0.03
  labels = [pf.make_image(3, 32, i)[1] for i in range(60)]
  assert 15 < sum(labels) < 45


def _spy_on_draw(monkeypatch):
  """The list of what each drawing call of the generator draws (its start
  points; the last call of an image draws the two markers)."""
  orig_draw = pf._Canvas.draw
  calls = []
  monkeypatch.setattr(pf._Canvas, "draw",
                      lambda self, a, b, r, *v: (calls.append(a),
                                                 orig_draw(self, a, b, r, *v)))
  return calls


def test_label_semantics(monkeypatch):
  # Label 1: the markers are the two ends of one target snake; 0: one end
  # of each.
  seen = {}
  orig = pf._Generator._targets

  def spy(self):
    snakes = orig(self)
    seen["ends"] = [(s[0][0], s[-1][1]) for s in snakes]
    return snakes

  monkeypatch.setattr(pf._Generator, "_targets", spy)
  calls = _spy_on_draw(monkeypatch)
  for i in range(12):
    calls.clear()
    _, label = pf.make_image(0, 32, i)
    markers = calls[-1]
    owner = [[k for k, ends in enumerate(seen["ends"])
              if any(np.allclose(m, e) for e in ends)] for m in markers]
    assert all(len(o) == 1 for o in owner)
    assert (owner[0] == owner[1]) == (label == 1)
    assert np.linalg.norm(markers[0] - markers[1]) >= 7


@pytest.mark.parametrize("resolution,count", [(32, 40), (128, 6)])
def test_different_snakes_never_touch(monkeypatch, resolution, count):
  """The image shows the label: the markers are joined by lit pixels
  (8-connected, any intensity) only when they are on one snake. At 32 px
  a snake's dashes touch, so label 1 is connected too; at 128 px its gaps
  show. (Snakes grown with margins in continuous coordinates touched each
  other in two thirds of the 32 px images of label 0.)"""
  calls = _spy_on_draw(monkeypatch)
  seen = set()
  for i in range(count):
    calls.clear()
    image, label = pf.make_image(1, resolution, i)
    parts, _ = ndimage.label(image > 0, np.ones((3, 3), int))
    ids = [parts[int(y), int(x)] for x, y in calls[-1]]
    joined = ids[0] == ids[1]
    seen.add(label)
    if label == 0:
      assert not joined, (resolution, i)
    elif resolution == 32:
      assert joined, (resolution, i)
  assert seen == {0, 1}


@pytest.mark.parametrize("resolution,count", [(32, 20), (128, 3)])
def test_markers_are_brighter_than_snakes(monkeypatch, resolution, count):
  """Markers are solid discs at 255; a paddle carries the ink of its
  thickness (half the markers' intensity at 32 px, three quarters at 128
  px), so away from the markers no pixel is brighter than that.
  (Generator version 2 drew snakes at 255 too, and no network found the
  markers: docs/results.md.)"""
  calls = _spy_on_draw(monkeypatch)
  snake_max = {32: 128, 128: 191}[resolution]
  yy, xx = np.mgrid[:resolution, :resolution] + 0.5
  for i in range(count):
    calls.clear()
    image, _ = pf.make_image(2, resolution, i)
    markers, radius = calls[-1], pf.PARAMS[resolution]["marker_radius"]
    dist = np.min([np.hypot(xx - x, yy - y) for x, y in markers], axis=0)
    assert (image[dist <= radius - 0.75] == 255).all(), i  # disc centres
    far = image[dist > radius + 1.5]
    assert far.max() <= snake_max and far.max() >= snake_max // 2, i


def test_training_batches_show_their_labels(gen):
  """What the model is fed: the training iterator's batches, read back as
  images, have markers joined exactly when the label says so."""
  from htransformer import input_pipeline
  srcs = pf.load_sources(gen["w1"], 32)
  batch = next(input_pipeline.train_iterator(srcs["train"], 16, seed=0))
  seen = 0
  for tokens, label in zip(np.asarray(batch["inputs"]),
                           np.asarray(batch["targets"])):
    joined = pf.markers_joined((tokens - pf.PIXEL_OFFSET).reshape(32, 32))
    if joined is not None:
      assert joined == bool(label)
      seen += 1
  assert seen >= 5


def test_check_script_reads_a_folder(gen):
  """scripts/check_pathfinder.py's summary of generated images: label 0
  never joined, label 1 always, where two markers are found."""
  module = load_script("check_pathfinder")
  s = module.summarize(gen["w1"], 32, num=N)
  assert s["checked"] == N and s["images"] == N
  assert s["label0_read"] + s["label1_read"] + s["markers_not_found"] == N
  assert s["label0_read"] and s["label1_read"]
  assert s["label0_joined"] == 0.0 and s["label1_joined"] == 1.0
  assert 0 < s["lit_fraction"] < 0.5
  assert 0 < s["label0_lit_fraction"] < 0.5
  assert 2 < s["label0_marker_distance"] < 45
  assert 0.5 <= s["marker_distance_accuracy"] <= 1.0
  # The threshold rule on values that do and do not separate the labels.
  assert module.threshold_accuracy([1, 2, 3], [4, 5, 6]) == 1.0
  assert module.threshold_accuracy([4, 5, 6], [1, 2, 3]) == 1.0
  assert module.threshold_accuracy([1, 2, 3, 4], [1, 2, 3, 4]) == 0.5
  assert module.threshold_accuracy([1, 3], [2, 4]) == 0.75


def _one_line_errors(cases, script):
  """Runs scripts/<script>.py with each case's arguments side by side; each
  must fail with one 'Error: ' line holding the case's text."""
  procs = [(subprocess.Popen(
      [sys.executable, f"scripts/{script}.py", *args], cwd=ROOT,
      env=child_env(JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True), expected)
           for args, expected in cases]
  for proc, expected in procs:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode not in (0, None), (proc.args, out[-2000:])
    assert "Traceback" not in err, (proc.args, err[-3000:])
    errors = [l for l in err.splitlines() if l.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], (proc.args, err)


def test_check_script_bad_input_is_one_line(gen, tmp_path):
  """scripts/check_pathfinder.py: settings out of range and images it
  cannot read end in one line naming the problem (they were tracebacks,
  or, for --num=0 and a threshold no pixel passes, a summary of nulls;
  --num=-5 silently checked all but 5 images)."""
  import shutil  # pylint: disable=g-import-not-at-top
  broken = str(tmp_path / "broken")
  shutil.copytree(gen["w1"], broken)
  paths, _, _ = pf.read_metadata(broken)
  with open(paths[0], "wb") as f:
    f.write(b"not a png")
  folder = gen["w1"]
  _one_line_errors([
      ([folder, "--num=0"], "--num must be >= 1, got 0"),
      ([folder, "--num=-5"], "--num must be >= 1, got -5"),
      ([folder, "--seed=-1"], "--seed must be >= 0"),
      ([folder, "--threshold=255"], "--threshold must be in 0..254"),
      ([folder, "--threshold=-1"], "--threshold must be in 0..254"),
      ([folder, "--resolution=128"], "image is (32, 32), expected 128x128"),
      ([broken, f"--num={N}"], "not a readable PNG image"),
  ], "check_pathfinder")


def test_cnn_script_bad_flags_are_one_line(gen, tmp_path):
  """scripts/pathfinder_cnn.py: flags the training cannot use are refused
  before any image is read (--batch_size=0 and --width=0 were tracebacks,
  --depth=0 silently trained a linear model on the mean pixel, a negative
  learning rate trained uphill), and a folder without images is not met
  with the trainer's advice to leave data_dir empty, which this script
  cannot follow."""
  folder = gen["w1"]
  _one_line_errors([
      ([folder, "--epochs=0"], "--epochs must be >= 1, got 0"),
      ([folder, "--batch_size=0"], "--batch_size must be >= 1, got 0"),
      ([folder, "--depth=0"], "--depth must be >= 1, got 0"),
      ([folder, "--learning_rate=-0.001"], "--learning_rate must be > 0"),
      ([str(tmp_path)], "Make one with `python -m htransformer.data."),
  ], "pathfinder_cnn")


def test_pathx_resolution(tmp_path):
  d = pf.generate(str(tmp_path), 128, 3, seed=0, workers=1)
  assert d.endswith(os.path.join("pathfinder128", "curv_contour_length_14"))
  srcs = pf.load_sources(d, 128)
  item = next(srcs[s] for s in ("train", "val", "test") if len(srcs[s]))[0]
  assert item["inputs"].shape == (16384,)


def test_preload_decodes_in_worker_processes(gen, monkeypatch):
  """decode_all with worker processes gives every image, in order."""
  paths, _, _ = pf.read_metadata(gen["w1"])
  serial = pf.decode_all(paths, 32, workers=1)
  monkeypatch.setattr(pf, "MIN_IMAGES_PER_WORKER", 4)
  parallel = pf.decode_all(paths, 32, workers=3)
  assert parallel.shape == (N, 1024) and parallel.dtype == np.uint8
  np.testing.assert_array_equal(parallel, serial)
  for i in (0, N - 1):
    np.testing.assert_array_equal(
        serial[i], png.decode(open(paths[i], "rb").read()).reshape(-1))
  assert pf.decode_all([], 32).shape == (0, 1024)


def test_data_origin_names_the_generator(tmp_path):
  """tasks.data_origin (results.json's "data") tells generated data from a
  folder of files, also when the generated folder is passed as data_dir."""
  from htransformer import tasks  # pylint: disable=g-import-not-at-top
  d = pf.generate(str(tmp_path / "gen"), 32, 3, seed=5, workers=1)
  origin = tasks.data_origin(d)
  assert origin["generated"] is True and origin["data_dir"] == d
  assert origin["generator"] == {"generator": "htransformer.data.pathfinder",
                                 "generator_version": pf.GENERATOR_VERSION,
                                 "seed": 5, "num_images": 3,
                                 "resolution": 32}
  os.makedirs(tmp_path / "release")
  assert tasks.data_origin(str(tmp_path / "release")) == {
      "data_dir": str(tmp_path / "release"), "generated": False}
  assert tasks.data_origin("tfds:cifar10")["generated"] is False


def test_generate_rejects_bad_args(tmp_path):
  with pytest.raises(ValueError, match="resolution"):
    pf.generate(str(tmp_path), 64, 3)
  with pytest.raises(ValueError, match="num_images"):
    pf.generate(str(tmp_path), 32, 0)


# --- PNG codec. ---


def _filtered_png(img, filters):
  """A gray PNG of `img` with the given filter type per row (reference)."""
  h, w = img.shape
  img = img.astype(np.int64)
  rows = []
  for y in range(h):
    f = filters[y % len(filters)]
    cur = img[y]
    prev = img[y - 1] if y else np.zeros(w, np.int64)
    left = np.concatenate([[0], cur[:-1]])
    ul = np.concatenate([[0], prev[:-1]])
    if f == 0:
      pred = np.zeros(w, np.int64)
    elif f == 1:
      pred = left
    elif f == 2:
      pred = prev
    elif f == 3:
      pred = (left + prev) // 2
    else:
      p = left + prev - ul
      pa, pb, pc = abs(p - left), abs(p - prev), abs(p - ul)
      pred = np.where((pa <= pb) & (pa <= pc), left,
                      np.where(pb <= pc, prev, ul))
    rows.append(bytes([f]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  return (b"\x89PNG\r\n\x1a\n"
          + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_png_roundtrip_and_all_filters():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (9, 13)).astype(np.uint8)
  np.testing.assert_array_equal(png.decode(png.encode_gray(img)), img)
  np.testing.assert_array_equal(
      png.decode(_filtered_png(img, [0, 1, 2, 3, 4])), img)
  with pytest.raises(ValueError, match="PNG"):
    png.decode(b"not a png")


def test_png_gray_with_alpha_reads_the_gray_channel(monkeypatch):
  """Colour type 4 (gray + alpha): the gray values, not the alpha, by
  Pillow and by the numpy decoder."""
  rng = np.random.default_rng(2)
  gray = rng.integers(0, 256, (6, 5)).astype(np.uint8)
  alpha = rng.integers(0, 256, (6, 5)).astype(np.uint8)
  rows = np.concatenate([np.zeros((6, 1), np.uint8),
                         np.stack([gray, alpha], -1).reshape(6, 10)], 1)
  header = struct.pack(">IIBBBBB", 5, 6, 8, 4, 0, 0, 0)
  data = (b"\x89PNG\r\n\x1a\n" + png._chunk(b"IHDR", header)
          + png._chunk(b"IDAT", zlib.compress(rows.tobytes()))
          + png._chunk(b"IEND", b""))
  np.testing.assert_array_equal(png.decode(data), gray)
  monkeypatch.setattr(png, "_PIL", None)
  np.testing.assert_array_equal(png.decode(data), gray)


@pytest.mark.parametrize("filters", [[0, 1, 2, 3, 4], [3], [4]])
def test_png_decoders_agree(monkeypatch, filters):
  """The Pillow path (when installed) and the numpy decoder give the same
  pixels, for every row filter, gray and colour."""
  pil = pytest.importorskip("PIL.Image")
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (40, 37)).astype(np.uint8)
  rgb = rng.integers(0, 256, (20, 23, 3)).astype(np.uint8)
  buf = io.BytesIO()
  pil.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=True)
  images = [_filtered_png(gray, filters), buf.getvalue()]
  fast = [png.decode(x) for x in images]
  monkeypatch.setattr(png, "_PIL", None)
  slow = [png.decode(x) for x in images]
  np.testing.assert_array_equal(fast[0], gray)
  np.testing.assert_array_equal(slow[0], gray)
  np.testing.assert_array_equal(fast[1], slow[1])
  assert fast[1].shape == (20, 23)


# --- Loader. ---


def test_find_data_dir_release_layout(gen, tmp_path):
  release = os.path.dirname(os.path.dirname(gen["w1"]))  # holds pathfinder32/
  cache = str(tmp_path / "cache")
  for d in (release, os.path.join(release, "pathfinder32"), gen["w1"]):
    assert pf.find_data_dir(d, cache, resolution=32) == gen["w1"]
  assert not os.path.exists(cache)
  with pytest.raises(FileNotFoundError, match="imgs"):
    pf.find_data_dir(release, cache, resolution=128)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pf.find_data_dir(str(tmp_path / "nope"), cache)


def test_find_data_dir_generates_once(gen, tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  d = pf.find_data_dir(None, cache, resolution=32, num_images=N, seed=0,
                       workers=1)
  folder = f"pathfinder32_seed0_24_cl14_v{pf.GENERATOR_VERSION}"
  assert d == os.path.join(cache, folder, "pathfinder32",
                           "curv_contour_length_14")
  assert os.listdir(cache) == [folder]
  assert _files(d) == _files(gen["w1"])
  monkeypatch.setattr(pf, "generate", lambda *a, **k: 1 / 0)
  assert pf.find_data_dir("", cache, resolution=32, num_images=N) == d


def test_loader_skips_empty_and_splits(gen, tmp_path):
  import shutil
  d = str(tmp_path / "copy")
  shutil.copytree(gen["w1"], d)
  open(os.path.join(d, "imgs", "0", "sample_3.png"), "wb").close()  # empty
  os.remove(os.path.join(d, "imgs", "0", "sample_7.png"))  # missing
  paths, labels, skipped = pf.read_metadata(d)
  assert skipped == 2 and len(paths) == N - 2
  assert not any(p.endswith(("sample_3.png", "sample_7.png")) for p in paths)
  srcs = pf.load_sources(d, 32, split_seed=0)
  sizes = {k: len(v) for k, v in srcs.items()}
  assert sum(sizes.values()) == N - 2
  assert sizes["train"] == round(0.8 * (N - 2))
  idx = pf.split_indices(N - 2, 0)
  assert sorted(np.concatenate(list(idx.values())).tolist()) == list(
      range(N - 2))
  np.testing.assert_array_equal(pf.split_indices(N - 2, 0)["test"],
                                idx["test"])
  lazy = pf.load_sources(d, 32, split_seed=0, preload=False)
  for split, src in srcs.items():
    for i in range(len(src)):
      item = src[i]
      x = item["inputs"]
      assert x.shape == (1024,) and x.dtype == np.int32
      assert x.min() >= 1 and x.max() <= 256  # pixel + 1: 0 stays padding
      path = paths[idx[split][i]]
      np.testing.assert_array_equal(
          x, png.decode(open(path, "rb").read()).reshape(-1).astype(np.int32) + 1)
      assert int(item["targets"]) == labels[idx[split][i]]
      np.testing.assert_array_equal(lazy[split][i]["inputs"], x)
  # The batched read (training) gives the items, preloaded or not.
  order = np.array([3, 0, 3, len(srcs["train"]) - 1])
  for source in (srcs["train"], lazy["train"]):
    batch = source.get_batch(order)
    for row, i in enumerate(order):
      np.testing.assert_array_equal(batch["inputs"][row],
                                    srcs["train"][int(i)]["inputs"])
      assert batch["targets"][row] == srcs["train"][int(i)]["targets"]
    assert batch["inputs"].dtype == np.int32
  src = pickle.loads(pickle.dumps(srcs["train"]))
  assert len(src) == sizes["train"]
  with pytest.raises(IndexError):
    src[len(src)]
  with pytest.raises(IndexError):
    src.get_batch([0, len(src)])


def test_cli(tmp_path):
  env = child_env()
  r = subprocess.run(
      [sys.executable, "-m", "htransformer.data.pathfinder",
       "--resolution=32", "--num_images=4", f"--output_dir={tmp_path}",
       "--seed=0", "--workers=1", "--contour_length=14"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "images/s" in r.stdout
  d = tmp_path / "pathfinder32" / "curv_contour_length_14"
  assert sorted(os.listdir(d / "imgs" / "0")) == [
      f"sample_{j}.png" for j in range(4)]


def test_cnn_script_learns_a_visible_label_and_reads_a_folder(gen):
  """scripts/pathfinder_cnn.py: on images whose label is a visible bright
  square its CNN must learn the label; on a generated folder it trains on
  the job's split and reports every epoch and the test accuracy."""
  module = load_script("pathfinder_cnn")
  rng = np.random.default_rng(0)

  def visible(n):
    labels = rng.integers(0, 2, n).astype(np.int32)
    pixels = rng.integers(0, 40, (n, 16, 16)).astype(np.uint8)
    for i in np.flatnonzero(labels):
      r, c = rng.integers(0, 12, 2)
      pixels[i, r:r + 4, c:c + 4] = 255
    return pixels, labels

  data = {"train": visible(512), "val": visible(200), "test": visible(200)}
  lines = []
  last = module.train(data, epochs=4, batch_size=32, learning_rate=3e-3,
                      width=8, depth=4, seed=0, log=lines.append)
  assert len(lines) == 4 and last["epoch"] == 4
  assert last["val_accuracy"] >= 0.9 and last["test_accuracy"] >= 0.9

  arrays = module.split_arrays(gen["w1"], 32)
  sources = pf.load_sources(gen["w1"], 32)
  for split, (pixels, labels) in arrays.items():
    assert pixels.shape == (len(sources[split]), 32, 32)
    np.testing.assert_array_equal(labels, sources[split].labels)
  last = module.train(arrays, epochs=1, batch_size=8, learning_rate=1e-3,
                      width=4, depth=2, seed=0, log=lambda s: None)
  assert 0.0 <= last["test_accuracy"] <= 1.0

  # --marker_contrast: the markers at 255, the snakes at the given value;
  # every marker stays lit, no pixel is lit that was not.
  pixels = arrays["train"][0]
  emphasised = module.emphasise_markers(pixels, 100)
  assert set(np.unique(emphasised)) == {0, 100, 255}
  np.testing.assert_array_equal(emphasised > 0, pixels > 20)
  for image, redrawn in zip(pixels, emphasised):
    markers = pf.read_markers(image)
    if markers is not None:  # Two markers: both found at 255.
      cores, n = ndimage.label(ndimage.binary_erosion(
          image > 20, pf.EIGHT_CONNECTED), pf.EIGHT_CONNECTED)
      assert n == 2 and (redrawn[cores > 0] == 255).all()
      assert (redrawn == 100).any()  # the snakes
