r"""LRA Image (CIFAR-10 in gray, 1024 pixel tokens) with H-Transformer-1D.

Default: the LRA configuration (1 layer, 8 heads, emb 128, qkv 64, MLP 128,
batch 256, 200 epochs of the 45,000 training images = 35,200 steps, lr
5e-4 with a cosine decay after 1 epoch (176 steps) of warmup, Adam b2 0.98,
no weight decay, dropout 0.1 (experiments.md: 0.1-0.3), CLS pooling,
learned positions), hierarchical attention with block_size 16.

  python -m htransformer.main --config=configs/image.py --workdir=runs/image

Data: ``config.data_dir`` empty (default) reads tfds ``cifar10``
(train[:90%] / train[90%:] / test; ``config.data.tfds_data_dir`` for a
non-default tfds folder); or point it at a local ``cifar-10-batches-py/``
(same split). Tokens are gray pixel values + 1 (1..256): 0 stays padding,
so black pixels are attended to (the original masked them). Training
batches are shuffled example by example.

Variants (``--config=configs/image.py:VARIANT``, comma-separated):
  full   the same model with full softmax attention (the baseline).
  quick  a 1-layer emb-64 model, 300 steps of batch 32; minutes on 2 CPU
         cores once the data is there:
           python -m htransformer.main --config=configs/image.py:quick \
               --workdir=runs/image-quick --config.data_dir=PATH
         Expected: not measured (no CIFAR-10 copy on the development
         machine); the one-step test uses cifar-10-batches-py made by it.

Paper (test accuracy): H-Transformer-1D 46.05%, Transformer 42.44%.
"""

import ml_collections

VARIANTS = ("full", "quick")
TRAIN_IMAGES = 45000


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = {v for v in arg.split(",") if v}
  unknown = variants - set(VARIANTS)
  if unknown:
    raise ValueError(f"Unknown variant(s) {sorted(unknown)} of "
                     f"configs/image.py: use '' or a comma-separated subset "
                     f"of {VARIANTS}.")
  c = ml_collections.ConfigDict()
  c.task = "image"
  c.data_dir = ""
  c.cache_dir = ""
  c.data = ml_collections.ConfigDict(dict(tfds_data_dir=""))
  c.max_length = 1024
  c.model = ml_collections.ConfigDict(dict(
      attention="hierarchical", block_size=16, implementation="",
      num_layers=1, num_heads=8, emb_dim=128, qkv_dim=64, mlp_dim=128,
      dropout_rate=0.1, pool="CLS", learned_positions=True,
      dtype="bfloat16"))
  c.mesh = ml_collections.ConfigDict(dict(model=1))
  c.batch_size = 256
  steps_per_epoch = TRAIN_IMAGES // c.batch_size  # 175 (+1 below)
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-4, schedule="cosine", warmup_steps=steps_per_epoch + 1,
      b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0, grad_clip=0.0))
  c.eval_batch_size = 256
  c.num_train_steps = 200 * (steps_per_epoch + 1)
  c.log_every = 100
  c.eval_every = 10 * (steps_per_epoch + 1)
  c.checkpoint_every = 10 * (steps_per_epoch + 1)
  c.seed = 0
  c.data_seed = 0
  c.dry_run = False

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
