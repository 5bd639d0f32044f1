r"""Sample text from a trained language model.

  python -m htransformer.sample --workdir=DIR --prompt="The government" \
      [--max_new_tokens=100] [--temperature=1.0] [--top_k=0] [--seed=0] \
      [--best]

Loads ``DIR/config.json``, the tokenizer (``DIR/tokenizer.model`` for
SentencePiece runs) and the latest checkpoint (``--best``: the parameters
with the best validation perplexity), and continues the prompt. The prompt
is preceded by eos, which the model saw at the start of every document.

Decoding is a full recompute: each new token comes from one jitted forward
pass over a fixed-size buffer of ``max_length`` tokens (the context, then
padding), reading the logits at the last real position. The model is
causal, so the padding changes nothing but the float rounding: the logits
are those of running the model on the unpadded context at every step, to
about 6e-7 in float32 and 0.02 in bfloat16 (the LM configs' dtype), which
can turn a near tie in greedy decoding (tests/test_lm.py checks this). Contexts longer than ``max_length`` keep
their last ``max_length`` tokens. Sampling: logits / temperature, the
``top_k`` largest kept (0: all), a draw with the key
``fold_in(key(seed), step)``; temperature 0 is greedy. Generation stops at
eos (unless --nostop_at_eos) or after ``max_new_tokens``. An empty prompt
samples from eos alone (text as a document would start). A negative or
non-finite temperature, a negative ``top_k`` or ``max_new_tokens`` and
token ids outside the vocabulary are errors.
"""

from __future__ import annotations

import math
import operator
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx

from htransformer import checkpoint as ckpt_lib
from htransformer import config_utils

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A language-model run's workdir.")
flags.DEFINE_string("prompt", "", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 100, "Most tokens to generate.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest (0: all).")
flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
flags.DEFINE_bool("best", False, "Use the best-on-validation parameters.")
flags.DEFINE_bool("stop_at_eos", True, "Stop when eos is generated.")


def _count(value, name: str) -> int:
  """``value`` as a Python int >= 0 (not a bool), or a ValueError."""
  count = None
  if not isinstance(value, (bool, np.bool_)):
    try:
      count = operator.index(value)
    except TypeError:
      pass
  if count is None or count < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
  return count


def check_settings(temperature, top_k, max_new_tokens=0):
  """(temperature, top_k, max_new_tokens) as float, int, int; a ValueError
  naming the first that is not a finite temperature >= 0 or a count >= 0."""
  t = None
  if not isinstance(temperature, (bool, np.bool_)):
    try:
      t = float(temperature)
    except (TypeError, ValueError):
      pass
  if t is None or not math.isfinite(t) or t < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), "
                     f"got {temperature!r}.")
  return (t, _count(top_k, "top_k"),
          _count(max_new_tokens, "max_new_tokens"))


def sample_logits(logits, key, temperature: float, top_k: int):
  """One token id from logits [vocab] (see module doc)."""
  temperature, top_k, _ = check_settings(temperature, top_k)
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def step_key(seed: int, step: int):
  return jax.random.fold_in(jax.random.key(seed), step)


class Sampler:
  """Jitted full-recompute decoding of a Decoder on a fixed-size buffer."""

  def __init__(self, model, temperature: float = 1.0, top_k: int = 0):
    temperature, top_k, _ = check_settings(temperature, top_k)
    self.max_len = model.max_len
    self.vocab_size = model.embed.num_embeddings
    graphdef, params = nnx.split(model)
    self.params = params

    def step(params, buffer, n, key):
      logits = nnx.merge(graphdef, params)(buffer, deterministic=True)[0]
      last = jax.lax.dynamic_index_in_dim(logits, n - 1, keepdims=False)
      return sample_logits(last, key, temperature, top_k), last

    self._step = jax.jit(step)

  def next_token(self, context: list[int], key):
    """(token, logits at the last position) for ``context``."""
    window = np.asarray(list(context[-self.max_len:]))
    if not window.size:
      raise ValueError("The context is empty: give at least one token (the "
                       "command line starts every prompt with eos).")
    if window.ndim != 1 or not np.issubdtype(window.dtype, np.integer):
      raise ValueError(f"The context must be a sequence of token ids, got "
                       f"{window.dtype} values of shape {window.shape}.")
    bad = window[(window < 0) | (window >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"Token id {int(bad[0])} is outside the model's "
                       f"vocabulary (0..{self.vocab_size - 1}).")
    buffer = np.zeros((1, self.max_len), np.int32)
    buffer[0, : len(window)] = window
    token, logits = self._step(self.params, jnp.asarray(buffer),
                               jnp.int32(len(window)), key)
    return int(token), logits

  def generate(self, prompt_ids: list[int], max_new_tokens: int,
               seed: int = 0, eos_id: int | None = None) -> list[int]:
    """The new tokens (up to and including eos when ``eos_id`` is given)."""
    max_new_tokens = _count(max_new_tokens, "max_new_tokens")
    context, new = list(prompt_ids), []
    if not context:
      raise ValueError("The prompt is empty: give at least one token (the "
                       "command line starts every prompt with eos).")
    for i in range(max_new_tokens):
      token, _ = self.next_token(context, step_key(seed, i))
      context.append(token)
      new.append(token)
      if eos_id is not None and token == eos_id:
        break
    return new


def load_run(workdir: str, best: bool = False):
  """(model with restored parameters, tokenizer, config) of a run."""
  from htransformer import optim  # pylint: disable=g-import-not-at-top
  from htransformer import tasks  # pylint: disable=g-import-not-at-top
  from htransformer import train  # pylint: disable=g-import-not-at-top
  from htransformer.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config = config_utils.read_run_config(workdir)
  if config.task != "lm":
    raise ValueError(f"{workdir} is a {config.task!r} run, not a language "
                     "model.")
  tok = tokenizer_lib.load_for_workdir(workdir, config.data.vocab)
  task = tasks.Task("lm", {}, tok.vocab_size, 0, config.max_length, "",
                    kind="lm", tokenizer=tok)
  model = train.build_model(config, task, config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
  step, params = ckpt_lib.restore_params(
      workdir, train.abstract_state(params, tx), best)
  logging.info("Restored step %d from %s.", step, workdir)
  return nnx.merge(graphdef, params), tok, config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    check_settings(FLAGS.temperature, FLAGS.top_k, FLAGS.max_new_tokens)
    model, tok, _ = load_run(FLAGS.workdir, FLAGS.best)
  except (FileNotFoundError, ValueError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
  prompt_ids = [tok.eos_id] + tok.encode(FLAGS.prompt)
  sampler = Sampler(model, FLAGS.temperature, FLAGS.top_k)
  new = sampler.generate(prompt_ids, FLAGS.max_new_tokens, FLAGS.seed,
                         tok.eos_id if FLAGS.stop_at_eos else None)
  print(tok.decode(prompt_ids + new), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
