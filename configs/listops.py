r"""ListOps (Long Range Arena) with H-Transformer-1D.

Default: the LRA configuration (4 layers, 8 heads, 512/1024, batch 32, 5k
steps, Adam b2 0.98, lr 0.05 rsqrt with 1k warmup, weight decay 0.1, CLS
pooling, max length 2000) with hierarchical attention, block_size 16.

  python -m htransformer.main --config=configs/listops.py \
      --workdir=runs/listops

Variants (``--config=configs/listops.py:VARIANT``, or several joined by
commas, e.g. ``:quick,full``):
  full   the same model with full softmax attention (the baseline).
  long   the best recipe found so far on generated data: lr 0.005 (a tenth
         of LRA's) for 20,000 steps, evaluation every 1,000:
           python -m htransformer.main --config=configs/listops.py:long \
               --workdir=runs/listops-long
         Expected (one NVIDIA H200, generated data seed 0, 2026-11-29):
         41.80% test, 42.80% best validation, ~63 steps/s (6 minutes);
         with LRA's ReLU head (--config.model.head_activation=relu)
         41.70% / 42.25%. The default config gives 36.0% (ReLU head,
         docs/results.md). ``long_full`` (``long,full``): the same with full attention
         (40.0% validation at 20k steps, ReLU head). With LRA's attention
         dropout (--config.model.attention_dropout_rate=0.1): 41.35% test,
         41.75% best validation; with learned positions 38.25% / 38.70%.
  quick  small data (6000/500/500 expressions of 10-60 tokens) and a
         2-layer model; trains and evaluates on 2 CPU cores in about 1 to
         1.5 minutes, data generation included:
           python -m htransformer.main --config=configs/listops.py:quick \
               --workdir=runs/listops-quick
         Expected (2-core CPU, 2026-11-28, data cached, GELU head):
         validation accuracy 44.8%, test 43.6% after 1200 steps (about a
         minute), against 15-16% for the majority class (15.8%
         validation, 16.4% test).

Data: ``config.data_dir`` may point at the LRA release (a folder holding
basic_{train,val,test}.tsv, or its listops-1000/ subfolder). Empty (the
default) generates the data once with the LRA rules (seed
``config.data.seed``, 96k/2k/2k) into ``config.cache_dir`` (default
~/.cache/htransformer, or $HTRANSFORMER_CACHE).

Mesh: ``config.mesh.model`` is the size of the ``model`` axis of the device
mesh (attention heads and MLP hidden units are split over it); the ``data``
axis gets the rest (devices / model) and splits the batch. The default, 1,
is pure data parallelism. ``model`` must divide the number of devices on each
host, ``model.num_heads`` and ``model.mlp_dim``; ``batch_size`` and
``eval_batch_size`` are global and must be divisible by the data axis:

  python -m htransformer.main --config=configs/listops.py \
      --workdir=runs/listops-tp2 --config.mesh.model=2

Expected results: see docs/results.md (paper: H-Transformer-1D 49.53% test,
Transformer 36.37%). The default config on our generated data (seed 0,
ReLU head): 36.0% test after 5,000 steps (H100, 26 steps/s), which is
what reading the outermost operator alone scores (36.1%;
scripts/listops_depth.py).
"""

import ml_collections

from htransformer import config_utils


VARIANTS = ("full", "long", "long_full", "quick")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = config_utils.parse_variants(arg, VARIANTS, "configs/listops.py")
  if "long_full" in variants:  # the name the results tables use
    variants = (variants - {"long_full"}) | {"long", "full"}
  if {"long", "quick"} <= variants:
    raise ValueError("Variants 'long' and 'quick' of configs/listops.py "
                     "each set their own data and schedule: give one.")
  c = config_utils.experiment_config(
      "listops",
      data=dict(seed=0, num_train=96000, num_val=2000, num_test=2000,
                min_length=500, max_length=2000),
      max_length=2000,
      model=dict(num_layers=4, num_heads=8, emb_dim=512, qkv_dim=512,
                 mlp_dim=1024, pool="CLS", learned_positions=False),
      optimizer=dict(learning_rate=0.05, schedule="rsqrt",
                     warmup_steps=1000, weight_decay=0.1),
      batch_size=32, eval_batch_size=64, num_train_steps=5000,
      log_every=100, eval_every=500, checkpoint_every=500)

  if "full" in variants:
    c.model.attention = "full"
  if "long" in variants:
    c.optimizer.learning_rate = 0.005
    c.num_train_steps = 20000
    c.eval_every = 1000
    c.checkpoint_every = 1000
  if "quick" in variants:
    c.data = ml_collections.ConfigDict(dict(
        seed=0, num_train=6000, num_val=500, num_test=500, min_length=10,
        max_length=60))
    c.max_length = 60
    c.model.update(num_layers=2, num_heads=4, emb_dim=64, qkv_dim=64,
                   mlp_dim=128, block_size=8, dtype="float32")
    c.optimizer.update(learning_rate=1e-3, schedule="cosine",
                       warmup_steps=100, weight_decay=0.01)
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_train_steps = 1200
    c.log_every = 100
    c.eval_every = 400
    c.checkpoint_every = 400
  return c
