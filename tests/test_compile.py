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


def _tiny_training_config():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")
    spec = importlib.util.spec_from_file_location("test_compile_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")  # the tiny model train.py runs in the tests: dropout and drop path on
    config.optimizer.grad_clip_norm = 1.0  # clipping and accumulation in the program too
    config.optimizer.grad_accum_steps = 2
    return config


def _host_batches(config, n: int, seed: int = 0) -> list[dict]:
    """n random batches of 2 crops for the tiny 5-class training config."""
    rng = np.random.default_rng(seed)
    h, w = config.data.crop_size
    return [
        {
            "image": rng.normal(size=(2, h, w, 3)).astype(np.float32),
            "label": rng.integers(0, 5, size=(2, h, w)).astype(np.int32),
        }
        for _ in range(n)
    ]


def _run_counting_compiles(step, state, batches, rng):
    """Run `step` over `batches`; -> (state, backend compiles per step, losses). Checks each step
    donated the state it was given."""
    counts, losses = [], []
    for b in batches:
        old = state
        with count_compiles() as c:
            state, metrics = step(state, b, rng)
            losses.append(float(metrics["loss"]))
        counts.append(c["n"])
        assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old.params)), "state not donated"
    return state, counts, losses


def test_real_train_step_compiles_once_and_donates(tiny):
    """`training.build_training`'s step, as train.py runs it: sharded over the 'data' mesh, state donated,
    dropout rng folded with the step. The first call compiles it; further steps (fresh host batches, the
    state the previous step returned, accumulation and update steps alike) compile nothing."""
    from segformer_jax import training

    config = _tiny_training_config()
    class_names = ["a", "b", "c", "d", "e"]
    model, pretrained = training.build_model(config, class_names)
    setup = training.build_training(config, model, pretrained, num_classes=len(class_names))
    batches = [training.shard_batch(b, setup.batch_sharding) for b in _host_batches(config, 5)]  # before counting
    state, counts, losses = _run_counting_compiles(setup.train_step, setup.init_state(), batches, setup.train_rng)
    assert counts[0] >= 1, counts  # the step's program (counting works)
    assert counts[1:] == [0, 0, 0, 0], counts
    assert int(state.step) == 5 and all(np.isfinite(losses))
    assert setup.train_step._cache_size() == 1
    # A resumed run: the state as a checkpoint restores it (typed by `abstract_state`, no weak types)
    # runs the same program, so the persistent cache serves it too.
    restored = jax.tree_util.tree_map(
        lambda x, like: jax.device_put(np.asarray(x), like.sharding), state, setup.abstract_state
    )
    _, counts, _ = _run_counting_compiles(setup.train_step, restored, batches[:1], setup.train_rng)
    assert counts == [0] and setup.train_step._cache_size() == 1, "a restored state compiles a new step"


def test_loop_compiles_the_step_ahead_then_releases_the_compilers_memory(tiny, monkeypatch):
    """train_and_evaluate's step (`loop.compile_then_release`): compiled once, on the first call's
    arguments, with the compiler's freed heap handed back before the program runs; same losses as the
    jitted step, bit for bit, and the state still donated."""
    from segformer_jax import training
    from segformer_jax.training import loop

    released = []
    monkeypatch.setattr(loop, "release_freed_memory", lambda: released.append(True))
    config = _tiny_training_config()
    model, _ = training.build_model(config, ["a", "b", "c", "d", "e"])
    host = _host_batches(config, 3)
    losses = {}
    for name in ("jit", "ahead"):
        setup = training.build_training(
            config, model, num_classes=5, compiler_options={"xla_backend_optimization_level": 0}
        )
        step = setup.train_step if name == "jit" else loop.compile_then_release(setup.train_step)
        batches = [training.shard_batch(b, setup.batch_sharding) for b in host]
        _, counts, losses[name] = _run_counting_compiles(step, setup.init_state(), batches, setup.train_rng)
        assert counts[0] >= 1 and counts[1:] == [0, 0], (name, counts)
    assert losses["ahead"] == losses["jit"]
    assert released == [True]  # once, after the compile


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
