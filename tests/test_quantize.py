"""int8 weight-only quantization: per-channel rounding, ~4x smaller checkpoint, loadable by
load_quantized and predict, refused with a clear message by from_pretrained."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from PIL import Image
from reference import random_variables

import segformer_jax as sj
from segformer_jax.deploy import quantize as Q

TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 1, 1, 2),
    decoder_hidden_size=16,
    num_labels=5,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**TINY))
    variables = random_variables(model, seed=0)
    root = tmp_path_factory.mktemp("q")
    f32_dir = sj.save_pretrained(model, variables, root / "f32", format="hf")
    q_dir = Q.save_quantized(model, Q.quantize_variables(variables), root / "int8")
    return model, variables, f32_dir, q_dir


def test_quantize_array_per_channel():
    w = np.random.default_rng(0).standard_normal((3, 3, 4, 6)).astype(np.float32) * np.arange(1, 7)
    q = Q.quantize_array(w)
    assert q["q"].dtype == np.int8 and q["scale"].shape == (6,)
    assert np.abs(q["q"]).max() == 127
    err = np.abs(q["q"] * q["scale"] - w)
    assert (err <= q["scale"] / 2 + 1e-7).all()
    assert Q.quantize_array(np.zeros((2, 3), np.float32))["scale"].tolist() == [1.0, 1.0, 1.0]


def test_checkpoint_smaller_and_logits_close(tiny):
    model, variables, f32_dir, q_dir = tiny
    f32_bytes = os.path.getsize(os.path.join(f32_dir, "model.safetensors"))
    q_bytes = os.path.getsize(os.path.join(q_dir, Q.QUANTIZED_WEIGHTS_NAME))
    # The tiny model's biases/norms are a large share of its parameters; b0 reaches ~3.9x (README, int8 section).
    assert f32_bytes / q_bytes > 2.5
    loaded_model, qvars = Q.load_quantized(q_dir)
    leaf = qvars["params"]["segformer"]["encoder"]["block_0_0"]["mlp"]["dense1"]["kernel"]
    assert leaf["q"].dtype == np.int8
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    ref = np.asarray(jax.jit(model.apply)(variables, x))
    got = np.asarray(jax.jit(Q.quantized_apply(loaded_model))(qvars, x))
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95
    _, dequantized = Q.load_quantized(q_dir, dequantize=True)
    assert dequantized["params"]["segformer"]["encoder"]["block_0_0"]["mlp"]["dense1"]["kernel"].dtype == np.float32


def test_float_code_refuses_quantized_checkpoint(tiny):
    _, _, _, q_dir = tiny
    with pytest.raises(Q.QuantizedCheckpointError, match="int8 weight-only quantized checkpoint.*load_quantized"):
        sj.from_pretrained(q_dir)
    with pytest.raises(Q.QuantizedCheckpointError, match="int8"):
        sj.from_pretrained(os.path.join(q_dir, Q.QUANTIZED_WEIGHTS_NAME), config=sj.SegformerConfig(**TINY))
    with pytest.raises(Q.QuantizedCheckpointError, match="not an int8 checkpoint"):
        Q.load_quantized(tiny[2])


def test_predict_with_quantized_checkpoint(tmp_path, tiny):
    from segformer_jax import inference
    from segformer_jax import predict as P

    _, _, _, q_dir = tiny
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    result = P.predict(
        [str(tmp_path / "*.png")],
        q_dir,
        tmp_path / "out",
        progress=False,
        config=inference.InferenceConfig("whole", scale=None),
    )
    assert not result.failed and len(result.written) == 2 and result.compilations == 1


def test_command_line_writes_the_same_checkpoint_as_the_api(tiny, tmp_path, capsys):
    model, variables, f32_dir, q_dir = tiny
    out = tmp_path / "cli-int8"
    from segformer_jax import quantize as quantize_cli  # the CLI module

    assert quantize_cli.main([f32_dir, str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _, want = Q.load_quantized(q_dir)
    _, got = Q.load_quantized(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, want, got)
    assert quantize_cli.main([f32_dir, str(out)]) == 2  # exists: nothing replaced
    assert "pass --overwrite" in capsys.readouterr().err
    assert quantize_cli.main([q_dir, str(tmp_path / "again")]) == 2  # already int8
    assert "is an int8 weight-only quantized checkpoint" in capsys.readouterr().err
