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
values + 1 (1..256): nothing is masked (see ``lra_mask``).

Variants (``--config=configs/pathx.py:VARIANT``, comma-separated):
  full   the same model with full softmax attention (the baseline). On
         CPU it runs in chunks of queries (memory ~2.5 GB for ``quick,full``)
         but slowly: ~75 s per ``quick`` step on 2 cores (2026-11-29).
  lra_mask  black pixels left out of attention, as queries and as keys
         (``model.mask_black_pixels``): what the original LRA code did by
         treating pixel 0 as padding, and what its numbers were measured
         with. They are still pooled. Combines with the others.
  quick  300 generated images, the LRA model with emb and MLP 16 (qkv
         16 as in LRA), 30 steps of batch 8; a few minutes on 2 CPU cores,
         generation included:
           python -m htransformer.main --config=configs/pathx.py:quick \
               --workdir=runs/pathx-quick
         Expected: chance (50%); the variant checks the pipeline end to end.

Paper (test accuracy): H-Transformer-1D and Transformer both fail (chance).
Measured here (2026-11-29, one NVIDIA H200 per model, 40,000 generated
images, seed 0, generator version 3, ``--config.num_train_steps=15000``;
docs/results.md, "Path-X on generator version 3"): chance too, 49.12% test
after 15,000 steps (the model memorised its 32,000 training images);
training steps/s hierarchical 165.2, full attention (cuDNN) 13.5, 12.2x.
"""

import ml_collections

from htransformer import config_utils

VARIANTS = ("full", "quick", "lra_mask")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = config_utils.parse_variants(arg, VARIANTS, "configs/pathx.py")
  data = dict(seed=0, num_images=200000, contour_length=14, split_seed=0)
  batch_size = 64
  epoch = -(-int(0.8 * data["num_images"]) // batch_size)  # 2500 steps
  c = config_utils.experiment_config(
      "pathx", data=data, max_length=128 * 128,
      model=dict(num_layers=1, num_heads=2, emb_dim=32, qkv_dim=16,
                 mlp_dim=32, pool="MEAN", learned_positions=True,
                 mask_black_pixels=False),
      optimizer=dict(learning_rate=1e-3, schedule="cosine",
                     warmup_steps=epoch, weight_decay=0.0, grad_clip=1.0),
      batch_size=batch_size, eval_batch_size=64,
      num_train_steps=200 * epoch, log_every=500, eval_every=10 * epoch,
      checkpoint_every=2 * epoch)

  if "lra_mask" in variants:
    c.model.mask_black_pixels = True
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
