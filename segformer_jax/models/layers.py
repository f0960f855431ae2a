"""The blocks of the Mix Transformer (MiT) encoder, one class each, NHWC throughout.

Submodule names follow the Hugging Face hub checkpoint names (transformers 4 layout), so that a
Flax path reads like the HF key: `block_0_1/attention/self/query/kernel` is
`segformer.encoder.block.0.1.attention.self.query.weight`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segformer_jax.models import kernels

Dtype = Any


# HF `_init_weights`: Linear ~ trunc_normal(std=initializer_range); Conv2d ~ normal(0, sqrt(2 / fan_out))
# with fan_out = k*k*out_channels/groups; LayerNorm 1/0; biases 0.
def dense_init(std: float):
    return nn.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


class Dense(nn.Dense):
    """`nn.Dense` (same parameters, same function) applied as one 2D matmul over all leading axes.
    On (B, N, C) tokens the kernel gradient contracts over two axes, and XLA:CPU then wrote the
    incoming gradient out transposed, (C_out, B*N), before the matmul (one extra pass over every
    residual branch's gradient in the training step). `dtype` is the compute dtype (`kernels.matmul`);
    the output is `output_dtype` (None: the activation dtype)."""

    output_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        y = kernels.matmul(inputs, kernel, self.dtype or jnp.float32, self.output_dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(y.dtype)
        return y


class Conv(nn.Module):
    """`nn.Conv` (same parameters: kernel (kh, kw, in, out), bias) computed by `kernels.conv`: in a
    reduced compute dtype, bfloat16 operands with float32 accumulation."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: Any = "VALID"
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = kernels.conv(x, kernel, self.dtype, strides=(self.strides, self.strides), padding=self.padding)
        return y + bias.astype(y.dtype)


def conv_init(kernel_size: int, out_channels: int, groups: int = 1):
    fan_out = kernel_size * kernel_size * out_channels // groups
    return nn.initializers.normal(stddev=math.sqrt(2.0 / fan_out))


def torch_padding(kernel_size: int):
    """Torch `Conv2d(padding=k//2)`: symmetric, unlike XLA's 'SAME' for even strides."""
    p = kernel_size // 2
    return ((p, p), (p, p))


class ValidRegion(NamedTuple):
    """The top-left part of a padded (B, H, W, C) map that the unpadded image's own map has.

    Images of different sizes padded to one shape share a compilation; to compute what each would
    give unpadded, every layer that mixes positions must ignore the rest: convs read zeros there
    (as torch's zero padding at the unpadded border), attention does not attend to it."""

    size: Any  # (B, 2) int32: valid rows, columns per image (runtime values)
    mask: Any  # (B, H, W, 1) bool


def valid_region(size, height: int, width: int) -> ValidRegion:
    rows = jnp.arange(height)[None, :] < size[:, :1]
    cols = jnp.arange(width)[None, :] < size[:, 1:]
    return ValidRegion(size, (rows[:, :, None] & cols[:, None, :])[..., None])


def zero_outside(x, valid: ValidRegion | None):
    return x if valid is None else jnp.where(valid.mask, x, jnp.zeros((), x.dtype))


class LayerNorm(nn.Module):
    """LayerNorm over channels with torch's parameters (`scale` = weight, `bias`) and semantics,
    computed by `kernels.layer_norm` (hand-written VJP; same parameters as `nn.LayerNorm`)."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32  # output dtype; statistics are float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return kernels.layer_norm(x.astype(kernels.activation_dtype(self.dtype)), scale, bias, self.epsilon)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (kernel > stride), then LayerNorm (HF `patch_embeddings.i`)."""

    hidden_size: int  # output channels
    patch_size: int = 7  # conv kernel
    stride: int = 4  # conv stride
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=self.stride,
            padding=torch_padding(self.patch_size),
            dtype=self.dtype,
            kernel_init=conv_init(self.patch_size, self.hidden_size),
            name="proj",
        )(x)
        return LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values are spatially reduced by a conv with
    kernel = stride = sr_ratio (+ LayerNorm): cost O(N^2 / sr^2) instead of O(N^2).
    HF `attention.self`."""

    hidden_size: int
    num_heads: int
    sr_ratio: int  # 1 = plain attention
    attention_dropout: float = 0.0
    reduction_layer_norm_eps: float = 1e-5  # LayerNorm after the reduction conv
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, valid: ValidRegion | None = None):
        """valid: the region of a padded map that is the image; keys outside it are not attended to."""
        b, h, w, c = x.shape
        head_dim = c // self.num_heads
        # q, k, v feed only the attention products: in a reduced dtype (where those pay) they are
        # produced in it.
        reduced = kernels.is_reduced(self.dtype) and kernels.reduced_pays(head_dim, head_dim)
        qkv_dtype = self.dtype if reduced else None
        dense = lambda name: Dense(
            c, dtype=self.dtype, kernel_init=dense_init(self.initializer_range), output_dtype=qkv_dtype, name=name
        )

        q = dense("query")(x).reshape(b, h * w, self.num_heads, head_dim)
        if self.sr_ratio > 1:
            x = Conv(
                c,
                (self.sr_ratio, self.sr_ratio),
                strides=self.sr_ratio,
                padding="VALID",
                dtype=self.dtype,
                kernel_init=conv_init(self.sr_ratio, c),
                name="sr",
            )(x)
            x = LayerNorm(epsilon=self.reduction_layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        kv = x.reshape(b, -1, c)
        k = dense("key")(kv).reshape(b, -1, self.num_heads, head_dim)
        v = dense("value")(kv).reshape(b, -1, self.num_heads, head_dim)
        key_mask = None
        if valid is not None:
            # The VALID reduction conv's output j covers rows j*sr .. j*sr+sr-1: it is the unpadded
            # map's own key where those rows are all inside the image, i.e. for j < h_valid // sr.
            keys = valid if self.sr_ratio == 1 else valid_region(valid.size // self.sr_ratio, *x.shape[1:3])
            key_mask = keys.mask.reshape(b, -1)

        if train and self.attention_dropout > 0:  # dropout on the probabilities: plain autodiff form
            dropout = nn.Dropout(self.attention_dropout, deterministic=False)
            out = kernels.attention_reference(q, k, v, probs_fn=dropout, key_mask=key_mask)
        elif key_mask is not None:
            out = kernels.attention_masked(q, k, v, key_mask)
        else:
            out = kernels.attention(q, k, v)
        return out.reshape(b, h, w, c)


class SelfOutput(nn.Module):
    """Output projection of the attention (HF `attention.output.dense`) and its dropout."""

    hidden_size: int
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = Dense(self.hidden_size, dtype=self.dtype, kernel_init=dense_init(self.initializer_range), name="dense")(x)
        return Dropout(self.hidden_dropout, deterministic=not train)(x)


class Attention(nn.Module):
    """HF `attention`: efficient self-attention (`self`) + output projection (`output`)."""

    hidden_size: int
    num_heads: int
    sr_ratio: int
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    reduction_layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, valid: ValidRegion | None = None):
        x = EfficientSelfAttention(
            self.hidden_size,
            self.num_heads,
            self.sr_ratio,
            self.attention_dropout,
            self.reduction_layer_norm_eps,
            self.initializer_range,
            self.dtype,
            name="self",
        )(x, train=train, valid=valid)
        return SelfOutput(self.hidden_size, self.hidden_dropout, self.initializer_range, self.dtype, name="output")(
            x, train=train
        )


def resolve_depthwise_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    return "shifted" if jax.default_backend() == "cpu" else "native"


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv of Mix-FFN: gives the tokens position information without position
    embeddings (HF `mlp.dwconv.dwconv`). Parameters are those of `nn.Conv(feature_group_count=C)`."""

    features: int
    impl: str = "auto"  # 'native' grouped conv | 'shifted' multiply-adds | 'auto' per backend
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, output_scale: float = 1.0):
        kernel = self.param("kernel", conv_init(3, self.features, self.features), (3, 3, 1, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=kernels.activation_dtype(self.dtype))
        if output_scale != 1.0:  # scales the 9C + C parameters, not the output
            kernel, bias = kernel * output_scale, bias * output_scale
        # 'shifted': 9 multiply-adds with a hand-written VJP; XLA:CPU runs the grouped conv at < 1 GFLOP/s.
        if resolve_depthwise_impl(self.impl) == "shifted":
            return kernels.depthwise_conv3x3(x, kernel, bias)
        return kernels.depthwise_conv3x3_native(x, kernel, bias)


class MixFFN(nn.Module):
    """Mix-FFN: dense -> 3x3 depthwise conv -> GELU (exact) -> dense (HF `mlp`)."""

    hidden_size: int
    mlp_ratio: int = 4
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    depthwise_conv_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, valid: ValidRegion | None = None):
        hidden = self.hidden_size * self.mlp_ratio
        drop = Dropout(self.hidden_dropout, deterministic=not train)
        x = Dense(hidden, dtype=self.dtype, kernel_init=dense_init(self.initializer_range), name="dense1")(x)
        x = zero_outside(x, valid)  # the 3x3 conv reads zeros past the image's border, as torch's padding
        half = DWConv(hidden, self.depthwise_conv_impl, self.dtype, name="dwconv")(x, output_scale=0.5)
        x = drop(gelu_of_half(half))
        x = Dense(self.hidden_size, dtype=self.dtype, kernel_init=dense_init(self.initializer_range), name="dense2")(x)
        return drop(x)


