"""predict(): folders/globs of mixed images -> label PNGs + overlays, one compilation per bucket,
bad inputs reported one by one, atomic writes; the CLI."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest
from PIL import Image

import segformer_jax as sj
from segformer_jax import inference
from segformer_jax import predict as P
from segformer_jax.data import palettes

TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 1, 1, 2),
    decoder_hidden_size=16,
    num_labels=5,
)
CFG = inference.InferenceConfig("whole", scale=None, bucket=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model saved with save_pretrained(format="flax") (variables from a fixed seed, no init compile)."""
    from segformer_jax.pretrained import variable_shapes

    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**TINY))
    rng = np.random.default_rng(0)
    import jax

    shapes = variable_shapes(model)
    variables = jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    variables["batch_stats"]["decode_head"]["batch_norm"]["var"] = np.ones(16, np.float32)
    variables["batch_stats"]["decode_head"]["batch_norm"]["num_batches_tracked"] = np.zeros((), np.int32)
    out = tmp_path_factory.mktemp("model") / "tiny"
    sj.save_pretrained(model, variables, out, format="flax")
    return str(out)


@pytest.fixture(scope="module")
def loaded(model_dir):
    model, apply_fn, variables = P.load_model(model_dir)
    return model, inference.TiledForward(
        apply_fn, variables, batch_size=4, compiler_options={"xla_backend_optimization_level": 0}
    )


