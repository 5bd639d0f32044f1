r"""Where a training step's time goes: input pipeline, device step, both.

Builds the job of a config exactly as training does (task, model, optimizer,
mesh, grain iterator) and measures, each after warm-up:
  data   host batches/s from the training iterator alone;
  step   device steps/s of the jitted train step on one device-resident
         batch (synchronised every step, so nothing overlaps);
  loop   steps/s of the real loop (next batch, transfer, step), without
         logging, evaluation or checkpoints.
If ``loop`` is far below both ``data`` and ``step``, the time is lost
between them (transfers, dispatch); if it equals ``data``, feed faster.

``--profile=N`` also traces N device steps with the JAX profiler and prints
where the device time goes: the operations (XLA fusions, cuDNN and Pallas
kernels) with the largest total time, the same grouped by kernel name
(e.g. every ``hattn_fwd_l0``), their share of the traced device time, and
how busy the device was over the traced wall time. With XLA's command
buffers on (the default) a step shows as one ``command_buffer`` entry: set
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to see its kernels.
``--levels_per_launch=G`` runs the fused kernels with G levels per launch
(``kernels.TUNING``) instead of the default.

  python scripts/step_time.py --config=configs/lm1b.py:text4096 \
      [--config.model.attention=full] [--steps=50]

Prints one JSON line per config (and appends it to --out if given). A
config that cannot be read (no such file, an unknown variant or field, a
value of the wrong type), a job that cannot be built (its data missing,
say) or an --out in a folder that is not there is one line, "Error: ...",
before anything is measured.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from htransformer import config_utils  # noqa: E402
from htransformer import input_pipeline  # noqa: E402
from htransformer import optim  # noqa: E402
from htransformer import profiling  # noqa: E402
from htransformer import tasks  # noqa: E402
from htransformer import train  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                lock_config=True)
flags.DEFINE_integer("steps", 50, "Timed steps per measurement.",
                     lower_bound=1)
flags.DEFINE_string("out", "", "Append the JSON line to this file.")
flags.DEFINE_integer("profile", 0, "Trace this many device steps and print "
                     "the operations that take the device time.",
                     lower_bound=0)
flags.DEFINE_integer("top", 25, "Operations listed by --profile.",
                     lower_bound=1)
flags.DEFINE_integer("levels_per_launch", 0, "Fused kernels: levels per "
                     "launch (kernels.TUNING); 0 keeps the default.",
                     lower_bound=0)
FLAGS = flags.FLAGS


def _rate(fn, steps):
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return steps / (time.perf_counter() - start)


def main(argv):
  del argv
  config = FLAGS.config
  steps = FLAGS.steps
  if FLAGS.out:  # Said before the measurement, not after it.
    folder = os.path.dirname(os.path.abspath(FLAGS.out))
    problem = ("a folder, not a file" if os.path.isdir(FLAGS.out) else
               None if os.path.isdir(folder) else f"no folder {folder}")
    if problem:
      print(f"Error: --out {FLAGS.out}: {problem}.", file=sys.stderr)
      return 1
  if FLAGS.levels_per_launch:
    from htransformer.attention import kernels  # pylint: disable=g-import-not-at-top
    kernels.TUNING["levels_per_launch"] = FLAGS.levels_per_launch
  with tempfile.TemporaryDirectory() as workdir:
    try:
      train.check_config(config)
      task = tasks.get_task(config, workdir)
    except (FileNotFoundError, ImportError, ValueError) as e:
      print(f"Error: {e}", file=sys.stderr)
      return 1
    model = train.build_model(config, task, config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
    trainer = train.Trainer(config, task, graphdef, params, tx)
    state = trainer.initial_state(params)
    it = input_pipeline.train_iterator(task.sources["train"],
                                       config.batch_size, config.data_seed)

    for _ in range(3):
      next(it)
    data_rate = _rate(lambda: next(it), steps)

    batch = trainer.global_batch(next(it))
    holder = {"state": state}

    def device_step():
      holder["state"], sums = trainer.train_step(holder["state"], batch)
      jax.block_until_ready(sums)

    for _ in range(3):
      device_step()
    step_rate = _rate(device_step, steps)
    profile = (profiling.device_profile(device_step, FLAGS.profile, FLAGS.top)
               if FLAGS.profile else None)

    def loop_step():
      holder["state"], _ = trainer.train_step(
          holder["state"], trainer.global_batch(next(it)))

    for _ in range(3):
      loop_step()
    jax.block_until_ready(holder["state"])
    start = time.perf_counter()
    for _ in range(steps):
      loop_step()
    jax.block_until_ready(holder["state"])
    loop_rate = steps / (time.perf_counter() - start)

  row = {"task": config.task, "attention": config.model.attention,
         "implementation": config.model.get("implementation", ""),
         "max_length": config.max_length, "batch_size": config.batch_size,
         "device": jax.devices()[0].device_kind,
         "data_batches_per_sec": round(data_rate, 2),
         "device_steps_per_sec": round(step_rate, 2),
         "loop_steps_per_sec": round(loop_rate, 2)}
  if FLAGS.levels_per_launch:
    row["levels_per_launch"] = FLAGS.levels_per_launch
  if profile is not None:
    row["profile"] = profile
  line = json.dumps(row)
  print(line, flush=True)
  if profile is not None and "top" in profile:
    print(f"device time {profile['device_ms_per_step']} ms/step over "
          f"{profile['wall_ms_per_step']} ms/step wall, "
          f"{profile['kernels_per_step']} kernels/step")
    for title, key in (("operations", "top"), ("kernels by name", "top_kernels")):
      print(f" {title}:")
      for r in profile[key]:
        print(f"  {r['ms_per_step']:9.3f} ms {100 * r['share']:5.1f}% "
              f"x{r['calls_per_step']:<5g} {r['op'][:90]}")
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=config_utils.parse_config_flags)
