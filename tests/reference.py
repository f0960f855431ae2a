"""Reference models for the tests: transformers' PyTorch SegFormer built here (no download), with
weights under which every branch of the network moves the logits at O(1), and its float64 twin.

Why not HF's own init: with Linear std 0.02 and zero biases the attention probabilities sit within
~3% of uniform, the Mix-FFN output is ~1e-3 and only ~0.6 of order-10 logits depends on the input, so
a tanh GELU, a missing 1/sqrt(d) or a q/k swap moved the logits by less than the tolerance. Here:

* every Linear / Conv weight ~ N(0, 0.3^2) (`initializer_range=0.3`), every bias ~ N(0, 0.3^2), query
  kernels x1.5 (sharper attention in the 1-head, head_dim-8 first stage);
* LayerNorm / BatchNorm weights 1 + N(0, 0.3^2), biases N(0, 0.2^2), BN running statistics moved
  away from 0/1 (a scale/bias or mean/var mix-up cannot hide);
* the second stage's patch-embedding LayerNorm shrunk (weight and bias x 0.01), so the first block
  of that stage normalises tokens of variance ~1e-4: LayerNorm's epsilon (1e-5 vs 1e-6) matters;
* the classifier scaled so that the largest logit is ~10 (a factor of ~2: the network itself
  gives logits of order 5, whose input-dependent part has a standard deviation of ~1).

`check_preconditions` measures these properties with forward hooks and fails if a change makes the
reference degenerate again. Tolerance (`tolerance`): our float32 error against the float64 run of
the same torch model must be <= max(floor, 1.5 x torch float32's own error); floor 1e-5 for blocks,
1e-4 for logits of order 10."""

from __future__ import annotations

import copy

import jax
import numpy as np
import torch
import transformers

import segformer_jax as sj
from segformer_jax.pretrained import variable_shapes
from weights_convert.convert import torch_state_to_flax

TINY = dict(hidden_sizes=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_attention_heads=(1, 2, 3, 4), decoder_hidden_size=16)
INITIALIZER_RANGE = 0.3
BLOCK_FLOOR = 1e-5  # block-level outputs of order 1
LOGITS_FLOOR = 1e-4  # logits of order 10: a relative 1e-5


def hf_config(num_labels: int = 7, **kwargs) -> transformers.SegformerConfig:
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return transformers.SegformerConfig(num_labels=num_labels, **kwargs)


@torch.no_grad()
def perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
            module.num_batches_tracked.fill_(17)


