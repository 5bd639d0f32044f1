r"""Entry point: train and evaluate a model described by a config file.

  python -m htransformer.main --config=configs/listops.py[:variant] \
      --workdir=DIR [--config.field=value ...]

Multi-host: pass --coordinator_address, --num_processes and --process_id,
or nothing where JAX detects the cluster itself (TPU pods, SLURM).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from htransformer import config_utils
from htransformer import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/listops.py:quick.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])
# An empty --workdir= would train into the current directory.
flags.register_validator(
    "workdir", lambda v: v is None or bool(v.strip()),
    "must name a folder (empty: checkpoints and metrics would land in the "
    "current directory)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Keep the console readable.
  # A workdir this launch creates goes again if the run is refused before
  # writing anything into it.
  created = not os.path.exists(os.path.abspath(FLAGS.workdir))
  try:
    config_utils.make_workdir(FLAGS.workdir)
  except ValueError as e:
    print(f"Error: --workdir {FLAGS.workdir}: {e}.", file=sys.stderr)
    sys.exit(2)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  # Imported after distributed initialisation.
  from htransformer import train  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", FLAGS.config)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.TrainingStopped as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)
  except (train.NonFiniteLossError, FileNotFoundError, ImportError,
          ValueError) as e:
    print(f"Error: {e}", file=sys.stderr)
    if created:
      try:
        os.rmdir(FLAGS.workdir)  # only if still empty
      except OSError:
        pass
    sys.exit(1)


def _config_spec(argv) -> str | None:
  """The value of the last --config flag in ``argv`` (``--config=X`` or
  ``--config X``)."""
  spec = None
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a == "--":
      break
    if a in ("--config", "-config") and i + 1 < len(args):
      spec = args[i + 1]
    elif a.startswith(("--config=", "-config=")):
      spec = a.split("=", 1)[1]
  return spec


def _config_file_problem(spec: str | None) -> str | None:
  """Why the config file of ``spec`` (``path[:arg]``) cannot be read."""
  if spec is None:
    return None
  path = spec.split(":", 1)[0]
  if not path:
    return f"--config={spec}: no config file named."
  if not os.path.exists(path):
    return (f"--config={spec}: no such config file: {path} (relative to "
            f"{os.getcwd()}).")
  if not os.path.isfile(path):
    return f"--config={spec}: {path} is not a file."
  if not os.access(path, os.R_OK):
    return f"--config={spec}: {path} is not readable."
  return None


def _unknown_override(argv) -> str | None:
  """Names the first --config.a.b=... override that is not a config field."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    config = config_utils.load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return None
  for a in argv[1:]:
    if a == "--":
      break
    if not a.startswith(("--config.", "-config.")):
      continue
    field = a.split("config.", 1)[1].split("=", 1)[0]
    node = config
    for i, part in enumerate(field.split(".")):
      if not hasattr(node, "keys") or part not in node.keys():
        parent = ".".join(field.split(".")[:i]) or "config"
        known = ", ".join(sorted(node.keys())) if hasattr(
            node, "keys") else "(not a group)"
        return (f"Unknown config field '{field}' (from {a}). Fields of "
                f"{parent} in {spec}: {known}.")
      node = node[part]
  return None


def _one_line(e: Exception) -> str:
  """``e`` as ``Type: message`` on one line."""
  text = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def parse_flags(argv):
  """absl flag parsing with a one-line message for bad config overrides."""
  problem = _config_file_problem(_config_spec(argv))
  if problem:
    print(f"Error: {problem}", file=sys.stderr)
    sys.exit(2)
  try:
    rest = FLAGS(argv)
    # config_flags defers a config file that failed to load (an IOError)
    # until the config is read.
    FLAGS.config.keys()  # pylint: disable=pointless-statement
    return rest
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if "Traceback (most recent call last):" in lines:  # Config file raised.
      lines = [lines[0].rstrip(":"), lines[-1]]
    print("Error: " + "\n  ".join(lines), file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    message = (_unknown_override(argv) or
               f"Could not load the config: {_one_line(e)}")
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=parse_flags)
