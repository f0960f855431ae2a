"""Gradient clipping and accumulation (training/optim.make_optimizer) against AdamW written out by hand
over four different micro-batches (two optimiser updates), and the wrong orders of clip / average /
sum shown to give other numbers: the comparison can fail.

Why not Adam's first step alone: with a negligible eps it is -lr * sign(g) whatever the clipping, and
Adam is invariant to one scale of all gradients. Here eps is of the order of the gradients (so every
scale shows in the update) and the two updates' gradients are clipped by different factors."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segformer_jax.training import optim

LR, B1, B2, EPS, WD, HEAD_MULT = 1e-2, 0.9, 0.999, 1e-3, 0.05, 10.0
TOTAL, WARMUP, WARMUP_RATIO = 100, 4, 0.1
CLIP = 0.05


def _opt_config(**kw):
    c = dict(
        learning_rate=LR,
        b1=B1,
        b2=B2,
        eps=EPS,
        weight_decay=WD,
        head_lr_mult=HEAD_MULT,
        warmup_steps=WARMUP,
        warmup_ratio=WARMUP_RATIO,
        poly_power=1.0,
        min_lr=0.0,
        grad_clip_norm=CLIP,
        grad_accum_steps=2,
        no_decay_patterns=("layer_norm", "batch_norm"),
    )
    c.update(kw)
    return types.SimpleNamespace(**c)


PATHS = {  # path -> shape
    "segformer/encoder/block_0_0/layer_norm_1/scale": (6,),
    "segformer/encoder/block_0_0/attention/self/query/kernel": (6, 6),
    "segformer/encoder/block_0_0/attention/self/query/bias": (6,),
    "decode_head/batch_norm/scale": (4,),
    "decode_head/classifier/kernel": (4, 3),
    "decode_head/classifier/bias": (3,),
}


def _tree(flat):
    out = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v, np.float64)
    return out


def _micro_batches():
    """Four different gradients; norms chosen around CLIP: the first pair's mean is below it (its sum
    is not), the second pair's mean is above it, and the members of each pair differ in norm."""
    rng = np.random.default_rng(0)
    grads = []
    for scale in (0.004, 0.009, 0.03, 0.012):
        grads.append({p: scale * rng.standard_normal(s) for p, s in PATHS.items()})
    return grads


def _norm(g):
    return np.sqrt(sum(np.sum(v**2) for v in g.values()))


def _clip(g, c):
    n = _norm(g)
    return {k: v * min(1.0, c / n) for k, v in g.items()}


def _lr(t):
    """mmcv poly with linear warmup (the paper's schedule), for update t = 0, 1, ..."""
    regular = LR * (1 - t / TOTAL)
    return regular * (1 - (1 - t / WARMUP) * (1 - WARMUP_RATIO)) if t < WARMUP else regular


def _reference_updates(params, micro, *, combine="mean", clip="after"):
    """AdamW (decoupled decay, no decay on norms, head lr x HEAD_MULT), one update per two micro-
    batches, written out. combine: how a pair is accumulated; clip: 'after' (of the accumulated
    gradient), 'each' (every micro-batch before accumulating) or 'none'."""
    p = dict(params)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    updates = []
    for t, pair in enumerate((micro[:2], micro[2:])):
        if clip == "each":
            pair = [_clip(g, CLIP) for g in pair]
        g = {k: sum(x[k] for x in pair) * (0.5 if combine == "mean" else 1.0) for k in p}
        if clip == "after":
            g = _clip(g, CLIP)
        u = {}
        for k in p:
            m[k] = B1 * m[k] + (1 - B1) * g[k]
            v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - B1 ** (t + 1)), v[k] / (1 - B2 ** (t + 1))
            decay = 0.0 if ("layer_norm" in k or "batch_norm" in k) else WD
            lr = _lr(t) * (HEAD_MULT if k.startswith("decode_head/") else 1.0)
            u[k] = -lr * (m_hat / (np.sqrt(v_hat) + EPS) + decay * p[k])
        p = {k: p[k] + u[k] for k in p}
        updates.append(u)
    return updates


def _ours(params, micro, **config):
    tree = jax.tree_util.tree_map(jnp.asarray, _tree({k: v.astype(np.float32) for k, v in params.items()}))
    tx, _ = optim.make_optimizer(_opt_config(**config), TOTAL, tree)
    state = tx.init(tree)
    out = []
    for g in micro:
        u, state = tx.update(_tree({k: jnp.asarray(x, jnp.float32) for k, x in g.items()}), state, tree)
        tree = jax.tree_util.tree_map(lambda a, b: a + b, tree, u)
        out.append(_flat(u))
    return out


def _max_rel(a, b):
    return max(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max() for k in b)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1)
    params = {p: 1.0 + 0.5 * rng.standard_normal(s) for p, s in PATHS.items()}
    micro = _micro_batches()
    norms = [_norm(g) for g in micro]
    pair_means = [_norm({k: (a[k] + b[k]) / 2 for k in a}) for a, b in (micro[:2], micro[2:])]
    # the regimes the docstring of _micro_batches promises (else some wrong order could coincide)
    assert pair_means[0] < CLIP < 2 * pair_means[0] and pair_means[1] > CLIP, pair_means
    assert norms[0] < CLIP < norms[2] and abs(norms[0] / norms[1] - 1) > 0.3, norms
    return params, micro


def test_clipping_and_accumulation_match_adamw_written_out(setup):
    params, micro = setup
    ours = _ours(params, micro)
    want = _reference_updates(params, micro)
    # micro-batches 1 and 3 only accumulate: no update at all
    for i in (0, 2):
        assert all(np.all(u == 0) for u in ours[i].values()), i
    for t, i in enumerate((1, 3)):
        err = _max_rel(ours[i], want[t])
        print(f"update {t + 1}: max relative error {err:.1e}")
        assert err < 5e-5, (t, err)  # float32 against float64
    # the order that matters: each wrong variant gives other updates, by far more than the tolerance
    for wrong in (dict(combine="sum"), dict(clip="each"), dict(clip="none")):
        other = _reference_updates(params, micro, **wrong)
        gap = max(_max_rel(other[t], want[t]) for t in range(2))
        print(f"{wrong}: differs by {gap:.1e} (relative)")
        assert gap > 1e-2, (wrong, gap)


def test_no_clipping_and_no_accumulation_are_plain_adamw(setup):
    params, micro = setup
    ours = _ours(params, micro, grad_clip_norm=0.0, grad_accum_steps=1)
    # every micro-batch is an update; the reference with pairs of identical micro-batches is the same
    want = _reference_updates(params, [micro[0], micro[0], micro[1], micro[1]], clip="none")
    for t in range(2):
        err = _max_rel(ours[t], want[t])
        assert err < 5e-5, (t, err)  # float32 against float64
