"""Tests for the hierarchical attention core (H-Transformer-1D).

The contract is /work/shared/docs/h_attention.md ("Dense definition" and
"Checks every implementation must pass"). Everything here is checked against a
reference written directly from the dense definition:

  * `dense_reference` computes, for every pair (i, j), the level l(i, j), the
    coarse query/key qbar_l(i), kbar_l(j) exactly as the doc defines them, the
    masked logits and an exact row softmax. It is vectorised over (i, j) and is
    written against an array module `xp`, so the very same code runs in numpy
    float64 (the reference for values) and in jax.numpy (the autodiff
    reference for gradients).
  * `loop_reference` is a literal per-pair Python loop of the definition, used
    only to validate `dense_reference` on tiny inputs.

The references never look at the blockwise algorithm; they only share the
definition with the implementation.
"""

import functools
import itertools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from htransformer.attention import dropout as dropout_lib
from htransformer.attention import hierarchical
from htransformer.attention import full_attention, hierarchical_attention
from tests.scripts_helper import jaxpr_equations


# ----------------------------------------------------------------------------
# Reference implementation of the dense definition.
# ----------------------------------------------------------------------------


def padded_length(length, block_size):
    """Lp = Nr * 2**m, m >= 1, the smallest such length >= L. Returns (Lp, m)."""
    m = 1
    while block_size * 2**m < length:
        m += 1
    return block_size * 2**m, m


