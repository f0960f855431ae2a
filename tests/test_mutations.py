"""The equivalence checks can fail: each classic porting bug, applied to OUR model in memory, makes the
suite's own check (reference.check_*: same reference, same tolerance as tests/test_equivalence.py
and tests/test_nvlabs.py) fail, and the unmutated model passes the same checks.

The list of mutations is `MUTATIONS`, here and only here. A mutation is module-level patches
(monkeypatch), config overrides of our model, and/or a transform of the converted variables (a
conversion bug), plus the checks it must fail."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from reference import check_logits, check_nvlabs, check_train, images, to_flax, train_reference

import segformer_jax as sj
from segformer_jax.models import decode_head, kernels, layers
from weights_convert import mapping


# ----------------------------------------------------------------------------- the bugs
def _tanh_gelu(monkeypatch):
    # flax's nn.gelu default (approximate=True), on the x = 2 * half that Mix-FFN's conv produces
    monkeypatch.setattr(layers, "gelu_of_half", lambda half: nn.gelu(2 * half, approximate=True))


def _no_attention_scale(monkeypatch):
    monkeypatch.setattr(kernels, "_over_sqrt_head_dim", lambda x: x)


def _mean_of_values(monkeypatch):
    # attention replaced by the plain mean of V (what near-uniform probabilities look like)
    def mean_attention(q, k, v):
        return jnp.broadcast_to(v.mean(axis=1, keepdims=True), q.shape[:2] + v.shape[2:])

    monkeypatch.setattr(kernels, "attention", mean_attention)


def _swap_query_key(variables):
    def swap(tree):
        if isinstance(tree, dict):
            tree = {k: swap(v) for k, v in tree.items()}
            if "query" in tree and "key" in tree:
                tree["query"], tree["key"] = tree["key"], tree["query"]
        return tree

    return swap(variables)


def _swap_key_value_in_nvlabs_split(monkeypatch):
    original = mapping.SOURCE_NORMALIZERS["nvlabs"]

    def swapped(state):
        out = original(state)
        for k in [k for k in out if ".attention.self.key." in k]:
            v = k.replace(".key.", ".value.")
            out[k], out[v] = out[v], out[k]
        return out

    monkeypatch.setitem(mapping.SOURCE_NORMALIZERS, "nvlabs", swapped)


class BiasedVarianceBatchNorm(decode_head.BatchNorm):
    """decode_head.BatchNorm updating the running variance with the biased batch variance (flax's
    nn.BatchNorm does this; torch uses n / (n - 1))."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        num_batches = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if train:
            mean = x.mean((0, 1, 2))
            var = jnp.square(x - mean).mean((0, 1, 2))
            if not self.is_initializing():
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var  # biased
                num_batches.value = num_batches.value + 1
        else:
            mean, var = running_mean.value, running_var.value
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        return x * mul + (bias - mean * mul)


def _biased_batch_norm_variance(monkeypatch):
    monkeypatch.setattr(decode_head, "BatchNorm", BiasedVarianceBatchNorm)


def _same_padding(monkeypatch):
    monkeypatch.setattr(layers, "torch_padding", lambda kernel_size: "SAME")


class _ForwardOrderConcat:
    """jax.numpy as the decode head sees it, except that concatenate undoes the head's [::-1]: the
    stages reach the fuse conv in forward order [c1, c2, c3, c4]."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def concatenate(arrays, axis=0):
        return jnp.concatenate(list(arrays)[::-1], axis=axis)


def _forward_order_concat(monkeypatch):
    monkeypatch.setattr(decode_head, "jnp", _ForwardOrderConcat())


@dataclasses.dataclass(frozen=True)
class Mutation:
    patch: Callable | None = None  # patch(monkeypatch): module-level changes
    config: dict = dataclasses.field(default_factory=dict)  # overrides of our model's config
    variables: Callable | None = None  # transform of the converted variables (conversion bugs)
    checks: tuple[str, ...] = ("logits",)  # which of the suite's checks it must fail


MUTATIONS = {
    "tanh_gelu": Mutation(_tanh_gelu),
    "no_attention_scale": Mutation(_no_attention_scale),
    "mean_of_values": Mutation(_mean_of_values),
    "query_key_swap": Mutation(variables=_swap_query_key),
    "key_value_swap_in_nvlabs_kv_split": Mutation(_swap_key_value_in_nvlabs_split, checks=("nvlabs",)),
    "one_head": Mutation(config=dict(num_attention_heads=(1, 1, 1, 1))),
    "biased_batch_norm_running_variance": Mutation(_biased_batch_norm_variance, checks=("bn_var",)),
    "block_layer_norm_eps_1e-6": Mutation(config=dict(layer_norm_eps=1e-6)),  # flax's default
    "same_padding": Mutation(_same_padding),
    "forward_order_decode_concat": Mutation(_forward_order_concat, config=dict(decode_head_impl="concat")),
}


# ----------------------------------------------------------------------------- the checks
X = images(2, 45, 61, seed=21)


@pytest.fixture(scope="module")
def references(tiny_reference, tiny_flax):
    train_ref = train_reference()
    return {"eval": (tiny_reference, *tiny_flax), "train": (train_ref, *to_flax(train_ref))}


def _run_checks(references, mutation: Mutation) -> dict[str, tuple[float, float]]:
    results = {}
    for check in mutation.checks:
        if check == "nvlabs":
            results[check] = check_nvlabs(references["eval"][0], X)
            continue
        ref, model, variables = references["train" if check.startswith("bn_") else "eval"]
        model = sj.SegformerForSemanticSegmentation(model.config.replace(**mutation.config))
        if mutation.variables is not None:
            variables = mutation.variables(variables)
        if check == "logits":
            results[check] = check_logits(ref, model, variables, X)
        else:
            results[check] = check_train(ref, model, variables, X[:1, :32, :32])[check]
    return results


@pytest.fixture
def fresh_traces():
    yield
    jax.clear_caches()  # no trace of a patched function outlives its test


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_fails_the_equivalence_checks(references, monkeypatch, fresh_traces, name):
    mutation = MUTATIONS[name]
    if mutation.patch is not None:
        mutation.patch(monkeypatch)
    for check, (err, tol) in _run_checks(references, mutation).items():
        print(f"{name}: {check} max-abs-diff {err:.2e} vs tolerance {tol:.2e} ({err / tol:.0f}x)")
        assert err > 10 * tol, f"{name} passes the {check} check: {err:.3e} <= 10 x {tol:.3e}"


def test_unmutated_model_passes_the_same_checks(references):
    checks = {c for m in MUTATIONS.values() for c in m.checks}
    for check, (err, tol) in _run_checks(references, Mutation(checks=tuple(sorted(checks)))).items():
        print(f"unmutated: {check} max-abs-diff {err:.2e} vs tolerance {tol:.2e}")
        assert err <= tol, check
    # and with the concat head the forward-order mutation uses
    model = sj.SegformerForSemanticSegmentation(references["eval"][1].config.replace(decode_head_impl="concat"))
    err, tol = check_logits(references["eval"][0], model, references["eval"][2], X)
    assert err <= tol