def gelu_of_half(half):
    """Exact GELU of x = 2 * half in torch's form, x/2 * (1 + erf(x / sqrt 2)) = half + half * erf(half * sqrt 2).

    erf, not flax's `(0.5 * x) * erfc(-x / sqrt 2)`: XLA lowers float32 erfc to two rational
    approximations and an exp, all evaluated for every element, erf to one rational approximation
    (`kernels.erf_f32`; the GELU alone 2.5x faster, b0 inference 2-7%). Within 1.1e-6 of the float64
    GELU, as torch's own float32 GELU (1.2e-6). Lower precisions are computed in float32; float64 uses
    `lax.erf`.

    Mix-FFN has the conv produce x / 2 (its kernel and bias halved: exact in binary floating point), so
    no scalar multiply by 0.5 sits between the conv and the next matmul: XLA:CPU's YNNPACK dot fusion
    takes such a multiply in and then needs its constant broadcast to the activation's size as a real
    buffer, written on every call (~10 ms per b0 forward at 512x512)."""
    if half.dtype == jnp.float64:
        return half + half * jax.lax.erf(half * np.sqrt(2.0))
    h = half.astype(jnp.float32)
    return (h + h * kernels.erf_f32(h * jnp.float32(np.sqrt(2.0)))).astype(half.dtype)


