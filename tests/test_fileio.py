"""What the atomic writes leave: the umask's permissions (mkstemp / mkdtemp alone would give 0600 / 0700,
refusing a serving process or a colleague), and nothing at all when the write fails. Covers predict's
PNG writer, save_pretrained (hf and flax; flax with overwrite=True is train.py's <workdir>/final
export), save_quantized."""

import contextlib
import os
import stat

import numpy as np
import pytest

import segformer_jax as sj
from segformer_jax import fileio
from segformer_jax import predict as P
from segformer_jax.deploy import quantize as Q

TINY = dict(hidden_sizes=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_attention_heads=(1, 1, 1, 2), decoder_hidden_size=16)


@pytest.fixture(scope="module")
def tiny():
    """A tiny model with random variables of the right shapes (no init compile)."""
    import jax

    from segformer_jax.pretrained import variable_shapes

    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**TINY, num_labels=3))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), variable_shapes(model)
    )
    return model, variables


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root):
    """{relative path: permission bits} of `root` and everything below it."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def _assert_umask_modes(root, mask):
    root = str(root)
    modes = _modes(root) if os.path.isdir(root) else {".": stat.S_IMODE(os.stat(root).st_mode)}
    for rel, mode in modes.items():
        is_dir = os.path.isdir(os.path.join(root, rel)) if rel != "." else os.path.isdir(root)
        want = (0o777 if is_dir else 0o666) & ~mask
        assert mode == want, f"{rel}: {oct(mode)}, want {oct(want)} (umask {oct(mask)})"


def _leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_predict_png_gets_the_umask_permissions(tmp_path, mask):
    with umask(mask):
        P._save_png_atomic(np.arange(16, dtype=np.uint8).reshape(4, 4), str(tmp_path / "mask.png"))
    _assert_umask_modes(tmp_path / "mask.png", mask)
    if mask == 0o022:
        assert stat.S_IMODE(os.stat(tmp_path / "mask.png").st_mode) == 0o644
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
@pytest.mark.parametrize("fmt", ["hf", "flax"])
def test_save_pretrained_folders_get_the_umask_permissions(tiny, tmp_path, mask, fmt):
    model, variables = tiny
    out = tmp_path / "model"
    with umask(mask):
        sj.save_pretrained(model, variables, out, format=fmt)
    _assert_umask_modes(out, mask)
    if mask == 0o022:
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(out / "config.json").st_mode) == 0o644
    assert _leftovers(tmp_path) == []
    sj.from_pretrained(str(out))  # and it loads


def test_workdir_final_export_replacing_an_old_one_gets_the_umask_permissions(tiny, tmp_path):
    """train.py's export: save_pretrained(format='flax', overwrite=True) over an existing workdir/final."""
    model, variables = tiny
    final = tmp_path / "workdir" / "final"
    with umask(0o077):
        sj.save_pretrained(model, variables, final, format="flax")
    with umask(0o022):
        sj.save_pretrained(model, variables, final, format="flax", overwrite=True)
    _assert_umask_modes(final, 0o022)
    assert _leftovers(final.parent) == []


def test_save_quantized_gets_the_umask_permissions(tiny, tmp_path):
    model, variables = tiny
    with umask(0o022):
        out = Q.save_quantized(model, Q.quantize_variables(variables), tmp_path / "int8")
    _assert_umask_modes(out, 0o022)
    assert stat.S_IMODE(os.stat(os.path.join(out, Q.QUANTIZED_WEIGHTS_NAME)).st_mode) == 0o644
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- failures leave nothing


def test_failed_png_write_leaves_nothing(tmp_path):
    old = tmp_path / "kept.png"
    P._save_png_atomic(np.zeros((4, 4), np.uint8), str(old))
    before = old.read_bytes()
    with pytest.raises((OSError, TypeError, ValueError, KeyError)):
        P._save_png_atomic(np.zeros((4, 4, 5), np.float64), str(old))  # PIL cannot write this as PNG
    assert old.read_bytes() == before  # the old file is whole
    with pytest.raises((OSError, TypeError, ValueError, KeyError)):
        P._save_png_atomic(np.zeros((4, 4, 5), np.float64), str(tmp_path / "new.png"))
    assert sorted(os.listdir(tmp_path)) == ["kept.png"]


class _Interrupted(Exception):
    pass


def _fail_after_partial_write(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise _Interrupted


def test_failed_save_pretrained_leaves_nothing_and_keeps_the_old_folder(tiny, tmp_path, monkeypatch):
    model, variables = tiny
    out = tmp_path / "model"
    sj.save_pretrained(model, variables, out, format="hf")
    before = sorted(os.listdir(out))
    from weights_convert import checkpoint_io

    monkeypatch.setattr(checkpoint_io, "save_safetensors", lambda state, path: _fail_after_partial_write(path))
    with pytest.raises(_Interrupted):
        sj.save_pretrained(model, variables, out, format="hf", overwrite=True)
    with pytest.raises(_Interrupted):
        sj.save_pretrained(model, variables, tmp_path / "new", format="hf")
    assert sorted(os.listdir(tmp_path)) == ["model"] and sorted(os.listdir(out)) == before
    sj.from_pretrained(str(out))


def test_failed_save_quantized_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, variables = tiny
    import safetensors.numpy

    monkeypatch.setattr(
        safetensors.numpy, "save_file", lambda tensors, path, metadata=None: _fail_after_partial_write(path)
    )
    with pytest.raises(_Interrupted):
        Q.save_quantized(model, Q.quantize_variables(variables), tmp_path / "int8")
    assert os.listdir(tmp_path) == []


def test_atomic_file_failure_keeps_the_old_content(tmp_path):
    path = tmp_path / "f.bin"
    fileio.atomic_write_bytes(b"old", path)
    with pytest.raises(_Interrupted), fileio.atomic_file(path) as f:
        f.write(b"new, half")
        raise _Interrupted
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
