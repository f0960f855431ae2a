"""Training: lr schedule, optimiser groups, overfitting, data parallelism, checkpoint resume (bit-exact),
the train.py command line and its errors. Tiny models on 32-64 px images keep this to a few minutes."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segformer_jax import training
from segformer_jax.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ["a", "b", "c", "d"]


def load_config(name="default.py", arg="tiny"):
    path = os.path.join(REPO, "configs", name)
    spec = importlib.util.spec_from_file_location(f"test_config_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """synthetic_shapes/small generated once (no download, a few seconds)."""
    from segformer_jax.data import synthetic_shapes

    path = str(tmp_path_factory.mktemp("tfds"))
    synthetic_shapes.ensure_prepared(path, "small")
    return path


# ----------------------------------------------------------------------------- schedule and optimiser


def test_schedule_matches_mmcv_poly_with_linear_warmup():
    lr, total, warmup, ratio = 6e-5, 160_000, 1500, 1e-6
    schedule = optim.poly_warmup_schedule(lr, total, warmup_steps=warmup, warmup_ratio=ratio, power=1.0)

    def expected(t):
        regular = lr * (1 - t / total)
        if t < warmup:
            return regular * (1 - (1 - t / warmup) * (1 - ratio))
        return regular

    for t in (0, 750, 1499, 1500, 80_000, 159_999, 160_000):
        np.testing.assert_allclose(float(schedule(t)), expected(t), rtol=1e-5, atol=1e-13, err_msg=f"step {t}")
    assert float(schedule(0)) == pytest.approx(lr * ratio, rel=1e-4)
    assert float(schedule(total)) == 0.0
    power2 = optim.poly_warmup_schedule(1.0, 100, warmup_steps=0, power=2.0, min_lr=0.1)
    assert float(power2(50)) == pytest.approx(0.9 * 0.25 + 0.1)


def _fake_params():
    leaf = lambda *s: jnp.full(s, 2.0)  # noqa: E731
    return {
        "segformer": {
            "encoder": {
                "block_0_0": {
                    "layer_norm_1": {"scale": leaf(4), "bias": leaf(4)},
                    "attention": {"query": {"kernel": leaf(4, 4), "bias": leaf(4)}},
                },
                "layer_norm_0": {"scale": leaf(4), "bias": leaf(4)},
            }
        },
        "decode_head": {
            "batch_norm": {"scale": leaf(4), "bias": leaf(4)},
            "classifier": {"kernel": leaf(4, 3), "bias": leaf(3)},
        },
    }


def _opt_config(**kw):
    c = load_config("ade20k.py", "b0").optimizer
    c.unlock()
    c.update(kw)
    return c


def test_weight_decay_mask_excludes_norms_only():
    mask = optim.weight_decay_mask(_fake_params())
    flat = {"/".join(str(e.key) for e in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    no_decay = sorted(k for k, v in flat.items() if not v)
    assert no_decay == [
        "decode_head/batch_norm/bias",
        "decode_head/batch_norm/scale",
        "segformer/encoder/block_0_0/layer_norm_1/bias",
        "segformer/encoder/block_0_0/layer_norm_1/scale",
        "segformer/encoder/layer_norm_0/bias",
        "segformer/encoder/layer_norm_0/scale",
    ]
    # biases of linear layers are decayed (NVlabs), as are kernels
    assert flat["segformer/encoder/block_0_0/attention/query/bias"] and flat["decode_head/classifier/kernel"]


def test_optimizer_decay_and_head_lr_multiplier():
    params = _fake_params()
    cfg = _opt_config(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, head_lr_mult=10.0)
    tx, _ = optim.make_optimizer(cfg, 1000, params)
    state = tx.init(params)
    # Zero gradients: the update is the decoupled decay alone, -lr * wd * p, or 0 for norms.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    lr = 1e-2  # schedule at step 0 without warmup
    np.testing.assert_allclose(
        updates["segformer"]["encoder"]["block_0_0"]["attention"]["query"]["kernel"], -lr * 0.1 * 2.0, rtol=1e-5
    )
    np.testing.assert_allclose(updates["decode_head"]["classifier"]["kernel"], -10 * lr * 0.1 * 2.0, rtol=1e-5)
    for norm in (updates["segformer"]["encoder"]["layer_norm_0"], updates["decode_head"]["batch_norm"]):
        np.testing.assert_array_equal(norm["scale"], 0.0)
    # Unit gradients, no decay: Adam's first step is -lr * sign(g); the head's is 10x larger.
    cfg = _opt_config(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, head_lr_mult=10.0)
    tx, _ = optim.make_optimizer(cfg, 1000, params)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    np.testing.assert_allclose(updates["segformer"]["encoder"]["layer_norm_0"]["scale"], -lr, rtol=1e-4)
    np.testing.assert_allclose(updates["decode_head"]["batch_norm"]["scale"], -10 * lr, rtol=1e-4)


def test_gradient_accumulation_and_clipping_wrap_the_optimizer():
    params = _fake_params()
    tx, _ = optim.make_optimizer(_opt_config(grad_accum_steps=2, grad_clip_norm=1.0, warmup_steps=0), 10, params)
    state = tx.init(params)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    u1, state = tx.update(ones, state, params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(u1))  # accumulating
    u2, state = tx.update(ones, state, params)
    assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree_util.tree_leaves(u2))  # applied


def test_global_norm_is_optax_global_norm():
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": {"c": -jnp.ones(5), "d": jnp.full((2, 2, 2), 0.5)}}
    np.testing.assert_allclose(float(optim.global_norm(tree)), float(optax.global_norm(tree)), rtol=1e-6)


# ----------------------------------------------------------------------------- train step


def _tiny_setup(config, devices=None):
    # (XLA opt level 0 was measured slower here overall: the tiny step's compile is not what dominates.)
    model, _ = training.build_model(config, CLASS_NAMES)
    setup = training.build_training(config, model, num_classes=len(CLASS_NAMES), devices=devices)
    return model, setup


def _learnable_batch(n=4, size=32, seed=0):
    """Smooth random images whose labels are a pixelwise function of the colour: learnable at 1/4 res."""
    small = np.random.default_rng(seed).standard_normal((n, size // 4, size // 4, 3)).astype(np.float32)
    images = np.asarray(jax.image.resize(small, (n, size, size, 3), "bilinear"))
    labels = ((images[..., 0] > 0).astype(np.int32) + 2 * (images[..., 1] > 0)).astype(np.int32)
    labels[:, :2, :] = 255  # some ignored pixels
    return {"image": images, "label": labels}


def test_overfit_one_batch_reduces_loss_tenfold():
    config = load_config()
    config.model.drop_path_rate = 0.0
    config.model.classifier_dropout_prob = 0.0
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 0
    config.total_steps = 100_000  # ~constant lr over the few steps taken here
    _, setup = _tiny_setup(config)
    state = setup.init_state()
    batch = training.shard_batch(_learnable_batch(), setup.batch_sharding)
    losses = []
    for _ in range(200):
        state, m = setup.train_step(state, batch, setup.train_rng)
        losses.append(float(m["loss"]))
    ratio = losses[0] / losses[-1]
    print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f} (x{ratio:.1f})")
    assert ratio >= 10, losses[::10]


DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import test_training as t
    from segformer_jax import training
    assert jax.device_count() == 4, jax.devices()
    config = t.load_config()
    config.data.crop_size = (32, 32)
    # Adam divides by sqrt(v) + eps: with eps=1e-8 a gradient entry of ~1e-9 whose last bits differ
    # (all-reduce order) moves its parameter by up to lr either way. A large eps makes the update
    # proportional to the gradient, so the comparison measures the data parallelism, not that amplification.
    config.optimizer.eps = 1.0
    config.optimizer.learning_rate = 0.1
    batch = t._learnable_batch(n=8)
    params, losses = {{}}, {{}}
    for name, devices in (("four", jax.devices()), ("one", jax.devices()[:1])):
        _, setup = t._tiny_setup(config, devices=devices)
        state = setup.init_state()
        initial = training.to_host(state.params)
        losses[name] = []
        for step in range(2):   # dropout and drop-path on: the random bits must not depend on the sharding
            state, m = setup.train_step(state, training.shard_batch(batch, setup.batch_sharding), setup.train_rng)
            losses[name].append(float(m["loss"]))
        assert len(state.params["decode_head"]["classifier"]["kernel"].sharding.device_set) == len(devices)
        params[name] = training.to_host({{"params": state.params, "batch_stats": state.batch_stats}})
    diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))), params["four"], params["one"]))
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
        params["one"]["params"], initial))
    print(json.dumps({{"max_abs_diff": max(diffs), "max_update": max(moved), "losses": losses}}))
""")


