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

  def fail(message: str, code: int):
    print(message, file=sys.stderr)
    if created:
      try:
        os.rmdir(FLAGS.workdir)  # only if still empty
      except OSError:
        pass
    sys.exit(code)

  try:
    config_utils.make_workdir(FLAGS.workdir)
  except ValueError as e:
    print(f"Error: --workdir {FLAGS.workdir}: {e}.", file=sys.stderr)
    sys.exit(2)
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id)
  except (ValueError, RuntimeError) as e:
    fail(f"Error: multi-process setup (--coordinator_address, "
         f"--num_processes, --process_id): {str(e).splitlines()[0]}", 2)
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
    fail(f"Error: {e}", 1)
  except KeyboardInterrupt:
    # Before training (reading or generating data, compiling: generated
    # data enters the cache only once complete), or a second Ctrl-C during
    # it: the last checkpoint, if any, stands.
    fail(f"Interrupted. Run the same command again to resume from the last "
         f"checkpoint in {FLAGS.workdir} (or to start, if there is none).",
         130)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=config_utils.parse_config_flags)
