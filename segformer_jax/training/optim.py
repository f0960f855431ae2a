"""Optimiser of the SegFormer paper / NVlabs mmseg configs, in optax.

    optimizer = dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01,
                     paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.),
                                                     'norm': dict(decay_mult=0.),
                                                     'head': dict(lr_mult=10.)}))
    lr_config = dict(policy='poly', warmup='linear', warmup_iters=1500, warmup_ratio=1e-6,
                     power=1.0, min_lr=0.0, by_epoch=False)

* Learning rate: mmcv's `PolyLrUpdaterHook` with linear warmup, exactly:
  ``poly(t) = (lr - min_lr) * (1 - t / total)^power + min_lr`` and during warmup
  ``lr(t) = poly(t) * (1 - (1 - t / warmup) * (1 - warmup_ratio))`` (mmcv scales the *regular* lr, so
  lr(0) = lr * warmup_ratio and the warmup ramps to the poly curve, not to the peak lr).
* Weight decay: decoupled (torch AdamW: p -= lr * wd * p). No decay on normalisation parameters
  (scale and bias of every LayerNorm and of the head's BatchNorm). Biases of linear/conv layers *are*
  decayed, as in NVlabs (their `custom_keys` only match 'norm'). One deliberate difference: NVlabs'
  head BatchNorm is named `bn`, which their 'norm' key does not match, so it got decay there; here all
  norms are excluded (`no_decay_patterns` restores the NVlabs behaviour if set to ('layer_norm',)).
* Head learning rate x10: every parameter under `decode_head` uses lr * head_lr_mult (mmcv's lr_mult
  scales the lr, and with it the decoupled decay, so it is the whole AdamW update that is scaled).
* Options: global-norm clipping before AdamW (mmseg `grad_clip`), gradient accumulation
  (`optax.MultiSteps`: the schedule then counts optimiser updates, not micro-batches).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

HEAD_PREFIX = "decode_head"


def poly_warmup_schedule(
    base_lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr: float = 0.0,
):
    """mmcv `PolyLrUpdaterHook(warmup='linear')` as an optax schedule: step -> lr (float32)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        # (total - t) / total rather than 1 - t / total: exact near the end of training in float32.
        remaining = jnp.clip((total_steps - t) / total_steps, 0.0, 1.0)
        regular = (base_lr - min_lr) * remaining**power + min_lr
        if warmup_steps <= 0:
            return regular
        # mmcv: regular * (1 - k), k = (1 - t / warmup) * (1 - ratio); written as ratio + (1 - ratio) t / warmup,
        # the same number without float32's cancellation at t = 0 (1 - 0.999999 is 1% off in float32).
        factor = warmup_ratio + (1.0 - warmup_ratio) * (t / warmup_steps)
        return jnp.where(t < warmup_steps, regular * factor, regular)

    return schedule


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def weight_decay_mask(params, no_decay_patterns: Sequence[str] = ("layer_norm", "batch_norm")):
    """Pytree of bools like `params`: True where weight decay applies. A leaf is excluded when any
    pattern (regex, searched in the '/'-joined path, e.g. 'segformer/encoder/block/0/0/layer_norm_1/scale')
    matches. Works on sub-trees too (optax.multi_transform hands each group a tree with the other
    group's leaves masked out), since it only looks at paths."""
    compiled = [re.compile(p) for p in no_decay_patterns]

    def decays(path, _):
        name = "/".join(_key_name(e) for e in path)
        return not any(c.search(name) for c in compiled)

    return jax.tree_util.tree_map_with_path(decays, params)


def param_groups(params):
    """Pytree of 'head' / 'encoder' labels like `params` (for optax.multi_transform)."""
    flat = traverse_util.flatten_dict(params)
    labels = {k: "head" if k[0] == HEAD_PREFIX else "encoder" for k in flat}
    return traverse_util.unflatten_dict(labels)


def global_norm(tree) -> jax.Array:
    """L2 norm over all leaves as one reduction. optax.global_norm reduces each leaf separately, a kernel
    per parameter shape for XLA to compile (b0 training step: 545 distinct kernels with it, 490 without)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves]))))


def make_optimizer(opt_config, total_steps: int, params) -> tuple[optax.GradientTransformation, Any]:
    """-> (optax transformation, schedule of the base (encoder) lr as a function of the *update* count).

    opt_config fields: learning_rate, b1, b2, eps, weight_decay, head_lr_mult, warmup_steps, warmup_ratio,
    poly_power, min_lr, grad_clip_norm (0/None = off), grad_accum_steps (1 = off), no_decay_patterns."""
    schedule = poly_warmup_schedule(
        opt_config.learning_rate,
        total_steps,
        warmup_steps=opt_config.warmup_steps,
        warmup_ratio=opt_config.warmup_ratio,
        power=opt_config.poly_power,
        min_lr=opt_config.min_lr,
    )
    mult = float(opt_config.head_lr_mult)
    patterns = tuple(opt_config.no_decay_patterns)

    def mask(p):
        return weight_decay_mask(p, patterns)

    def adamw(lr_schedule):
        return optax.adamw(
            lr_schedule,
            b1=opt_config.b1,
            b2=opt_config.b2,
            eps=opt_config.eps,
            weight_decay=opt_config.weight_decay,
            mask=mask,
        )

    # Two AdamW instances over disjoint parameter sets; each keeps its own step count, which is the
    # same number, so both follow the same schedule shape.
    tx = optax.multi_transform(
        {"encoder": adamw(schedule), "head": adamw(lambda step: schedule(step) * mult)}, param_groups(params)
    )
    if opt_config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
    if opt_config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(opt_config.grad_accum_steps))
    return tx, schedule