def test_four_device_data_parallel_equals_one_device(compile_cache):
    script = DATA_PARALLEL_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": compile_cache},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("4-device vs 1-device:", result)
    np.testing.assert_allclose(result["losses"]["four"], result["losses"]["one"], rtol=1e-5)
    assert result["max_update"] > 1e-3, result  # the steps did move the parameters
    assert result["max_abs_diff"] < 1e-5, result  # float reassociation of the gradient all-reduce only


# ----------------------------------------------------------------------------- train.py and resuming

RUN_FLAGS = [
    "--config.total_steps=4",
    "--config.checkpoint.every_steps=2",
    "--config.log_every_steps=1",
    "--config.progress_bar=False",
]


def _run_train_py(workdir, data_dir, compile_cache, *extra):
    cmd = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'default.py')}:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *RUN_FLAGS,
        *extra,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": compile_cache, "JAX_PLATFORMS": "cpu"},
    )


def _restore_tree(workdir, step):
    return training.restore_state_here(os.path.join(workdir, training.CHECKPOINT_DIR, str(step)))


def _config_like_run_flags(data_dir):
    config = load_config()
    config.data.data_dir = data_dir
    config.total_steps = 4
    config.checkpoint.every_steps = 2
    config.log_every_steps = 1
    config.progress_bar = False
    return config


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, data_dir, compile_cache):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    out = _run_train_py(workdir, data_dir, compile_cache)
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir, out


