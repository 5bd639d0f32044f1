r"""ListOps (Long Range Arena) with H-Transformer-1D.

Default: the LRA configuration (4 layers, 8 heads, 512/1024, batch 32, 5k
steps, Adam b2 0.98, lr 0.05 rsqrt with 1k warmup, weight decay 0.1, CLS
pooling, max length 2000) with hierarchical attention, block_size 16.

  python -m htransformer.main --config=configs/listops.py \
      --workdir=runs/listops

Variants (``--config=configs/listops.py:VARIANT``):
  full   the same model with full softmax attention (the baseline).
  quick  small data and model; trains and evaluates on 2 CPU cores in a few
         minutes, data generation included, and beats the majority class
         (~17%) on validation:
           python -m htransformer.main --config=configs/listops.py:quick \
               --workdir=runs/listops-quick

Data: ``config.data_dir`` may point at the LRA release (a folder holding
basic_{train,val,test}.tsv, or its listops-1000/ subfolder). Empty (the
default) generates the data once with the LRA rules (seed
``config.data.seed``, 96k/2k/2k) into ``config.cache_dir`` (default
~/.cache/htransformer, or $HTRANSFORMER_CACHE).

Expected results: see docs/results.md (paper: H-Transformer-1D 49.53% test,
Transformer 36.37%).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = ml_collections.ConfigDict()
  c.task = "listops"
  c.data_dir = ""
  c.cache_dir = ""
  c.data = ml_collections.ConfigDict(dict(
      seed=0, num_train=96000, num_val=2000, num_test=2000, min_length=500,
      max_length=2000))
  c.max_length = 2000

  c.model = ml_collections.ConfigDict(dict(
      attention="hierarchical", block_size=16, implementation="",
      num_layers=4, num_heads=8, emb_dim=512, qkv_dim=512, mlp_dim=1024,
      dropout_rate=0.1, pool="CLS", learned_positions=False,
      dtype="bfloat16"))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=0.05, schedule="rsqrt", warmup_steps=1000, b1=0.9,
      b2=0.98, eps=1e-9, weight_decay=0.1, grad_clip=0.0))

  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_train_steps = 5000
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.seed = 0
  c.data_seed = 0
  c.dry_run = False

  if variant == "default":
    pass
  elif variant == "full":
    c.model.attention = "full"
  elif variant == "quick":
    c.data = ml_collections.ConfigDict(dict(
        seed=0, num_train=6000, num_val=500, num_test=500, min_length=10,
        max_length=100))
    c.max_length = 100
    c.model.update(num_layers=2, num_heads=4, emb_dim=64, qkv_dim=64,
                   mlp_dim=128, block_size=8, dtype="float32")
    c.optimizer.update(learning_rate=1e-3, schedule="cosine",
                       warmup_steps=100, weight_decay=0.01)
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_train_steps = 1500
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 500
  else:
    raise ValueError(
        f"Unknown variant {variant!r} of configs/listops.py: use one of "
        "'' (default), 'full', 'quick'.")
  return c