def _img(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx[..., None] / (3.0 + seed % 5) + np.arange(3)) * np.cos(yy[..., None] / 4.0)
    return np.clip(base + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_mixed(folder, n=20):
    """n images: JPEG/PNG, RGB/grayscale/RGBA/palette/16-bit, sizes 40..64 x 50..96 (2 buckets)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {}
    for i in range(n):
        h, w = int(rng.integers(40, 64)), int(rng.integers(50, 96))
        rgb = _img(h, w, i)
        kind = i % 5
        if kind == 0:
            path, im = f"{folder}/img{i:02d}.jpg", Image.fromarray(rgb)
        elif kind == 1:
            path, im = f"{folder}/img{i:02d}.png", Image.fromarray(rgb).convert("L")
        elif kind == 2:
            path, im = f"{folder}/img{i:02d}.png", Image.fromarray(np.dstack([rgb, np.full((h, w), 128, np.uint8)]))
        elif kind == 3:
            path, im = f"{folder}/img{i:02d}.png", Image.fromarray(rgb).convert("P")
        else:
            path = f"{folder}/img{i:02d}.png"
            im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        im.save(path)
        sizes[os.path.basename(path)] = (h, w)
    return sizes


def test_predict_folder_and_glob_one_compilation_per_bucket(tmp_path, loaded):
    model, forward = loaded
    sizes = _write_mixed(tmp_path / "in")
    out = tmp_path / "out"
    before = set(forward.shapes)
    result = P.predict(
        [str(tmp_path / "in" / "*.jpg"), str(tmp_path / "in")], model, out, forward=forward, config=CFG, progress=False
    )
    assert not result.failed, result.failed
    assert len(result.written) == 20  # glob + folder overlap counted once
    buckets = inference.tile_shapes(sizes.values(), CFG)
    assert len(buckets) == 2
    assert result.compilations == len(buckets - before) <= len(buckets)
    assert any("16-bit" in note for _, note in result.notes) and any("alpha" in note for _, note in result.notes)
    for src, label_path, overlay_path in result.written:
        h, w = sizes[os.path.basename(src)]
        labels = np.asarray(Image.open(label_path))
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < TINY["num_labels"]
        over = np.asarray(Image.open(overlay_path))
        assert over.shape == (h, w, 3)
    # Same labels as the library function on the same pixels.
    src, label_path, overlay_path = next(r for r in result.written if r[0].endswith(".jpg"))
    image, _ = P.load_image(src)
    want = np.argmax(inference.segment(forward, image, CFG), axis=-1)
    np.testing.assert_array_equal(np.asarray(Image.open(label_path)), want)
    np.testing.assert_array_equal(
        np.asarray(Image.open(overlay_path)), palettes.overlay(image, want, palettes.generated_palette(5), 0.5)
    )
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files left


def test_bad_inputs_are_reported_and_others_processed(tmp_path, loaded):
    model, forward = loaded
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_img(48, 64, 1)).save(d / "good1.png")
    Image.fromarray(_img(50, 70, 2)).save(d / "good2.jpg")
    (d / "notes.png").write_text("this is not an image")
    buf = d / "cut.jpg"
    Image.fromarray(_img(64, 64, 3)).save(buf, quality=95)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(d / "dot.png")
    result = P.predict([str(d)], model, tmp_path / "out", forward=forward, config=CFG, progress=False)
    failed = dict(result.failed)
    assert sorted(os.path.basename(f) for f in failed) == ["cut.jpg", "dot.png", "notes.png"]
    assert "not an image" in failed[str(d / "notes.png")]
    assert "truncated" in failed[str(d / "cut.jpg")]
    assert "1x1 pixels" in failed[str(d / "dot.png")]
    assert sorted(os.path.basename(r[1]) for r in result.written) == ["good1.png", "good2.png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["good1.png", "good1_overlay.png", "good2.png", "good2_overlay.png"]


def test_empty_folder_and_unwritable_output(tmp_path, loaded):
    model, forward = loaded
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        P.predict([str(tmp_path / "empty")], model, tmp_path / "out", forward=forward, progress=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        P.predict([str(tmp_path / "missing.png")], model, tmp_path / "out", forward=forward, progress=False)
    Image.fromarray(_img(40, 40, 0)).save(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(P.OutputError, match="cannot write to output folder"):
        P.predict([str(tmp_path / "a.png")], model, blocker / "out", forward=forward, progress=False)
    before = (tmp_path / "a.png").read_bytes()
    with pytest.raises(P.OutputError, match="holds 1 of the input images .a.png.*choose another output folder"):
        P.predict([str(tmp_path)], model, tmp_path, forward=forward, progress=False)
    assert (tmp_path / "a.png").read_bytes() == before  # the input is untouched


def test_cli(tmp_path, model_dir, capsys, monkeypatch):
    from segformer_jax import xla_options

    monkeypatch.setattr(xla_options, "DEFAULT_COMPILATION_CACHE", "")  # never ~/.cache from a test
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        Image.fromarray(_img(40 + i, 60, i)).save(d / f"x{i}.png")
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    try:
        code = P.main(
            [
                "--model",
                model_dir,
                "--output",
                str(tmp_path / "out"),
                "--scale",
                "none",
                "--quiet",
                "--palette",
                "cityscapes",
                "--compilation-cache",
                str(tmp_path / "xla"),
                str(d),
            ]
        )
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    err = capsys.readouterr().err
    assert code == 1 and "3 image(s) segmented" in err and "bad.png" in err
    assert len(glob.glob(str(tmp_path / "out" / "*_overlay.png"))) == 3
    assert P.main(["--model", model_dir, "--output", str(tmp_path / "o2"), str(tmp_path / "nothing")]) == 2
    assert P.main(["--model", model_dir, "--output", str(tmp_path / "o2"), "--crop", "axb", str(d)]) == 2
    capsys.readouterr()
    for flags, message in (
        (["--mode", "slide", "--crop", "64x64", "--stride", "600x600"], "larger than crop"),
        (["--crop", "none"], "crop=None"),
        (["--ratios", "1,x"], "--ratios=1,x"),
        (["--bucket", "abc"], "--bucket=abc"),
        (["--alpha", "5"], "--alpha=5"),
    ):
        assert P.main(["--model", model_dir, "--output", str(tmp_path / "o2"), *flags, str(d)]) == 2, flags
        assert message in capsys.readouterr().err, flags