def test_train_py_end_to_end(uninterrupted_run):
    workdir, out = uninterrupted_run
    assert "mIoU" in out.stdout
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == 4
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "images_per_second"} <= set(r) for r in train)
    assert any(r["split"] == "eval" and "mIoU" in r for r in records)
    assert os.path.isfile(os.path.join(workdir, "images", "eval_4.png"))
    assert os.path.isfile(os.path.join(workdir, "eval", "eval_4.json"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    from segformer_jax import from_pretrained

    model, variables = from_pretrained(os.path.join(workdir, "final"))
    assert model.config.num_labels == 6 and model.config.id2label[1] == "circle"
    final = _restore_tree(workdir, 4)
    np.testing.assert_array_equal(
        variables["params"]["decode_head"]["classifier"]["kernel"],
        final["params"]["decode_head"]["classifier"]["kernel"],
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_trains_checkpoints_exports_and_resumes(tmp_path, data_dir):
    """`train.py` as two JAX processes (multi-host, here on one CPU host with gloo): both finish, the
    checkpoints and the final model are written once and load, and a second run resumes from them.
    (This caught process 0's final export waiting forever on an Orbax barrier the other process never
    reached.) ~1-2 minutes: slow-marked."""
    workdir = str(tmp_path / "w")

    def run_both(*extra, program=None):
        program = program or (os.path.join(REPO, "train.py"),)
        port = _free_port()
        procs = []
        for rank in range(2):
            env = {
                **os.environ,
                "SEGFORMER_MULTI_HOST": "1",
                "SEGFORMER_COORDINATOR": f"127.0.0.1:{port}",
                "SEGFORMER_NUM_PROCESSES": "2",
                "SEGFORMER_PROCESS_ID": str(rank),
                "JAX_PLATFORMS": "cpu",
                "JAX_COMPILATION_CACHE_DIR": "",
            }
            cmd = [
                sys.executable,
                *program,
                f"--config={os.path.join(REPO, 'configs', 'default.py')}:tiny",
                f"--config.data.data_dir={data_dir}",
                "--config.progress_bar=False",
                *extra,
            ]
            if program[-1].endswith("train.py"):
                cmd += [f"--workdir={workdir}", "--config.checkpoint.every_steps=2", "--config.log_every_steps=1"]
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
            )
        outs = [p.communicate(timeout=900) for p in procs]
        for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"process {rank}:\n{err[-4000:]}"
        return outs

    outs = run_both("--config.total_steps=2")
    assert "mIoU" in outs[0][0] and "mIoU" not in outs[1][0]  # process 0 reports
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    from segformer_jax import from_pretrained

    model, variables = from_pretrained(os.path.join(workdir, "final"))
    np.testing.assert_array_equal(
        variables["params"]["decode_head"]["classifier"]["kernel"],
        _restore_tree(workdir, 2)["params"]["decode_head"]["classifier"]["kernel"],
    )
    outs = run_both("--config.total_steps=4")
    assert "Resuming from checkpoint at step 2" in outs[0][0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    train = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in train if r["split"] == "train"] == [1, 2, 3, 4]  # written once, by process 0
    assert all(np.isfinite(r["loss"]) for r in train if r["split"] == "train")

    # segformer_jax.evaluate as two processes, each on its half of the images: both protocols give the
    # numbers of the run's final evaluation (eval scale = image size here), reported by process 0.
    recorded = json.load(open(os.path.join(workdir, "eval", "eval_4.json")))
    for protocol in ("resized", "original"):
        output = str(tmp_path / f"{protocol}.json")
        outs = run_both(
            f"--checkpoint={workdir}",
            f"--protocol={protocol}",
            f"--output={output}",
            "--compilation_cache=",
            program=("-m", "segformer_jax.evaluate"),
        )
        assert "mIoU" in outs[0][0] and "mIoU" not in outs[1][0]
        got = json.load(open(output))
        assert got["num_pixels"] == recorded["num_pixels"] and abs(got["mIoU"] - recorded["mIoU"]) < 1e-3


@pytest.mark.slow  # kill -9 and bit-identical resume also run unmarked in tests/test_preemption.py
def test_resume_after_kill_is_bit_exact(uninterrupted_run, tmp_path, data_dir):
    reference_dir, _ = uninterrupted_run
    workdir = str(tmp_path / "interrupted")
    config = _config_like_run_flags(data_dir)
    config.max_steps_this_run = 3  # stops after step 3 with checkpoints at 2 and 3
    training.train_and_evaluate(config, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["2", "3"]
    assert not os.path.exists(os.path.join(workdir, "final"))
    # The kill: the process died while writing checkpoint 3. Orbax writes into a temporary directory
    # that is renamed on commit; leave such a half-written one in place of 3 (its files truncated).
    half = os.path.join(ckpt, "3.orbax-checkpoint-tmp-1234567890")
    os.rename(os.path.join(ckpt, "3"), half)
    for root, _, files in os.walk(half):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(max(os.path.getsize(os.path.join(root, f)) // 2, 0))
    config.max_steps_this_run = 0
    result = training.train_and_evaluate(config, workdir)  # the same command again: resumes at 2
    assert result["step"] == 4
    resumed, reference = _restore_tree(workdir, 4), _restore_tree(reference_dir, 4)
    leaves_a, tree_a = jax.tree_util.tree_flatten(resumed)
    leaves_b, tree_b = jax.tree_util.tree_flatten(reference)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not any("tmp" in name for name in os.listdir(ckpt))  # the half-written one was cleaned up
    # Once more, finished: same final results, and the last evaluation is not logged a second time.
    assert training.train_and_evaluate(config, workdir)["mIoU"] == result["mIoU"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "eval"] == [4]


def test_workdir_of_a_different_model_is_refused(uninterrupted_run, data_dir):
    reference_dir, _ = uninterrupted_run
    workdir = os.path.join(os.path.dirname(reference_dir), "copy_for_mismatch")
    shutil.copytree(reference_dir, workdir)
    config = _config_like_run_flags(data_dir)
    config.model.overrides.decoder_hidden_size = 32
    with pytest.raises(
        training.TrainingError, match=r"(?s)different model.*decoder_hidden_size: checkpoint 16, now 32"
    ):
        training.train_and_evaluate(config, workdir)


def test_unknown_config_override_is_a_clear_error(tmp_path, data_dir, compile_cache):
    out = _run_train_py(str(tmp_path / "w"), data_dir, compile_cache, "--config.optimizer.lerning_rate=1e-3")
    assert out.returncode != 0
    assert "lerning_rate" in out.stderr and not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.slow
def test_default_run_reaches_target_miou_within_ten_minutes(tmp_path):
    """`python train.py` as a user runs it (cold compilation cache): <= 10 minutes, mIoU >= 0.85."""
    import time

    start = time.time()
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            f"--workdir={tmp_path / 'run'}",
            "--config.progress_bar=False",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1800,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")},
    )
    minutes = (time.time() - start) / 60
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    print(f"default run: {minutes:.1f} min, mIoU {results['mIoU']:.4f}")
    assert results["mIoU"] >= 0.85
    assert minutes <= 10, "slower than 10 minutes (is the CPU shared with other jobs?)"


def test_read_config_gives_back_the_training_config(uninterrupted_run, tmp_path):
    workdir, out = uninterrupted_run
    assert "Data: synthetic_shapes" in out.stdout and "classes (background, circle" in out.stdout
    config = training.read_config(workdir)
    assert isinstance(config.data.crop_size, tuple) and config.total_steps == 4
    with pytest.raises(training.TrainingError, match="not a train.py config"):
        training.read_config(os.path.join(workdir, "final"))  # a model's config.json
    with pytest.raises(training.TrainingError, match="cannot read the training config"):
        training.read_config(str(tmp_path))


def test_final_model_carries_its_eval_settings_to_predict(uninterrupted_run, tmp_path, capsys):
    from PIL import Image

    from segformer_jax import inference, predict

    workdir, _ = uninterrupted_run
    final = os.path.join(workdir, "final")
    want = inference.config_from_training(training.read_config(workdir))
    assert inference.InferenceConfig(**inference.load_settings(final)) == want
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert (
        predict.main(
            [
                "--model",
                final,
                "--output",
                str(tmp_path / "out"),
                "--quiet",
                "--compilation-cache",
                "",
                str(tmp_path / "a.png"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"as evaluated in training (inference.json): mode whole, scale {list(want.scale)}" in err
    assert np.asarray(Image.open(tmp_path / "out" / "a.png")).shape == (90, 150)


def _varied_size_folder(root, class_names):
    """A folder dataset whose validation images have different sizes, none a multiple of 32."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for split, sizes in (("train", [(48, 40)]), ("val", [(40, 56), (70, 37), (64, 64)])):
        for i, (h, w) in enumerate(sizes):
            for sub in ("images", "masks"):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
            mask = rng.integers(0, len(class_names), (h, w), dtype=np.uint8)
            mask[:5, :7] = 255
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    (root / "class_names.txt").write_text("\n".join(class_names) + "\n")
    return sorted((root / "val" / "images").iterdir())


def test_evaluate_reproduces_the_training_eval_and_scores_at_the_original_size(
    uninterrupted_run, data_dir, tmp_path, compile_cache
):
    workdir, _ = uninterrupted_run
    # The command line with --protocol resized gives exactly the numbers of the run's final evaluation.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "segformer_jax.evaluate",
            f"--config={os.path.join(REPO, 'configs', 'default.py')}:tiny",
            f"--config.data.data_dir={data_dir}",
            f"--checkpoint={workdir}",
            "--protocol=resized",
            f"--output={tmp_path / 'resized.json'}",
            "--config.progress_bar=False",
            f"--compilation_cache={compile_cache}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    recorded = json.load(open(os.path.join(workdir, "eval", "eval_4.json")))
    got = json.load(open(tmp_path / "resized.json"))
    assert got["protocol"] == "resized" and got["checkpoint"].endswith(os.path.join("checkpoints", "4"))
    assert {k: got[k] for k in ("mIoU", "mAcc", "aAcc", "num_pixels", "per_class")} == {
        k: recorded[k] for k in ("mIoU", "mAcc", "aAcc", "num_pixels", "per_class")
    }
    # Without --config: the config the workdir was trained with (overrides such as data_dir included).
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "segformer_jax.evaluate",
            f"--checkpoint={os.path.join(workdir, 'checkpoints')}",
            "--protocol=resized",
            f"--output={tmp_path / 'saved_config.json'}",
            f"--compilation_cache={compile_cache}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.load(open(tmp_path / "saved_config.json"))["per_class"] == recorded["per_class"]

    # --protocol original on images of varied sizes, all resized for inference (eval scale 80): the
    # prediction is resized back and scored against the stored label. The reference is independent of
    # the code under test: transformers (the trained weights exported to HF) on each unpadded resized
    # image, torch F.interpolate for every resize.
    import torch
    import transformers
    from PIL import Image

    from segformer_jax import evaluate, save_pretrained

    model, variables, _ = evaluate.load_model(workdir)
    hf_dir = save_pretrained(model, variables, tmp_path / "hf", format="hf")
    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(hf_dir).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    config = _config_like_run_flags(data_dir)
    config.data.name, config.data.folder = "folder", str(tmp_path / "varied")
    config.data.eval_scale, config.data.eval_pad_size = (80, 80), (96, 96)
    config.eval.batch_size = 2  # two groups: 2 images, then 1
    files = _varied_size_folder(tmp_path / "varied", names)
    k = len(names)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    interpolate = lambda x, size: torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    expected, near_ties, stored_pixels = np.zeros((k, k), np.int64), 0, 0
    for path in files:
        image = np.asarray(Image.open(path).convert("RGB"))
        label = np.asarray(Image.open(tmp_path / "varied" / "val" / "masks" / path.name)).astype(np.int64)
        h, w = label.shape
        f = min(80 / max(h, w), 80 / min(h, w))  # mmcv keep-ratio rescale to (80, 80)
        size = (int(h * f + 0.5), int(w * f + 0.5))
        with torch.no_grad():
            x = interpolate(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None], size)
            logits = interpolate(interpolate(hf((x - mean) / std).logits, size), (h, w))
        logits = logits[0].permute(1, 2, 0).numpy()
        top2 = np.sort(logits, axis=-1)[..., -2:]
        valid = label != 255
        near_ties += int(np.sum((top2[..., 1] - top2[..., 0] < 1e-4) & valid))
        expected += np.bincount(label[valid] * k + logits.argmax(-1)[valid], minlength=k * k).reshape(k, k)
        stored_pixels += int(valid.sum())
    results = evaluate.evaluate_model(config, model, variables)  # protocol 'original' by default
    assert results["protocol"] == "original"
    assert results["num_pixels"] == stored_pixels == expected.sum()  # every stored labelled pixel, once
    assert np.abs(np.asarray(results["confusion_matrix"]) - expected).sum() <= 2 * near_ties
    resized = evaluate.evaluate_model(config, model, variables, protocol="resized")
    assert resized["num_pixels"] != stored_pixels  # labels resized with the images
    with pytest.raises(evaluate.EvaluationError, match="needs --protocol original"):
        evaluate.evaluate_model(config, model, variables, protocol="resized", flip=True)


def test_confusion_matrices_beyond_int32_survive_the_sum_over_processes():
    from segformer_jax import evaluate

    matrix = np.array([[2**40 + 5, 0], [2**31, 2**31 - 1]], np.int64)  # Cityscapes val counts 2^31 pixels
    np.testing.assert_array_equal(evaluate._sum_over_processes(matrix), matrix)


def test_eval_pictures_leave_the_padding_uncoloured():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from segformer_jax.inference import visualize

    mesh = training.make_mesh(jax.devices()[:1])
    batch = {
        "image": np.zeros((2, 8, 8, 3), np.float32),
        "label": np.zeros((2, 8, 8), np.int32),
        "valid": np.ones((2,), bool),
        "image_size": np.array([[5, 6], [8, 8]], np.int32),
    }

    def eval_step(variables, b):  # predicts class 1 everywhere, padding included
        return jnp.zeros((2, 2), jnp.int32), jnp.ones(b["label"].shape, jnp.int32)

    _, vis = training.confusion_over_batches(
        None, [batch], eval_step, num_classes=2, batch_sharding=NamedSharding(mesh, P("data")), num_vis=2
    )
    pred = vis["pred"]
    assert (pred[0, :5, :6] == 1).all() and (pred[0, 5:] == -1).all() and (pred[0, :, 6:] == -1).all()
    assert (pred[1] == 1).all()
    grid = visualize.comparison_grid(
        vis["image"], vis["label"], pred, np.array([[0, 0, 0], [255, 0, 0]], np.uint8), mean=(0, 0, 0), std=(1, 1, 1)
    )
    prediction_cell = grid[:8, 2 * 8 + 4 :]  # row 0, third column (gaps of 2 px)
    assert (prediction_cell[5:] == 0).all() and prediction_cell[0, 0, 0] > 0  # padding stays the image (black)


def test_evaluate_normalises_a_model_dir_as_its_preprocessor_config_says(tmp_path):
    """`evaluate --checkpoint MODEL_DIR --config ...`: the model's preprocessor_config.json mean / std
    (0..1 units) replace the config's (0..255) where they differ, and it says so; the same values, no
    file, or a training workdir leave the config alone."""
    from segformer_jax import evaluate
    from segformer_jax.pretrained import hf_preprocessor_config

    config = _config_like_run_flags(str(tmp_path / "data"))
    imagenet = (tuple(config.data.mean), tuple(config.data.std))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert evaluate.use_model_normalisation(config, str(model_dir)) is None  # no preprocessor_config.json
    (model_dir / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config()))
    assert evaluate.use_model_normalisation(config, str(model_dir)) is None  # ImageNet, as the config
    assert (tuple(config.data.mean), tuple(config.data.std)) == imagenet
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps(hf_preprocessor_config(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.5)))
    )
    note = evaluate.use_model_normalisation(config, str(model_dir))
    assert "preprocessor_config.json" in note and "0.485" not in note.split("(the config's")[0]
    np.testing.assert_allclose(config.data.mean, (127.5, 127.5, 127.5))
    np.testing.assert_allclose(config.data.std, (63.75, 63.75, 127.5))
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10").mkdir(parents=True)
    (workdir / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(mean=(0, 0, 0))))
    assert evaluate.use_model_normalisation(config, str(workdir)) is None
