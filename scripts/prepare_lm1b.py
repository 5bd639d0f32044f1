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
line that says which. The internet is checked first by connecting to the
archive's host, within seconds (offline, tfds's download retries for
minutes); not where DATA_DIR/downloads already holds files of an earlier
attempt, which tfds reuses.
"""

import argparse
import os
import socket
import sys

# Where tfds's lm1b builder downloads its archive from.
DOWNLOAD_HOST = "www.statmt.org:80"


def unreachable(host_port: str, timeout: float = 15.0) -> str | None:
  """Why ``host:port`` cannot be connected to, or None if it can."""
  host, port = host_port.rsplit(":", 1)
  try:
    socket.create_connection((host, int(port)), timeout=timeout).close()
  except OSError as e:
    return f"{type(e).__name__}: {e}"
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True,
                      help="tfds data directory to write lm1b into.")
  parser.add_argument("--download_host", default=DOWNLOAD_HOST,
                      help="HOST:PORT checked for the internet first.")
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
  downloads = os.path.join(args.data_dir, "downloads")
  if not (os.path.isdir(downloads) and os.listdir(downloads)):
    why = unreachable(args.download_host)
    if why:
      sys.exit(f"Error: preparing lm1b downloads about 1.8 GB from "
               f"{args.download_host.rsplit(':', 1)[0]}, which cannot be "
               f"reached from here ({why}): run it on a host with the "
               "internet.")
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
