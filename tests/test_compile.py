"""No recompilation: a jitted forward compiles once per input shape, a jitted training step once
for all steps. Counted with JAX's backend-compile monitoring event; tiny model."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring

from segformer_jax import SegformerConfig, SegformerForSemanticSegmentation
from segformer_jax.models import kernels

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 2, 4, 8),
    decoder_hidden_size=16,
    num_labels=5,
)


@contextlib.contextmanager
def count_compiles():
    counter = {"n": 0}

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            counter["n"] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def tiny():
    model = SegformerForSemanticSegmentation(SegformerConfig(**TINY))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return model, variables


def test_forward_compiles_once_per_shape(tiny):
    model, variables = tiny
    apply = jax.jit(model.apply)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 96, 3)), jnp.float32)
    inputs = [a, a + 1, b, a, b * 2, np.asarray(a)]  # eager ops compile too: build the inputs first
    with count_compiles() as c:
        for x in inputs:
            jax.block_until_ready(apply(variables, x))
    # (apply._cache_size() is 3 here: numpy and jax inputs are separate dispatch-cache entries that
    # share one executable; the backend compile count is what matters.)
    assert c["n"] == 2, f"{c['n']} compilations for 2 distinct shapes"


def test_train_step_compiles_once(tiny):
    import optax

    model, variables = tiny
    tx = optax.adamw(1e-3, weight_decay=0.01)

    def step(state, x, y, base_key):
        params, batch_stats, opt_state, i = state

        def loss_fn(p):
            logits, mut = model.apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                rngs={"dropout": jax.random.fold_in(base_key, i)},
                mutable=["batch_stats"],
            )
            return kernels.upsampled_cross_entropy(logits, y), mut["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state, i + 1), loss

    jstep = jax.jit(step, donate_argnums=0)
    params = jax.tree.map(jnp.copy, variables["params"])
    state = (params, jax.tree.map(jnp.copy, variables["batch_stats"]), tx.init(params), jnp.zeros((), jnp.int32))
    key = jax.random.key(0, impl="rbg")
    rng = np.random.default_rng(0)
    with count_compiles() as c:
        losses = []
        for _ in range(4):  # fresh host batches each step, as a data loader gives them
            x = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
            y = rng.integers(0, 5, size=(2, 64, 64)).astype(np.int32)
            state, loss = jstep(state, x, y, key)
            losses.append(float(loss))
    assert jstep._cache_size() == 1
    assert c["n"] == 1, f"{c['n']} compilations over 4 steps"
    assert all(np.isfinite(losses))


def test_train_compiler_options_drop_what_this_xla_does_not_know(monkeypatch):
    from segformer_jax import xla_options

    assert xla_options.train_compiler_options("tpu") is None
    known = xla_options.train_compiler_options("cpu")
    assert known == xla_options._CPU_OPTIONS  # every option is understood by the pinned jaxlib
    monkeypatch.setitem(xla_options._CPU_OPTIONS, "xla_cpu_no_such_option_anywhere", True)
    assert xla_options.train_compiler_options("cpu") == known
    # and the options compile a real program, with the same result as XLA's defaults
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x) * x, axis=-1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)), jnp.float32)
    np.testing.assert_allclose(f.lower(x).compile(compiler_options=known)(x), f(x), rtol=1e-6)
