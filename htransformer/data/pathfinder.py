r"""Pathfinder and Path-X (Long Range Arena): seeded generator and loader.

Generator
---------
Linsley et al.'s "snakes" (NeurIPS 2018), as the Long Range Arena used
them. Each image holds two target snakes of `contour_length` short
dashes ("paddles"), a few short distractor snakes and two circular markers.
Label 1: both markers sit on the two ends of the same target snake; label 0:
one marker on an end of each target snake. Both target snakes are drawn in
every image, so only the markers' placement tells the labels apart.

Growth: a snake starts at a random point and direction. Each next paddle is
placed on a circle around a pivot half a gap ahead of the previous paddle's
end; its turn `d` relative to the previous direction is drawn among 16
(jittered) angles in (-pi / (2 c), pi / (2 c)) with weight
`max(cos(d * c), 0) ** 2` (c = continuity), restricted to positions inside
the image whose pixels do not touch the dilated mask of anything already
drawn (the snake's own previous paddle excepted, it is joined to the new
one). Masks are in the image's own pixels: a paddle or marker occupies
every pixel its disc may light, dilated by `margin` pixels, so different
snakes and markers are at least `margin` background pixels apart (a snake
can never appear to continue into another one). The ends of the first
target snake (future markers) are occupied before the second grows. No
valid position: the pair of target snakes is started again (a distractor
is dropped instead). The two marked ends are at least `seed_distance`
apart in both classes.

Drawing is anti-aliased by 2x supersampling (lines and markers drawn at
twice the resolution, then 2x2 averaged); a paddle's band, at least a
supersampled pixel each side of its centre line, is drawn at the intensity
that gives it the ink of its thickness (half the markers' at 32 px, three
quarters at 128 px), markers as solid discs; the image is normalised to
the full 0-255 range and saved as an 8-bit gray PNG
(htransformer/data/png.py). Markers are the brightest and widest things in
an image.

Parameters (32 px / 128 px): paddle length 2 / 5, thickness 0.5 / 1.5,
margin 1 / {2, 3} (drawn per image), seed distance 7 / 20, marker radius
1.5 / 3, continuity 1.0 / 1.8, contour length 14, distractor length 4,
5 / 8 distractors.

Deterministic: image i is a pure function of (seed, resolution, i, the
parameters); its label is drawn (fair coin) from the same stream. Images are
generated in worker processes (`workers`), which does not change the data.

Layout (the LRA release's, under OUTPUT_DIR):
  pathfinder{R}/curv_contour_length_{C}/imgs/<b>/sample_<j>.png
  pathfinder{R}/curv_contour_length_{C}/metadata/<b>.npy
with 1000 images per batch folder <b> (image i is batch i // 1000, j =
i % 1000). Despite its name a metadata file is TEXT, one line per image:
`imgs/<b> sample_<j>.png <j> <label> <contour_length> <distractor_length>
<num_distractors>` (the loader, like LRA's, reads columns 0, 1 and 3).

Loader
------
`find_data_dir` accepts the release root (holding pathfinder{R}/), the
pathfinder{R}/ folder, or the curv_contour_length_{C}/ folder itself. Every
metadata file is read (batches in numeric order, lines in file order);
images whose PNG is empty (the release has some 0-byte files) or missing
are skipped with a count in the log; a label other than 0 or 1, a metadata
file that is not text or an image that is not a readable PNG is an error
naming the file (and line). The examples are split 80/10/10 into
train/val/test by a permutation with a fixed seed (`split_seed`); each
split gets at least one (3 or more readable images are needed).

Tokens: pixel value + 1 (1..256), so that id 0 stays padding and black
pixels are never masked out of attention (the original code treated pixel
0 as padding). VOCAB_SIZE = 257.

CLI:
  python -m htransformer.data.pathfinder --resolution=32 --num_images=200000 \
      --output_dir=DIR --seed=0 [--workers=K] [--contour_length=14]
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import struct
import time
import zlib

import numpy as np
from absl import logging

from htransformer import data as data_lib
from htransformer.data import byte_source
from htransformer.data import cache
from htransformer.data import png

VOCAB_SIZE = 257  # pixel + 1; 0 = padding (never produced by an image)
NUM_CLASSES = 2
PIXEL_OFFSET = 1
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
IMAGES_PER_BATCH = 1000
METADATA_FILE = "pathfinder_generation.json"
# 2: occupancy in output pixels, so that different snakes (and markers)
# never touch (version 1's margins, in continuous coordinates, let them
# touch in most 32 px images).
# 3: paddles carry the ink of their thickness (half intensity at 32 px)
# instead of full intensity, so that markers stand out from snakes
# (version 2's markers were as bright as its snakes, and networks did not
# find them: docs/results.md).
GENERATOR_VERSION = 3
_SUPERSAMPLE = 2

# Per resolution: the LRA / Linsley parameters.
PARAMS = {
    32: dict(paddle_length=2.0, thickness=0.5, margin=(1.0,),
             seed_distance=7.0, marker_radius=1.5, continuity=1.0,
             distractor_length=4, num_distractors=5),
    128: dict(paddle_length=5.0, thickness=1.5, margin=(2.0, 3.0),
              seed_distance=20.0, marker_radius=3.0, continuity=1.8,
              distractor_length=4, num_distractors=8),
}
RESOLUTIONS = tuple(PARAMS)
_NUM_TURNS = 16
# Padding (supersampled pixels) around the drawing grids: more than the
# largest stamp radius (marker + margin) plus a candidate paddle's overshoot
# of the border (gap + paddle length), at every resolution.
_PAD = 48
_PAIR_ATTEMPTS = 200


def contour_dirname(contour_length: int) -> str:
  return f"curv_contour_length_{contour_length}"


def release_subdir(resolution: int, contour_length: int = 14) -> str:
  return os.path.join(f"pathfinder{resolution}",
                      contour_dirname(contour_length))


# ----------------------------------------------------------------------------
# Drawing.
# ----------------------------------------------------------------------------


class _Canvas:
  """Supersampled intensity canvas plus the occupancy ("forbidden") mask.

  A segment of radius r covers the supersampled pixels whose centres lie
  within r of one of its points (sampled every quarter of a supersampled
  pixel).
  """

  def __init__(self, resolution: int):
    self.res = resolution
    self.size = resolution * _SUPERSAMPLE
    # Both grids have _PAD pixels of padding on every side (wider than any
    # stamp or candidate overshoot), so no index needs a bounds check.
    self.full = self.size + 2 * _PAD
    self.image = np.zeros((self.full, self.full), np.float32)
    # Occupancy at the image's own resolution (output pixels, padded).
    self.pad_px = _PAD // _SUPERSAMPLE
    self.forbidden = np.zeros((resolution + 2 * self.pad_px,) * 2, bool)
    self._discs = {}
    self._fracs = {}

  def _box(self, radius):
    """Offsets (dy, dx) [m, 2] of the pixels that can lie within `radius`."""
    key = round(radius, 6)
    if key not in self._discs:
      k = int(math.ceil(radius * _SUPERSAMPLE)) + 1
      d = np.arange(-k, k + 1)
      dy, dx = np.meshgrid(d, d, indexing="ij")
      self._discs[key] = np.stack([dy.ravel(), dx.ravel()], axis=1)
    return self._discs[key]

  def _stamp_indices(self, starts, ends, radius):
    """Flat indices of the pixels whose centres lie within `radius` (image
    px) of a point sampled every quarter supersampled pixel along the
    segments [m, 2] -> [m, 2]."""
    starts = np.asarray(starts, np.float64).reshape(-1, 2)
    ends = np.asarray(ends, np.float64).reshape(-1, 2)
    n = int(math.ceil(np.max(np.abs(ends - starts)) * _SUPERSAMPLE * 4)) + 1
    frac = self._fracs.get(n)
    if frac is None:
      frac = self._fracs[n] = np.linspace(0.0, 1.0, n)[None, :, None]
    pts = (starts[:, None] + frac * (ends - starts)[:, None]).reshape(-1, 2)
    # Padded pixel i has its centre at i (image coordinate x -> x*S-0.5+PAD).
    pts = pts * _SUPERSAMPLE + (_PAD - 0.5)
    base = np.round(pts).astype(np.int64)
    box = self._box(radius)
    iy = base[:, 1:2] + box[None, :, 0]
    ix = base[:, 0:1] + box[None, :, 1]
    r = radius * _SUPERSAMPLE
    ok = (iy - pts[:, 1:2]) ** 2 + (ix - pts[:, 0:1]) ** 2 <= r * r
    return (iy * self.full + ix)[ok]

  def _pixels(self, points, radius, grow=0):
    """(rows, cols) in the padded occupancy grid of the output pixels that
    a disc of ``radius`` around each point [..., 2] may light (its bounding
    square: a superset of what ``draw`` lights), grown by ``grow`` pixels
    on every side; [..., K, K] each (repeats allowed)."""
    lo = np.floor(points - radius).astype(np.int64) - grow + self.pad_px
    hi = np.floor(points + radius).astype(np.int64) + grow + self.pad_px
    k = int(math.ceil(2 * radius)) + 1 + 2 * grow
    off = np.arange(k)
    xs = np.minimum(lo[..., 0, None] + off, hi[..., 0, None])  # [..., K]
    ys = np.minimum(lo[..., 1, None] + off, hi[..., 1, None])
    return ys[..., :, None], xs[..., None, :]

  def mark(self, points, radius, grow, grid):
    """Occupies the pixels of discs around points [..., 2], grown."""
    rows, cols = self._pixels(np.asarray(points, np.float64), radius, grow)
    grid[rows, cols] = True

  def draw(self, starts, ends, radius, value=1.0):
    flat = self.image.reshape(-1)
    idx = self._stamp_indices(starts, ends, radius)
    flat[idx] = np.maximum(flat[idx], value)

  def touches(self, points, radius, grid):
    """bool per point [..., 2]: does its disc of ``radius`` light an
    occupied pixel of ``grid``?"""
    rows, cols = self._pixels(np.asarray(points, np.float64), radius)
    return grid[rows, cols].any(axis=(-2, -1))

  def is_free(self, points, radius, border, forbidden=None):
    """bool per row of points [k, n, 2] (discs of ``radius``): inside the
    border and lighting no occupied pixel."""
    forbidden = self.forbidden if forbidden is None else forbidden
    inside = ((points.min(axis=(1, 2)) >= border)
              & (points.max(axis=(1, 2)) <= self.res - border))
    return inside & ~self.touches(points, radius, forbidden).any(axis=1)

  def to_uint8(self) -> np.ndarray:
    s = _SUPERSAMPLE
    n = self.res
    img = self.image[_PAD:_PAD + self.size, _PAD:_PAD + self.size]
    img = img.reshape(n, s, n, s).mean(axis=(1, 3))
    peak = img.max()
    if peak > 0:
      img = img / peak
    return np.round(img * 255.0).astype(np.uint8)


class _Generator:
  """Draws one image with the parameters of a resolution."""

  def __init__(self, resolution, rng, contour_length, p):
    self.res = resolution
    self.rng = rng
    self.contour_length = contour_length
    self.length = p["paddle_length"]
    self.thickness = p["thickness"]
    self.margin = float(rng.choice(p["margin"]))
    self.gap = self.margin
    self.seed_distance = p["seed_distance"]
    self.marker_radius = p["marker_radius"]
    self.continuity = p["continuity"]
    self.distractor_length = p["distractor_length"]
    self.num_distractors = p["num_distractors"]
    self.draw_radius = self.thickness / 2 + 0.5 / _SUPERSAMPLE
    # A paddle's band is 2 * draw_radius wide (at least a supersampled
    # pixel each side of its centre line, so that it is never lost between
    # pixel centres); drawn at this intensity it carries the ink of its
    # true thickness (0.5 / 1.0 at 32 px: half the markers' intensity).
    self.paddle_value = min(1.0, self.thickness / (2 * self.draw_radius))
    # What is drawn occupies its pixels plus `margin` pixels around them.
    self.grow = int(math.ceil(self.margin))
    self.border = self.margin
    self.n_points = int(math.ceil(self.length / 0.25)) + 1
    self.along = np.linspace(0.0, 1.0, self.n_points)[:, None]
    half = math.pi / (2 * self.continuity)
    self.turn_step = 2 * half / _NUM_TURNS
    self.turns = -half + self.turn_step * (np.arange(_NUM_TURNS) + 0.5)
    self.canvas = _Canvas(resolution)

  def _grow(self, start, theta, n_paddles, forbidden):
    """Paddles [(a, b)] of one snake, or None; marks `forbidden` (lag 1)."""
    rng = self.rng
    u = np.array([math.cos(theta), math.sin(theta)])
    a = np.asarray(start, np.float64)
    b = a + self.length * u
    first = (a + self.along * (b - a))[None]
    if not self.canvas.is_free(first, self.draw_radius, self.border,
                               forbidden)[0]:
      return None
    paddles = [(a, b)]
    frac = self.along[None]
    jitter = rng.uniform(-0.5, 0.5, (n_paddles, _NUM_TURNS)) * self.turn_step
    picks = rng.random(n_paddles)
    for step in range(1, n_paddles):
      a_prev, b_prev = paddles[-1]
      pivot = b_prev + (self.gap / 2) * u
      turns = self.turns + jitter[step]
      angles = theta + turns
      dirs = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [k, 2]
      starts = pivot[None] + (self.gap / 2) * dirs
      ends = starts + self.length * dirs
      pts = starts[:, None] + frac * (ends - starts)[:, None]  # [k, n, 2]
      free = self.canvas.is_free(pts, self.draw_radius, self.border,
                                 forbidden)
      weights = np.maximum(np.cos(turns * self.continuity), 0.0) ** 2 * free
      total = weights.sum()
      if total <= 0:
        return None
      k = min(int(np.searchsorted(np.cumsum(weights), picks[step] * total,
                                  side="right")), _NUM_TURNS - 1)
      # Commit the previous paddle (the new one starts next to it).
      self._occupy(a_prev, b_prev, forbidden)
      theta = float(angles[k])
      u = dirs[k]
      paddles.append((starts[k], ends[k]))
    self._occupy(*paddles[-1], forbidden)
    return paddles

  def _occupy(self, a, b, grid):
    self.canvas.mark(a + self.along * (b - a), self.draw_radius, self.grow,
                     grid)

  def _occupy_ends(self, ends, grid):
    self.canvas.mark(np.asarray(ends), self.marker_radius, self.grow, grid)

  def _random_start(self):
    lo = self.border + self.marker_radius
    xy = self.rng.uniform(lo, self.res - lo, 2)
    return xy, self.rng.uniform(0, 2 * math.pi)

  def _targets(self):
    for _ in range(_PAIR_ATTEMPTS):
      forbidden = np.zeros_like(self.canvas.forbidden)
      start_a, theta_a = self._random_start()
      snake_a = self._grow(start_a, theta_a, self.contour_length, forbidden)
      if snake_a is None:
        continue
      ends_a = (snake_a[0][0], snake_a[-1][1])
      if np.linalg.norm(ends_a[0] - ends_a[1]) < self.seed_distance:
        continue
      # Either end of either snake may get a marker: snake b keeps its
      # margin from a's possible markers, and its own from a.
      self._occupy_ends(ends_a, forbidden)
      for _ in range(20):
        start_b, theta_b = self._random_start()
        if min(np.linalg.norm(start_b - e) for e in ends_a) < (
            self.seed_distance):
          continue
        trial = forbidden.copy()
        snake_b = self._grow(start_b, theta_b, self.contour_length, trial)
        if snake_b is None:
          continue
        ends_b = (snake_b[0][0], snake_b[-1][1])
        if min([np.linalg.norm(x - y) for x in ends_a for y in ends_b]
               + [np.linalg.norm(ends_b[0] - ends_b[1])]) < (
                   self.seed_distance):
          continue
        # b's possible markers keep their margin from a.
        if self.canvas.touches(ends_b, self.marker_radius, forbidden).any():
          continue
        self._occupy_ends(ends_b, trial)
        self.canvas.forbidden = trial
        return snake_a, snake_b
    raise RuntimeError("Pathfinder: could not place the two target snakes "
                       f"in {_PAIR_ATTEMPTS} attempts.")

  def image(self, label: int) -> np.ndarray:
    rng = self.rng
    snake_a, snake_b = self._targets()
    ends_a = [snake_a[0][0], snake_a[-1][1]]
    ends_b = [snake_b[0][0], snake_b[-1][1]]
    if rng.random() < 0.5:  # which snake gets the first marker
      ends_a, ends_b = ends_b, ends_a
    first = ends_a[rng.integers(2)]
    if label:
      second = ends_a[1] if first is ends_a[0] else ends_a[0]
    else:
      second = ends_b[rng.integers(2)]
    markers = (first, second)
    distractors = []
    for _ in range(self.num_distractors):
      for _ in range(10):
        start, theta = self._random_start()
        trial = self.canvas.forbidden.copy()
        snake = self._grow(start, theta, self.distractor_length, trial)
        if snake is not None:
          self.canvas.forbidden = trial
          distractors.append(snake)
          break
    segments = [p for snake in (snake_a, snake_b, *distractors)
                for p in snake]
    self.canvas.draw([a for a, _ in segments], [b for _, b in segments],
                     self.draw_radius, self.paddle_value)
    self.canvas.draw(markers, markers, self.marker_radius)
    return self.canvas.to_uint8()


def image_rng(seed: int, resolution: int, index: int) -> np.random.Generator:
  return np.random.default_rng(
      np.random.SeedSequence(seed, spawn_key=(resolution, index)))


def make_image(seed: int, resolution: int, index: int,
               contour_length: int = 14) -> tuple[np.ndarray, int]:
  """Image `index` of the dataset (seed, resolution): (uint8 [R, R], label)."""
  if resolution not in PARAMS:
    raise ValueError(f"resolution must be one of {RESOLUTIONS}, got "
                     f"{resolution}.")
  rng = image_rng(seed, resolution, index)
  label = int(rng.integers(2))
  gen = _Generator(resolution, rng, contour_length, PARAMS[resolution])
  return gen.image(label), label


def _batch_paths(index: int) -> tuple[str, str]:
  b, j = divmod(index, IMAGES_PER_BATCH)
  return f"imgs/{b}", f"sample_{j}.png"


def _generate_range(args):
  """Worker: writes images [lo, hi); returns their metadata lines."""
  root, seed, resolution, contour_length, lo, hi = args
  p = PARAMS[resolution]
  lines = []
  for i in range(lo, hi):
    img, label = make_image(seed, resolution, i, contour_length)
    sub, name = _batch_paths(i)
    with open(os.path.join(root, sub, name), "wb") as f:
      f.write(png.encode_gray(img))
    j = i % IMAGES_PER_BATCH
    lines.append((i, f"{sub} {name} {j} {label} {contour_length} "
                  f"{p['distractor_length']} {p['num_distractors']}\n"))
  return lines


def _default_workers() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:
    return max(1, os.cpu_count() or 1)


def check_settings(resolution: int, num_images: int, contour_length: int, *,
                   nonempty: bool = False) -> None:
  """ValueError naming the setting the generator cannot take.
  ``nonempty``: enough images that train, val and test each get one (a
  training run reads all three; ``split_indices``)."""
  if resolution not in PARAMS:
    raise ValueError(f"resolution must be one of {RESOLUTIONS}, got "
                     f"{resolution}.")
  least = len(SPLITS) if nonempty else 1
  if num_images < least:
    raise ValueError(
        f"num_images must be >= {least}"
        f"{' (one image per split at least)' if nonempty else ''}, got "
        f"{num_images}.")
  if contour_length < 2:
    raise ValueError(f"contour_length must be >= 2, got {contour_length}.")


def generate(output_dir: str, resolution: int, num_images: int, seed: int = 0,
             contour_length: int = 14, workers: int | None = None) -> str:
  """Writes the release layout under output_dir; returns the image folder.

  The folder is output_dir/pathfinder{R}/curv_contour_length_{C}/.
  Deterministic in (seed, resolution, num_images, contour_length);
  independent of `workers` (default: the number of usable CPUs).
  """
  check_settings(resolution, num_images, contour_length)
  data_lib.check_output_dir(output_dir)
  workers = _default_workers() if not workers else int(workers)
  root = os.path.join(output_dir, release_subdir(resolution, contour_length))
  num_batches = -(-num_images // IMAGES_PER_BATCH)
  for b in range(num_batches):
    os.makedirs(os.path.join(root, "imgs", str(b)), exist_ok=True)
  os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
  start = time.time()
  logging.info("Generating %d Pathfinder images (%d px, contour length %d, "
               "seed %d) into %s with %d worker(s).", num_images, resolution,
               contour_length, seed, root, workers)
  chunk = max(1, min(250, -(-num_images // (4 * workers))))
  jobs = [(root, seed, resolution, contour_length, lo,
           min(lo + chunk, num_images)) for lo in range(0, num_images, chunk)]
  lines = {}
  if workers <= 1:
    results = map(_generate_range, jobs)
    for r in results:
      lines.update(r)
  else:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=data_lib.ignore_interrupts) as pool:
      done = 0
      last = start
      for r in pool.imap_unordered(_generate_range, jobs):
        lines.update(r)
        done += len(r)
        if time.time() - last > 10:
          last = time.time()
          logging.info("Pathfinder: %d/%d images (%.0f s).", done,
                       num_images, last - start)
  labels = np.zeros(2, np.int64)
  for b in range(num_batches):
    with open(os.path.join(root, "metadata", f"{b}.npy"), "w") as f:
      for i in range(b * IMAGES_PER_BATCH,
                     min((b + 1) * IMAGES_PER_BATCH, num_images)):
        f.write(lines[i])
        labels[int(lines[i].split()[3])] += 1
  elapsed = time.time() - start
  meta = {"generator": "htransformer.data.pathfinder",
          "generator_version": GENERATOR_VERSION, "seed": int(seed),
          "resolution": int(resolution), "num_images": int(num_images),
          "contour_length": int(contour_length),
          "params": {k: list(v) if isinstance(v, tuple) else v
                     for k, v in PARAMS[resolution].items()},
          "label_counts": labels.tolist(), "seconds": round(elapsed, 2),
          "images_per_second": round(num_images / max(elapsed, 1e-9), 1),
          "workers": workers}
  with open(os.path.join(root, METADATA_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  logging.info("Pathfinder: wrote %d images to %s in %.1f s (labels %s).",
               num_images, root, elapsed, labels.tolist())
  return root


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def _is_image_dir(folder: str) -> bool:
  return (os.path.isdir(os.path.join(folder, "metadata"))
          and os.path.isdir(os.path.join(folder, "imgs")))


def _candidates(data_dir, resolution, contour_length):
  c = contour_dirname(contour_length)
  sub = release_subdir(resolution, contour_length)
  return [data_dir, os.path.join(data_dir, c), os.path.join(data_dir, sub),
          os.path.join(data_dir, "lra_release", sub)]


# The trainer's advice that ends ``find_data_dir``'s error for a folder
# without images (``folder_error`` takes it off).
_GENERATE_ADVICE = " Leave data_dir empty to generate the data."


def folder_error(error: FileNotFoundError, data_dir: str) -> str:
  """The one-line error of a script that reads a Pathfinder folder
  (``scripts/check_pathfinder.py``, ``pathfinder_cnn.py``) for
  ``find_data_dir``'s ``error``: the trainer's advice (an empty data_dir
  generates) replaced by how to make the folder."""
  message = str(error).removesuffix(_GENERATE_ADVICE)
  return (f"Error: {message} Make one with `python -m "
          f"htransformer.data.pathfinder --output_dir={data_dir} ...`, or "
          "point at the LRA release.")


def find_data_dir(data_dir: str | None, cache_dir: str | None,
                  resolution: int = 32, num_images: int = 200000,
                  seed: int = 0, contour_length: int = 14,
                  workers: int | None = None) -> str:
  """The folder holding imgs/ and metadata/ (curv_contour_length_{C}/).

  With `data_dir`: that folder, its curv_contour_length_{C}/, its
  pathfinder{R}/curv_contour_length_{C}/ or lra_release/pathfinder{R}/...;
  FileNotFoundError if none exists. Without: generates once into
  cache_dir/pathfinder{R}_seed{S}_{N}_cl{C}/ and returns its image folder.
  """
  sub = release_subdir(resolution, contour_length)
  if data_dir:
    byte_source.check_data_dir(
        data_dir, "Pathfinder", f"the LRA release root or a folder with "
        f"{sub}/imgs and metadata")
    for folder in _candidates(data_dir, resolution, contour_length):
      if _is_image_dir(folder):
        return folder
    raise FileNotFoundError(
        f"Pathfinder data_dir {data_dir} holds no imgs/ and metadata/: "
        f"looked in it, in {contour_dirname(contour_length)}/, {sub}/ and "
        f"lra_release/{sub}/.{_GENERATE_ADVICE}")
  if not cache_dir:
    raise ValueError("find_data_dir needs a cache_dir when data_dir is empty "
                     "(the generated Pathfinder data is written there).")
  name = (f"pathfinder{resolution}_seed{seed}_{num_images}_cl{contour_length}"
          f"_v{GENERATOR_VERSION}")
  final = os.path.join(cache_dir, name)
  if cache.is_complete(final):
    logging.info("Using generated Pathfinder data in %s.", final)
    return os.path.join(final, sub)
  cache.build_once(cache_dir, name, lambda folder: generate(
      folder, resolution, num_images, seed=seed,
      contour_length=contour_length, workers=workers))
  return os.path.join(final, sub)


def read_metadata(folder: str) -> tuple[list[str], np.ndarray, int]:
  """(image paths, int32 labels, number skipped) for an image folder.

  Reads every metadata/<b>.npy (text) in numeric order of <b>; skips images
  whose file is missing or empty.
  """
  meta_dir = os.path.join(folder, "metadata")
  names = [n for n in os.listdir(meta_dir) if n.lower().endswith(".npy")]
  names.sort(key=lambda n: (int(n[:-4]) if n[:-4].isdigit() else 10**12, n))
  paths, labels, skipped = [], [], 0
  for n in names:
    meta_path = os.path.join(meta_dir, n)
    with open(meta_path, "rb") as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          raise ValueError(
              f"{meta_path}:{lineno}: not text (a metadata file is a text "
              "file of 'subdir filename index label ...' lines despite its "
              f".npy name), got {raw[:60]!r}.") from None
        parts = line.split()
        if not parts:
          continue
        if len(parts) < 4:
          raise ValueError(f"{meta_path}:{lineno}: expected 'subdir "
                           f"filename index label ...', got {line[:120]!r}.")
        if parts[3] not in ("0", "1"):
          raise ValueError(f"{meta_path}:{lineno}: label {parts[3][:20]!r} "
                           "is not 0 or 1.")
        path = os.path.join(folder, parts[0], parts[1])
        try:
          size = os.path.getsize(path)
        except OSError:
          size = 0
        if size == 0:
          skipped += 1
          continue
        paths.append(path)
        labels.append(int(parts[3]))
  if skipped:
    logging.warning("Pathfinder %s: skipped %d missing or empty images.",
                    folder, skipped)
  return paths, np.asarray(labels, np.int32), skipped


def split_indices(n: int, split_seed: int = 0) -> dict[str, np.ndarray]:
  """80/10/10 train/val/test indices by a permutation with a fixed seed.

  Sizes: train round(0.8 n), val round(0.1 n), test the rest; from 3
  examples on, val and test get at least one each, taken from train (4
  examples: 2/1/1, not 3/0/1).
  """
  split_seed = data_lib.check_seed(split_seed, "config.data.split_seed")
  perm = np.random.default_rng(split_seed).permutation(n)
  n_train = int(round(n * SPLIT_FRACTIONS[0]))
  n_val = int(round(n * SPLIT_FRACTIONS[1]))
  if n >= len(SPLITS):
    n_val = max(n_val, 1)
    n_train = min(n_train, n - n_val - 1)
  return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
          "test": perm[n_train + n_val:]}


def read_image(path: str, resolution: int | None = None) -> np.ndarray:
  """uint8 [h, w] pixels of a PNG; ValueError naming the file if it is not
  a readable PNG (corrupt, truncated) or not resolution x resolution."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    img = png.decode(data)
  except (ValueError, zlib.error, struct.error) as e:
    raise ValueError(f"{path}: not a readable PNG image ({e}).") from None
  if resolution is not None and img.shape != (resolution, resolution):
    raise ValueError(f"{path}: image is {img.shape}, expected "
                     f"{resolution}x{resolution}.")
  return img


