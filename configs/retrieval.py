r"""LRA Retrieval (ACL Anthology Network citation pairs, bytes), two towers.

Default: the LRA configuration (4 layers, 4 heads, emb 128, qkv 128, MLP
512, batch 32, 5k steps, Adam b2 0.98, lr 0.05 rsqrt with 8k warmup (so the
rate is still rising at the last step, as in LRA), weight decay 0.1, dropout
0.1, CLS pooling) with 4000 bytes per document and hierarchical attention,
block_size 16. The model is ``models.DualEncoderClassifier``: one shared
encoder for both documents, pooled vectors u, v combined as
[u, v, u*v, u-v] and classified by a 2-layer MLP.

  python -m htransformer.main --config=configs/retrieval.py \
      --workdir=runs/retrieval --config.data_dir=PATH/lra_release/tsv_data

Data: ``config.data_dir`` (required) is the LRA release's ``tsv_data/``
folder (or a folder above it) with new_aan_pairs.{train,eval,test}.tsv.
Tokens are bytes + 1 (0 = padding, vocabulary 257).

Variants (``--config=configs/retrieval.py:VARIANT``, comma-separated):
  full   the same model with full softmax attention (the baseline).
  quick  a 2-layer model on 256 bytes per document, 200 steps; minutes on
         2 CPU cores:
           python -m htransformer.main --config=configs/retrieval.py:quick \
               --workdir=runs/retrieval-quick --config.data_dir=PATH/tsv_data
         Expected: not measured (no AAN copy on the development machine);
         the one-step test uses tsv files made by the test.

Paper (test accuracy): H-Transformer-1D 63.99%, Transformer 57.46%.
"""

import ml_collections

from htransformer import config_utils

VARIANTS = ("full", "quick")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = config_utils.parse_variants(arg, VARIANTS,
                                         "configs/retrieval.py")
  c = config_utils.experiment_config(
      "retrieval", max_length=4000,  # per document
      model=dict(num_layers=4, num_heads=4, emb_dim=128, qkv_dim=128,
                 mlp_dim=512, pool="CLS", learned_positions=False),
      optimizer=dict(learning_rate=0.05, schedule="rsqrt",
                     warmup_steps=8000, weight_decay=0.1),
      batch_size=32, eval_batch_size=64, num_train_steps=5000,
      log_every=100, eval_every=500, checkpoint_every=500)

  if "full" in variants:
    c.model.attention = "full"
  if "quick" in variants:
    c.max_length = 256
    c.model.update(num_layers=2, num_heads=4, emb_dim=64, qkv_dim=64,
                   mlp_dim=128, block_size=16, dtype="float32")
    c.optimizer.update(learning_rate=1e-3, schedule="cosine",
                       warmup_steps=20, weight_decay=0.01)
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_train_steps = 200
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 50
  return c
