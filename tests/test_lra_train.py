"""LRA tasks end to end: the two-tower model and one step of each :quick
config (on data the tests make in the real on-disk layouts)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import image as image_config
from configs import pathfinder as pathfinder_config
from configs import pathx as pathx_config
from configs import retrieval as retrieval_config
from configs import text as text_config
from htransformer import models
from htransformer import tasks
from htransformer import train
from htransformer.data import pathfinder
from tests import test_lra_data as data_helpers


def _dual(pool="CLS"):
  # Full attention keeps the many eager calls below fast; the two-tower
  # logic does not depend on the attention (the train tests use
  # hierarchical attention).
  return models.DualEncoderClassifier(
      num_classes=2, vocab_size=257, max_len=24, emb_dim=16, num_layers=1,
      num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.1,
      attention="full", pool=pool, rngs=nnx.Rngs(params=0))


def test_mean_pooling_keeps_what_a_few_rows_add():
  """A bfloat16 encoder output is pooled in float32: one row of 1,024 that
  differs by 0.5 moves the mean by 0.5/1024, which a bfloat16 mean (8 bits)
  rounds away, and the classifier's heads see it too."""
  x = np.ones((2, 1024, 4), np.float32) + np.linspace(0, 1, 4)
  x[1, 700] += 0.5
  mask = np.ones((2, 1024), bool)
  mask[:, 1000:] = False
  x[:, 1000:] = 1e4  # masked rows count for nothing
  pooled = models.pool(jnp.asarray(x, jnp.bfloat16), jnp.asarray(mask),
                       "MEAN")
  assert pooled.dtype == jnp.float32
  want = x[:, :1000].astype(jnp.bfloat16).astype(np.float32).mean(1)
  np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-6)
  diff = np.asarray(pooled[1] - pooled[0])
  assert (np.abs(diff - 0.5 / 1000) < 2e-5).all(), diff
  model = models.Classifier(
      num_classes=2, vocab_size=257, max_len=64, emb_dim=16, num_layers=1,
      num_heads=2, qkv_dim=16, mlp_dim=16, attention="full", pool="MEAN",
      dtype="bfloat16", rngs=nnx.Rngs(params=0))
  assert model.head1.dtype == model.head2.dtype == jnp.float32