@torch.no_grad()
def perturb_weights(
    model: torch.nn.Module, seed: int = 0, std: float = INITIALIZER_RANGE, linear_gain: float | None = None
) -> None:
    """Random biases of every Linear / Conv (HF initialises them to 0), sharper queries, and the
    small-variance LayerNorm input of the second stage (see the module docstring). linear_gain: redraw
    every Linear weight with std linear_gain / sqrt(fan_in) (the wide presets: a flat 0.3 there makes
    attention scores of ~30 and the network chaotic, float32 noise amplified to 0.1-1 in the logits)."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, module in model.named_modules():
        if linear_gain is not None and isinstance(module, torch.nn.Linear):
            fan_in = module.weight.shape[1]
            module.weight.copy_(linear_gain / fan_in**0.5 * torch.randn(module.weight.shape, generator=g))
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.bias is not None:
            module.bias.copy_(std * torch.randn(module.bias.shape, generator=g))
        if name.endswith("attention.q_proj"):
            module.weight.mul_(1.5)
    stages = getattr(getattr(model, "segformer", model), "stages", None)
    if stages is not None and len(stages) > 1:
        stages[1].patch_embeddings.layer_norm.weight.mul_(0.01)
        stages[1].patch_embeddings.layer_norm.bias.mul_(0.01)


@torch.no_grad()
def scale_logits(model: torch.nn.Module, images_nchw: torch.Tensor, target: float = 10.0) -> None:
    """Scale the final classifier so that the largest logit on `images_nchw` is about `target`."""
    head = model.decode_head.classifier if hasattr(model, "decode_head") else model.classifier
    was_training = model.training
    model.eval()
    peak = model(images_nchw).logits.abs().max().item()
    head.weight.mul_(target / peak)
    head.bias.mul_(target / peak)
    model.train(was_training)


def build_reference(
    cls=transformers.SegformerForSemanticSegmentation,
    *,
    num_labels: int = 7,
    seed: int = 0,
    image_size=(64, 64),
    initializer_range: float = INITIALIZER_RANGE,
    linear_gain: float | None = None,
    check: bool = True,
    **config_kwargs,
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(hf_config(num_labels, initializer_range=initializer_range, **config_kwargs)).eval()
    perturb_norms(model, seed)
    perturb_weights(model, seed, linear_gain=linear_gain)
    x = torch.from_numpy(images(1, *image_size, seed=seed + 100, layout="NCHW"))
    scale_logits(model, x)
    if check:
        model.preconditions = check_preconditions(model, image_size, seed=seed + 100)
    return model


# ----------------------------------------------------------------------------- preconditions
MIN_ATTENTION_SPREAD = 0.15  # mean total-variation distance of every layer's probabilities from uniform
MIN_GELU_GAP = 2e-4  # max |tanh-approximate GELU - erf GELU| over the Mix-FFN GELU inputs
MIN_SMALL_LN_EPS_RATIO = 0.03  # 1e-5 / (smallest per-token variance of a block LayerNorm input)
MIN_INPUT_DEPENDENCE = 1.0  # std of the logit difference between two random inputs


@torch.no_grad()
def check_preconditions(model: torch.nn.Module, image_size=(64, 64), seed: int = 100) -> dict:
    """Measure, with forward hooks on one forward pass, what makes the reference non-degenerate, and
    assert it. Returns the numbers (printed by tests, quoted in the README)."""
    attention_spread, gelu_inputs, block_ln_vars = [], [], []

    def on_attention(module, args, kwargs, output):
        probs = output[1]
        m = probs.shape[-1]
        attention_spread.append(0.5 * (probs - 1.0 / m).abs().sum(-1).mean().item() if m > 1 else None)

    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__ == "SegformerAttention":
            hooks.append(module.register_forward_hook(on_attention, with_kwargs=True))
        elif type(module).__name__ == "GELUActivation":
            hooks.append(module.register_forward_hook(lambda m, i, o: gelu_inputs.append(i[0].flatten())))
        elif isinstance(module, torch.nn.LayerNorm) and ".blocks." in name and "sequence_reduction" not in name:
            hooks.append(
                module.register_forward_hook(lambda m, i, o: block_ln_vars.append(i[0].var(-1, unbiased=False).min()))
            )
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # sdpa returns no probabilities
    was_training = model.training
    model.eval()
    try:
        a = model(torch.from_numpy(images(1, *image_size, seed=seed, layout="NCHW")), output_attentions=True).logits
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(previous)
    b = model(torch.from_numpy(images(1, *image_size, seed=seed + 1, layout="NCHW"))).logits
    model.train(was_training)
    found = {}
    spreads = [s for s in attention_spread if s is not None]
    assert spreads, "no attention layer with more than one key at this image size"
    found["attention_spread_min"] = min(spreads)
    if gelu_inputs:  # the classification model has the same encoder; the plain encoder too
        x = torch.cat(gelu_inputs).double()
        gap = (torch.nn.functional.gelu(x, approximate="tanh") - torch.nn.functional.gelu(x)).abs().max().item()
        found["gelu_input_range"] = (x.min().item(), x.max().item())
        found["gelu_tanh_gap"] = gap
        assert gap >= MIN_GELU_GAP, found
    if block_ln_vars:
        found["block_ln_eps_ratio"] = 1e-5 / min(v.item() for v in block_ln_vars)
        assert found["block_ln_eps_ratio"] >= MIN_SMALL_LN_EPS_RATIO, found
    found["logit_peak"] = a.abs().max().item()
    found["input_dependence"] = (a - b).std().item()
    assert found["attention_spread_min"] >= MIN_ATTENTION_SPREAD, found
    # (ImageNet classification: one pooled vector of logits per image, which averages more out)
    assert found["input_dependence"] >= MIN_INPUT_DEPENDENCE * (0.5 if a.ndim == 2 else 1.0), found
    return found


# ----------------------------------------------------------------------------- float64 twin and tolerance
_FLOAT64: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}


def float64_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of `model` (cached; the copy is made once per model)."""
    entry = _FLOAT64.get(id(model))
    if entry is None or entry[0] is not model:
        twin = copy.deepcopy(model).double()
        twin.train(model.training)
        entry = _FLOAT64[id(model)] = (model, twin)
    return entry[1]


