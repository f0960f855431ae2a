"""NVlabs / mmseg original checkpoints: key renaming, attn.kv split, linear_c order, eps, loud errors.

The original-format state dict is built from the shared Hugging Face reference model
(tests/reference.py: every branch moves the logits at O(1), distinct q/k/v weights and biases) with
`weights_convert.nvlabs.hf_to_nvlabs`, saved the way mmseg saves it (nested under
`state_dict`, `backbone.` prefix, the unused `decode_head.conv_seg`), and loaded through
`from_pretrained(bare .pth, config=...)`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from reference import build_reference, expect_logits

import segformer_jax as sj  # noqa: E402
from weights_convert import mapping, nvlabs  # noqa: E402
from weights_convert.convert import ConversionError  # noqa: E402

TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 1, 1, 2),
    decoder_hidden_size=16,
    num_labels=5,
)


def _torch_state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _save_pth(state, path, nest=True):
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    torch.save({"meta": {"CLASSES": None}, "state_dict": tensors} if nest else tensors, path)
    return str(path)


def _images(shape=(2, 64, 96, 3), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_REFERENCES = {}


def _hf_seg(eps_nvlabs=False):
    """The shared reference (built once per flavour; tests must not modify it)."""
    if eps_nvlabs not in _REFERENCES:
        model = build_reference(**TINY)
        if eps_nvlabs:  # the NVlabs original: 1e-6 in block and stage norms, 1e-5 in patch-embed / sr norms
            for name, mod in model.named_modules():
                if (
                    isinstance(mod, torch.nn.LayerNorm)
                    and "patch_embeddings" not in name
                    and "sequence_reduction" not in name
                ):
                    mod.eps = 1e-6
        _REFERENCES[eps_nvlabs] = model
    return _REFERENCES[eps_nvlabs]


_APPLY = {}


def _apply(model, variables, images):
    """One jitted apply per model (eager apply compiles every op separately: slow on shared CPUs)."""
    import jax

    fn = _APPLY.setdefault(model, jax.jit(model.apply))
    return np.asarray(fn(variables, images))


def test_detect_and_rename_segmentation_keys():
    hf_state = _torch_state(_hf_seg())
    state = nvlabs.hf_to_nvlabs(mapping.normalize_hf(hf_state))
    keys = set(state)
    assert "backbone.patch_embed1.proj.weight" in keys and "backbone.block4.0.attn.kv.weight" in keys
    assert "backbone.norm4.bias" in keys and "decode_head.linear_fuse.conv.weight" in keys
    assert "decode_head.linear_fuse.bn.running_var" in keys and "decode_head.linear_pred.bias" in keys
    assert mapping.detect_format(keys) == "nvlabs"
    assert mapping.detect_format(hf_state.keys()) == "hf"
    # linear_c1 is stage 1 (8 channels in), linear_c4 stage 4 (32 channels in); torch Linear is (out, in).
    assert state["decode_head.linear_c1.proj.weight"].shape == (16, 8)
    assert state["decode_head.linear_c4.proj.weight"].shape == (16, 32)
    back = nvlabs.normalize_nvlabs(state)
    ref = mapping.normalize_hf(hf_state)
    assert set(back) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


def test_kv_split_first_half_is_key():
    kv = np.arange(2 * 4 * 4, dtype=np.float32).reshape(8, 4)
    out = nvlabs.normalize_nvlabs({"backbone.block2.1.attn.kv.weight": kv})
    np.testing.assert_array_equal(out["segformer.encoder.block.1.1.attention.self.key.weight"], kv[:4])
    np.testing.assert_array_equal(out["segformer.encoder.block.1.1.attention.self.value.weight"], kv[4:])


@pytest.mark.parametrize("source_format", [None, "nvlabs"])
def test_segmentation_checkpoint_logits_match_reference(tmp_path, source_format):
    ref = _hf_seg()
    state = nvlabs.hf_to_nvlabs(_torch_state(ref))
    state["decode_head.conv_seg.weight"] = np.zeros((5, 16, 1, 1), np.float32)  # mmseg's unused head
    state["decode_head.conv_seg.bias"] = np.zeros((5,), np.float32)
    path = _save_pth(state, tmp_path / "segformer.tiny.ade.pth")
    # HF modules use eps 1e-5 everywhere: load with that to compare exactly.
    model, variables = sj.from_pretrained(
        path, config=sj.SegformerConfig(**TINY), source_format=source_format, layer_norm_eps=1e-5
    )
    images = _images()
    expect_logits(ref, images).assert_matches(_apply(model, variables, images), "NVlabs segmentation logits")


def test_nvlabs_source_defaults_to_eps_1e6(tmp_path):
    import copy

    ref = copy.deepcopy(_hf_seg(eps_nvlabs=True))
    # Tiny patch-embed outputs (variance ~1e-6): the patch-embed norms' epsilon (1e-5 in NVlabs, unlike
    # the block/stage norms' 1e-6) then changes the logits by far more than the tolerance. The block
    # norms' epsilon matters through the reference's small-variance input of stage 2's first block.
    with torch.no_grad():
        for stage in ref.segformer.stages:
            stage.patch_embeddings.proj.weight.mul_(1e-3)
            stage.patch_embeddings.proj.bias.mul_(1e-3)
    path = _save_pth(nvlabs.hf_to_nvlabs(_torch_state(ref)), tmp_path / "seg.pth")
    model, variables = sj.from_pretrained(path, config=sj.SegformerConfig(**TINY))
    assert model.config.layer_norm_eps == 1e-6
    assert model.config.embedding_layer_norm_eps == 1e-5
    images = _images(seed=1)
    want = expect_logits(ref, images)
    want.assert_matches(_apply(model, variables, images), "NVlabs eps 1e-6")
    # The layers use the config's epsilons: either one left at the other value fails the same check.
    for wrong in (dict(layer_norm_eps=1e-5), dict(embedding_layer_norm_eps=1e-6)):
        wrong_model = sj.SegformerForSemanticSegmentation(model.config.replace(**wrong))
        err = want.error(_apply(wrong_model, variables, images))
        print(f"NVlabs eps: {wrong} moves the logits by {err:.2e} (tolerance {want.tolerance:.1e})")
        assert err > 10 * want.tolerance, (wrong, err)


def test_imagenet_mit_checkpoint(tmp_path):
    ref = build_reference(transformers.SegformerForImageClassification, **{**TINY, "num_labels": 7})
    state = nvlabs.hf_to_nvlabs(_torch_state(ref), backbone_prefix="")
    assert "head.weight" in state and "patch_embed1.proj.weight" in state and "block1.0.attn.kv.bias" in state
    path = _save_pth(state, tmp_path / "mit_tiny.pth", nest=False)
    cfg = sj.SegformerConfig(**{**TINY, "num_labels": 7})
    model, variables = sj.from_pretrained(
        path, config=cfg, architecture="SegformerForImageClassification", layer_norm_eps=1e-5
    )
    images = _images((2, 64, 64, 3))
    expect_logits(ref, images).assert_matches(_apply(model, variables, images), "ImageNet MiT logits")
    # The same encoder file fits a segmentation model's encoder (the decode head is then fresh, the
    # ImageNet head unused); checked on the key level (from_pretrained would also compile model.init).
    from segformer_jax.pretrained import variable_shapes
    from weights_convert import checkpoint_io
    from weights_convert.convert import torch_state_to_flax

    seg = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**TINY))
    loaded, report = torch_state_to_flax(
        checkpoint_io.load_state_dict(path),
        variable_shapes(seg),
        allow_missing=[r"^(params|batch_stats)/decode_head/"],
        ignore_unused=[r"^classifier\."],
    )
    assert report["unused"] == ["classifier.bias", "classifier.weight"]
    assert all(p.startswith(("params/decode_head/", "batch_stats/decode_head/")) for p in report["missing"])
    np.testing.assert_array_equal(
        loaded["params"]["segformer"]["encoder"]["block_3_0"]["attention"]["self"]["key"]["bias"],
        state["block4.0.attn.kv.bias"][:32],
    )


def test_missing_and_extra_keys_are_listed(tmp_path):
    state = nvlabs.hf_to_nvlabs(_torch_state(_hf_seg()))
    broken = dict(state)
    del broken["backbone.block3.0.attn.kv.weight"]
    broken["backbone.block1.0.attn.qkv_extra.weight"] = np.zeros((3,), np.float32)
    path = _save_pth(broken, tmp_path / "broken.pth")
    with pytest.raises(ConversionError) as e:
        sj.from_pretrained(path, config=sj.SegformerConfig(**TINY))
    msg = str(e.value)
    assert "params/segformer/encoder/block_2_0/attention/self/key/kernel" in msg
    assert "params/segformer/encoder/block_2_0/attention/self/value/kernel" in msg
    assert "backbone.block1.0.attn.qkv_extra.weight" in msg
    # A checkpoint of another size: shapes are reported.
    path = _save_pth(state, tmp_path / "ok.pth")
    with pytest.raises(ConversionError, match="wrong shape"):
        sj.from_pretrained(path, config=sj.SegformerConfig(**{**TINY, "hidden_sizes": (8, 16, 24, 40)}))
