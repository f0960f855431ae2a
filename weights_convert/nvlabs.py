"""NVlabs/SegFormer (mmseg 0.x) original checkpoints -> Hugging Face hub (v4) names, and back.

Two kinds of original files:

* segmentation checkpoints (`segformer.b0.512x512.ade.160k.pth`, ...): keys under `state_dict`,
  `backbone.*` (MiT encoder) and `decode_head.*` (SegFormerHead);
* ImageNet encoders (`mit_b0.pth`, ...): the MiT keys without the `backbone.` prefix, plus an
  ImageNet classifier `head.weight/bias`.

Renaming (NVlabs -> HF), stage k = 1..4 -> HF stage index k-1:

    patch_embed{k}.proj / .norm          -> segformer.encoder.patch_embeddings.{k-1}.proj / .layer_norm
    block{k}.{j}.norm1 / norm2           -> segformer.encoder.block.{k-1}.{j}.layer_norm_1 / layer_norm_2
    block{k}.{j}.attn.q                  -> ...attention.self.query
    block{k}.{j}.attn.kv                 -> ...attention.self.key (first half of the rows) + .value (second half)
    block{k}.{j}.attn.sr / attn.norm     -> ...attention.self.sr / attention.self.layer_norm
    block{k}.{j}.attn.proj               -> ...attention.output.dense
    block{k}.{j}.mlp.fc1 / fc2           -> ...mlp.dense1 / mlp.dense2
    block{k}.{j}.mlp.dwconv.dwconv       -> ...mlp.dwconv.dwconv
    norm{k}                              -> segformer.encoder.layer_norm.{k-1}
    decode_head.linear_c{k}.proj         -> decode_head.linear_c.{k-1}.proj   (c1 = stage 1 = HF linear_c.0)
    decode_head.linear_fuse.conv         -> decode_head.linear_fuse
    decode_head.linear_fuse.bn           -> decode_head.batch_norm
    decode_head.linear_pred              -> decode_head.classifier
    head                                 -> classifier                        (ImageNet mit_bX.pth)
    decode_head.conv_seg                 -> dropped: mmseg's BaseDecodeHead always builds it, SegFormerHead
                                            never uses it (it classifies with linear_pred)

Both heads concatenate [c4, c3, c2, c1] before the fuse conv, so the fuse kernel needs no reordering.

LayerNorm epsilon: NVlabs `mix_transformer.py` builds every mit_bX with
`norm_layer=partial(nn.LayerNorm, eps=1e-6)`, which reaches the block norms (norm1, norm2) and the
stage norms (norm1..norm4) only; `OverlapPatchEmbed.norm` and `Attention.norm` (after the
spatial-reduction conv) are plain `nn.LayerNorm(dim)`, i.e. eps=1e-5. `from_pretrained` sets
`layer_norm_eps=1e-6` for these sources; see the README (NVlabs section) for the per-norm detail.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np

from weights_convert import mapping

logger = logging.getLogger("segformer_jax")

_PREFIXES = ("module.", "backbone.")  # DataParallel wrapper; mmseg segmentor's backbone

# (NVlabs regex on the key without prefix, HF template); {k1} = k-1, {j}/{rest} copied.
_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^patch_embed(?P<k>[1-9])\.proj\.(?P<t>\w+)$", "segformer.encoder.patch_embeddings.{k1}.proj.{t}"),
        (r"^patch_embed(?P<k>[1-9])\.norm\.(?P<t>\w+)$", "segformer.encoder.patch_embeddings.{k1}.layer_norm.{t}"),
        (r"^block(?P<k>[1-9])\.(?P<j>\d+)\.norm1\.(?P<t>\w+)$", "segformer.encoder.block.{k1}.{j}.layer_norm_1.{t}"),
        (r"^block(?P<k>[1-9])\.(?P<j>\d+)\.norm2\.(?P<t>\w+)$", "segformer.encoder.block.{k1}.{j}.layer_norm_2.{t}"),
        (
            r"^block(?P<k>[1-9])\.(?P<j>\d+)\.attn\.q\.(?P<t>\w+)$",
            "segformer.encoder.block.{k1}.{j}.attention.self.query.{t}",
        ),
        (
            r"^block(?P<k>[1-9])\.(?P<j>\d+)\.attn\.sr\.(?P<t>\w+)$",
            "segformer.encoder.block.{k1}.{j}.attention.self.sr.{t}",
        ),
        (
            r"^block(?P<k>[1-9])\.(?P<j>\d+)\.attn\.norm\.(?P<t>\w+)$",
            "segformer.encoder.block.{k1}.{j}.attention.self.layer_norm.{t}",
        ),
        (
            r"^block(?P<k>[1-9])\.(?P<j>\d+)\.attn\.proj\.(?P<t>\w+)$",
            "segformer.encoder.block.{k1}.{j}.attention.output.dense.{t}",
        ),
        (r"^block(?P<k>[1-9])\.(?P<j>\d+)\.mlp\.fc1\.(?P<t>\w+)$", "segformer.encoder.block.{k1}.{j}.mlp.dense1.{t}"),
        (r"^block(?P<k>[1-9])\.(?P<j>\d+)\.mlp\.fc2\.(?P<t>\w+)$", "segformer.encoder.block.{k1}.{j}.mlp.dense2.{t}"),
        (
            r"^block(?P<k>[1-9])\.(?P<j>\d+)\.mlp\.dwconv\.dwconv\.(?P<t>\w+)$",
            "segformer.encoder.block.{k1}.{j}.mlp.dwconv.dwconv.{t}",
        ),
        (r"^norm(?P<k>[1-9])\.(?P<t>\w+)$", "segformer.encoder.layer_norm.{k1}.{t}"),
        (r"^decode_head\.linear_c(?P<k>[1-9])\.proj\.(?P<t>\w+)$", "decode_head.linear_c.{k1}.proj.{t}"),
        (r"^decode_head\.linear_fuse\.conv\.(?P<t>\w+)$", "decode_head.linear_fuse.{t}"),
        (r"^decode_head\.linear_fuse\.bn\.(?P<t>\w+)$", "decode_head.batch_norm.{t}"),
        (r"^decode_head\.linear_pred\.(?P<t>\w+)$", "decode_head.classifier.{t}"),
        (r"^head\.(?P<t>\w+)$", "classifier.{t}"),
    )
)
_KV = re.compile(r"^block(?P<k>[1-9])\.(?P<j>\d+)\.attn\.kv\.(?P<t>\w+)$")
_DROPPED = re.compile(r"^decode_head\.conv_seg\.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def is_nvlabs_layout(keys) -> bool:
    """True for NVlabs / mmseg SegFormer keys (patch_embed1, block1.0.attn.kv, decode_head.linear_pred...)."""
    pattern = re.compile(
        r"(^|\.)(patch_embed[1-9]\.|block[1-9]\.\d+\.attn\.kv\.)|^decode_head\.linear_(pred|fuse\.conv)\."
    )
    return any(pattern.search(k) for k in keys)


def normalize_nvlabs(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NVlabs / mmseg names -> HF hub v4 names (attn.kv split into key and value). Keys that match no
    rule are passed through unchanged, so the converter reports them as unused (loudly)."""
    out: dict[str, np.ndarray] = {}
    dropped = []
    for raw_key, value in state.items():
        key = _strip(raw_key)
        if _DROPPED.match(key):
            dropped.append(raw_key)
            continue
        m = _KV.match(key)
        if m is not None:
            value = np.asarray(value)
            if value.shape[0] % 2:
                raise ValueError(
                    f"{raw_key}: attn.kv has {value.shape[0]} output rows; expected an even number "
                    "(key rows then value rows)"
                )
            half = value.shape[0] // 2
            base = f"segformer.encoder.block.{int(m['k']) - 1}.{m['j']}.attention.self"
            out[f"{base}.key.{m['t']}"] = value[:half]
            out[f"{base}.value.{m['t']}"] = value[half:]
            continue
        for regex, template in _RULES:
            m = regex.match(key)
            if m is not None:
                g = m.groupdict()
                k1 = int(g["k"]) - 1 if g.get("k") else None
                key = template.format(k1=k1, j=g.get("j"), t=g["t"])
                break
        else:
            key = raw_key
        out[key] = value
    if dropped:
        logger.info(
            "NVlabs checkpoint: ignoring %s (mmseg's unused conv_seg; SegFormerHead classifies with linear_pred)",
            ", ".join(dropped),
        )
    return out


