"""The models and the sampler on edge cases: padding, dropout at evaluation,
bfloat16, two towers, the sampled distribution, and clear errors for bad
arguments and inputs."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from htransformer import models
from htransformer import sample
from tests.scripts_helper import ROOT, child_env

VOCAB = 20


def _decoder(attention="hierarchical", dtype=None, dropout_rate=0.0,
             attention_dropout_rate=0.0, max_len=32, vocab=VOCAB):
  return models.Decoder(vocab_size=vocab, max_len=max_len, emb_dim=32,
                        num_layers=2, num_heads=2, qkv_dim=32, mlp_dim=64,
                        dropout_rate=dropout_rate, attention=attention,
                        block_size=4, dtype=dtype,
                        attention_dropout_rate=attention_dropout_rate,
                        rngs=nnx.Rngs(params=0))


def _classifier(cls=models.Classifier, **kw):
  args = dict(num_classes=3, vocab_size=VOCAB, max_len=64, emb_dim=32,
              num_layers=2, num_heads=2, qkv_dim=32, mlp_dim=64,
              dropout_rate=0.0, attention="hierarchical", block_size=4,
              pool="CLS")
  args.update(kw)
  return cls(rngs=nnx.Rngs(params=0), **args)


def _jit(model, method=None, **kw):
  """``model(x, **kw)`` (or ``model.method``) compiled."""
  graphdef, state = nnx.split(model)

  def call(x):
    m = nnx.merge(graphdef, state)
    return getattr(m, method)(x, **kw) if method else m(x, **kw)
  return jax.jit(call)


def _tokens(shape, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(1, VOCAB, size=shape).astype(np.int32)


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("attention", ["hierarchical", "full"])
@pytest.mark.parametrize("pool", ["CLS", "MEAN"])
@pytest.mark.parametrize("learned_positions", [False, True])
def test_classifier_logits_ignore_trailing_padding(attention, pool,
                                                   learned_positions):
  """The same examples padded to 40 or to 64 tokens (and, at 64, rows
  padded for the attention) give the same logits."""
  model = _jit(_classifier(attention=attention, pool=pool,
                           learned_positions=learned_positions))
  tokens = _tokens((3, 64))
  for row, n in enumerate((17, 33, 40)):
    tokens[row, n:] = 0
  long = np.asarray(model(jnp.asarray(tokens)))
  short = np.asarray(model(jnp.asarray(tokens[:, :40])))
  np.testing.assert_allclose(long, short, atol=2e-5, rtol=0)
  # The content of the real positions does matter.
  changed = tokens.copy()
  changed[:, 5] = 1 + changed[:, 5] % (VOCAB - 1)
  assert np.abs(np.asarray(model(jnp.asarray(changed))) - long).max() > 1e-4


def test_dropout_is_off_at_evaluation():
  x = jnp.asarray(_tokens((2, 32)))
  decoder = _decoder(dropout_rate=0.5, attention_dropout_rate=0.5)
  plain = _decoder()  # The same parameters, no dropout.
  evaluated = np.asarray(_jit(decoder)(x))
  np.testing.assert_array_equal(evaluated, np.asarray(_jit(plain)(x)))
  graphdef, state = nnx.split(decoder)
  trained = jax.jit(lambda x: nnx.merge(graphdef, state)(
      x, deterministic=False, rngs=nnx.Rngs(dropout=1)))(x)
  assert np.abs(np.asarray(trained) - evaluated).max() > 1e-2
  classifier = _classifier(dropout_rate=0.5, attention_dropout_rate=0.5)
  np.testing.assert_array_equal(np.asarray(_jit(classifier)(x)),
                                np.asarray(_jit(_classifier())(x)))


@pytest.mark.parametrize("build", [
    _decoder, _classifier,
    lambda **kw: _classifier(models.DualEncoderClassifier, **kw)])
def test_models_follow_train_and_eval_modes(build):
  """A call that does not say follows nnx's modes: .train() turns dropout
  on (the same as deterministic=False), .eval() off; a call's own
  deterministic wins."""
  model = build(dropout_rate=0.5, attention_dropout_rate=0.5)
  shape = (2, 2, 16) if isinstance(model, models.DualEncoderClassifier) else (
      2, 16)
  x = jnp.asarray(_tokens(shape))
  evaluated = np.asarray(model(x))
  trained = np.asarray(model(x, deterministic=False,
                             rngs=nnx.Rngs(dropout=1)))
  assert np.abs(trained - evaluated).max() > 1e-2
  model.train()
  np.testing.assert_array_equal(
      np.asarray(model(x, rngs=nnx.Rngs(dropout=1))), trained)
  np.testing.assert_array_equal(np.asarray(model(x, deterministic=True)),
                                evaluated)
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(x)), evaluated)


@pytest.mark.parametrize("attention", ["hierarchical", "full"])
def test_bfloat16_decoder_is_causal(attention):
  model = _jit(_decoder(attention, dtype="bfloat16"))
  tokens = _tokens((1, 32))
  base = model(jnp.asarray(tokens))
  assert base.dtype == jnp.float32 and np.isfinite(np.asarray(base)).all()
  for t in (0, 7, 20):
    changed = tokens.copy()
    changed[0, t + 1:] = 1 + changed[0, t + 1:] % (VOCAB - 1)
    out = model(jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(out[:, :t + 1]),
                                  np.asarray(base[:, :t + 1]))


def test_dual_encoder_towers_are_interchangeable():
  """Swapping a pair's documents swaps u and v: [v, u, u*v, v-u]."""
  model = _classifier(models.DualEncoderClassifier, pool="MEAN")
  tokens = _tokens((3, 2, 40))
  tokens[0, 1, 25:] = 0
  features = _jit(model, "features")
  f = np.asarray(features(jnp.asarray(tokens)))
  g = np.asarray(features(jnp.asarray(tokens[:, ::-1])))
  u, v, uv, d = np.split(f, 4, axis=-1)
  np.testing.assert_allclose(g, np.concatenate([v, u, uv, -d], -1),
                             atol=1e-6, rtol=0)
  # Each tower is the encoder on its document alone.
  alone = _jit(model, "encode")(jnp.asarray(tokens[:, 1]))
  np.testing.assert_allclose(v, np.asarray(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", [_decoder, _classifier])
def test_models_reject_tokens_of_the_wrong_dtype_or_rank(build):
  model = build()
  with pytest.raises(TypeError, match="integer token ids, got dtype float32"):
    model(jnp.ones((1, 8), jnp.float32))
  with pytest.raises(ValueError, match=r"shape \[batch, length\], got \(8,\)"):
    model(jnp.ones((8,), jnp.int32))
  with pytest.raises(ValueError, match="exceeds the model's max_len"):
    model(jnp.ones((1, 65), jnp.int32))


@pytest.mark.parametrize("build, name", [
    (_decoder, "Decoder"), (_classifier, "Encoder"),
    (lambda: _classifier(models.DualEncoderClassifier, max_len=8),
     "DualEncoderClassifier")])
def test_models_reject_token_ids_outside_the_vocabulary(build, name):
  """An id outside the embedding table would embed as zeros: concrete
  tokens are checked (traced ones, in the train loop, are the input
  pipeline's to check)."""
  model = build()
  shape = (1, 2, 8) if name == "DualEncoderClassifier" else (1, 8)
  for bad in (VOCAB, -1):
    tokens = np.ones(shape, np.int32)
    tokens.flat[3] = bad
    with pytest.raises(ValueError, match=rf"{name} got token id {bad}, "
                       rf"outside its vocabulary \(0\.\.{VOCAB - 1}, "
                       rf"vocab_size {VOCAB}\)"):
      model(jnp.asarray(tokens))
  ok = np.full(shape, VOCAB - 1, np.int32)
  assert np.isfinite(np.asarray(model(jnp.asarray(ok)))).all()


def test_dual_encoder_rejects_tokens_that_are_not_pairs_of_rows():
  model = _classifier(models.DualEncoderClassifier, max_len=8)
  with pytest.raises(TypeError, match=r"DualEncoderClassifier expects tokens "
                     r"as an integer array \[batch, 2, length\], got list"):
    model([[[1, 2], [3, 4]]])
  with pytest.raises(TypeError, match="DualEncoderClassifier expects integer "
                     "token ids, got dtype float32"):
    model(jnp.ones((1, 2, 8), jnp.float32))
  for shape in ((1, 8), (1, 3, 8)):
    with pytest.raises(ValueError, match=r"DualEncoderClassifier expects "
                       r"tokens of shape \[batch, 2, length\], got"):
      model(jnp.ones(shape, jnp.int32))
  with pytest.raises(ValueError, match="exceeds the model's max_len 8"):
    model(jnp.ones((1, 2, 9), jnp.int32))


def test_multi_head_attention_rejects_inputs_of_the_wrong_shape():
  layer = models.MultiHeadAttention(2, 16, rngs=nnx.Rngs(0))
  assert layer(jnp.ones((2, 8, 16))).shape == (2, 8, 16)
  for shape in ((8, 16), (2, 8, 12)):
    with pytest.raises(ValueError, match=r"x of shape \[batch, length, 16\]"):
      layer(jnp.ones(shape))


def test_causal_encoder_with_cls_pooling_is_refused():
  """A causal CLS row (the first row) would see nothing of the input."""
  with pytest.raises(ValueError, match="pool='CLS' cannot be causal"):
    _classifier(causal=True, pool="CLS")
  model = _classifier(causal=True, pool="MEAN")
  assert _jit(model)(jnp.asarray(_tokens((1, 16)))).shape == (1, 3)


# ---------------------------------------------------------------- sampling


def test_sampled_distribution_is_the_models_softmax():
  """The sampler reads the model's logits at the last real position, and
  draws from softmax(logits / temperature) over the top_k."""
  model = _decoder(vocab=8)
  context = [1, 5, 3, 7, 2]
  want = np.asarray(_jit(model)(jnp.asarray([context], jnp.int32))[0, -1])
  for temperature, top_k in ((0.7, 0), (1.3, 3), (1.0, 8)):
    sampler = sample.Sampler(model, temperature, top_k)
    token, logits = sampler.next_token(context, sample.step_key(0, 0))
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=0)
    scaled = want / temperature
    if top_k:
      scaled = np.where(scaled < np.sort(scaled)[-top_k], -np.inf, scaled)
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    n = 20_000
    keys = jax.vmap(lambda i: sample.step_key(0, i))(jnp.arange(n))
    draws = np.asarray(jax.vmap(lambda k: sample.sample_logits(
        jnp.asarray(want), k, temperature, top_k))(keys))
    freq = np.bincount(draws, minlength=8) / n
    np.testing.assert_allclose(freq, p, atol=0.015, rtol=0)
    if top_k:
      assert freq[p == 0].sum() == 0
    assert 0 <= token < 8


def test_greedy_and_top_1_are_the_argmax():
  model = _decoder(vocab=8)
  context = [1, 4, 4, 6]
  logits = np.asarray(_jit(model)(jnp.asarray([context], jnp.int32))[0, -1])
  for temperature, top_k in ((0.0, 0), (0.0, 5), (1.0, 1)):
    sampler = sample.Sampler(model, temperature, top_k)
    for step in range(3):
      token, _ = sampler.next_token(context, sample.step_key(step, step))
      assert token == int(np.argmax(logits))


def test_generation_stops_at_eos_and_is_reproducible():
  model = _decoder(vocab=8)
  sampler = sample.Sampler(model, 1.0, 0)
  prompt = [1, 3, 5]
  free = sampler.generate(prompt, 40, seed=4)
  assert len(free) == 40 and free == sampler.generate(prompt, 40, seed=4)
  eos = free[10]
  stopped = sampler.generate(prompt, 40, seed=4, eos_id=eos)
  assert stopped == free[:free.index(eos) + 1]
  assert sampler.generate(prompt, 0) == []


@pytest.mark.parametrize("settings,match", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
])
def test_sampler_rejects_bad_settings(settings, match):
  model = _decoder()
  kw = dict(temperature=1.0, top_k=0)
  kw.update(settings)
  with pytest.raises(ValueError, match=match):
    sample.Sampler(model, **kw)
  with pytest.raises(ValueError, match=match):
    sample.sample_logits(jnp.zeros(VOCAB), jax.random.key(0), **kw)


