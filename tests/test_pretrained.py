"""from_pretrained / save_pretrained / weights_convert: round trips, formats, and loud failures."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from reference import TINY, build_reference, hf_config, images, max_abs_diff, perturb_norms, to_nhwc
from safetensors.numpy import load_file, save_file

import segformer_jax as sj
from segformer_jax.models.config import ConfigError
from weights_convert import __main__ as cli
from weights_convert.checkpoint_io import CheckpointFileError
from weights_convert.convert import ConversionError
from weights_convert.mapping import normalize_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_reference):
    d = tmp_path_factory.mktemp("hf")
    tiny_reference.save_pretrained(d)
    return str(d)


def _logits(ref, x):
    with torch.no_grad():
        return to_nhwc(ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits)


def test_from_pretrained_hf_directory_gives_the_same_logits(hf_dir, tiny_reference):
    model, variables = sj.from_pretrained(hf_dir)
    assert isinstance(model, sj.SegformerForSemanticSegmentation)
    assert model.config.num_labels == 7 and model.config.layer_norm_eps == 1e-5
    x = images(2, 50, 70, seed=1)
    assert max_abs_diff(jax.jit(model.apply)(variables, x), _logits(tiny_reference, x)) < 1e-4


def test_hf_flax_hf_round_trip_is_bit_exact_and_transformers_loads_it(hf_dir, tmp_path, tiny_reference):
    model, variables = sj.from_pretrained(hf_dir)
    out = sj.save_pretrained(model, variables, tmp_path / "back", format="hf")
    original, back = (
        load_file(os.path.join(hf_dir, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    assert sorted(original) == sorted(back)
    for key in original:
        assert original[key].dtype == back[key].dtype and np.array_equal(original[key], back[key]), key
    reloaded = transformers.SegformerForSemanticSegmentation.from_pretrained(out).eval()
    x = images(1, 40, 56, seed=2)
    # Bit-identical weights (above); two torch model instances may still round differently (kernel choice).
    assert max_abs_diff(_logits(reloaded, x), _logits(tiny_reference, x)) < 1e-5


def test_flax_format_round_trip(hf_dir, tmp_path):
    model, variables = sj.from_pretrained(hf_dir)
    out = sj.save_pretrained(model, variables, tmp_path / "flax", format="flax")
    assert sorted(os.listdir(out)) == ["config.json", "flax_variables"]
    model2, variables2 = sj.from_pretrained(out)
    assert model2.config == model.config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), variables, variables2)


def test_transformers5_in_memory_names_equal_hub_names(tiny_reference, hf_dir):
    in_memory = {k: v.numpy().copy() for k, v in tiny_reference.state_dict().items()}
    assert any(".q_proj." in k for k in in_memory)  # transformers-5 layout
    hub = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert any(".attention.self.query." in k for k in hub)  # hub (v4) layout
    renamed = normalize_hf(in_memory)
    assert sorted(renamed) == sorted(hub)
    for k in hub:
        np.testing.assert_array_equal(renamed[k], hub[k])


def test_pytorch_bin_is_read_with_torch(tmp_path, tiny_reference, hf_dir):
    d = tmp_path / "bin"
    tiny_reference.save_pretrained(
        d, safe_serialization=False
    ) if "safe_serialization" in transformers.PreTrainedModel.save_pretrained.__code__.co_varnames else None
    if not (d / "pytorch_model.bin").exists():  # transformers 5 writes safetensors only: write the .bin ourselves
        d.mkdir(exist_ok=True)
        torch.save(tiny_reference.state_dict(), d / "pytorch_model.bin")
        (d / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    model, variables = sj.from_pretrained(d)
    x = images(1, 40, 40, seed=3)
    assert max_abs_diff(jax.jit(model.apply)(variables, x), _logits(tiny_reference, x)) < 1e-4


def test_encoder_only_checkpoint_into_segmentation_model(tmp_path, caplog):
    ref = build_reference(transformers.SegformerForImageClassification, num_labels=10, **TINY)
    ref.save_pretrained(tmp_path / "mit")
    with caplog.at_level(logging.WARNING, logger="segformer_jax"):
        model, variables = sj.from_pretrained(tmp_path / "mit", num_labels=4)
    assert isinstance(model, sj.SegformerForSemanticSegmentation) and model.config.num_labels == 4
    assert "newly initialised" in caplog.text and "params/decode_head/classifier/kernel" in caplog.text
    assert "classifier.weight" in caplog.text  # the unused ImageNet head is listed
    # encoder weights are the checkpoint's
    x = images(1, 48, 48, seed=4)
    with torch.no_grad():
        want = ref.segformer(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states
    _, features = jax.jit(lambda v, x: model.apply(v, x, output_hidden_states=True))(variables, x)
    assert max_abs_diff(features[-1], to_nhwc(want[-1])) < 1e-5
    # ... and the ImageNet classifier itself when asked for
    cls_model, cls_vars = sj.from_pretrained(tmp_path / "mit", architecture="SegformerForImageClassification")
    with torch.no_grad():
        logits = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
    assert max_abs_diff(jax.jit(cls_model.apply)(cls_vars, x), logits) < 1e-4


def _hidden_states(encoder, x) -> list[np.ndarray]:
    with torch.no_grad():
        out = encoder(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states
    return [to_nhwc(h) for h in out]


def test_encoder_alone_loads_and_saves_in_every_format(tmp_path, hf_dir, tiny_reference):
    torch.manual_seed(0)
    ref = transformers.SegformerModel(hf_config(7, **TINY)).eval()
    perturb_norms(ref)
    ref.save_pretrained(tmp_path / "hf")
    x = images(1, 37, 53, seed=5)
    want = _hidden_states(ref, x)

    model, variables = sj.from_pretrained(tmp_path / "hf", architecture="SegformerModel")
    assert isinstance(model, sj.SegformerModel) and sorted(variables["params"]) == ["encoder"]
    got = jax.jit(model.apply)(variables, x)
    assert max(max_abs_diff(g, w) for g, w in zip(got, want, strict=True)) < 1e-5

    # Back to HF: transformers' own SegformerModel names (no `segformer.` prefix), tensors bit-identical.
    out = sj.save_pretrained(model, variables, tmp_path / "back", format="hf")
    original, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(back) == sorted(original) and not any(k.startswith("segformer.") for k in back)
    assert all(np.array_equal(original[k], back[k]) for k in original)
    reloaded = transformers.SegformerModel.from_pretrained(out).eval()
    assert all(max_abs_diff(a, b) == 0.0 for a, b in zip(_hidden_states(reloaded, x), want, strict=True))

    # Our own format reads back exactly.
    out = sj.save_pretrained(model, variables, tmp_path / "flax", format="flax")
    model2, variables2 = sj.from_pretrained(out, architecture="SegformerModel")
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, variables2)

    # The encoder of a segmentation checkpoint (its decode head is left out).
    model3, variables3 = sj.from_pretrained(hf_dir, architecture="SegformerModel")
    got = jax.jit(model3.apply)(variables3, x)
    assert max(max_abs_diff(g, w) for g, w in zip(got, _hidden_states(tiny_reference.segformer, x), strict=True)) < 1e-5


def test_new_num_labels_reinitialises_only_the_classifier(hf_dir, caplog):
    _, original = sj.from_pretrained(hf_dir)
    with caplog.at_level(logging.WARNING, logger="segformer_jax"):
        model, variables = sj.from_pretrained(hf_dir, num_labels=3)
    assert variables["params"]["decode_head"]["classifier"]["kernel"].shape == (1, 1, 16, 3)
    assert "params/decode_head/classifier/kernel" in caplog.text
    np.testing.assert_array_equal(
        variables["params"]["decode_head"]["linear_fuse"]["kernel"],
        original["params"]["decode_head"]["linear_fuse"]["kernel"],
    )


# ----------------------------------------------------------------------------- bad input
def _copy_with(hf_dir, tmp_path, edit):
    d = tmp_path / "edited"
    d.mkdir()
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    return d


def test_missing_extra_and_misshaped_tensors_are_all_listed(hf_dir, tmp_path):
    def edit(state):
        del state["segformer.encoder.block.1.1.mlp.dense1.weight"]
        state["segformer.encoder.block.9.0.mlp.dense1.weight"] = np.zeros((3, 3), np.float32)
        state["decode_head.linear_fuse.weight"] = np.zeros((16, 60, 1, 1), np.float32)

    with pytest.raises(ConversionError) as e:
        sj.from_pretrained(_copy_with(hf_dir, tmp_path, edit))
    msg = str(e.value)
    assert "1 model variable(s) missing" in msg and "params/segformer/encoder/block_1_1/mlp/dense1/kernel" in msg
    assert "1 checkpoint tensor(s) not used" in msg and "segformer.encoder.block.9.0.mlp.dense1.weight" in msg
    assert (
        "wrong shape" in msg
        and "decode_head.linear_fuse.weight: checkpoint (16, 60, 1, 1), model expects (16, 64, 1, 1)" in msg
    )


def test_config_that_is_not_segformer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    with pytest.raises(ConfigError, match="not a SegFormer config.*model_type='vit'"):
        sj.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        sj.from_pretrained(tmp_path)


def test_corrupt_safetensors(hf_dir, tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    data = open(os.path.join(hf_dir, "model.safetensors"), "rb").read()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    (d / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    with pytest.raises(CheckpointFileError, match="not a readable safetensors file"):
        sj.from_pretrained(d)


def test_paths_that_do_not_exist_or_hold_no_weights(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sj.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    with pytest.raises(CheckpointFileError, match="no weights in"):
        sj.from_pretrained(tmp_path)


def test_bad_images_get_clear_errors(tiny_flax):
    model, variables = tiny_flax
    with pytest.raises(ValueError, match="4-D NHWC"):
        model.apply(variables, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="looks like NCHW"):
        model.apply(variables, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="4 channels|3 channels"):
        model.apply(variables, np.zeros((1, 32, 32, 4), np.float32))
    with pytest.raises(ValueError, match="floating point, ImageNet-normalised"):
        model.apply(variables, np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        model.apply(variables, np.zeros((1, 16, 64, 3), np.float32))


def test_save_pretrained_writes_nothing_on_failure(tiny_flax, tmp_path):
    model, variables = tiny_flax
    bad = jax.tree_util.tree_map(lambda x: x, variables)
    bad["params"]["decode_head"]["classifier"]["kernel"] = np.zeros((1, 1, 16, 9), np.float32)
    with pytest.raises(ConversionError, match="nothing was written"):
        sj.save_pretrained(model, bad, tmp_path / "out", format="hf")
    assert os.listdir(tmp_path) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sj.save_pretrained(model, variables, tmp_path / "taken", format="flax")
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_cli_both_directions(hf_dir, tmp_path, tiny_reference, capsys):
    assert cli.main(["to-flax", hf_dir, str(tmp_path / "flax")]) == 0
    assert cli.main(["to-hf", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    reloaded = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()
    want, got = tiny_reference.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    x = images(1, 40, 40, seed=5)
    # Bit-identical weights; the two instances may still pick different kernels and round differently
    # (1.5e-5 on logits of ~9 seen on an AVX2 CPU), so the logits are checked at the project's 1e-4.
    assert max_abs_diff(_logits(reloaded, x), _logits(tiny_reference, x)) < 1e-4
    assert cli.main(["to-flax", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_errors_name_flags_not_python_arguments(hf_dir, tmp_path, capsys):
    bare = tmp_path / "weights.safetensors"
    bare.write_bytes(open(os.path.join(hf_dir, "model.safetensors"), "rb").read())
    assert cli.main(["to-flax", str(bare), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--preset b0..b5 or --config" in err and "SegformerConfig(" not in err
    assert cli.main(["to-flax", hf_dir, str(tmp_path / "b"), "--preset", "b0"]) == 2  # the wrong architecture
    err = capsys.readouterr().err
    assert "--num-labels N or --reinit REGEX" in err and "from_pretrained(" not in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    assert cli.main(["to-flax", hf_dir, str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err


def test_cli_output_is_not_buried_in_other_libraries_logs(hf_dir, tmp_path):
    # A real process: under pytest the root logger already has handlers and basicConfig is a no-op.
    run = subprocess.run(
        [sys.executable, "-m", "weights_convert", "to-flax", hf_dir, str(tmp_path / "flax"), "--num-labels", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote " in run.stdout
    assert "newly initialised" in run.stderr and "decode_head/classifier/kernel" in run.stderr  # ours stay
    assert "[process=" not in run.stderr and len(run.stderr.splitlines()) < 10, run.stderr  # Orbax's INFO lines go


def test_training_workdir_given_instead_of_its_final_model(tmp_path, hf_dir):
    (tmp_path / "checkpoints" / "30").mkdir(parents=True)
    (tmp_path / "config.json").write_text('{"batch_size": 4}')  # train.py's config, not a model's
    with pytest.raises(ConfigError, match="train.py workdir.*no final model yet"):
        sj.from_pretrained(tmp_path)
    (tmp_path / "final").mkdir()
    with pytest.raises(
        ConfigError, match=f"train.py workdir, not a model directory: its trained model is {tmp_path}/final"
    ):
        sj.from_pretrained(tmp_path)


def test_config_file_given_instead_of_its_directory(hf_dir):
    with pytest.raises(ConfigError, match="is the config file; give the directory"):
        sj.from_pretrained(os.path.join(hf_dir, "config.json"))


def test_hf_export_warns_when_transformers_would_use_another_layer_norm_eps(tiny_flax, tmp_path, caplog):
    model, variables = tiny_flax
    with caplog.at_level(logging.WARNING, logger="segformer_jax"):
        sj.save_pretrained(model, variables, tmp_path / "hf5", format="hf")
    assert "eps" not in caplog.text
    nvlabs_eps = type(model)(model.config.replace(layer_norm_eps=1e-6))
    with caplog.at_level(logging.WARNING, logger="segformer_jax"):
        sj.save_pretrained(nvlabs_eps, variables, tmp_path / "hf6", format="hf")
    assert "use eps 1e-06" in caplog.text and "transformers will compute slightly different outputs" in caplog.text


def test_config_json_round_trip_and_presets(hf_dir):
    cfg = sj.SegformerConfig.from_json_file(os.path.join(hf_dir, "config.json"))
    assert cfg.hidden_sizes == TINY["hidden_sizes"] and cfg.depths == TINY["depths"]
    assert sj.SegformerConfig.from_hf_dict(json.loads(cfg.to_json_string())) == cfg
    b2 = sj.SegformerConfig.preset("b2")
    assert (b2.depths, b2.hidden_sizes, b2.decoder_hidden_size, b2.mlp_ratios) == (
        (3, 4, 6, 3),
        (64, 128, 320, 512),
        768,
        (4, 4, 4, 4),
    )
    assert sj.SegformerConfig.preset("b5").depths == (3, 6, 40, 3)
    hf_default = transformers.SegformerConfig()  # b0 with PreTrainedConfig's default of 2 labels
    assert sj.SegformerConfig.from_hf_dict(hf_default.to_dict()) == sj.SegformerConfig(num_labels=2)
    with pytest.raises(ConfigError, match="unknown SegFormer variant"):
        sj.SegformerConfig.preset("b9")
    with pytest.raises(ConfigError, match="not divisible"):
        sj.SegformerConfig(hidden_sizes=(32, 64, 161, 256))