# 8-connectivity for scipy.ndimage (erosion, labelling).
EIGHT_CONNECTED = np.ones((3, 3), int)
# Pixels above this count as lit: every drawn pixel (a half-intensity
# paddle's thin diagonal steps fall to 32 at 32 px).
LIT_THRESHOLD = 20


def marker_cores(image: np.ndarray, threshold: int = LIT_THRESHOLD
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(lit, cores): bool masks of the lit pixels and of what survives a 3x3
  erosion of them, the markers' cores (a snake is too thin to)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  lit = np.asarray(image) > threshold
  return lit, ndimage.binary_erosion(lit, EIGHT_CONNECTED)


def read_markers(image: np.ndarray, threshold: int = LIT_THRESHOLD
                 ) -> tuple[bool, float] | None:
  """What a 32 px image shows, read from its pixels alone: whether lit
  pixels (> threshold, 8-connected) join the two markers, and the pixels
  between the markers' centres. The markers are what survives a 3x3
  erosion of the lit pixels (a snake is too thin to); None unless exactly
  two are found. In generated 32 px images "joined" equals the label; at
  128 px a snake's gaps show, so label-1 markers need not be joined. The
  distance is a label cue if it differs between the labels."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  lit, cores = marker_cores(image, threshold)
  cores, n = ndimage.label(cores, EIGHT_CONNECTED)
  if n != 2:
    return None
  parts, _ = ndimage.label(lit, EIGHT_CONNECTED)
  joined = bool(parts[cores == 1][0] == parts[cores == 2][0])
  (y1, x1), (y2, x2) = (np.argwhere(cores == i).mean(0) for i in (1, 2))
  return joined, float(np.hypot(y1 - y2, x1 - x2))


def markers_joined(image: np.ndarray, threshold: int = LIT_THRESHOLD
                   ) -> bool | None:
  """``read_markers``' first answer: lit pixels join the two markers."""
  markers = read_markers(image, threshold)
  return None if markers is None else markers[0]


MIN_IMAGES_PER_WORKER = 2000  # Fewer: decoding in this process is faster.


def _decode_range(args) -> np.ndarray:
  paths, resolution = args
  out = np.empty((len(paths), resolution * resolution), np.uint8)
  for i, p in enumerate(paths):
    out[i] = read_image(p, resolution).reshape(-1)
  return out


def decode_all(paths, resolution: int, workers: int | None = None
               ) -> np.ndarray:
  """uint8 [len(paths), R*R]: every image decoded, in worker processes when
  there are many (decoding is CPU-bound: ~0.5 ms per 128 px image)."""
  paths = list(paths)
  workers = _default_workers() if not workers else int(workers)
  workers = min(workers, max(1, len(paths) // MIN_IMAGES_PER_WORKER))
  if workers <= 1:
    return _decode_range((paths, resolution))
  out = np.empty((len(paths), resolution * resolution), np.uint8)
  start = time.time()
  chunk = -(-len(paths) // (8 * workers))
  ranges = [(i, min(i + chunk, len(paths)))
            for i in range(0, len(paths), chunk)]
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers, initializer=data_lib.ignore_interrupts) as pool:
    for (a, b), pixels in zip(ranges, pool.imap(
        _decode_range, [(paths[a:b], resolution) for a, b in ranges])):
      out[a:b] = pixels
  logging.info("Decoded %d images of %d px in %.1f s with %d processes.",
               len(paths), resolution, time.time() - start, workers)
  return out


class PathfinderSource:
  """grain RandomAccessDataSource over some images of an image folder.

  Item i: {"inputs": int32[R*R] (row-major pixels + 1; never 0),
  "targets": int32}. With `preload` every image is decoded once at
  construction (uint8, R*R bytes each); otherwise on access.
  """

  def __init__(self, paths, labels, resolution: int, preload: bool = True):
    self._paths = list(paths)
    self.labels = np.asarray(labels, np.int32)
    self.resolution = int(resolution)
    self._pixels = None
    if preload:
      self._pixels = decode_all(self._paths, self.resolution)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    index = byte_source.check_index(index, len(self.labels))
    if self._pixels is not None:
      pixels = self._pixels[index]
    else:
      pixels = read_image(self._paths[index], self.resolution).reshape(-1)
    return {"inputs": pixels.astype(np.int32) + PIXEL_OFFSET,
            "targets": np.int32(self.labels[index])}

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    """Items ``indices`` stacked (what the training pipeline reads)."""
    if self._pixels is None:
      return byte_source.stack_items([self[int(i)] for i in indices])
    return byte_source.pixel_batch(self._pixels, self.labels, indices,
                                   PIXEL_OFFSET)

  def __repr__(self):
    return (f"PathfinderSource(resolution={self.resolution}, "
            f"size={len(self)})")


def _preload_budget() -> int:
  """Bytes of pixels worth keeping in memory: a quarter of what is free."""
  try:
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    free = 0
  return max(2 * 2**30, free // 4)


def load_sources(folder: str, resolution: int, split_seed: int = 0,
                 preload: bool | None = None) -> dict[str, PathfinderSource]:
  """{'train', 'val', 'test'} -> PathfinderSource (80/10/10 split).

  preload (decode every image once, in worker processes, and keep the
  pixels in memory: batches then cost one indexing operation instead of a
  PNG decode per image) defaults to True when all pixels fit in a quarter
  of the host's available memory, and at least when they take under 2 GB
  (Path-X's 200,000 images take 3.3 GB).
  """
  paths, labels, skipped = read_metadata(folder)
  if not paths:
    raise FileNotFoundError(f"Pathfinder folder {folder} has no readable "
                            "images.")
  splits = split_indices(len(paths), split_seed)
  data_lib.check_nonempty(
      {s: len(idx) for s, idx in splits.items()}, "images",
      lambda s: (f"Pathfinder folder {folder} ({len(paths)} readable "
                 f"image(s), {skipped} missing or empty skipped; at least "
                 f"{len(SPLITS)} are needed)"))
  if preload is None:
    preload = len(paths) * resolution * resolution < _preload_budget()
  out = {}
  for split, idx in splits.items():
    out[split] = PathfinderSource([paths[i] for i in idx], labels[idx],
                                  resolution, preload=preload)
  return out


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------


def _define_flags():
  from absl import flags
  flags.DEFINE_enum("resolution", "32", ["32", "128"],
                    "Image size: 32 (Pathfinder) or 128 (Path-X).")
  flags.DEFINE_integer("num_images", 200000, "Number of images.")
  flags.DEFINE_string("output_dir", None, "Root folder (the LRA layout "
                      "pathfinder{R}/curv_contour_length_{C}/ is made in it).")
  flags.DEFINE_integer("seed", 0, "Seed: the data is a function of it.")
  flags.DEFINE_integer("workers", None, "Worker processes (default: usable "
                       "CPUs). Does not change the data.")
  flags.DEFINE_integer("contour_length", 14, "Paddles per target snake.")
  flags.mark_flag_as_required("output_dir")
  return flags.FLAGS


def _main(argv):
  del argv
  f = _FLAGS
  root = generate(f.output_dir, int(f.resolution), f.num_images, seed=f.seed,
                  contour_length=f.contour_length, workers=f.workers)
  with open(os.path.join(root, METADATA_FILE)) as fh:
    meta = json.load(fh)
  print(f"Wrote {meta['num_images']} images to {root} in {meta['seconds']} s "
        f"({meta['images_per_second']} images/s, labels "
        f"{meta['label_counts']}).")


if __name__ == "__main__":
  from absl import app
  _FLAGS = _define_flags()
  app.run(lambda argv: data_lib.run_cli(_main, argv))
