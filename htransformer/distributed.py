"""Multi-process setup through JAX's own multi-controller runtime."""

from __future__ import annotations

import jax
from absl import logging


def initialize(coordinator_address=None, num_processes=None,
               process_id=None):
  """Calls jax.distributed.initialize when asked or when a cluster is seen.

  With explicit arguments they are passed through. Without them JAX's own
  cluster detection (TPU pods, SLURM, ...) is tried; where none is found the
  run stays single-process.
  """
  if coordinator_address or num_processes or process_id is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      logging.info("Single-process run (%s).", str(e).splitlines()[0])
      return
  logging.info("Process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
