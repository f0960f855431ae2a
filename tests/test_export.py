"""Serving exports: StableHLO (jax.export, symbolic batch/height/width), TF SavedModel (jax2tf),
TFLite (static shapes); each reloaded and compared with the live model (1e-5)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from reference import random_variables

import segformer_jax as sj
from segformer_jax.deploy import export as E

TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 1, 1, 2),
    decoder_hidden_size=16,
    num_labels=5,
)


@pytest.fixture(scope="module")
def tiny():
    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**TINY))
    variables = random_variables(model, seed=0)
    apply = jax.jit(model.apply)
    cache = {}

    def live(variables, x):  # one live compilation per shape for the whole module
        key = (x.shape, x.tobytes())
        if key not in cache:
            cache[key] = np.asarray(apply(variables, x))
        return cache[key]

    return model, variables, live


def _x(shape, seed=0):  # same seed -> same array, so live results are reused
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


SHAPES = [(2, 64, 96, 3), (1, 50, 70, 3)]  # the second is not a multiple of 32 (or of 4)


def test_stablehlo_symbolic_batch_and_spatial(tmp_path, tiny):
    model, variables, live = tiny
    path = E.save_stablehlo(model, variables, tmp_path / "tiny.stablehlo")
    exported = E.load_stablehlo(path)
    assert str(exported.in_avals[0].shape) == "(b, h, w, 3)"
    for shape in SHAPES:
        x = _x(shape)
        np.testing.assert_allclose(np.asarray(exported.call(x)), np.asarray(live(variables, x)), atol=1e-5, rtol=0)


def test_tf_saved_model(tmp_path, tiny):
    import tensorflow as tf

    model, variables, live = tiny
    out = E.save_tf_saved_model(model, variables, tmp_path / "saved")
    assert os.path.isfile(os.path.join(out, "saved_model.pb"))
    loaded = tf.saved_model.load(out)
    for shape in SHAPES[1:]:
        x = _x(shape)
        got = loaded.signatures["serving_default"](images=tf.constant(x))
        (value,) = got.values()
        np.testing.assert_allclose(value.numpy(), np.asarray(live(variables, x)), atol=1e-5, rtol=0)


def test_tflite_static_shape(tmp_path, tiny):
    import tensorflow as tf

    model, variables, live = tiny
    saved = E.save_tf_saved_model(model, variables, tmp_path / "saved_static", batch=1, height=50, width=70)
    path = E.export_tflite(saved, tmp_path / "tiny.tflite", allow_select_tf_ops=False)
    interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.allocate_tensors()
    x = _x(SHAPES[1])
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, np.asarray(live(variables, x)), atol=1e-5, rtol=0)


def test_tflite_refuses_symbolic_shapes_up_front(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.serve = tf.function(
        lambda images: images * 2.0, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]
    )
    tf.saved_model.save(module, str(tmp_path / "symbolic"), signatures={"serving_default": module.serve})
    with pytest.raises(
        RuntimeError, match=r"TFLite needs static shapes, but input 'images' .* is \(None, None, None, 3\)"
    ):
        E.export_tflite(tmp_path / "symbolic", tmp_path / "x.tflite")
    assert not (tmp_path / "x.tflite").exists()
