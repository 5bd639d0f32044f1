r"""LRA Image (CIFAR-10 in gray, 1024 pixel tokens) with H-Transformer-1D.

Default: the LRA configuration (1 layer, 8 heads, emb 128, qkv 64, MLP 128,
batch 256, 200 epochs of the 45,000 training images = 35,200 steps, lr
5e-4 with a cosine decay after 1 epoch (176 steps) of warmup, Adam b2 0.98,
no weight decay, dropout 0.1 (LRA's paper: 0.1-0.3), CLS pooling,
learned positions), hierarchical attention with block_size 16.

  python -m htransformer.main --config=configs/image.py --workdir=runs/image

Data: ``config.data_dir`` empty (default) reads tfds ``cifar10``
(train[:90%] / train[90%:] / test; ``config.data.tfds_data_dir`` for a
non-default tfds folder); or point it at a local ``cifar-10-batches-py/``
(same split). Tokens are gray pixel values + 1 (1..256): 0 stays padding,
so black pixels are attended to (the original masked them; see
``lra_mask``). Training batches are shuffled example by example.

Variants (``--config=configs/image.py:VARIANT``, comma-separated):
  full   the same model with full softmax attention (the baseline).
  lra_mask  black pixels left out of attention, as queries and as keys
         (``model.mask_black_pixels``): what the original LRA code did by
         treating pixel 0 as padding, and what its numbers were measured
         with. They are still pooled. Combines with the others.
  quick  a 1-layer emb-64 model, 300 steps of batch 32; minutes on 2 CPU
         cores once the data is there:
           python -m htransformer.main --config=configs/image.py:quick \
               --workdir=runs/image-quick --config.data_dir=PATH
         Expected: not measured (no CIFAR-10 copy on the development
         machine); the one-step test uses cifar-10-batches-py made by it.

Paper (test accuracy): H-Transformer-1D 46.05%, Transformer 42.44%.
"""

import ml_collections

from htransformer import config_utils

VARIANTS = ("full", "quick", "lra_mask")
TRAIN_IMAGES = 45000


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = config_utils.parse_variants(arg, VARIANTS, "configs/image.py")
  batch_size = 256
  epoch = TRAIN_IMAGES // batch_size + 1  # 176 steps
  c = config_utils.experiment_config(
      "image", data=dict(tfds_data_dir=""), max_length=1024,
      model=dict(num_layers=1, num_heads=8, emb_dim=128, qkv_dim=64,
                 mlp_dim=128, pool="CLS", learned_positions=True,
                 mask_black_pixels=False),
      optimizer=dict(learning_rate=5e-4, schedule="cosine",
                     warmup_steps=epoch, weight_decay=0.0),
      batch_size=batch_size, eval_batch_size=256,
      num_train_steps=200 * epoch, log_every=100, eval_every=10 * epoch,
      checkpoint_every=10 * epoch)

  if "lra_mask" in variants:
    c.model.mask_black_pixels = True
  if "full" in variants:
    c.model.attention = "full"
  if "quick" in variants:
    c.model.update(num_layers=1, num_heads=4, emb_dim=64, qkv_dim=64,
                   mlp_dim=64, dtype="float32")
    c.optimizer.update(learning_rate=1e-3, warmup_steps=30)
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_train_steps = 300
    c.eval_every = 150
    c.checkpoint_every = 150
    c.log_every = 50
  return c