class Expected:
    """A torch result in float32 and float64 (same model, same input); `error(got)` is our error against
    the float64 result, `tolerance` max(floor, 1.5 x torch float32's own error)."""

    def __init__(self, f32, f64, floor: float, scale: float = 1.0):
        self.f32, self.f64, self.scale = np.asarray(f32), np.asarray(f64), scale
        self.torch_error = max_abs_diff(self.f32, self.f64)
        self.tolerance = tolerance(self.torch_error, floor)

    def error(self, got) -> float:
        got = np.asarray(got)
        if got.shape != self.f64.shape:
            return float("inf")  # a wrong shape (e.g. 'SAME' padding) is as wrong as it gets
        return max_abs_diff(got, self.f64)

    def check(self, got) -> tuple[float, float]:
        return self.error(got), self.tolerance

    def assert_matches(self, got, what: str = "") -> float:
        err = self.error(got)
        assert err <= self.tolerance, (
            f"{what}: max-abs-diff {err:.3e} vs float64 torch > tolerance {self.tolerance:.3e} "
            f"(torch float32's own error {self.torch_error:.3e})"
        )
        return err


def tolerance(torch_error: float, floor: float) -> float:
    return max(floor, 1.5 * torch_error)


def expect(fn, model: torch.nn.Module, *arrays, floor: float = BLOCK_FLOOR, layout=None) -> Expected:
    """Run fn(model, *tensors) -> tensor on `model` (float32) and its float64 twin; the arrays are
    NHWC/NCHW numpy inputs converted to each precision. `layout='NCHW->NHWC'` transposes 4-D outputs."""
    outs = []
    for m, dtype in ((model, torch.float32), (float64_twin(model), torch.float64)):
        with torch.no_grad():
            out = fn(m, *(torch.from_numpy(np.asarray(a)).to(dtype) for a in arrays))
        out = out.detach().numpy()
        outs.append(out.transpose(0, 2, 3, 1) if layout == "NCHW->NHWC" and out.ndim == 4 else out)
    return Expected(*outs, floor=floor)


def expect_logits(model: torch.nn.Module, x_nhwc, floor: float = LOGITS_FLOOR) -> Expected:
    """Whole-model logits (NHWC for segmentation, (B, classes) for classification) for NHWC images."""
    nchw = np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2))
    return expect(lambda m, x: m(x).logits, model, nchw, floor=floor, layout="NCHW->NHWC")


# ----------------------------------------------------------------------------- the suite's checks
# Shared by the equivalence tests and the mutation tests (tests/test_mutations.py), so that "the
# mutation fails the suite" is measured with the very tolerance the suite uses.
def our_logits(model, variables, x):
    """Our eval-mode logits, jitted (a fresh function each call: a monkeypatched module-level helper is
    traced anew, never served from a cache of the unpatched trace)."""
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x))


def check_logits(ref: torch.nn.Module, model, variables, x_nhwc) -> tuple[float, float]:
    """(our max-abs-diff against float64 torch, tolerance) for whole-model eval logits."""
    return expect_logits(ref, x_nhwc).check(our_logits(model, variables, x_nhwc))


def train_reference(**overrides) -> torch.nn.Module:
    """Dropout and drop-path off, so train mode is deterministic: only BatchNorm differs from eval."""
    kwargs = dict(
        num_labels=5,
        seed=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        drop_path_rate=0.0,
        **TINY,
    )
    return build_reference(**{**kwargs, **overrides}).train()


BN_RELATIVE_FLOOR = 1e-4  # running mean / var, relative to their largest magnitude


def expect_train(ref: torch.nn.Module, x_nhwc) -> dict[str, Expected]:
    """Train-mode logits and the decode head's updated BatchNorm running mean / var (relative), from
    copies of `ref` and its float64 twin (a train-mode forward updates the running statistics)."""
    nchw = np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2))
    results = []
    for m, dtype in ((ref, torch.float32), (float64_twin(ref), torch.float64)):
        m = copy.deepcopy(m).train()
        with torch.no_grad():
            logits = m(torch.from_numpy(nchw).to(dtype)).logits.numpy().transpose(0, 2, 3, 1)
        bn = m.decode_head.batch_norm
        results.append((logits, bn.running_mean.numpy(), bn.running_var.numpy(), int(bn.num_batches_tracked)))
    (l32, m32, v32, n32), (l64, m64, v64, n64) = results
    assert n32 == n64
    scale_m, scale_v = np.abs(m64).max(), np.abs(v64).max()
    return {
        "logits": Expected(l32, l64, LOGITS_FLOOR),
        "bn_mean": Expected(m32 / scale_m, m64 / scale_m, BN_RELATIVE_FLOOR, scale=scale_m),
        "bn_var": Expected(v32 / scale_v, v64 / scale_v, BN_RELATIVE_FLOOR, scale=scale_v),
        "num_batches_tracked": n64,
    }