def hf_to_nvlabs(state: Mapping[str, np.ndarray], *, backbone_prefix: str = "backbone.") -> dict[str, np.ndarray]:
    """HF names (any layout) -> NVlabs / mmseg names (key + value merged into attn.kv). Inverse of
    `normalize_nvlabs`. Use backbone_prefix='' and an ImageNet classifier for mit_bX.pth-style files."""
    state = mapping.normalize_hf(state)
    inverse = []
    for regex, template in _RULES:
        inv_pattern = re.escape(template).replace(r"\{k1\}", r"(?P<k1>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        inv_pattern = "^" + inv_pattern.replace(r"\{t\}", r"(?P<t>\w+)") + "$"
        nv_template = (
            regex.pattern.strip("^$")
            .replace(r"(?P<k>[1-9])", "{k}")
            .replace(r"(?P<j>\d+)", "{j}")
            .replace(r"(?P<t>\w+)", "{t}")
            .replace("\\.", ".")
        )
        inverse.append((re.compile(inv_pattern), nv_template))
    kv = re.compile(
        r"^segformer\.encoder\.block\.(?P<k1>\d+)\.(?P<j>\d+)\.attention\.self\.(?P<kv>key|value)\.(?P<t>\w+)$"
    )
    out, pending = {}, {}
    for key, value in state.items():
        m = kv.match(key)
        if m is not None:
            pending.setdefault((int(m["k1"]) + 1, m["j"], m["t"]), {})[m["kv"]] = np.asarray(value)
            continue
        for regex, template in inverse:
            m = regex.match(key)
            if m is not None:
                g = m.groupdict()
                name = template.format(k=int(g["k1"]) + 1 if g.get("k1") else None, j=g.get("j"), t=g["t"])
                if not name.startswith(("decode_head.", "head.")):
                    name = backbone_prefix + name
                out[name] = np.asarray(value)
                break
        else:
            raise ValueError(f"{key}: no NVlabs name for this tensor")
    for (k, j, t), parts in pending.items():
        if set(parts) != {"key", "value"}:
            raise ValueError(f"block {k - 1}.{j}: attention {t} has {sorted(parts)} but needs both key and value")
        out[f"{backbone_prefix}block{k}.{j}.attn.kv.{t}"] = np.concatenate([parts["key"], parts["value"]], axis=0)
    return out


mapping.SOURCE_NORMALIZERS["nvlabs"] = normalize_nvlabs
mapping.FORMAT_DETECTORS["nvlabs"] = is_nvlabs_layout
