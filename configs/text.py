r"""LRA Text (IMDb reviews, byte level) with H-Transformer-1D.

Default: the LRA configuration (4 layers, 4 heads, emb 256, qkv 256, MLP
1024, batch 32, 20k steps, Adam b2 0.98, lr 0.05 rsqrt with 8k warmup,
weight decay 0.1, dropout 0.1, CLS pooling, sinusoidal positions) on
reviews truncated to 4000 bytes (the LRA paper's length), hierarchical
attention with block_size 16.

  python -m htransformer.main --config=configs/text.py --workdir=runs/text

Data: ``config.data_dir`` empty (default) reads tfds ``imdb_reviews``
(``tfds.data_source``; prepared beforehand, ``config.data.tfds_data_dir``
for a non-default tfds folder); or point it at a local ``aclImdb/`` folder
(the Stanford archive, unpacked). Test doubles as validation, as in LRA.
Tokens are bytes + 1 (0 = padding, vocabulary 257).

Variants (``--config=configs/text.py:VARIANT``, several joined by commas):
  full     the same model with full softmax attention (the baseline).
  len1000  reviews truncated to 1000 bytes (what the LRA repository's text
           config used) instead of 4000.
  quick    a 2-layer model on 512 bytes, 300 steps; a few minutes on 2 CPU
           cores once the data is there:
             python -m htransformer.main --config=configs/text.py:quick \
                 --workdir=runs/text-quick --config.data_dir=PATH/aclImdb
           Expected: not measured (no IMDb copy on the development machine);
           the one-step test uses a tiny aclImdb/ made by the test.

Paper (test accuracy): H-Transformer-1D 78.69%, Transformer 64.27%.
"""

import ml_collections

from htransformer import config_utils

VARIANTS = ("full", "len1000", "quick")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = config_utils.parse_variants(arg, VARIANTS, "configs/text.py")
  c = config_utils.experiment_config(
      "text", data=dict(tfds_data_dir=""), max_length=4000,
      model=dict(num_layers=4, num_heads=4, emb_dim=256, qkv_dim=256,
                 mlp_dim=1024, pool="CLS", learned_positions=False),
      optimizer=dict(learning_rate=0.05, schedule="rsqrt",
                     warmup_steps=8000, weight_decay=0.1),
      batch_size=32, eval_batch_size=64, num_train_steps=20000,
      log_every=100, eval_every=1000, checkpoint_every=1000)

  if "full" in variants:
    c.model.attention = "full"
  if "len1000" in variants:
    c.max_length = 1000
  if "quick" in variants:
    c.max_length = min(c.max_length, 512)
    c.model.update(num_layers=2, num_heads=4, emb_dim=64, qkv_dim=64,
                   mlp_dim=128, block_size=16, dtype="float32")
    c.optimizer.update(learning_rate=1e-3, schedule="cosine",
                       warmup_steps=30, weight_decay=0.01)
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_train_steps = 300
    c.eval_every = 150
    c.checkpoint_every = 150
    c.log_every = 50
  return c