def test_sampler_rejects_an_empty_prompt():
  """An empty context would read the logits of a buffer of padding."""
  sampler = sample.Sampler(_decoder(), 0.0)
  with pytest.raises(ValueError, match="prompt is empty"):
    sampler.generate([], 3)
  with pytest.raises(ValueError, match="context is empty"):
    sampler.next_token([], sample.step_key(0, 0))


def test_sampler_rejects_token_ids_outside_the_vocabulary():
  sampler = sample.Sampler(_decoder(), 0.0)
  for bad in (VOCAB, -1):
    with pytest.raises(ValueError, match=f"Token id {bad} is outside the "
                       rf"model's vocabulary \(0..{VOCAB - 1}\)"):
      sampler.generate([1, bad, 3], 2)
  with pytest.raises(ValueError, match="sequence of token ids"):
    sampler.generate([1, 2.5], 2)
  # numpy ids are token ids too.
  assert len(sampler.generate(list(np.array([1, 2], np.int64)), 2)) == 2


def test_generate_rejects_a_negative_max_new_tokens():
  sampler = sample.Sampler(_decoder(), 0.0)
  with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
    sampler.generate([1, 2], -1)
  assert sampler.generate([1, 2], 0) == []


@pytest.mark.parametrize("flag,name", [("--temperature=-1", "temperature"),
                                       ("--top_k=-3", "top_k"),
                                       ("--max_new_tokens=-5",
                                        "max_new_tokens")])
def test_sample_command_rejects_bad_settings_before_loading(tmp_path, flag,
                                                            name):
  r = subprocess.run(
      [sys.executable, "-m", "htransformer.sample", f"--workdir={tmp_path}",
       flag], cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120)
  assert r.returncode == 1, r.stderr[-2000:]
  assert f"Error: {name} must be" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