@pytest.mark.parametrize("two_tower", [False, True])
def test_head_below_zero_still_passes_gradient(two_tower):
  """Every unit of the classifier head pushed below zero (what happened to
  all 32 on Pathfinder with LRA's ReLU head) still leaves a gradient for
  the encoder with the default GELU head; with ``head_activation="relu"``
  the gradient is exactly zero, so such a model never leaves chance."""
  def grads(activation):
    kw = dict(num_classes=2, vocab_size=257, emb_dim=16, num_layers=1,
              num_heads=2, qkv_dim=16, mlp_dim=8, attention="full",
              pool="MEAN", dtype="float32", head_activation=activation,
              rngs=nnx.Rngs(params=0))
    model = (models.DualEncoderClassifier(max_len=24, **kw) if two_tower
             else models.Classifier(max_len=24, **kw))
    model.head1.bias[...] = jnp.full((8,), -1.0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(
        1, 257, (4, 2, 24) if two_tower else (4, 24)))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit  # One compilation, not one per operation.
    def pre_and_grad(params):
      def loss(params):
        logits = nnx.merge(graphdef, params)(tokens)
        return -jax.nn.log_softmax(logits)[:, 0].mean()
      model = nnx.merge(graphdef, params)
      return model.head1(model.features(tokens)), jax.grad(loss)(params)

    pre, g = pre_and_grad(params)
    assert float(pre.max()) < 0  # every unit is below zero on every input
    g = g["encoder"]
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g))

  assert grads("relu") == 0.0
  assert grads("gelu") > 1e-4
  assert pathfinder_config.get_config().model.head_activation == "gelu"
  with pytest.raises(ValueError, match="head_activation"):
    models.Classifier(num_classes=2, vocab_size=8, max_len=8, emb_dim=8,
                      num_layers=1, num_heads=2, qkv_dim=8, mlp_dim=8,
                      head_activation="tanh", rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("attention,pool", [("hierarchical", "MEAN"),
                                            ("full", "CLS")])
def test_unattended_token_is_left_out_of_attention(attention, pool):
  """With ``unattended_token=1`` (black pixels, ``model.mask_black_pixels``)
  every other row's output is what it is when those tokens are padding:
  they neither attend nor are attended to; they are still pooled. Without
  the option the rows differ."""
  rng = np.random.default_rng(3)
  tokens = rng.integers(2, 257, (2, 64))
  tokens[rng.random((2, 64)) < 0.6] = 1  # "black pixels", not a suffix
  as_padding = np.where(tokens == 1, 0, tokens)
  other = np.pad(tokens != 1, ((0, 0), (1 if pool == "CLS" else 0, 0)),
                 constant_values=True)
  make = lambda token: models.Encoder(
      vocab_size=257, max_len=64, emb_dim=16, num_layers=2, num_heads=2,
      qkv_dim=16, mlp_dim=16, attention=attention, block_size=4, pool=pool,
      implementation="xla", dtype="float32", unattended_token=token,
      rngs=nnx.Rngs(params=0))
  skip, plain = make(1), make(None)
  x, mask = skip(jnp.asarray(tokens))
  y, _ = skip(jnp.asarray(as_padding))
  assert bool(mask.all())  # pooled: black rows are not padding
  np.testing.assert_allclose(np.asarray(x)[other], np.asarray(y)[other],
                             atol=1e-5)
  z, _ = plain(jnp.asarray(tokens))
  assert not np.allclose(np.asarray(z)[other], np.asarray(y)[other],
                         atol=1e-3)
  with pytest.raises(ValueError, match="unattended_token"):
    make(0)


def test_dual_encoder_shapes_and_symmetry():
  model = _dual("CLS")
  rng = np.random.default_rng(0)
  a = rng.integers(1, 257, (3, 24))
  b = rng.integers(1, 257, (3, 24))
  a[:, 15:] = 0  # padding
  pair = lambda x, y: jnp.asarray(np.stack([x, y], axis=1))

  @nnx.jit
  def run(model, ab, ba, aa, a, b):
    # One shared encoder: a document's vector does not depend on its tower,
    # and the pair's features are exactly [u, v, u*v, u-v].
    u, v = model.encode(a), model.encode(b)
    act = models.HEAD_ACTIVATIONS[model.head_activation]
    head = lambda f: model.head2(act(model.head1(f)))
    expected = {
        "ab": head(jnp.concatenate([u, v, u * v, u - v], -1)),
        "ba": head(jnp.concatenate([v, u, v * u, v - u], -1)),
        "aa": head(jnp.concatenate([u, u, u * u, jnp.zeros_like(u)], -1)),
    }
    got = {"ab": model(ab), "ba": model(ba), "aa": model(aa)}
    train = model(ab, deterministic=False, rngs=nnx.Rngs(dropout=1))
    return u, got, expected, train

  u, got, expected, train_out = run(model, pair(a, b), pair(b, a),
                                    pair(a, a), jnp.asarray(a),
                                    jnp.asarray(b))
  assert u.shape == (3, 16)
  for k in ("ab", "ba", "aa"):
    assert got[k].shape == (3, 2) and got[k].dtype == jnp.float32
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-5)
  assert not np.allclose(got["ab"], got["ba"])  # order-aware head (u - v)
  assert np.all(np.isfinite(np.asarray(train_out)))
  # Shared weights: one encoder's parameters, a head on 4 * emb_dim.
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(
      nnx.state(model, nnx.Param))}
  assert {n.split("/")[0] for n in names} == {"encoder", "head1", "head2"}
  assert model.head1.kernel.shape == (64, 32)
  with pytest.raises(ValueError, match="batch, 2, length"):
    model(jnp.asarray(a))


def _one_step(config, workdir):
  """One training step, evaluation and results.json for a :quick config.

  Only the model depth is cut (1 layer) to keep the compile time of the test
  down; task, data pipeline, model class, loss and evaluation are the
  config's.
  """
  config.model.num_layers = 1
  config.eval_batch_size = config.batch_size
  config.num_train_steps = 1
  config.log_every = config.eval_every = config.checkpoint_every = 1
  results = train.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert 0.0 <= on_disk["test_accuracy"] <= 1.0
  assert np.isfinite(on_disk["test_loss"])
  return results


