"""ONNX (jax2onnx) and OpenVINO export: the artifacts reproduce the live float32 logits within 1e-4
at a square and a non-square size, with a symbolic batch; the CLI; missing packages."""

from __future__ import annotations

import os
import sys
import warnings

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from reference import TINY  # noqa: E402

from segformer_jax import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from segformer_jax.deploy import export  # noqa: E402
from segformer_jax.pretrained import init_variables, save_pretrained  # noqa: E402

onnxruntime = pytest.importorskip("onnxruntime", reason=export.ONNX_INSTALL_HINT)
pytest.importorskip("jax2onnx", reason=export.ONNX_INSTALL_HINT)

NON_SQUARE = (64, 96)


@pytest.fixture(scope="module")
def tiny():
    model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=5, **TINY))
    variables = init_variables(model, 0)
    return model, variables, jax.jit(model.apply)


@pytest.fixture(scope="module")
def onnx_file(tiny, tmp_path_factory):
    """The Python API at a non-square size (the CLI test below makes the square one)."""
    model, variables, _ = tiny
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    return export.save_onnx(model, variables, path, height=NON_SQUARE[0], width=NON_SQUARE[1])


def _images(b, h, w, seed=0):
    return np.random.RandomState(seed).randn(b, h, w, 3).astype(np.float32)


def test_onnxruntime_matches_the_live_model_at_any_batch(tiny, onnx_file):
    model, variables, apply = tiny
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape == ["b", *NON_SQUARE, 3]  # symbolic batch
    for b in (1, 2):
        x = _images(b, *NON_SQUARE, seed=b)
        (got,) = session.run(["logits"], {"images": x})
        want = np.asarray(apply(variables, x))
        assert got.shape == want.shape == (b, NON_SQUARE[0] // 4, NON_SQUARE[1] // 4, 5)
        assert np.abs(got - want).max() < 1e-4


def test_openvino_ir_matches_the_live_model_in_float32(tiny, onnx_file, tmp_path):
    import openvino as ov

    model, variables, apply = tiny
    xml = export.save_openvino(model, variables, tmp_path / "m.xml", onnx_path=onnx_file)
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.xml"]  # nothing else left behind
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = _images(2, *NON_SQUARE, seed=2)
    assert np.abs(compiled(x)[0] - np.asarray(apply(variables, x))).max() < 1e-4


def test_cli_onnx_and_openvino_from_a_model_directory(tiny, onnx_file, tmp_path, monkeypatch, capsys):
    import shutil

    import openvino as ov

    from segformer_jax import export as cli

    model, variables, apply = tiny
    model_dir = save_pretrained(model, variables, tmp_path / "model", format="hf")
    out = tmp_path / "m.onnx"
    assert cli.main(["--format", "onnx", model_dir, str(out), "--size", "64x64"]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _images(2, 64, 64)
    (got,) = session.run(None, {"images": x})
    assert np.abs(got - np.asarray(apply(variables, x))).max() < 1e-4  # the square size
    assert cli.main(["--format", "onnx", model_dir, str(out), "--size", "64x64"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err

    # --format openvino converts the ONNX export it stages; the conversion is the fixture's (same model)
    monkeypatch.setattr(export, "save_onnx", lambda m, v, path, **kw: shutil.copyfile(onnx_file, path))
    xml = tmp_path / "ir" / "m.xml"
    assert cli.main(["--format", "openvino", model_dir, str(xml), "--size", "64x96"]) == 0
    assert sorted(os.listdir(xml.parent)) == ["m.bin", "m.xml"]
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = _images(1, *NON_SQUARE, seed=1)
    assert np.abs(compiled(x)[0] - np.asarray(apply(variables, x))).max() < 1e-4


def test_missing_package_is_a_clear_error_and_nothing_is_written(tiny, tmp_path, monkeypatch, capsys):
    from segformer_jax import export as cli

    model, variables, _ = tiny
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx -> ImportError
    with pytest.raises(export.ExportDependencyError, match=r"jax2onnx.*\.\[export\]"):
        export.save_onnx(model, variables, tmp_path / "m.onnx", height=64, width=64)
    assert cli.main(["--format", "onnx", "nowhere/model", str(tmp_path / "m.onnx")]) == 2
    assert "jax2onnx" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_old_module_path_forwards_to_deploy_export():
    from segformer_jax import export as cli

    with pytest.warns(DeprecationWarning, match="segformer_jax.deploy.export.save_stablehlo"):
        assert cli.save_stablehlo is export.save_stablehlo
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main is export.main


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "tflite"])
def test_bfloat16_export_to_float32_only_formats_is_refused_before_loading(tiny, fmt, tmp_path, capsys):
    """A bfloat16 ONNX graph does not load in ONNX Runtime (no bfloat16 Einsum / MatMul kernels): the
    CLI refuses it up front, naming the way to OpenVINO's bfloat16 (a float32 export, its precision
    hint) and the formats that do carry bfloat16; the Python API refuses a bfloat16 model too."""
    from segformer_jax import export as cli

    model, variables, _ = tiny
    out = tmp_path / "m.out"
    assert cli.main(["--format", fmt, "nowhere/model", str(out), "--size", "64x64", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert f"--format {fmt} exports float32 models only" in err and "INFERENCE_PRECISION_HINT" in err
    assert "nowhere" not in err  # refused before looking for the model
    assert os.listdir(tmp_path) == []
    if fmt == "onnx":
        bf16 = SegformerForSemanticSegmentation(model.config, dtype="bfloat16")
        with pytest.raises(ValueError, match="float32 models only"):
            export.export_onnx(bf16, variables, height=64, width=64)
