r"""Downloads and prepares tfds ``lm1b`` in ArrayRecord format (once).

Needs TensorFlow, tensorflow-datasets and the internet (about 1.8 GB to
download), so run it where those are available:

  pip install tensorflow-cpu tensorflow-datasets
  python scripts/prepare_lm1b.py --data_dir=/data/tfds

Afterwards training reads the prepared files through ``tfds.data_source``
with neither TensorFlow nor the internet (tensorflow-datasets is still
needed); copy DATA_DIR/lm1b to the training hosts and pass
``--config.data_dir=DATA_DIR`` to ``configs/lm1b.py``.
"""

import argparse


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True,
                      help="tfds data directory to write lm1b into.")
  args = parser.parse_args()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("lm1b", data_dir=args.data_dir,
                         file_format="array_record")
  builder.download_and_prepare()
  for split in ("train", "test"):
    source = tfds.data_source("lm1b", split=split, data_dir=args.data_dir)
    print(f"lm1b {split}: {len(source):,} sentences, e.g. {source[0]}")


if __name__ == "__main__":
  main()
