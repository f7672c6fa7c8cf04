"""Quantization-aware layers and the block chain every model is built from.

A model is a :class:`Chain` of blocks (stem, residual / separable / conv units,
head). Partition points fall between blocks, so ``Chain(start=0, stop=p)`` is
the edge part and ``Chain(start=p)`` the cloud part. Every conv and dense layer
carries a ``layer_id`` (its index in the model's layer list) so that a
:class:`~maxpart_jax.quant.QuantPolicy` can give it its own traced bit widths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxpart_jax.quant import QuantPolicy, quantize_activations, quantize_weights

_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
PRECISIONS = ("highest", "high", "default")


@dataclasses.dataclass(frozen=True)
class Numerics:
  """How convolutions and matmuls compute; everything else stays float32.

  Attributes:
    dtype: operand dtype of convolutions and matmuls, ``float32`` or ``bfloat16``
      (mixed precision: parameters, optimizer state, batch norm, the quantizers and
      the loss stay float32; a bf16 convolution accumulates in float32 and returns bf16).
      ``float64`` is a reference for measuring precision (the deployment's, in
      ``experiments/deploy_precision.py``): it needs ``jax.enable_x64`` and float64
      variables and inputs, and is refused otherwise.
    precision: ``jax.lax.Precision`` of float32 operands. ``highest`` is true float32
      on every backend; ``default`` lets the backend pick its fastest mode (TF32 on
      NVIDIA GPUs, a single bf16 pass on TPUs), which changes 8-bit IR codes. CPUs
      compute float32 exactly in every mode.
  """

  dtype: str = "float32"
  precision: str = "highest"

  def __post_init__(self):
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
    if self.dtype == "float64" and not jax.config.jax_enable_x64:
      raise ValueError("compute dtype float64 needs 64-bit floats: run it inside "
                       "jax.enable_x64(True)")
    if self.precision not in PRECISIONS:
      raise ValueError(f"matmul precision must be one of {PRECISIONS}, got {self.precision!r}")

  @property
  def lax_precision(self) -> jax.lax.Precision:
    return jax.lax.Precision[self.precision.upper()]

  def cast(self, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """The operands of a convolution or matmul in the compute dtype."""
    return tuple(x.astype(self.dtype) for x in xs)


def resolve_numerics(dtype: str, precision: str, platform: str | None = None) -> Numerics:
  """:class:`Numerics` from config strings; ``dtype="auto"`` picks by platform.

  ``auto`` is bfloat16 on GPUs and TPUs, whose matrix units run it at full rate and where
  it ranks genomes like float32, and float32 on CPUs, where bfloat16 gains little and
  float32 keeps results identical to earlier runs (``results/benchmarks/README.md``).
  """
  if dtype == "auto":
    platform = platform or jax.default_backend()
    dtype = "float32" if platform == "cpu" else "bfloat16"
  return Numerics(dtype, precision)


def _quantize_inputs(x, kernel, layer_id, quantizable, signed_input, policy):
  """Applies the policy's bits for ``layer_id`` to a layer's input and kernel."""
  if policy is None or not quantizable:
    return x, kernel
  x = quantize_activations(x, policy.a_bits[layer_id], signed=signed_input,
                           levels=policy.activation_levels)
  kernel = quantize_weights(kernel, policy.w_bits[layer_id], policy.per_channel)
  return x, kernel


class QConv(nn.Module):
  """2-D convolution (NHWC, HWIO) with PyTorch-style symmetric padding ``k // 2``.

  ``groups == in_channels`` gives a depthwise convolution.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  groups: int = 1
  use_bias: bool = False
  layer_id: int = -1
  quantizable: bool = True
  signed_input: bool = False
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, policy: QuantPolicy | None = None) -> jax.Array:
    k, cin = self.kernel_size, x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f"{self.name}: channels {cin}->{self.features} not divisible "
                       f"by groups={self.groups}")
    kernel = self.param("kernel", _CONV_INIT, (k, k, cin // self.groups, self.features))
    x, kernel = _quantize_inputs(x, kernel, self.layer_id, self.quantizable,
                                 self.signed_input, policy)
    x, kernel = self.numerics.cast(x, kernel)
    pad = k // 2
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides),
        padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups, precision=self.numerics.lax_precision)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class QDense(nn.Module):
  """Fully connected layer on the last axis."""

  features: int
  layer_id: int = -1
  quantizable: bool = True
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, policy: QuantPolicy | None = None) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    x, kernel = _quantize_inputs(x, kernel, self.layer_id, self.quantizable, False, policy)
    x, kernel = self.numerics.cast(x, kernel)
    y = jnp.matmul(x, kernel, precision=self.numerics.lax_precision)
    return y + self.param("bias", nn.initializers.zeros, (self.features,))


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """Batch norm with PyTorch's defaults (momentum 0.1, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class ConvBN(nn.Module):
  """Conv -> BN -> ReLU, optionally followed by 2x2 max-pooling (stem and VGG units)."""

  features: int
  layer_id: int
  kernel_size: int = 3
  strides: int = 1
  pool: bool = False
  quantizable: bool = True
  signed_input: bool = False
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               policy: QuantPolicy | None = None) -> jax.Array:
    x = QConv(self.features, self.kernel_size, self.strides, layer_id=self.layer_id,
              quantizable=self.quantizable, signed_input=self.signed_input,
              numerics=self.numerics, name="conv")(x, policy)
    x = nn.relu(batch_norm(train, "bn")(x))
    if self.pool:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class Head(nn.Module):
  """Global average pooling and the classifier."""

  num_classes: int
  layer_id: int
  quantizable: bool = False
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               policy: QuantPolicy | None = None) -> jax.Array:
    del train
    x = jnp.mean(x, axis=(1, 2))
    return QDense(self.num_classes, layer_id=self.layer_id, quantizable=self.quantizable,
                  numerics=self.numerics, name="fc")(x, policy)


class Chain(nn.Module):
  """A network as an ordered chain of blocks; runs blocks ``start..stop-1``.

  Attributes:
    blocks: the block modules, each called as ``block(x, train=..., policy=...)``.
    labels: a human-readable name per block (``stem``, ``layer2.1``, ``head``).
  """

  blocks: Sequence[nn.Module]
  labels: Sequence[str]

  def __call__(self, x: jax.Array, *, train: bool = False, start: int = 0,
               stop: int | None = None, policy: QuantPolicy | None = None) -> Any:
    stop = len(self.blocks) if stop is None else stop
    for i in range(start, stop):
      x = self.blocks[i](x, train=train, policy=policy)
      if policy is not None:
        # The IR the edge sends is quantized; `split` is traced, so test every boundary.
        x = jnp.where(policy.split == i + 1, quantize_activations(
            x, policy.ir_bits, levels=policy.activation_levels), x)
    return x


class LayerCounter:
  """Hands out consecutive layer ids while a builder creates the blocks."""

  def __init__(self) -> None:
    self.count = 0

  def take(self, n: int = 1) -> int:
    """Reserves ``n`` ids and returns the first."""
    first, self.count = self.count, self.count + n
    return first
