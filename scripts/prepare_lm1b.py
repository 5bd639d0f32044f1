r"""Downloads and prepares tfds ``lm1b`` in ArrayRecord format (once).

Needs TensorFlow, tensorflow-datasets and the internet (about 1.8 GB to
download), so run it where those are available:

  pip install tensorflow-cpu tensorflow-datasets
  python scripts/prepare_lm1b.py --data_dir=/data/tfds

Afterwards training reads the prepared files through ``tfds.data_source``
with neither TensorFlow nor the internet (tensorflow-datasets is still
needed); copy DATA_DIR/lm1b to the training hosts and pass
``--config.data_dir=DATA_DIR`` to ``configs/lm1b.py``.

Without tensorflow-datasets or TensorFlow (checked before the download:
tfds's lm1b builder reads the downloaded archive with TensorFlow), without
the internet, or with a DATA_DIR that is not a folder, it stops with one
line that says which.
"""

import argparse
import os
import sys


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True,
                      help="tfds data directory to write lm1b into.")
  args = parser.parse_args()
  if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
    sys.exit(f"Error: --data_dir {args.data_dir} exists and is not a folder.")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    sys.exit(f"Error: preparing lm1b needs tensorflow-datasets ({e}): "
             "pip install tensorflow-cpu tensorflow-datasets")
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    sys.exit(f"Error: preparing lm1b needs TensorFlow ({e}), which tfds's "
             "lm1b builder reads the downloaded archive with; nothing was "
             "downloaded: pip install tensorflow-cpu")
  try:
    builder = tfds.builder("lm1b", data_dir=args.data_dir,
                           file_format="array_record")
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    text = " ".join(str(e).split())[:500]
    sys.exit(f"Error: preparing lm1b in {args.data_dir} failed "
             f"({type(e).__name__}: {text}). It downloads about 1.8 GB and "
             "needs TensorFlow: run it on a host with both.")
  for split in ("train", "test"):
    source = tfds.data_source("lm1b", split=split, data_dir=args.data_dir)
    print(f"lm1b {split}: {len(source):,} sentences, e.g. {source[0]}")


if __name__ == "__main__":
  main()