def our_train(model, variables, x_nhwc):
    """Our train-mode logits and updated BatchNorm statistics (jitted afresh, see `our_logits`)."""
    run = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updates = run(variables, x_nhwc)
    return np.asarray(logits), jax.tree_util.tree_map(np.asarray, updates["batch_stats"]["decode_head"]["batch_norm"])


def check_train(ref: torch.nn.Module, model, variables, x_nhwc) -> dict[str, tuple[float, float]]:
    """{'logits' | 'bn_mean' | 'bn_var': (error, tolerance)}; BN errors relative to max |statistic|."""
    want = expect_train(ref, x_nhwc)
    logits, stats = our_train(model, variables, x_nhwc)
    assert int(stats["num_batches_tracked"]) == want["num_batches_tracked"]
    return {
        "logits": want["logits"].check(logits),
        "bn_mean": want["bn_mean"].check(stats["mean"] / want["bn_mean"].scale),
        "bn_var": want["bn_var"].check(stats["var"] / want["bn_var"].scale),
    }


def nvlabs_state(ref: torch.nn.Module) -> dict:
    """`ref` as an NVlabs / mmseg state dict (attn.kv merged, backbone. prefix)."""
    from weights_convert import nvlabs

    return nvlabs.hf_to_nvlabs({k: v.detach().numpy().copy() for k, v in ref.state_dict().items()})


def check_nvlabs(ref: torch.nn.Module, x_nhwc) -> tuple[float, float]:
    """Logits of our model loaded from `ref` converted to the NVlabs layout (through the registered
    NVlabs normaliser, as from_pretrained does) against float64 torch."""
    model = sj.SegformerForSemanticSegmentation(flax_config(ref))
    variables, _ = torch_state_to_flax(nvlabs_state(ref), variable_shapes(model), source_format="nvlabs")
    return check_logits(ref, model, jax.tree_util.tree_map(np.asarray, variables), x_nhwc)


# ----------------------------------------------------------------------------- conversion and helpers
def images(batch: int, height: int, width: int, *, seed: int = 0, layout: str = "NHWC") -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NCHW" else x


def flax_config(hf_model: torch.nn.Module, **overrides) -> sj.SegformerConfig:
    return sj.SegformerConfig.from_hf_dict(hf_model.config.to_dict()).replace(**overrides)


def to_flax(hf_model: torch.nn.Module, flax_cls=sj.SegformerForSemanticSegmentation, **config_overrides):
    """Convert the in-memory state dict (transformers-5 names) into (flax model, variables)."""
    model = flax_cls(flax_config(hf_model, **config_overrides))
    state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}  # no aliasing of torch buffers
    variables, _ = torch_state_to_flax(state, variable_shapes(model))
    return model, jax.tree_util.tree_map(np.asarray, variables)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def random_variables(model, seed: int = 0) -> dict:
    """Random weights of order 0.3 for a Flax model (no torch involved), with a valid BatchNorm state."""
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), variable_shapes(model)
    )
    bn = variables["batch_stats"]["decode_head"]["batch_norm"]
    bn["var"] = np.ones_like(bn["var"])
    bn["num_batches_tracked"] = np.zeros((), np.int32)
    return variables


@torch.no_grad()
def pipeline_reference(config_kwargs: dict, calibration_nchw: torch.Tensor, *, seed: int = 0) -> torch.nn.Module:
    """transformers' segmentation model for the inference / padding tests, with weights under which
    padding moves every logit: fan-in-scaled normal weights and random biases everywhere, perturbed
    norms and BatchNorm statistics, logits scaled to order 10 on `calibration_nchw` (normalised)."""
    torch.manual_seed(seed)
    ref = transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(**config_kwargs, initializer_range=0.3)
    ).eval()
    g = torch.Generator().manual_seed(seed)
    for module in ref.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.weight.normal_(0, 1.0 / np.sqrt(module.weight[0].numel()), generator=g)
            if module.bias is not None:
                module.bias.normal_(0, 0.1, generator=g)
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
    ref.decode_head.batch_norm.running_var.uniform_(0.5, 1.5, generator=g)
    ref.decode_head.batch_norm.running_mean.normal_(0, 0.1, generator=g)
    peak = ref(calibration_nchw).logits.abs().max()
    ref.decode_head.classifier.weight.mul_(10 / peak)
    ref.decode_head.classifier.bias.mul_(10 / peak)
    return ref
