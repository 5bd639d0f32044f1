r"""LRA Path-X (128x128 images, 16,384 pixel tokens) with H-Transformer-1D.

Default: the LRA configuration (1 layer, 2 heads, emb 32, qkv 16, MLP 32,
batch 64, 200 epochs of the 160,000 training images = 500,000 steps, lr
1e-3 with a cosine decay after 1 epoch (2,500 steps) of warmup, gradient
clipping at 1, Adam b2 0.98, no weight decay, dropout 0.1, MEAN pooling,
learned positions), hierarchical attention with block_size 16. Every model
in the paper and in LRA failed this task (chance, 50%).

  python -m htransformer.main --config=configs/pathx.py --workdir=runs/pathx

Data: ``config.data_dir`` may point at the LRA release (anything from
``lra_release/`` down to ``pathfinder128/curv_contour_length_14/``). Empty
(the default) generates 200,000 images of 128 px once with our snake
generator (seed ``config.data.seed``) into the cache; about 70 minutes on 2
CPU cores. Split 80/10/10 with ``config.data.split_seed``. Tokens are pixel
values + 1 (1..256): nothing is masked.

Variants (``--config=configs/pathx.py:VARIANT``, comma-separated):
  full   the same model with full softmax attention (the baseline; 16K
         tokens, needs an accelerator's memory).
  quick  300 generated images, the LRA model with emb 16, 30 steps of
         batch 8; a few minutes on 2 CPU cores, generation included:
           python -m htransformer.main --config=configs/pathx.py:quick \
               --workdir=runs/pathx-quick
         Expected: chance (50%); the variant checks the pipeline end to end.

Paper (test accuracy): H-Transformer-1D and Transformer both fail (chance).
"""

import ml_collections

VARIANTS = ("full", "quick")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = {v for v in arg.split(",") if v}
  unknown = variants - set(VARIANTS)
  if unknown:
    raise ValueError(f"Unknown variant(s) {sorted(unknown)} of "
                     f"configs/pathx.py: use '' or a comma-separated subset "
                     f"of {VARIANTS}.")
  c = ml_collections.ConfigDict()
  c.task = "pathx"
  c.data_dir = ""
  c.cache_dir = ""
  c.data = ml_collections.ConfigDict(dict(
      seed=0, num_images=200000, contour_length=14, split_seed=0))
  c.max_length = 128 * 128
  c.model = ml_collections.ConfigDict(dict(
      attention="hierarchical", block_size=16, implementation="",
      num_layers=1, num_heads=2, emb_dim=32, qkv_dim=16, mlp_dim=32,
      dropout_rate=0.1, pool="MEAN", learned_positions=True,
      dtype="bfloat16"))
  c.mesh = ml_collections.ConfigDict(dict(model=1))
  c.batch_size = 64
  epoch = -(-int(0.8 * c.data.num_images) // c.batch_size)  # 2500
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="cosine", warmup_steps=epoch, b1=0.9,
      b2=0.98, eps=1e-9, weight_decay=0.0, grad_clip=1.0))
  c.eval_batch_size = 64
  c.num_train_steps = 200 * epoch
  c.log_every = 500
  c.eval_every = 10 * epoch
  c.checkpoint_every = 2 * epoch
  c.seed = 0
  c.data_seed = 0
  c.dry_run = False

  if "full" in variants:
    c.model.attention = "full"
  if "quick" in variants:
    c.data.num_images = 300
    c.model.update(emb_dim=16, qkv_dim=16, mlp_dim=16, dtype="float32")
    c.optimizer.update(warmup_steps=5)
    c.batch_size = 8
    c.eval_batch_size = 30
    c.num_train_steps = 30
    c.eval_every = 30
    c.checkpoint_every = 30
    c.log_every = 10
  return c