def level_matrix(lp, block_size, num_levels):
    """l(i, j): smallest l with |i // (Nr*2**l) - j // (Nr*2**l)| <= 1."""
    i = np.arange(lp)[:, None]
    j = np.arange(lp)[None, :]
    lev = np.full((lp, lp), -1, dtype=np.int64)
    for level in range(num_levels):
        size = block_size << level
        near = np.abs(i // size - j // size) <= 1
        lev = np.where((lev < 0) & near, level, lev)
    # The coarsest level has exactly two blocks, so every pair has a level.
    assert (lev >= 0).all()
    return lev


def _dense_logits(q, k, mask, *, block_size, causal, xp, causal_query="first"):
    """Logits S[b, h, i, j] of the dense definition on the padded sequence.

    q, k: [B, L, H, d] (array module xp). mask: numpy bool [B, L] or None.
    Returns (S, valid, qmask, lev, L, Lp): S without the -inf masking,
    valid[b, 0, i, j] = key j may be attended by query i,
    qmask[b, i] = query i is real.
    `causal_query="mean"` is a deliberate mutation (averaging queries in causal
    mode) used only to show the leak test can fail.
    """
    b, length, h, d = q.shape
    lp, m = padded_length(length, block_size)
    if mask is None:
        mask = np.ones((b, length), dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    pad = lp - length
    maskp = np.pad(mask, ((0, 0), (0, pad)))  # padded positions are never real
    # [B, H, Lp, d] layout.
    qh = xp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kh = xp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    mf = maskp.astype(np.float64)[:, None, :, None]  # [B, 1, Lp, 1]
    mf_x = xp.asarray(mf, dtype=qh.dtype)

    def group_mean(x, g):
        """Mean of the real tokens of each aligned group of g tokens, per token."""
        dd = x.shape[-1]
        sums = (x * mf_x).reshape(b, h, lp // g, g, dd).sum(axis=3)
        counts = np.maximum(mf.reshape(b, 1, lp // g, g, 1).sum(axis=3), 1.0)
        means = sums / xp.asarray(counts, dtype=qh.dtype)
        return xp.repeat(means, g, axis=2)

    lev = level_matrix(lp, block_size, m)
    idx = np.arange(lp)
    s = None
    for level in range(m):
        g = 1 << level
        if causal and causal_query == "first":
            # The query of the group's first real token (the group start
            # where it has none: such rows are not real).
            real = maskp.reshape(b, lp // g, g)
            first = np.where(real.any(-1), real.argmax(-1), 0)
            first = np.repeat(first + np.arange(0, lp, g), g, axis=1)
            qbar = xp.take_along_axis(qh, first[:, None, :, None], axis=2)
        else:
            qbar = group_mean(qh, g)
        kbar = group_mean(kh, g)
        s_l = (qbar @ kbar.swapaxes(-1, -2)) / math.sqrt(d)
        s = s_l if s is None else xp.where(lev == level, s_l, s)

    valid = maskp[:, None, None, :]  # padded keys are excluded
    if causal:
        valid = valid & (idx[None, :] <= idx[:, None])[None, None]
    return s, valid, maskp, lev, length, lp


def dropout_multipliers(batch, heads, lev, rate, rng):
    """[B, H, Lp, Lp] attention-dropout multipliers of every pair (numpy):
    the pair (i, j) at level l = lev[i, j] takes the weight of coarse row
    i >> l and coarse key j >> l at that level (dropout.py)."""
    with jax.ensure_compile_time_eval():  # also inside a traced reference
        seed = np.asarray(dropout_lib.seed_from_key(rng))
    seeds = dropout_lib.head_seeds(seed, batch, heads, xp=np)
    i = np.arange(lev.shape[0])[:, None]
    j = np.arange(lev.shape[1])[None, :]
    out = np.zeros((batch, heads) + lev.shape, np.float32)
    for level in range(int(lev.max()) + 1):
        ls = dropout_lib.level_seed(seeds, level, xp=np)[:, :, None, None]
        mult = dropout_lib.multiplier(ls, (i >> level).astype(np.uint32),
                                      (j >> level).astype(np.uint32), rate,
                                      xp=np)
        out = np.where(lev == level, mult, out)
    return out


def dense_reference(q, k, v, mask=None, *, block_size, causal, xp=np,
                    causal_query="first", dropout=None):
    """out[b, i, h, :] of the dense definition. q, k: [B,L,H,d]; v: [B,L,H,dv].

    dropout: None or (rate, PRNG key): attention dropout on the weights of
    the numerator (the normaliser keeps every weight)."""
    s, valid, maskp, lev, length, lp = _dense_logits(
        q, k, mask, block_size=block_size, causal=causal, xp=xp,
        causal_query=causal_query)
    # A finite "minus infinity": identical to -inf for rows with at least one
    # valid key, and keeps fully padded rows (zeroed below) NaN-free for grad.
    neg = -0.25 * float(np.finfo(np.dtype(s.dtype)).max)
    s = xp.where(valid, s, neg)
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p = p / p.sum(axis=-1, keepdims=True)
    if dropout is not None:
        mult = dropout_multipliers(q.shape[0], q.shape[2], lev, *dropout)
        p = p * xp.asarray(mult, dtype=p.dtype)
    vh = xp.pad(v, ((0, 0), (0, lp - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    out = p @ vh  # [B, H, Lp, dv]
    out = xp.where(maskp[:, None, :, None], out, 0.0)
    return out.transpose(0, 2, 1, 3)[:, :length]


def numpy_reference(q, k, v, mask=None, *, block_size, causal, **kw):
    f64 = lambda x: np.asarray(x, dtype=np.float64)
    return dense_reference(f64(q), f64(k), f64(v), mask, block_size=block_size,
                           causal=causal, xp=np, **kw)


def full_softmax_reference(q, k, v, mask=None, *, causal):
    """Plain softmax attention in numpy float64 (zeros at padded queries)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, length, _, d = q.shape
    if mask is None:
        mask = np.ones((b, length), dtype=bool)
    s = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    valid = mask[:, None, None, :]
    if causal:
        valid = valid & np.tril(np.ones((length, length), dtype=bool))[None, None]
    s = np.where(valid, s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.exp(s - mx)
    den = p.sum(axis=-1, keepdims=True)
    p = p / np.where(den > 0, den, 1.0)
    out = np.einsum("bhij,bjhe->bihe", p, v)
    return np.where(mask[:, :, None, None], out, 0.0)


def loop_reference(q, k, v, mask, *, block_size, causal):
    """Literal per-pair transcription of the definition. q,k: [L,d], v: [L,dv]."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    length, d = q.shape
    _, m = padded_length(length, block_size)
    real = lambda t: t < length and bool(mask[t])
    out = np.zeros((length, v.shape[1]))
    for i in range(length):
        if not real(i):
            continue
        logits, values = [], []
        for j in range(length):
            if not real(j) or (causal and j > i):
                continue
            level = next(l for l in itertools.count()
                         if abs(i // (block_size << l) - j // (block_size << l)) <= 1)
            assert level < m
            gi = range((i >> level) << level, ((i >> level) + 1) << level)
            gj = range((j >> level) << level, ((j >> level) + 1) << level)
            if causal:  # the group's first real token (i itself is real)
                qbar = q[min(t for t in gi if real(t))]
            else:
                qbar = np.mean([q[t] for t in gi if real(t)], axis=0)
            kbar = np.mean([k[t] for t in gj if real(t)], axis=0)
            logits.append(qbar @ kbar / math.sqrt(d))
            values.append(v[j])
        logits = np.array(logits)
        w = np.exp(logits - logits.max())
        out[i] = (w / w.sum()) @ np.array(values)
    return out


def mis_scaled_reference(q, k, v, mask=None, *, block_size, causal, variant):
    """Deliberately broken numerics, to prove the extreme-row tests can fail.

    variant="per_level_max": each level of a row is exponentiated against its
      own max (the "separate max per level" bug).
    variant="global_max": one max per (batch, head) and float32 exp, like
      flaxformer; rows far below the global max underflow.
    """
    f64 = lambda x: np.asarray(x, dtype=np.float64)
    s, valid, maskp, lev, length, lp = _dense_logits(
        f64(q), f64(k), mask, block_size=block_size, causal=causal, xp=np)
    s = np.where(valid, s, -np.inf)
    with np.errstate(all="ignore"):
        if variant == "per_level_max":
            p = np.zeros_like(s)
            for level in range(lev.max() + 1):
                sl = np.where(lev == level, s, -np.inf)
                mx = sl.max(axis=-1, keepdims=True)
                mx = np.where(np.isfinite(mx), mx, 0.0)
                p += np.exp(sl - mx)
        elif variant == "global_max":
            mx = np.where(valid, s, -np.inf).max(axis=(-1, -2), keepdims=True)
            p = np.exp((s - mx).astype(np.float32)).astype(np.float64)
        else:
            raise AssertionError(variant)
        p = p / p.sum(axis=-1, keepdims=True)
        vh = np.pad(f64(v), ((0, 0), (0, lp - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
        out = np.where(maskp[:, None, :, None], p @ vh, 0.0)
    return out.transpose(0, 2, 1, 3)[:, :length]


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
#
# XLA:CPU compilation dominates the runtime of this file, so the tests reuse a
# few shapes on purpose: `run_h` keeps one jitted function per (block_size,
# causal) and jax caches its executables by input shape. SHARED is the shape
# most single-purpose tests run at (it is also one of MATCH_CASES).

SHARED = dict(length=100, block_size=4, d=16, dv=8)

# Every jit in this file compiles at XLA backend optimisation level 0: it cuts
# XLA:CPU compile time 2-3x and the programs are tiny. Passed per jit (not via
# XLA_FLAGS) so that nothing else in the process or its subprocesses is affected.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def make_qkv(seed, b, length, h, d, dv=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    q = rng.standard_normal((b, length, h, d)).astype(dtype)
    k = rng.standard_normal((b, length, h, d)).astype(dtype)
    v = rng.standard_normal((b, length, h, dv)).astype(dtype)
    return q, k, v


def make_mask(seed, b, length, kind):
    """Suffix-padding masks, True = real token.

    none: no mask (None); full: all real; partial: row 0 padded, other rows
    full; suffix: every row padded, different lengths; empty: row 0 has no
    real token at all, row 1 random.
    """
    if kind == "none":
        return None
    rng = np.random.default_rng(seed + 12345)
    if kind == "full":
        lengths = np.full(b, length)
    elif kind == "partial":
        lengths = np.full(b, length)
        lengths[0] = rng.integers(1, length) if length > 1 else 1
    elif kind == "suffix":
        assert length >= b + 1
        lengths = rng.choice(np.arange(1, length), size=b, replace=False)
    elif kind == "empty":
        lengths = rng.integers(1, length + 1, size=b)
        lengths[0] = 0
    else:
        raise AssertionError(kind)
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


@functools.lru_cache(maxsize=None)
def _jitted_h(block_size, causal):
    return jit(functools.partial(hierarchical_attention,
                                     block_size=block_size, causal=causal))


def run_h(q, k, v, mask=None, *, block_size, causal):
    return np.asarray(_jitted_h(block_size, causal)(q, k, v, mask=mask))


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def shared_inputs(seed, kind="partial"):
    q, k, v = make_qkv(seed, 2, SHARED["length"], 2, SHARED["d"], SHARED["dv"])
    return q, k, v, make_mask(seed, 2, SHARED["length"], kind)


# ----------------------------------------------------------------------------
# 0. The reference itself.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("length,block_size,causal,holes", [
    (1, 2, False, False), (5, 2, True, False), (11, 2, False, True),
    (13, 2, True, False), (19, 4, False, True), (19, 4, True, False),
    (23, 2, False, False), (23, 2, True, True),
])
def test_reference_matches_per_pair_loop(length, block_size, causal, holes):
    q, k, v = make_qkv(length, 1, length, 1, 3, 2, dtype=np.float64)
    if holes:
        mask = np.random.default_rng(length).random((1, length)) < 0.7
        mask[0, 0] = True
    else:
        mask = make_mask(length, 1, length, "suffix" if length > 2 else "full")
    vec = numpy_reference(q, k, v, mask, block_size=block_size, causal=causal)
    loop = loop_reference(q[0, :, 0], k[0, :, 0], v[0, :, 0], mask[0],
                          block_size=block_size, causal=causal)
    np.testing.assert_allclose(vec[0, :, 0], loop, atol=1e-12, rtol=0)


def test_reference_level_matrix_properties():
    lp, m = padded_length(100, 4)
    assert (lp, m) == (128, 5)
    assert padded_length(1, 16) == (32, 1)
    assert padded_length(32, 16) == (32, 1)
    assert padded_length(33, 16) == (64, 2)
    lev = level_matrix(lp, 4, m)
    i, j = np.indices(lev.shape)
    assert (lev == lev.T).all()
    # near field (same or adjacent level-0 block) is exact
    assert ((lev == 0) == (np.abs(i // 4 - j // 4) <= 1)).all()
    assert lev.max() == m - 1
    # resolution halves as distance doubles: level never decreases with distance
    assert (np.diff(lev[0]) >= 0).all()


def test_reference_jnp_port_matches_numpy():
    q, k, v = make_qkv(3, 2, 21, 2, 4, 3, dtype=np.float64)
    mask = make_mask(3, 2, 21, "suffix")
    for causal in (False, True):
        want = numpy_reference(q, k, v, mask, block_size=2, causal=causal)
        with jax.enable_x64(True):
            ref = jit(functools.partial(dense_reference, mask=mask, block_size=2,
                                            causal=causal, xp=jnp))
            got = np.asarray(ref(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------
# 1. Equals the dense definition.
# ----------------------------------------------------------------------------

# (L, Nr, d, dv, mask kind): non-powers of two, L < Nr, L == Lp, a row with no
# real token, many levels (Nr=2, L=257: Lp=512, m=8), value dim != head dim.
MATCH_CASES = [
    (1, 2, 4, 4, "empty"),
    (7, 2, 4, 4, "none"),
    (7, 16, 16, 16, "suffix"),
    (16, 2, 16, 16, "partial"),
    (16, 4, 4, 6, "none"),
    (33, 2, 4, 4, "suffix"),
    (33, 8, 16, 16, "none"),
    (33, 16, 4, 4, "empty"),
    (100, 4, 16, 8, "suffix"),   # SHARED
    (100, 16, 4, 4, "none"),
    (257, 2, 4, 4, "none"),
    (257, 8, 16, 16, "suffix"),
    (45, 6, 4, 4, "suffix"),     # even block sizes that are not powers of 2
    (100, 10, 8, 8, "none"),
    (97, 12, 4, 6, "partial"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length,block_size,d,dv,mask_kind", MATCH_CASES)
def test_matches_dense_definition(length, block_size, d, dv, mask_kind, causal):
    seed = length * 1000 + block_size * 10 + d
    q, k, v = make_qkv(seed, 2, length, 2, d, dv)
    mask = make_mask(seed, 2, length, mask_kind)
    out = run_h(q, k, v, mask, block_size=block_size, causal=causal)
    assert out.shape == (2, length, 2, dv)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    want = numpy_reference(q, k, v, mask, block_size=block_size, causal=causal)
    err = max_abs(out, want)
    assert err <= 2e-5, f"max abs error {err:.3g}"
    if mask is not None:
        assert (out[~mask] == 0).all(), "padded query positions must be zero"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_mask_with_holes(causal):
    """Non-suffix masks: means over real tokens; in causal mode the query of
    the group's first real token (docs/h_attention.md, "Masks with holes").
    Garbage at the holes changes nothing."""
    q, k, v, _ = shared_inputs(5)
    rng = np.random.default_rng(6)
    mask = rng.random(q.shape[:2]) < 0.6
    mask[:, 0] = True
    # Groups (levels 1 and 2) that start with a hole and hold a real token.
    for g in (2, 4):
        assert any(not mask[b, t] and mask[b, t:t + g].any()
                   for b in range(2) for t in range(0, 100, g))
    want = numpy_reference(q, k, v, mask, block_size=SHARED["block_size"],
                           causal=causal)
    for x in (q, k, v):
        x[~mask] = 1e4 * rng.standard_normal(x[~mask].shape)
    out = run_h(q, k, v, mask, block_size=SHARED["block_size"], causal=causal)
    assert (out[~mask] == 0).all()
    assert max_abs(out, want) <= 2e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_padding_content_is_ignored(causal):
    """Whatever sits at padded positions (here: large garbage) changes nothing."""
    q, k, v, mask = shared_inputs(8, "suffix")
    rng = np.random.default_rng(9)
    q2, k2, v2 = (x.copy() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[~mask] = (300.0 * rng.standard_normal(x[~mask].shape)).astype(np.float32)
    nr = SHARED["block_size"]
    want = numpy_reference(q, k, v, mask, block_size=nr, causal=causal)
    assert max_abs(run_h(q, k, v, mask, block_size=nr, causal=causal), want) <= 2e-5
    assert max_abs(run_h(q2, k2, v2, mask, block_size=nr, causal=causal), want) <= 2e-5


def test_single_token_returns_its_value():
    q, k, v = make_qkv(1, 2, 1, 2, 4, 4)
    mask = np.ones((2, 1), dtype=bool)
    for causal in (False, True):
        out = run_h(q, k, v, mask, block_size=2, causal=causal)
        np.testing.assert_allclose(out, v, atol=1e-6)


def test_eager_and_explicit_xla_implementation():
    """Eager (no jit) call with implementation="xla" equals the jitted default."""
    q, k, v = make_qkv(2, 2, 7, 2, 4, 4)
    eager = hierarchical_attention(q, k, v, block_size=2, causal=True,
                                   implementation="xla")
    assert eager.shape == (2, 7, 2, 4) and eager.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(eager),
                               run_h(q, k, v, block_size=2, causal=True), atol=1e-6)


def test_eager_call_compiles_once_per_shape():
    """Outside jit the plain path is one compiled function: a handful of
    compilations at a new shape (not one per operation), none again."""
    q, k, v = make_qkv(5, 3, 37, 3, 5, 6)  # a shape no other test uses
    compiled = []

    def listen(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        calls = []
        for _ in range(2):
            hierarchical_attention(q, k, v, block_size=4, causal=True,
                                   implementation="xla")
            calls.append(len(compiled))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert calls[0] <= 8, calls  # op by op it is over 200
    assert calls[1] == calls[0], calls


# ----------------------------------------------------------------------------
# 2. Nr >= Lp / 2 is full attention.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length,block_size,mask_kind",
                         [(5, 4, "none"), (13, 8, "suffix"), (32, 16, "partial")])
def test_full_attention_regime(length, block_size, mask_kind, causal):
    lp, m = padded_length(length, block_size)
    assert m == 1 and block_size >= lp // 2
    q, k, v = make_qkv(length + block_size, 2, length, 2, 8, 5)
    mask = make_mask(length, 2, length, mask_kind)
    want = full_softmax_reference(q, k, v, mask, causal=causal)
    # the reference of the definition agrees too
    np.testing.assert_allclose(
        numpy_reference(q, k, v, mask, block_size=block_size, causal=causal),
        want, atol=1e-12)
    out = run_h(q, k, v, mask, block_size=block_size, causal=causal)
    assert max_abs(out, want) <= 2e-5
    full = np.asarray(jit(functools.partial(full_attention, causal=causal))(
        q, k, v, mask=mask))
    assert full.shape == want.shape and full.dtype == np.float32
    assert max_abs(full, want) <= 2e-5
    assert max_abs(full, out) <= 2e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_full_attention_matches_reference_long(causal):
    q, k, v, mask = shared_inputs(4, "suffix")
    full = np.asarray(jit(functools.partial(full_attention, causal=causal))(
        q, k, v, mask=mask))
    want = full_softmax_reference(q, k, v, mask, causal=causal)
    assert max_abs(full, want) <= 2e-5
    assert (full[~mask] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_full_attention_key_column_masks_any_keys(causal):
    """The extra head column cuDNN full attention masks non-suffix masks with
    (run here through XLA, with no mask argument) gives the float64 masked
    softmax, values and gradients; masked keys get exactly zero gradient."""
    from htransformer.attention import api
    length, d = 45, 4
    q, k, v = make_qkv(31, 2, length, 3, d, d)
    mask = np.random.default_rng(32).random((2, length)) < 0.35
    mask[:, 0] = True
    cot = np.random.default_rng(33).standard_normal(q.shape).astype(np.float32)

    def by_column(q, k, v):
        out = api._xla(*api._mask_keys_by_column(q, k, v, mask), causal, None,
                       scale_dim=d)[..., :d]
        return jnp.where(mask[:, :, None, None], out, 0)

    want = full_softmax_reference(q, k, v, mask, causal=causal)
    assert max_abs(np.asarray(jit(by_column)(q, k, v)), want) <= 2e-5
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cot)
    got = jit(jax.grad(loss(by_column), argnums=(0, 1, 2)))(q, k, v)
    ref = jit(jax.grad(loss(functools.partial(
        full_attention, causal=causal, mask=mask, implementation="xla")),
        argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, ref):
        assert max_abs(np.asarray(g), np.asarray(w)) <= 1e-5, name
        assert (np.asarray(g)[~mask] == 0).all(), name


def _limit_xla_logits(monkeypatch, logits):
    """Full attention's XLA path holds at most ``logits`` at once, whatever
    the backend."""
    from htransformer.attention import api
    monkeypatch.setattr(api, "XLA_MAX_LOGITS", logits)
    monkeypatch.setattr(api, "XLA_MAX_LOGITS_ACCELERATOR", logits)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mask_kind", ["none", "partial", "empty"])
def test_full_attention_in_chunks_of_queries(causal, mask_kind, monkeypatch):
    """Above XLA_MAX_LOGITS the XLA path runs in chunks of queries (the last
    one padded): the float64 masked softmax, and the same gradients as the
    dense path; value dim != head dim."""
    length = 37
    q, k, v = make_qkv(41, 2, length, 3, 8, 5)
    mask = make_mask(length, 2, length, mask_kind)
    cot = np.random.default_rng(42).standard_normal(v.shape).astype(
        np.float32)
    def compiled():  # new functions: jit traces them again
        run = lambda q, k, v: full_attention(
            q, k, v, causal=causal, mask=mask, implementation="xla")
        loss = lambda q, k, v: jnp.sum(run(q, k, v) * cot)
        return jax.jit(run), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    run, grad = compiled()
    assert "while" not in run.lower(q, k, v).as_text()
    dense_out, dense_grads = np.asarray(run(q, k, v)), grad(q, k, v)
    # 2 x 3 x 37 keys x 5 queries per chunk: 8 chunks, the last of 2 rows.
    _limit_xla_logits(monkeypatch, 2 * 3 * length * 5)
    run, grad = compiled()
    assert "while" in run.lower(q, k, v).as_text()  # lax.map is a loop
    out = np.asarray(run(q, k, v))
    want = full_softmax_reference(q, k, v, mask, causal=causal)
    assert max_abs(out, want) <= 2e-5
    assert max_abs(out, dense_out) <= 1e-6
    if mask is not None:
        assert (out[~mask] == 0).all()
    grads = grad(q, k, v)
    for name, g, w in zip("qkv", grads, dense_grads):
        assert max_abs(np.asarray(g), np.asarray(w)) <= 1e-5, name


# ----------------------------------------------------------------------------
# 3. v = 1 returns 1 at every real position.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_constant_value_gives_one(causal):
    q, k, v, mask = shared_inputs(10, "partial")
    q = 4.0 * q  # sharper softmax, larger dynamic range
    v = np.ones_like(v)
    out = run_h(q, k, v, mask, block_size=SHARED["block_size"], causal=causal)
    np.testing.assert_allclose(out[mask], 1.0, atol=1e-5)
    assert (out[~mask] == 0).all()


# ----------------------------------------------------------------------------
# 4. Causal: no information flows from the future.
# ----------------------------------------------------------------------------


def _leak_check(fn, shape_args, t, seed):
    """max |change| of outputs at <= t and > t when inputs after t change."""
    length = shape_args[1]
    q, k, v = make_qkv(seed, *shape_args)
    rng = np.random.default_rng(seed + 1)
    q2, k2, v2 = (x.copy() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t + 1:] = rng.standard_normal(x[:, t + 1:].shape).astype(x.dtype)
    a, b = np.asarray(fn(q, k, v)), np.asarray(fn(q2, k2, v2))
    past = max_abs(a[:, :t + 1], b[:, :t + 1])
    future = max_abs(a[:, t + 1:], b[:, t + 1:]) if t + 1 < length else None
    return past, future


@pytest.mark.parametrize("length,block_size,d", [(100, 16, 4), (257, 2, 4)])
def test_causal_no_leak(length, block_size, d):
    fn = functools.partial(run_h, block_size=block_size, causal=True)
    # positions at, just before and just after block boundaries of several levels
    for t in (0, block_size - 1, block_size, 2 * block_size + 1, 4 * block_size - 1,
              length // 2, length - 3):
        past, future = _leak_check(fn, (2, length, 2, d), t, seed=t)
        assert past <= 1e-6, f"t={t}: outputs at <= t changed by {past:.3g}"
        assert future > 1e-3, f"t={t}: outputs after t did not change"


def test_causal_leak_check_is_discriminative():
    """The leak check fails for bidirectional attention and for the doc's
    'averaging queries in causal mode' mistake (done on the reference)."""
    shape, block_size, t = (2, 100, 2, 4), 16, 40
    bidir = functools.partial(run_h, block_size=block_size, causal=False)
    past, _ = _leak_check(bidir, shape, t, seed=1)
    assert past > 1e-3
    mean_q = functools.partial(numpy_reference, mask=None, block_size=block_size,
                               causal=True, causal_query="mean")
    past, _ = _leak_check(mean_q, shape, t, seed=1)
    assert past > 1e-3
    first_q = functools.partial(numpy_reference, mask=None, block_size=block_size,
                                causal=True)
    past, future = _leak_check(first_q, shape, t, seed=1)
    assert past == 0.0 and future > 1e-3


# ----------------------------------------------------------------------------
# 5. Extreme rows: the softmax offset must be per row and shared by all levels.
# ----------------------------------------------------------------------------

# Logits are a large part along e0 plus O(1) noise in the other dims. The
# large parts are powers of two (exact in float32); still, float32 rounding of
# a ~500 logit is ~3e-5, so the tolerance here is 3e-4 instead of 2e-5 (every
# float32 implementation has this error).
EXTREME_TOL = 3e-4


def _extreme_inputs(seed, q_e0, k_e0, kind="partial"):
    q, k, v, mask = shared_inputs(seed, kind)
    q[..., 0] = q_e0[None, :, None]
    k[..., 0] = k_e0[None, :, None]
    return q, k, v, mask


def _check_extreme(q, k, v, mask, causal):
    nr = SHARED["block_size"]
    want = numpy_reference(q, k, v, mask, block_size=nr, causal=causal)
    out = run_h(q, k, v, mask, block_size=nr, causal=causal)
    assert np.isfinite(out).all(), "NaN/inf in output"
    real = np.ones(out.shape[:2], bool) if mask is None else mask
    assert (np.linalg.norm(out, axis=-1)[real] > 1e-3).all(), "zero rows in output"
    err = max_abs(out, want)
    assert err <= EXTREME_TOL, f"max abs error {err:.3g}"
    return want


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_extreme_rows_far_below_global_max(causal):
    """Per head, rows < 50 have all logits near +512, rows >= 50 near -512.
    One global max per (batch, head) underflows the low rows."""
    length = SHARED["length"]
    sign = np.where(np.arange(length) < length // 2, 1.0, -1.0)
    q, k, v, mask = _extreme_inputs(11, q_e0=64.0 * sign, k_e0=np.full(length, 32.0))
    want = _check_extreme(q, k, v, mask, causal)
    # the data really is extreme: a flaxformer-style global max fails here
    bad = mis_scaled_reference(q, k, v, mask, block_size=SHARED["block_size"],
                               causal=causal, variant="global_max")
    low = mask & (sign < 0)[None, :]
    assert low.sum() > 20
    assert not np.isfinite(bad[low]).all() or max_abs(bad[low], want[low]) > 0.1


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_extreme_coarse_levels_far_above_level0(causal):
    """Keys < 50 have logits ~ +256 against every query, keys >= 50 ~ 0.
    Rows far into the second half see the first half only at coarse levels,
    so their coarse-level logits sit ~256 above their level-0 logits: a
    separate max per level mis-weights them badly."""
    length = SHARED["length"]
    k_e0 = np.where(np.arange(length) < length // 2, 32.0, 0.0)
    q, k, v, mask = _extreme_inputs(12, q_e0=np.full(length, 32.0), k_e0=k_e0,
                                    kind="full")
    want = _check_extreme(q, k, v, mask, causal)
    bad = mis_scaled_reference(q, k, v, mask, block_size=SHARED["block_size"],
                               causal=causal, variant="per_level_max")
    assert max_abs(bad, want) > 0.1, "test data does not discriminate the bug"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_extreme_mixed_rows_random_scales(causal):
    """Random per-row query scales x1..x64 and signs, keys offset along e0."""
    q, k, v, mask = shared_inputs(13, "suffix")
    rng = np.random.default_rng(13)
    scale = (2.0 ** rng.integers(0, 7, size=q.shape[1])) * rng.choice([-1, 1], size=q.shape[1])
    q = (q * scale[None, :, None, None]).astype(np.float32)
    k[..., 0] += 8.0
    _check_extreme(q, k, v, mask, causal)


# ----------------------------------------------------------------------------
# 6. Gradients.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.25], ids=["plain", "dropout"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_match_autodiff_of_reference(causal, rate):
    """Also with attention dropout (section "Attention dropout" below)."""
    length, block_size, d, dv = 37, 4, 8, 6
    q, k, v = make_qkv(21, 2, length, 2, d, dv)
    cot = np.random.default_rng(22).standard_normal((2, length, 2, dv)).astype(np.float32)
    mask = make_mask(21, 2, length, "partial")
    rng = jax.random.PRNGKey(47)

    def loss_impl(q, k, v):
        out = hierarchical_attention(q, k, v, block_size=block_size, causal=causal,
                                     mask=mask, dropout_rate=rate,
                                     dropout_rng=rng)
        return jnp.sum(out * cot)

    def loss_ref(q, k, v):
        out = dense_reference(q, k, v, mask, block_size=block_size, causal=causal,
                              xp=jnp, dropout=(rate, rng) if rate else None)
        return jnp.sum(out * cot)

    got = jit(jax.grad(loss_impl, argnums=(0, 1, 2)))(q, k, v)
    want = jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and np.isfinite(g).all(), name
        scale = max(1.0, float(np.abs(w).max()))
        err = max_abs(g, w)
        assert err <= 1e-4 * scale, f"d{name}: max abs error {err:.3g} (scale {scale:.3g})"
        # padded positions have no influence on the output
        assert np.abs(g[~mask]).max() <= 1e-6, name

    if causal and not rate:
        # per-example gradients (vmap of grad over the batch axis) agree too
        def loss_one(q, k, v, c, m):
            out = hierarchical_attention(q[None], k[None], v[None], mask=m[None],
                                         block_size=block_size, causal=True)
            return jnp.sum(out[0] * c)
        per_ex = jit(jax.vmap(jax.grad(loss_one)))(q, k, v, cot, mask)
        np.testing.assert_allclose(np.asarray(per_ex), np.asarray(got[0]), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_finite_differences_float64(causal):
    """Central differences along a random direction vs <grad, direction>,
    with x64 enabled locally.

    The reference's float64 gradient must match its own finite differences
    tightly (1e-7): this checks the FD machinery. The implementation
    computes in float64 for float64 inputs, so it is held to the same
    tolerances, and its forward pass equals the reference to ~1e-12.
    """
    length, block_size, d, dv = 19, 2, 4, 3
    with jax.enable_x64(True):
        q, k, v = make_qkv(31, 2, length, 2, d, dv, dtype=np.float64)
        mask = make_mask(31, 2, length, "suffix")
        rng = np.random.default_rng(32)
        cot = rng.standard_normal((2, length, 2, dv))
        dirs = [rng.standard_normal(x.shape) for x in (q, k, v)]

        def impl(q, k, v):
            return jnp.sum(hierarchical_attention(q, k, v, block_size=block_size,
                                                  causal=causal, mask=mask) * cot)

        def ref(q, k, v):
            return jnp.sum(dense_reference(q, k, v, mask, block_size=block_size,
                                           causal=causal, xp=jnp) * cot)

        def directional(loss, eps):
            grads = jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
            analytic = sum(float(np.sum(np.asarray(g) * u)) for g, u in zip(grads, dirs))
            f = jit(loss)
            plus = float(f(*(x + eps * u for x, u in zip((q, k, v), dirs))))
            minus = float(f(*(x - eps * u for x, u in zip((q, k, v), dirs))))
            return analytic, (plus - minus) / (2 * eps)

        assert jit(impl)(q, k, v).dtype == jnp.float64
        np.testing.assert_allclose(jit(impl)(q, k, v), jit(ref)(q, k, v),
                                   rtol=1e-11, atol=1e-11)
        ref_analytic, ref_numeric = directional(ref, 1e-5)
        analytic, numeric = directional(impl, 1e-5)
    assert abs(ref_numeric - ref_analytic) <= 1e-7 * max(1.0, abs(ref_analytic))
    assert abs(analytic - ref_analytic) <= 1e-9 * max(1.0, abs(ref_analytic))
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_where_queries_see_no_key(causal):
    """Queries that see no real key (normaliser 0): every query of a batch
    row with no real token (a loader's filler example), and, causal, the
    padding before a row's first real token (left padding). Their outputs
    are zero and take no gradient; the gradients are finite and equal the
    reference's (a 0/0 there is NaN, which reaches every parameter)."""
    length, block_size, d, dv = 37, 4, 8, 6
    q, k, v = make_qkv(25, 2, length, 2, d, dv)
    mask = np.ones((2, length), bool)
    mask[0] = False
    mask[1, :6] = False
    mask[1, 30:] = False
    cot = np.random.default_rng(26).standard_normal(
        (2, length, 2, dv)).astype(np.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    impl = functools.partial(hierarchical_attention, block_size=block_size,
                             causal=causal, mask=mask, implementation="xla")
    ref = functools.partial(dense_reference, mask=mask, block_size=block_size,
                            causal=causal, xp=jnp)
    out = np.asarray(jit(impl)(q, k, v))
    assert (out[~mask] == 0).all()
    assert max_abs(out, numpy_reference(q, k, v, mask, block_size=block_size,
                                        causal=causal)) <= 2e-5
    got = jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
    want = jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.isfinite(g).all(), name
        assert max_abs(g, w) <= 1e-4 * max(1.0, float(np.abs(w).max())), name
        assert (g[~mask] == 0).all(), name


# ----------------------------------------------------------------------------
# 7. Padding invariance.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_padding_invariance(causal):
    """Length 33 (Lp=64) vs the same tokens extended to length 100 (Lp=128)
    with the extra positions masked out (and filled with random values)."""
    short = 33
    nr = SHARED["block_size"]
    q, k, v, mask_long = shared_inputs(41, "full")
    assert padded_length(short, nr)[0] != padded_length(q.shape[1], nr)[0]
    mask_short = make_mask(41, 2, short, "partial")
    mask_long[:, :] = False
    mask_long[:, :short] = mask_short
    out_short = run_h(q[:, :short], k[:, :short], v[:, :short], mask_short,
                      block_size=nr, causal=causal)
    out_long = run_h(q, k, v, mask_long, block_size=nr, causal=causal)
    assert max_abs(out_long[:, :short], out_short) <= 1e-5
    assert (out_long[:, short:] == 0).all()


# ----------------------------------------------------------------------------
# 8. bfloat16.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bfloat16_inputs(causal):
    """Relative Frobenius error vs the float64 reference of the bf16-rounded
    inputs < 2e-2 (bf16 output rounding alone is ~3e-3)."""
    q, k, v, mask = shared_inputs(51, "suffix")
    qb, kb, vb = (jnp.asarray(x, dtype=jnp.bfloat16) for x in (q, k, v))
    out = _jitted_h(SHARED["block_size"], causal)(qb, kb, vb, mask=mask)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32), dtype=np.float64)
    want = numpy_reference(*(np.asarray(x.astype(jnp.float32)) for x in (qb, kb, vb)),
                           mask, block_size=SHARED["block_size"], causal=causal)
    assert np.isfinite(out).all()
    rel = np.linalg.norm(out - want) / np.linalg.norm(want)
    assert rel < 2e-2, f"relative Frobenius error {rel:.3g}"
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bfloat16_inputs_accumulate_in_float32(causal):
    """The contract's float32 accumulation with bfloat16 inputs, where the
    error test above cannot tell (bfloat16 sums are within its tolerance
    at these lengths): every product, sum, max, exp and division of the
    plain path, forward and backward, yields float32."""
    q = jnp.ones((1, 64, 2, 8), jnp.bfloat16)
    mask = jnp.ones((1, 64), bool)
    f = lambda q, k, v: hierarchical_attention(
        q, k, v, block_size=4, causal=causal, mask=mask,
        implementation="xla").astype(jnp.float32).sum()
    accumulating = ("dot_general", "reduce_sum", "reduce_max", "exp", "div",
                    "cumsum")
    for fn in (f, jax.grad(f, argnums=(0, 1, 2))):
        eqns = [e for e in jaxpr_equations(jax.make_jaxpr(fn)(q, q, q).jaxpr)
                if e.primitive.name in accumulating]
        assert {e.primitive.name for e in eqns} >= {"dot_general",
                                                    "reduce_sum", "exp"}
        narrow = [f"{e.primitive.name} -> {e.outvars[0].aval.dtype}"
                  for e in eqns if e.outvars[0].aval.dtype != jnp.float32]
        assert not narrow, narrow


# ----------------------------------------------------------------------------
# 9. Transformations: jit, vmap (grad: see the gradient tests, all under jit).
# ----------------------------------------------------------------------------


def _strided_slices(jaxpr):
    """The slices with a stride other than 1, sub-computations included."""
    return [eqn for eqn in jaxpr_equations(jaxpr)
            if eqn.primitive.name == "slice"
            and any(s != 1 for s in (eqn.params["strides"] or ()))]


def test_causal_plain_path_has_no_strided_slice():
    """XLA's GPU compiler aborts on a strided slice of the queries feeding a
    level's matmul (batch x heads 1; tests/test_gpu.py compiles it there):
    the causal coarse queries are taken from the pairs' axis instead. This
    guards the formulation where no GPU runs, forward and backward."""
    q = jnp.ones((1, 64, 1, 16), jnp.float32)
    loss = lambda q: jnp.sum(hierarchical_attention(
        q, q, q, block_size=4, causal=True, implementation="xla"))
    for fn in (loss, jax.grad(loss)):
        assert not _strided_slices(jax.make_jaxpr(fn)(q).jaxpr)
    # The check finds such a slice where there is one.
    assert _strided_slices(jax.make_jaxpr(lambda q: q[:, ::2] @ q[0].T)(
        q[0, :, :, 0]).jaxpr)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_vmap_over_extra_leading_axis(causal):
    nr = SHARED["block_size"]
    inputs = [shared_inputs(61 + n, "suffix") for n in range(3)]
    q, k, v, mask = (np.stack(x) for x in zip(*inputs))  # [3, B, L, H, D]
    fn = functools.partial(hierarchical_attention, block_size=nr, causal=causal)
    vmapped = np.asarray(jit(jax.vmap(lambda a, b, c, m: fn(a, b, c, mask=m)))(
        q, k, v, mask))
    assert vmapped.shape == (3,) + v.shape[1:]
    looped = np.stack([run_h(q[n], k[n], v[n], mask[n], block_size=nr, causal=causal)
                       for n in range(3)])
    np.testing.assert_allclose(vmapped, looped, atol=1e-6)
    want = np.stack([numpy_reference(q[n], k[n], v[n], mask[n], block_size=nr,
                                     causal=causal) for n in range(3)])
    assert max_abs(vmapped, want) <= 2e-5


# ----------------------------------------------------------------------------
# 10. Errors name the offending argument.
# ----------------------------------------------------------------------------


def _small():
    return make_qkv(0, 2, 10, 2, 4, 3)


@pytest.mark.parametrize("block_size", [3, 1, 0, -2, 7])
def test_error_bad_block_size(block_size):
    q, k, v = _small()
    with pytest.raises(ValueError, match="block_size"):
        hierarchical_attention(q, k, v, block_size=block_size)


@pytest.mark.parametrize("block_size", [0, -4])
def test_padded_length_refuses_block_sizes_below_one(block_size):
    """(It used to loop forever: models call it before the API checks.)"""
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        hierarchical.padded_length(100, block_size)


def test_padded_length_and_levels_follow_the_definition():
    """The library's Lp and m (which the models pad their inputs to) are the
    doc's: the smallest Nr * 2**m with m >= 1 that holds L; a length that
    is already one is not padded further."""
    assert hierarchical.padded_length(64, 16) == 64
    assert hierarchical.padded_length(65, 16) == 128
    assert hierarchical.padded_length(1, 16) == 32
    for block_size in (2, 4, 6, 16):
        lengths = list(range(1, 9 * block_size)) + [block_size << 6,
                                                    (block_size << 6) + 1]
        for length in lengths:
            lp, m = padded_length(length, block_size)
            assert hierarchical.padded_length(length, block_size) == lp, (
                length, block_size)
            assert hierarchical.num_levels(length, block_size) == m, (
                length, block_size)


@pytest.mark.parametrize("which", [
    "query_rank", "key_rank", "value_rank", "key_head_dim", "key_length",
    "value_length", "batch", "heads",
])
def test_error_qkv_shape_mismatch(which):
    q, k, v = _small()
    if which == "query_rank":
        q = q[0]
    elif which == "key_rank":
        k = k[..., None]
    elif which == "value_rank":
        v = v[0]
    elif which == "key_head_dim":
        k = k[..., :3]
    elif which == "key_length":
        k = k[:, :9]
    elif which == "value_length":
        v = v[:, :9]
    elif which == "batch":
        v = v[:1]
    elif which == "heads":
        k = k[:, :, :1]
    with pytest.raises(ValueError, match="(?i)query|key|value"):
        hierarchical_attention(q, k, v, block_size=4)


@pytest.mark.parametrize("which", ["length", "batch", "rank"])
def test_error_mask_shape(which):
    q, k, v = _small()
    mask = {"length": np.ones((2, 11), bool), "batch": np.ones((3, 10), bool),
            "rank": np.ones((2, 10, 1), bool)}[which]
    with pytest.raises(ValueError, match="mask"):
        hierarchical_attention(q, k, v, block_size=4, mask=mask)


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_error_mask_not_bool(dtype):
    q, k, v = _small()
    with pytest.raises((TypeError, ValueError), match="mask"):
        hierarchical_attention(q, k, v, block_size=4, mask=np.ones((2, 10), dtype))


def test_error_unknown_implementation():
    q, k, v = _small()
    with pytest.raises(ValueError, match="implementation"):
        hierarchical_attention(q, k, v, block_size=4, implementation="no-such-impl")
    with pytest.raises(ValueError, match="implementation"):
        full_attention(q, k, v, implementation="no-such-impl")
    with pytest.raises(ValueError, match="value_dim == head_dim"):
        full_attention(q, k, v, implementation="cudnn")
    if jax.default_backend() != "gpu":
        for mask in (None, np.ones(q.shape[:2], bool)):
            with pytest.raises(ValueError, match="runs on a GPU"):
                full_attention(q, k, q, mask=mask, implementation="cudnn")


# ----------------------------------------------------------------------------
# 11. The reference is discriminative (so the tests above can fail).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_reference_differs_from_full_attention(causal):
    q, k, v = make_qkv(81, 2, 64, 2, 8)
    ref = numpy_reference(q, k, v, None, block_size=4, causal=causal)
    full = full_softmax_reference(q, k, v, None, causal=causal)
    assert max_abs(ref, full) > 1e-2
    # and the implementation is on the reference's side, not full attention's
    q, k, v, mask = shared_inputs(82, "full")
    nr = SHARED["block_size"]
    out = run_h(q, k, v, mask, block_size=nr, causal=causal)
    ref = numpy_reference(q, k, v, mask, block_size=nr, causal=causal)
    full = full_softmax_reference(q, k, v, mask, causal=causal)
    assert max_abs(out, ref) <= 2e-5 < 1e-2 < max_abs(out, full)


def test_reference_detects_doc_mistakes():
    """Mutations from the doc's 'Known mistakes' change the reference output."""
    q, k, v = make_qkv(82, 1, 64, 1, 8)
    ref = numpy_reference(q, k, v, None, block_size=4, causal=False)[0, :, 0]
    s, _, _, lev, _, _ = _dense_logits(q.astype(np.float64), k.astype(np.float64),
                                       None, block_size=4, causal=False, xp=np)
    w = np.exp(s - s.max(-1, keepdims=True))[0, 0]
    v0 = v[0, :, 0].astype(np.float64)
    np.testing.assert_allclose((w @ v0) / w.sum(-1, keepdims=True), ref, atol=1e-12)
    # normaliser without token counts: each coarse key group counted once
    den_wrong = (w / 2.0 ** lev).sum(-1, keepdims=True)
    assert max_abs((w @ v0) / den_wrong, ref) > 1e-2
    # stopping one level short: the coarsest level's pairs never meet
    short = np.where(lev == lev.max(), 0.0, w)
    assert max_abs((short @ v0) / short.sum(-1, keepdims=True), ref) > 1e-2


# ----------------------------------------------------------------------------
# Attention dropout.
# ----------------------------------------------------------------------------


def _h_dropout(q, k, v, mask, *, block_size, causal, rate, rng,
               implementation="xla"):
    return hierarchical_attention(q, k, v, block_size=block_size, causal=causal,
                                  mask=mask, implementation=implementation,
                                  dropout_rate=rate, dropout_rng=rng)


@pytest.mark.parametrize("length,block_size", [(37, 4), (100, 16), (64, 8)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_dropout_matches_dense_definition(length, block_size, causal):
    q, k, v = make_qkv(41, 2, length, 3, 8)
    mask = make_mask(42, 2, length, "partial")
    rng = jax.random.PRNGKey(43)
    got = np.asarray(jit(functools.partial(
        _h_dropout, mask=mask, block_size=block_size, causal=causal, rate=0.3,
        rng=rng))(q, k, v))
    want = numpy_reference(q, k, v, mask, block_size=block_size, causal=causal,
                           dropout=(0.3, rng))
    assert max_abs(got, want) <= 2e-5
    # The reference without dropout is far from it: the test can fail.
    plain = numpy_reference(q, k, v, mask, block_size=block_size, causal=causal)
    assert max_abs(plain, want) > 0.05
    assert np.all(got[~mask] == 0)


def test_dropout_rate_zero_and_the_key():
    q, k, v = make_qkv(48, 2, 50, 2, 8)
    mask = make_mask(49, 2, 50, "partial")
    run = lambda rate, rng: np.asarray(_h_dropout(
        q, k, v, mask, block_size=8, causal=False, rate=rate, rng=rng))
    plain = np.asarray(hierarchical_attention(q, k, v, block_size=8, mask=mask))
    np.testing.assert_array_equal(run(0.0, None), plain)
    np.testing.assert_array_equal(run(0.0, jax.random.PRNGKey(0)), plain)
    a, b = run(0.2, jax.random.PRNGKey(1)), run(0.2, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)  # same key, same weights dropped
    assert max_abs(a, run(0.2, jax.random.PRNGKey(2))) > 0.01


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_drops_the_rate_independently(rate):
    """Over 2 x 4 heads x 1024^2 level-0 weights: the dropped fraction is the
    rate, heads and batch rows differ, and neighbouring weights are not
    correlated."""
    lev = np.zeros((1024, 1024), np.int64)
    mult = dropout_multipliers(2, 4, lev, rate, jax.random.PRNGKey(3))
    kept = mult > 0
    assert set(np.unique(mult)) == {0.0, np.float32(1 / (1 - rate))}
    n = kept.size
    assert abs((1 - kept.mean()) - rate) < 4 * math.sqrt(rate * (1 - rate) / n) + 1e-4
    for a, b in [(kept[0, 0], kept[0, 1]), (kept[0, 0], kept[1, 0]),
                 (kept[0, 0, :, :-1], kept[0, 0, :, 1:]),
                 (kept[0, 0, :-1], kept[0, 0, 1:])]:
        agree = np.mean(a == b)
        expect = rate**2 + (1 - rate)**2
        assert abs(agree - expect) < 0.01, (agree, expect)
    # Levels draw apart: level 1 over the same indices is another draw.
    lev1 = np.ones((64, 64), np.int64)
    m0 = dropout_multipliers(1, 1, np.zeros((64, 64), np.int64), rate,
                             jax.random.PRNGKey(3))
    m1 = dropout_multipliers(1, 1, lev1, rate, jax.random.PRNGKey(3))
    assert np.any(m0[..., ::2, ::2] != m1[..., ::2, ::2])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_full_attention_dropout(causal, monkeypatch):
    """Full attention with dropout drops the level-0 weight of every pair:
    it equals the reference and hierarchical attention whose blocks cover
    the sequence, also when it runs in chunks of queries."""
    length = 45
    q, k, v = make_qkv(50, 2, length, 2, 8)
    mask = make_mask(51, 2, length, "partial")
    rng = jax.random.PRNGKey(52)
    run = lambda: np.asarray(full_attention(
        q, k, v, causal=causal, mask=mask, dropout_rate=0.3, dropout_rng=rng))
    got = run()
    want = numpy_reference(q, k, v, mask, block_size=32, causal=causal,
                           dropout=(0.3, rng))
    assert max_abs(got, want) <= 2e-5
    h = np.asarray(_h_dropout(q, k, v, mask, block_size=32, causal=causal,
                              rate=0.3, rng=rng))
    assert max_abs(got, h) <= 2e-5
    _limit_xla_logits(monkeypatch, 2 * 2 * 45 * 8)  # 8-row chunks
    assert max_abs(run(), want) <= 2e-5


def test_dropout_errors():
    q, k, v = make_qkv(53, 1, 16, 1, 4)
    # Strings and bools are not rates, even where float() would take them.
    for rate in (-0.1, 1.0, "a", "0.5", True, False, np.bool_(False)):
        with pytest.raises(ValueError, match="dropout_rate"):
            hierarchical_attention(q, k, v, block_size=4, dropout_rate=rate,
                                   dropout_rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs dropout_rng"):
        hierarchical_attention(q, k, v, block_size=4, dropout_rate=0.1)
    with pytest.raises(ValueError, match="needs dropout_rng"):
        full_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError, match="no attention dropout"):
        full_attention(q, k, v, dropout_rate=0.1, implementation="cudnn",
                       dropout_rng=jax.random.PRNGKey(0))
