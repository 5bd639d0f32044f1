r"""Registers per thread of the fused kernels, estimated without a GPU.

The level kernels are latency-bound, and their registers set how many
programs an SM runs (docs/benchmarks.md, "Registers at tiles of one
block"): an SM of a Hopper card has 65,536 registers, and a program of
``w`` warps at ``r`` registers per thread takes ``32 w r`` of them (in steps
of 8 registers), at most 32 programs. This script screens a change's
effect on registers on a CPU, before a GPU call times it:

  1. traces the forward+backward of ``implementation="pallas"`` and lowers
     it for CUDA (no GPU needed), keeping each kernel's Triton IR and its
     warp count;
  2. compiles that IR with the ``triton`` package for sm_90 and assembles
     it with the ``ptxas`` inside that package (``ptxas -v``).

  pip install triton   # not in requirements.txt: a developer's tool
  python scripts/kernel_registers.py [--length 2048] [--block_size 16]
      [--head_dim 64] [--causal] [--masked]
      [--kernels 'hattn_(fwd|dq|dkv|dqkv)_l[01]$'] [--warps 2]
      [--tuning backward_l0_impl=sweep sweep_levels=1]

It prints one JSON line per kernel: its name, warps, registers per
thread, spill bytes and the programs an SM can hold by registers.

The numbers are an estimate: the GPU build compiles the same IR with the
Triton inside jaxlib and its own ptxas, which allocate differently. For
the kernels of commit 0e475a8 (blocks of 16, head_dim 64; triton 3.9.0,
jax 0.10.2 on the CPU) this script gives 151 / 180 / 210 / 255 / 246
registers for forward level 0, dq levels 0 and 1 and dk, dv levels 0 and
1, where Nsight Compute read 128 / 168 / 243 / 255 / 246 on an H200 (jax
0.11.2, 2026-12-02). Read differences between variants, not absolute
values, and time what looks promising on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from htransformer.attention import kernels  # noqa: E402

REGISTERS_PER_SM = 65536
PROGRAMS_PER_SM = 32


def _hopper():
  """Where Pallas lowers for a Hopper card (sm_90) on a host without one:
  jax 0.11 reads the card from the abstract mesh's device (0.10 assumed
  sm_90 when it found no GPU)."""
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
          device_kind="NVIDIA H200", num_cores=None, platform="gpu"))
  return jax.sharding.use_abstract_mesh(mesh)


def capture_kernels(length, block_size, head_dim, causal, masked=False,
                    heads=8):
  """{kernel name: (Triton IR text, warps, stages)} of the forward+backward,
  lowered for CUDA on this host."""
  # Internal to jax: where the Pallas Triton lowering builds a kernel's IR.
  from jax._src.pallas.triton import pallas_call_registration as registration
  lowering = registration.lowering
  settings, found = {}, {}
  make_call = pl.pallas_call
  lower_module = lowering.lower_jaxpr_to_triton_module

  def pallas_call(*args, **kw):  # the warps each kernel asks for
    params = kw["compiler_params"]
    settings[kw["name"]] = (params.num_warps, params.num_stages)
    return make_call(*args, **kw)

  def lower(*args, **kw):
    result = lower_module(*args, **kw)
    text = result.module.operation.get_asm(enable_debug_info=False)
    name = re.search(r"tt\.func public @(\w+)", text).group(1)
    found[name] = text
    return result

  q = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.bfloat16)

  valid = jnp.ones((1, length), jnp.bool_) if masked else None

  def loss(q, k, v):
    out = kernels.hierarchical_attention_pallas(
        q, k, v, valid, block_size=block_size, causal=causal)
    return jnp.sum(out.astype(jnp.float32))

  pl.pallas_call, lowering.lower_jaxpr_to_triton_module = pallas_call, lower
  try:
    with _hopper():
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
          lowering_platforms=("cuda",))
  finally:
    pl.pallas_call, lowering.lower_jaxpr_to_triton_module = (make_call,
                                                            lower_module)
  return {name: (text, *settings[name]) for name, text in found.items()}


def registers(text, warps, stages):
  """(registers per thread, spill store bytes) of one kernel's Triton IR,
  compiled for sm_90."""
  # pylint: disable=g-import-not-at-top
  import triton
  from triton.backends.compiler import GPUTarget
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(text)
    compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps,
                                       "num_stages": stages})
    ptx = os.path.join(tmp, "kernel.ptx")
    with open(ptx, "w") as f:
      f.write(compiled.asm["ptx"])
    out = subprocess.run([ptxas_path(), "--gpu-name", "sm_90a", "-v", ptx,
                          "-o", os.path.join(tmp, "kernel.cubin")],
                         capture_output=True, text=True, check=True).stderr
  regs = int(re.search(r"Used (\d+) registers", out).group(1))
  spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
  return regs, spill


def ptxas_path():
  """The newest ptxas inside the triton package (Triton's PTX needs it)."""
  import triton  # pylint: disable=g-import-not-at-top
  base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                      "bin")
  for name in ("ptxas-blackwell", "ptxas"):
    if os.path.exists(os.path.join(base, name)):
      return os.path.join(base, name)
  raise FileNotFoundError(f"no ptxas in {base}")


def programs_per_sm(regs, warps):
  per_thread = -(-regs // 8) * 8  # allocated in steps of 8
  return min(PROGRAMS_PER_SM, REGISTERS_PER_SM // (per_thread * 32 * warps))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--block_size", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--masked", action="store_true",
                      help="the kernels of a call with a mask (padding)")
  parser.add_argument("--kernels", default=r"hattn_(fwd|dq|dkv|dqkv)_l[01]$",
                      help="regex of the kernel names to compile")
  parser.add_argument("--warps", type=int, default=0,
                      help="compile with this many warps (0: the kernels')")
  parser.add_argument("--tuning", nargs="+", default=[], metavar="KEY=VALUE",
                      help="kernels.TUNING settings to trace with (e.g. "
                      "backward_l0_impl=sweep sweep_levels=1)")
  args = parser.parse_args()
  try:
    kernels.TUNING.update(kernels.parse_tuning(args.tuning))
  except ValueError as e:
    parser.error(f"--tuning {e}")
  # Triton's default, set so that it does not warn.
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  try:
    # pylint: disable-next=g-import-not-at-top,unused-import
    import triton  # noqa: F401
  except ImportError:
    sys.exit("kernel_registers.py needs the triton package: pip install "
             "triton (a developer's tool, not in requirements.txt).")
  captured = capture_kernels(args.length, args.block_size, args.head_dim,
                             args.causal, args.masked)
  names = [name for name in sorted(captured) if re.search(args.kernels, name)]
  if not names:
    sys.exit(f"--kernels {args.kernels!r} matches none of the kernels: "
             f"{', '.join(sorted(captured))}.")
  for name in names:
    text, warps, stages = captured[name]
    warps = args.warps or warps
    regs, spill = registers(text, warps, stages)
    print(json.dumps({"kernel": name, "warps": warps, "registers": regs,
                      "spill_bytes": spill,
                      "programs_per_sm": programs_per_sm(regs, warps)}),
          flush=True)


if __name__ == "__main__":
  main()