class DWConv(nn.Module):
    """HF nests the depthwise conv one level deeper (`mlp.dwconv.dwconv`)."""

    features: int
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, output_scale: float = 1.0):
        return DepthwiseConv3x3(self.features, self.impl, self.dtype, name="dwconv")(x, output_scale=output_scale)


class Dropout(nn.Module):
    """Element dropout as torch's `nn.Dropout` (flax's 'dropout' rng collection), drawing 16 random bits
    per element instead of 32: one threefry hash gives two elements' bits, so the draw costs half. The rate
    is kept to 1/65536 (0.1 -> 6554/65536) and kept values are scaled by 1 / that keep rate, so the
    output's expectation is exactly the input. On the decode head's input to the classifier (b0,
    batch 8, 64x64x256) the 32-bit draw was ~60 ms of a ~760 ms training step on this project's CPU."""

    rate: float = 0.0
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        threshold = min(max(round(self.rate * 65536), 1), 65535)
        bits = jax.random.bits(self.make_rng("dropout"), ((x.size + 1) // 2,), jnp.uint32)
        bits = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[: x.size].reshape(x.shape)
        scale = 65536 / (65536 - threshold)
        return jnp.where(bits >= threshold, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    rate: float = 0.0  # a Python float, or a traced scalar when the blocks are scanned

    @nn.compact
    def __call__(self, x, *, train: bool = False, draw=None):
        """draw: this call's uniform [0, 1) numbers, one per sample (the encoder draws all of them at once:
        a random draw per block is two threefry loops and ~10 kernels for XLA to compile); None: draw here."""
        if not train or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
            return x
        keep = 1.0 - self.rate
        if draw is None:
            draw = jax.random.uniform(self.make_rng("dropout"), (x.shape[0],))
        mask = (draw < keep).reshape((x.shape[0],) + (1,) * (x.ndim - 1))  # = jax.random.bernoulli(key, keep)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    hidden_size: int
    num_heads: int
    sr_ratio: int
    mlp_ratio: int = 4
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    layer_norm_eps: float = 1e-5  # the block's two pre-norms
    reduction_layer_norm_eps: float = 1e-5  # the attention's reduction norm
    initializer_range: float = 0.02
    depthwise_conv_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, drop_path_draws=None, valid: ValidRegion | None = None):
        """drop_path_draws: (2, batch) uniform numbers for the two residual branches' drop path, or None.
        valid: the image's region of a padded map (None: all of it)."""
        draws = (None, None) if drop_path_draws is None else (drop_path_draws[0], drop_path_draws[1])
        drop_path = DropPath(self.drop_path)
        y = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm_1")(x)
        y = Attention(
            self.hidden_size,
            self.num_heads,
            self.sr_ratio,
            self.attention_dropout,
            self.hidden_dropout,
            self.reduction_layer_norm_eps,
            self.initializer_range,
            self.dtype,
            name="attention",
        )(y, train=train, valid=valid)
        x = x + drop_path(y, train=train, draw=draws[0])
        y = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm_2")(x)
        y = MixFFN(
            self.hidden_size,
            self.mlp_ratio,
            self.hidden_dropout,
            self.initializer_range,
            self.depthwise_conv_impl,
            self.dtype,
            name="mlp",
        )(y, train=train, valid=valid)
        return x + drop_path(y, train=train, draw=draws[1])
