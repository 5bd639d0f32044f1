r"""Host time to build a model's use of the fused kernels: trace and lower.

A model calls the attention once per layer. This script takes the gradient
of a stack of ``--layers`` attention layers (each ``h + attention(h, k,
v)``, ``implementation="pallas"``'s kernels) under ``jax.jit``, and
reports the seconds to trace it, to lower it for a CUDA GPU and, on a
GPU, to compile it, with the number of kernel launches in the lowered
module and of the XLA operations between them (``ops_outside_kernels``:
each fusion of those is a launch too; ``--show_ops``: them by name;
``--forward``: the stack's forward alone, no gradient). The kernels are
one jitted function per setting (``kernels.hierarchical_attention_pallas``),
so layers of one shape share one trace and one lowering: the time should
barely grow with the layers.

Lowering for a GPU needs no GPU with jax 0.10 (this project's CPU
environment); jax 0.11 lowers the Triton kernels only where it sees one.
``--as_hopper`` lowers on a host without a GPU as for a Hopper GPU (the
Mosaic GPU kernels where the defaults take them):

  python scripts/trace_time.py --as_hopper --length 2048 --layers 1 4

``--per_call`` traces the kernels anew at every call (a fresh jitted
function each), as each layer did before they were one function per
setting: the comparison.

Prints one JSON line per number of layers, each measured from cold (the
kernels' jitted functions dropped first).
"""

import argparse
import collections
import functools
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from htransformer.attention import kernels  # noqa: E402


def stack_grad(layers, block_size, causal, per_call=False, forward=False):
  """The gradient (q, k, v) of a stack of ``layers`` attention layers;
  ``per_call``: each layer's kernels a jitted function of their own;
  ``forward``: the stack's output instead (no gradient)."""

  def attend(h, k, v):
    if per_call:
      return jax.jit(functools.partial(
          kernels._pallas_attention, block_size=block_size, causal=causal,
          interpret=False, tile=None, dropout_rate=0.0))(h, k, v, None, None)
    return kernels.hierarchical_attention_pallas(
        h, k, v, None, block_size=block_size, causal=causal)

  def stack(q, k, v):
    h = q
    for _ in range(layers):
      h = h + attend(h, k, v)
    return h

  if forward:
    return jax.jit(stack)
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      stack(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


# StableHLO operations that launch nothing of their own: the kernels'
# calls, views (a reshape of a contiguous array) and constants.
_NO_LAUNCH = {"custom_call", "reshape", "constant"}


def ops_outside_kernels(text):
  """The StableHLO operations the lowered module ``text`` holds besides
  ``_NO_LAUNCH``, by name: the XLA work between the kernels, whose fusions
  are launches of their own (the loss's sum and its gradient among them;
  a function's operations counted once however often it is called)."""
  ops = re.findall(r"= stablehlo\.([a-z_]+)", text)
  return dict(sorted(collections.Counter(
      op for op in ops if op not in _NO_LAUNCH).items()))


def measure(args, layers):
  batch = max(1, args.tokens // args.length)
  x = jax.ShapeDtypeStruct((batch, args.length, args.heads, args.head_dim),
                           jnp.dtype(args.dtype))
  fn = stack_grad(layers, args.block_size, args.causal, args.per_call,
                  args.forward)
  kernels._jitted.cache_clear()  # From cold: no trace of an earlier row.
  start = time.perf_counter()
  traced = fn.trace(x, x, x)
  lowering = time.perf_counter()
  lowered = traced.lower(lowering_platforms=("cuda",))
  done = time.perf_counter()
  text = lowered.as_text()
  outside = ops_outside_kernels(text)
  row = {"layers": layers, "batch": batch, "length": args.length,
         "trace_s": round(lowering - start, 2),
         "lower_s": round(done - lowering, 2),
         "kernel_calls": text.count("stablehlo.custom_call"),
         "ops_outside_kernels": sum(outside.values())}
  if args.show_ops:
    row["ops"] = outside
  if jax.default_backend() == "gpu":
    lowered.compile()
    row["compile_s"] = round(time.perf_counter() - done, 2)
  return row


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--layers", type=int, nargs="+", default=[1, 4],
                      help="attention layers of the traced gradient, one "
                      "row each")
  parser.add_argument("--length", type=int, default=2048,
                      help="sequence length")
  parser.add_argument("--tokens", type=int, default=65536,
                      help="tokens per batch: batch = tokens // length")
  parser.add_argument("--heads", type=int, default=8, help="heads")
  parser.add_argument("--head_dim", type=int, default=64, help="head dim")
  parser.add_argument("--block_size", type=int, default=16,
                      help="block size (a power of two >= 16: the kernels')")
  parser.add_argument("--dtype", default="bfloat16",
                      choices=("bfloat16", "float16", "float32"),
                      help="input dtype")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--as_hopper", action="store_true",
                      help="on a host without a GPU, lower as for a Hopper "
                      "GPU")
  parser.add_argument("--forward", action="store_true",
                      help="the forward alone (no gradient)")
  parser.add_argument("--show_ops", action="store_true",
                      help="also list the operations outside the kernels "
                      "by name (field ops)")
  parser.add_argument("--per_call", action="store_true",
                      help="trace the kernels anew at every call")
  args = parser.parse_args()
  if any(n < 1 for n in args.layers):
    parser.error(f"--layers must be at least 1, got {args.layers}")
  for name in ("length", "heads", "head_dim"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  if args.tokens < args.length:
    parser.error(f"--tokens ({args.tokens}) must be at least --length "
                 f"({args.length}): batch = tokens // length")
  if args.block_size < 16 or args.block_size & (args.block_size - 1):
    parser.error(f"--block_size must be a power of two >= 16 (the fused "
                 f"kernels'), got {args.block_size}")
  if args.as_hopper:
    kernels.mosaic_gpu = lambda: True
  for layers in args.layers:
    print(json.dumps(measure(args, layers)), flush=True)


if __name__ == "__main__":
  main()
