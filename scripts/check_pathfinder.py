#!/usr/bin/env python
r"""What a folder of Pathfinder images shows: labels, pixels, connectivity.

  python scripts/check_pathfinder.py DATA_DIR [--resolution=32] \
      [--contour_length=14] [--num=2000] [--seed=0]

DATA_DIR is anything the training job accepts as ``config.data_dir`` (the
LRA release root down to ``curv_contour_length_14/``, or a generated
folder). For ``--num`` images drawn at random it prints the label balance,
pixel statistics (lit fraction, mean intensity, lit 8-connected
components per image) and, per label, how often lit pixels join the two
markers (``pathfinder.read_markers``: markers are what survives a 3x3
erosion; images where it finds other than two are counted apart). On
generated 32 px images label 0 is never joined and label 1 always is.
It also looks for shortcuts, cues to the label that need no path
following: the lit fraction and the distance between the markers per
label, and how often the best single threshold on that distance is
right (generated 32 px images: ~55%). The same statistics for the LRA
release and for our images say how the two differ. The last line is the
summary as JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from scipy import ndimage  # noqa: E402

from htransformer.data import pathfinder  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
  """Defined when run as a script only: importing the module (the tests
  do) adds no flags beside other modules' ones."""
  flags.DEFINE_integer("resolution", 32,
                       "Image size (32 Pathfinder, 128 Path-X).")
  flags.DEFINE_integer("contour_length", 14, "Which curv_contour_length_<C>.")
  flags.DEFINE_integer("num", 2000, "Images to check (drawn at random).")
  flags.DEFINE_integer("seed", 0, "Seed of the draw.")
  flags.DEFINE_integer("threshold", pathfinder.LIT_THRESHOLD,
                       "Pixels above this count as lit.")


def summarize(folder: str, resolution: int, num: int, seed: int = 0,
              threshold: int = pathfinder.LIT_THRESHOLD) -> dict:
  """The statistics above for ``num`` random images of an image folder.
  ValueError for a setting out of range (num < 1, seed < 0, a threshold
  outside 0-254, which leaves every pixel lit or none), or an image or
  metadata file that cannot be read."""
  if num < 1:
    raise ValueError(f"--num must be >= 1, got {num}.")
  if seed < 0:
    raise ValueError(f"--seed must be >= 0, got {seed}.")
  if not 0 <= threshold <= 254:
    raise ValueError(f"--threshold must be in 0..254 (pixels are 0-255), "
                     f"got {threshold}.")
  paths, labels, skipped = pathfinder.read_metadata(folder)
  if not paths:
    raise SystemExit(f"{folder}: no readable images.")
  pick = np.random.default_rng(seed).permutation(len(paths))[:num]
  lit, mean, parts = [], [], []
  joined = {0: [], 1: []}
  lit_by, dist_by = {0: [], 1: []}, {0: [], 1: []}
  unread = 0
  for i in pick:
    image = pathfinder.read_image(paths[i], resolution)
    label = int(labels[i])
    on = image > threshold
    lit.append(on.mean())
    lit_by[label].append(on.mean())
    mean.append(image.mean())
    parts.append(ndimage.label(on, pathfinder.EIGHT_CONNECTED)[1])
    markers = pathfinder.read_markers(image, threshold)
    if markers is None:
      unread += 1
    else:
      joined[label].append(markers[0])
      dist_by[label].append(markers[1])
  rate = lambda xs: round(float(np.mean(xs)), 4) if len(xs) else None
  return {
      "folder": folder, "images": len(paths), "skipped": skipped,
      "checked": int(len(pick)), "label1_fraction": rate(labels[pick]),
      "lit_fraction": rate(lit), "mean_intensity": rate(mean),
      "components_per_image": rate(parts),
      "label0_joined": rate(joined[0]), "label0_read": len(joined[0]),
      "label1_joined": rate(joined[1]), "label1_read": len(joined[1]),
      "markers_not_found": unread,
      "label0_lit_fraction": rate(lit_by[0]),
      "label1_lit_fraction": rate(lit_by[1]),
      "label0_marker_distance": rate(dist_by[0]),
      "label1_marker_distance": rate(dist_by[1]),
      "marker_distance_accuracy": threshold_accuracy(dist_by[0],
                                                     dist_by[1])}


def threshold_accuracy(values0, values1) -> float | None:
  """How often the best single threshold on a value tells label 0 from
  label 1 (either side); 0.5 for a value that carries no cue (on balanced
  labels), 1.0 for one that separates them."""
  if not values0 or not values1:
    return None
  v = np.concatenate([values0, values1])
  y = np.concatenate([np.zeros(len(values0)), np.ones(len(values1))])
  order = np.argsort(v, kind="stable")
  v, y = v[order], y[order]
  # Splitting after k sorted values: label 0 below, 1 above (or reverse);
  # a threshold falls only between different values.
  zeros_below = np.concatenate([[0], np.cumsum(y == 0)])
  ones_above = np.sum(y) - np.concatenate([[0], np.cumsum(y)])
  right = (zeros_below + ones_above) / len(y)
  valid = np.concatenate([[True], v[1:] != v[:-1], [True]])
  return round(float(np.max(np.maximum(right, 1 - right)[valid])), 4)


def main(argv):
  if len(argv) != 2 or not argv[1]:
    raise app.UsageError("Usage: check_pathfinder.py DATA_DIR [flags]")
  try:
    folder = pathfinder.find_data_dir(
        argv[1], None, resolution=FLAGS.resolution,
        contour_length=FLAGS.contour_length)
  except FileNotFoundError as e:
    raise SystemExit(pathfinder.folder_error(e, argv[1])) from None
  try:
    s = summarize(folder, FLAGS.resolution, FLAGS.num, FLAGS.seed,
                  FLAGS.threshold)
  except ValueError as e:
    raise SystemExit(f"Error: {e}") from None
  print(f"{s['folder']}: {s['images']} images ({s['skipped']} skipped), "
        f"{s['checked']} checked, label 1 in {s['label1_fraction']}")
  print(f"pixels > {FLAGS.threshold}: {s['lit_fraction']} of the image; "
        f"mean intensity {s['mean_intensity']}; "
        f"{s['components_per_image']} lit components per image")
  print(f"markers joined by lit pixels: label 0 {s['label0_joined']} "
        f"(of {s['label0_read']}), label 1 {s['label1_joined']} "
        f"(of {s['label1_read']}); two markers not found in "
        f"{s['markers_not_found']}")
  print(f"shortcuts: lit fraction label 0 {s['label0_lit_fraction']}, "
        f"label 1 {s['label1_lit_fraction']}; marker distance label 0 "
        f"{s['label0_marker_distance']} px, label 1 "
        f"{s['label1_marker_distance']} px; the best threshold on the "
        f"distance is right in {s['marker_distance_accuracy']}")
  print(json.dumps(s))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