def test_text_quick_one_step(tmp_path):
  data_helpers._write_acl_imdb(str(tmp_path / "data"))
  c = text_config.get_config("quick")
  c.data_dir = str(tmp_path / "data")
  assert c.max_length == 512 and c.task == "text"
  _one_step(c, tmp_path / "run")


def test_retrieval_quick_one_step(tmp_path):
  data_helpers._write_aan(str(tmp_path / "tsv_data"), n=20)
  c = retrieval_config.get_config("quick")
  c.data_dir = str(tmp_path)
  task = tasks.get_task(c)
  assert task.kind == "pair_classification"
  assert isinstance(train.build_model(c, task), models.DualEncoderClassifier)
  _one_step(c, tmp_path / "run")


def test_image_quick_one_step(tmp_path):
  data_helpers._write_cifar(str(tmp_path / "data"))
  c = image_config.get_config("quick")
  c.data_dir = str(tmp_path / "data")
  c.batch_size = 8
  _one_step(c, tmp_path / "run")


def test_pathfinder_quick_one_step_generates(tmp_path, capsys):
  c = pathfinder_config.get_config("quick,lra_mask")
  c.cache_dir = str(tmp_path / "cache")
  c.data.num_images = 40
  c.batch_size = 8
  _one_step(c, tmp_path / "run")
  model = train.build_model(c, tasks.get_task(c))
  assert model.encoder.unattended_token == 1  # the token of black pixels
  assert "generated pathfinder data" in capsys.readouterr().out
  assert os.listdir(c.cache_dir) == [
      f"pathfinder32_seed0_40_cl14_v{pathfinder.GENERATOR_VERSION}"]


def test_pathx_quick_one_step_generates(tmp_path):
  c = pathx_config.get_config("quick")
  assert c.max_length == 16384
  c.cache_dir = str(tmp_path / "cache")
  c.data.num_images = 12
  c.batch_size = 4
  _one_step(c, tmp_path / "run")


def test_configs_variants_and_errors():
  for mod in (text_config, retrieval_config, image_config, pathfinder_config,
              pathx_config):
    assert mod.get_config("").model.attention == "hierarchical"
    assert mod.get_config("full").model.attention == "full"
    with pytest.raises(ValueError, match="Unknown variant"):
      mod.get_config("nope")
  for mod in (image_config, pathfinder_config, pathx_config):
    assert not mod.get_config("").model.mask_black_pixels
    assert mod.get_config("full,lra_mask").model.mask_black_pixels
  assert text_config.get_config("len1000").max_length == 1000
  assert text_config.get_config("full,len1000").model.attention == "full"
  # LRA hyperparameters (the LRA paper's).
  pf = pathfinder_config.get_config("")
  assert (pf.model.num_layers, pf.model.emb_dim, pf.model.qkv_dim,
          pf.model.pool, pf.batch_size) == (4, 32, 16, "MEAN", 512)
  repo = pathfinder_config.get_config("lra_repo,lra_mask")
  assert (repo.model.num_layers, repo.model.num_heads, repo.model.emb_dim,
          repo.model.qkv_dim, repo.model.mlp_dim, repo.model.dropout_rate,
          repo.model.mask_black_pixels, repo.batch_size) == (
              1, 4, 128, 64, 128, 0.2, True, 512)
  assert not pf.model.learned_positions  # LRA: sinusoidal for Pathfinder
  lp = pathfinder_config.get_config("learned_pos,full")
  assert lp.model.learned_positions and lp.model.attention == "full"
  px = pathx_config.get_config("")
  assert px.optimizer.grad_clip == 1.0 and px.model.learned_positions
  im = image_config.get_config("")
  assert (im.model.num_layers, im.model.num_heads, im.batch_size,
          im.optimizer.learning_rate) == (1, 8, 256, 5e-4)
  tx = text_config.get_config("")
  assert (tx.max_length, tx.optimizer.warmup_steps, tx.num_train_steps) == (
      4000, 8000, 20000)


def test_pixel_tasks_check_length(tmp_path):
  c = pathfinder_config.get_config("quick")
  c.max_length = 1000
  with pytest.raises(ValueError, match="1024"):
    tasks.get_task(c)
