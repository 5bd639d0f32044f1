#!/usr/bin/env python
r"""What a folder of Pathfinder images shows: labels, pixels, connectivity.

  python scripts/check_pathfinder.py DATA_DIR [--resolution=32] \
      [--contour_length=14] [--num=2000] [--seed=0]

DATA_DIR is anything the training job accepts as ``config.data_dir`` (the
LRA release root down to ``curv_contour_length_14/``, or a generated
folder). For ``--num`` images drawn at random it prints the label balance,
pixel statistics (lit fraction, mean intensity, lit 8-connected
components per image) and, per label, how often lit pixels join the two
markers (``pathfinder.markers_joined``: markers are what survives a 3x3
erosion; images where it finds other than two are counted apart). On
generated 32 px images label 0 is never joined and label 1 always is; the
same statistics for the LRA release and for our images say how the two
differ. The last line is the summary as JSON.
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
  flags.DEFINE_integer("threshold", 60, "Pixels above this count as lit.")


def summarize(folder: str, resolution: int, num: int, seed: int = 0,
              threshold: int = 60) -> dict:
  """The statistics above for ``num`` random images of an image folder."""
  paths, labels, skipped = pathfinder.read_metadata(folder)
  if not paths:
    raise SystemExit(f"{folder}: no readable images.")
  pick = np.random.default_rng(seed).permutation(len(paths))[:num]
  lit, mean, parts = [], [], []
  joined = {0: [], 1: []}
  unread = 0
  for i in pick:
    image = pathfinder.read_image(paths[i], resolution)
    label = int(labels[i])
    on = image > threshold
    lit.append(on.mean())
    mean.append(image.mean())
    parts.append(ndimage.label(on, np.ones((3, 3), int))[1])
    j = pathfinder.markers_joined(image, threshold)
    if j is None:
      unread += 1
    else:
      joined[label].append(j)
  rate = lambda xs: round(float(np.mean(xs)), 4) if len(xs) else None
  return {
      "folder": folder, "images": len(paths), "skipped": skipped,
      "checked": int(len(pick)), "label1_fraction": rate(labels[pick]),
      "lit_fraction": rate(lit), "mean_intensity": rate(mean),
      "components_per_image": rate(parts),
      "label0_joined": rate(joined[0]), "label0_read": len(joined[0]),
      "label1_joined": rate(joined[1]), "label1_read": len(joined[1]),
      "markers_not_found": unread}


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Usage: check_pathfinder.py DATA_DIR [flags]")
  try:
    folder = pathfinder.find_data_dir(
        argv[1], None, resolution=FLAGS.resolution,
        contour_length=FLAGS.contour_length)
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None
  s = summarize(folder, FLAGS.resolution, FLAGS.num, FLAGS.seed,
                FLAGS.threshold)
  print(f"{s['folder']}: {s['images']} images ({s['skipped']} skipped), "
        f"{s['checked']} checked, label 1 in {s['label1_fraction']}")
  print(f"pixels > {FLAGS.threshold}: {s['lit_fraction']} of the image; "
        f"mean intensity {s['mean_intensity']}; "
        f"{s['components_per_image']} lit components per image")
  print(f"markers joined by lit pixels: label 0 {s['label0_joined']} "
        f"(of {s['label0_read']}), label 1 {s['label1_joined']} "
        f"(of {s['label1_read']}); two markers not found in "
        f"{s['markers_not_found']}")
  print(json.dumps(s))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
