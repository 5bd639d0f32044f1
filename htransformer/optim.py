"""Learning-rate schedules and the optimizer, from ``config.optimizer``."""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("rsqrt", "cosine", "constant")
# Those whose learning rates depend on the number of training steps.
SCHEDULES_OF_THE_TOTAL = ("cosine",)


def learning_rate_schedule(cfg, total_steps: int):
  """Returns step -> learning rate.

  ``rsqrt`` (LRA): ``lr * min(1, step/warmup) / sqrt(max(step, warmup))``.
  ``cosine``: linear warmup then cosine decay to 0 at ``total_steps``.
  ``constant``: linear warmup then constant.
  """
  base, warmup = cfg.learning_rate, max(int(cfg.warmup_steps), 0)
  if cfg.schedule == "rsqrt":
    w = max(warmup, 1)

    def schedule(step):
      step = jnp.asarray(step, jnp.float32)
      return (base * jnp.minimum(1.0, step / w)
              / jnp.sqrt(jnp.maximum(step, w)))
    return schedule
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, base, warmup, max(total_steps, warmup + 1))
  if cfg.schedule == "constant":
    return optax.linear_schedule(0.0, base, max(warmup, 1)) if warmup else (
        lambda step: jnp.asarray(base, jnp.float32))
  raise ValueError(
      f"config.optimizer.schedule must be one of {SCHEDULES}, got "
      f"{cfg.schedule!r}.")


def make_optimizer(cfg, total_steps: int):
  """AdamW with decoupled weight decay, optional global-norm clipping."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip and cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts), schedule
