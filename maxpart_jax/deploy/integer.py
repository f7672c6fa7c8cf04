"""Integer arithmetic of the edge program (docs/deploy.md).

Between layers every activation is a *wide* integer: int32 fixed point with
:data:`FRACTION_BITS` fractional bits (layers compute in int64 and saturate to int32 after
each layer; :func:`overflowed` flags images whose values had to be clipped). A quantized layer (weight and input bits below 32)
runs as integers only:

1. **Input codes.** Like :func:`maxpart_jax.quant.quantize_activations`, the clipping
   value is the image's own maximum ``M`` (a wide integer); the codes are
   ``round(V · L / M)`` by integer division (``L`` the number of positive levels).
2. **Integer convolution** of the codes with the weight codes, accumulated in int32
   (int64 where the worst case could overflow int32, e.g. 16-bit genes).
3. **Requantization** with batch norm folded in: the real output is
   ``a_c · (M · 2^-F / L) · s_w · acc + b_c``; the per-channel factor
   ``k_c = a_c · s_w / L`` is a fixed-point multiplier (31-bit mantissa and a shift),
   the image's ``M`` multiplies it at run time, and the product is renormalized to 31 bits
   so that ``acc · multiplier`` fits int64. ``b_c`` is a wide integer.

ReLU, max-pooling and residual additions act on wide integers. Layers the genome leaves
at 32 bits (by the paper's convention the stem) have no integer form: they run in
float32, as the energy model charges them, and hand wide integers on.

Everything here runs under ``jax.enable_x64(True)`` (int64 intermediates).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax.quant import FLOAT_BITS, quantize_activations, quantize_weights

FRACTION_BITS = 20
"""Fractional bits of the wide activations (int32: range ±2048, resolution 9.5e-7). The
CIFAR models' activations stay below 25 (ResNet18 ×0.25); the edge program reports any
image whose activations leave the range instead of wrapping around."""

MANTISSA_BITS = 31
"""Fixed-point multipliers are ``mantissa · 2^-shift`` with ``2^30 <= mantissa < 2^31``."""

def levels(bits: int, signed: bool, activation_levels: str = "paper") -> int:
  """Largest code of a ``bits``-bit quantizer: ``2^(b-1) - 1`` (signed, or the paper's
  step for non-negative activations) or ``2^b - 1`` (``activation_levels="unsigned"``)."""
  return 2 ** (bits - 1) - 1 if signed or activation_levels == "paper" else 2 ** bits - 1


def code_dtype(largest: int) -> np.dtype:
  """The narrowest signed integer type holding codes in ``[-largest, largest]``."""
  for dtype in (np.int8, np.int16, np.int32):
    if largest <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"codes up to {largest} do not fit int32")


def fixed_point(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(mantissa, shift, sign)`` with ``values ≈ sign · mantissa · 2^-shift`` (relative error
  below 2^-31); the mantissa is in ``[2^30, 2^31)``, or 0 for a zero value."""
  values = np.asarray(values, np.float64)
  frac, exp = np.frexp(np.abs(values))  # |v| = frac · 2^exp, frac in [0.5, 1)
  mantissa = np.round(frac * 2.0 ** MANTISSA_BITS).astype(np.int64)
  carry = mantissa == 2 ** MANTISSA_BITS  # frac rounded up to 1
  mantissa = np.where(carry, 2 ** (MANTISSA_BITS - 1), mantissa)
  shift = MANTISSA_BITS - exp - carry.astype(np.int64)
  zero = values == 0
  return (np.where(zero, 0, mantissa).astype(np.int64), np.where(zero, 0, shift).astype(np.int64),
          np.where(values < 0, -1, 1).astype(np.int64))


def round_shift(v: jax.Array, shift: jax.Array) -> jax.Array:
  """``round(v · 2^-shift)`` (halves up) for int64 ``v``; a negative shift multiplies."""
  shift = jnp.asarray(shift, jnp.int64)
  right = jnp.maximum(shift, 1)
  rounded = (v + (jnp.int64(1) << (right - 1))) >> right
  return jnp.where(shift > 0, rounded, v << jnp.maximum(-shift, 0))


def saturate_int32(v: jax.Array) -> jax.Array:
  """int64 to int32, clipped to int32's range (the edge never wraps around)."""
  info = np.iinfo(np.int32)
  return jnp.clip(v, info.min, info.max).astype(jnp.int32)


def overflowed(v: jax.Array) -> jax.Array:
  """Per image (N,): whether any int64 value lies outside int32's range."""
  info = np.iinfo(np.int32)
  return jnp.any((v < info.min) | (v > info.max), axis=tuple(range(1, v.ndim)))


def to_wide(x: jax.Array) -> jax.Array:
  """Float activations as (int64) wide integers (identity on integers)."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x
  return jnp.round(x.astype(jnp.float64) * 2.0 ** FRACTION_BITS).astype(jnp.int64)


def to_float(x: jax.Array) -> jax.Array:
  """Wide integers as float32 (identity on floats)."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return (x.astype(jnp.float64) * 2.0 ** -FRACTION_BITS).astype(jnp.float32)


def activation_codes(v: jax.Array, bits: int, signed: bool, activation_levels: str
                     ) -> tuple[jax.Array, jax.Array]:
  """Per-image codes of wide activations and the images' clipping values ``M`` (N,).

  ``codes = round(V · L / M)`` (halves away from zero), ``M = max V`` (``max |V|`` if
  ``signed``), in integer arithmetic; an image whose ``M`` is 0 gets all-zero codes.
  The quantized value is ``codes · (M · 2^-F) / L``.
  """
  largest = levels(bits, signed, activation_levels)
  v = v.astype(jnp.int64)
  magnitude = jnp.abs(v) if signed else jnp.maximum(v, 0)
  m = jnp.max(magnitude, axis=tuple(range(1, v.ndim)))
  m_b = m.reshape((-1,) + (1,) * (v.ndim - 1))
  codes = (2 * magnitude * largest + m_b) // (2 * jnp.maximum(m_b, 1))
  codes = jnp.where(m_b > 0, codes, 0)
  if signed:
    codes = jnp.where(v < 0, -codes, codes)
  return codes.astype(jnp.int32), m.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one edge conv layer (JSON in the artifact's manifest).

  ``integer`` layers hold weight codes and fixed-point multipliers; the others hold the
  float kernel (fake-quantized if ``w_bits < 32``) and the folded batch norm.
  """

  name: str
  layer_id: int
  block: int
  kernel: int
  stride: int
  groups: int
  w_bits: int
  a_bits: int
  signed_input: bool
  activation_levels: str
  per_channel: bool
  acc_bits: int = 32
  pre_shift: int = 0

  @property
  def integer(self) -> bool:
    return self.w_bits < FLOAT_BITS and self.a_bits < FLOAT_BITS


def bn_fold(bn_params: dict[str, Any], bn_stats: dict[str, Any], epsilon: float
            ) -> tuple[np.ndarray, np.ndarray]:
  """Batch norm in inference mode as ``a · y + b`` per channel (float64)."""
  var = np.asarray(bn_stats["var"], np.float64)
  a = np.asarray(bn_params["scale"], np.float64) / np.sqrt(var + epsilon)
  return a, np.asarray(bn_params["bias"], np.float64) - np.asarray(bn_stats["mean"], np.float64) * a


def weight_codes(kernel: np.ndarray, bits: int, per_channel: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Integer codes of a kernel and their step (per tensor, or per output channel).

  The float32 arithmetic of :func:`maxpart_jax.quant.quantize_weights` in numpy (IEEE
  float32 division and round-half-to-even give the same codes), so that ``codes · step``
  is the fake-quantized kernel (tested against it).
  """
  kernel = np.asarray(kernel, np.float32)
  axes = tuple(range(kernel.ndim - 1)) if per_channel else None
  c = np.max(np.abs(kernel), axis=axes)
  step = np.where(c > 0, c / np.float32(levels(bits, True)), np.float32(1.0)).astype(np.float32)
  codes = np.round(np.clip(kernel, -c, c) / step)
  return codes.astype(code_dtype(levels(bits, True))), np.broadcast_to(
      step.astype(np.float64), (kernel.shape[-1],))


def layer_arrays(spec: LayerSpec, kernel: np.ndarray, bn_params: dict[str, Any],
                 bn_stats: dict[str, Any], epsilon: float) -> tuple[LayerSpec, dict[str, np.ndarray]]:
  """The arrays one layer runs with, and its spec with the accumulator width filled in."""
  a, b = bn_fold(bn_params, bn_stats, epsilon)
  if not spec.integer:
    w = np.asarray(quantize_weights(jnp.asarray(kernel, jnp.float32), jnp.int32(spec.w_bits),
                                    spec.per_channel))
    return spec, {"w": w.astype(np.float32), "a": a.astype(np.float32), "b": b.astype(np.float32)}
  codes, step = weight_codes(kernel, spec.w_bits, spec.per_channel)
  largest_in = levels(spec.a_bits, spec.signed_input, spec.activation_levels)
  fan_in = int(np.prod(codes.shape[:-1]))
  worst = largest_in * levels(spec.w_bits, True) * fan_in
  acc_bits = 32 if worst < 2 ** 31 else 64
  pre_shift = max(0, int(worst).bit_length() - 31) if acc_bits == 64 else 0
  mantissa, shift, sign = fixed_point(a * step / largest_in)
  bias = np.round(b * 2.0 ** FRACTION_BITS).astype(np.int64)
  spec = dataclasses.replace(spec, acc_bits=acc_bits, pre_shift=pre_shift)
  return spec, {"w": codes, "k": mantissa, "shift": shift, "sign": sign, "bias": bias}


def _conv(x: jax.Array, w: jax.Array, spec: LayerSpec, out_dtype: Any,
          precision: Any = None) -> jax.Array:
  pad = spec.kernel // 2
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(spec.stride, spec.stride), padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=spec.groups,
      preferred_element_type=out_dtype, precision=precision)


def integer_layer(x: jax.Array, arrays: dict[str, jax.Array], spec: LayerSpec) -> jax.Array:
  """Codes, integer convolution and requantization (batch norm folded): int64 wide out."""
  codes, m = activation_codes(to_wide(x), spec.a_bits, spec.signed_input, spec.activation_levels)
  w = arrays["w"]
  operand = jnp.promote_types(w.dtype, code_dtype(levels(spec.a_bits, spec.signed_input,
                                                          spec.activation_levels)))
  acc_type = jnp.int32 if spec.acc_bits == 32 else jnp.int64
  acc = _conv(codes.astype(operand), w.astype(operand), spec, acc_type).astype(jnp.int64)
  acc = round_shift(acc, spec.pre_shift) if spec.pre_shift else acc
  mult = m.astype(jnp.int64)[:, None, None, None] * arrays["k"]  # < 2^62
  extra = jnp.maximum(64 - jax.lax.clz(mult) - MANTISSA_BITS, 0)
  out = round_shift(acc * (mult >> extra), arrays["shift"] - extra - spec.pre_shift)
  return out * arrays["sign"] + arrays["bias"]


def float_layer(x: jax.Array, arrays: dict[str, jax.Array], spec: LayerSpec) -> jax.Array:
  """A layer the genome leaves in float: float32 convolution and batch norm, int64 wide out."""
  x = to_float(x)
  if spec.a_bits < FLOAT_BITS:
    x = quantize_activations(x, jnp.int32(spec.a_bits), signed=spec.signed_input,
                             levels=spec.activation_levels)
  y = _conv(x, arrays["w"], spec, jnp.float32, jax.lax.Precision.HIGHEST)
  return to_wide(y * arrays["a"] + arrays["b"])


def relu(x: jax.Array) -> jax.Array:
  return jnp.maximum(x, 0)


def max_pool(x: jax.Array) -> jax.Array:
  """2×2, stride 2 (on wide integers)."""
  return nn.max_pool(x, (2, 2), strides=(2, 2))


# The integer form of each block type: `run(name, x)` applies the block's conv named
# `name` with its batch norm and returns int32 wide integers; `block` is the Flax module
# (for its static attributes).
BlockForward = Callable[[Callable[[str, jax.Array], jax.Array], jax.Array, nn.Module], jax.Array]


def _conv_bn_unit(run, x, block):
  x = relu(run("conv", x))
  return max_pool(x) if block.pool else x


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
  """Residual addition of wide integers, in int64 (no wrap-around)."""
  return a.astype(jnp.int64) + b.astype(jnp.int64)


def _basic_block(run, x, block):
  y = run("conv2", relu(run("conv1", x)))
  return relu(_add(run("proj", x) if block.project else x, y))


def _bottleneck(run, x, block):
  y = run("conv3", relu(run("conv2", relu(run("conv1", x)))))
  return relu(_add(run("proj", x) if block.project else x, y))


def _separable(run, x, block):
  del block
  return relu(run("pw", relu(run("dw", x))))


BLOCKS: dict[str, BlockForward] = {
    "ConvBN": _conv_bn_unit, "BasicBlock": _basic_block, "Bottleneck": _bottleneck,
    "SeparableBlock": _separable,
}
"""Integer forward of each block class, by class name; a new block type registers here."""

BATCH_NORM_OF = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "conv3": "bn3",
                 "proj": "proj_bn", "dw": "dw_bn", "pw": "pw_bn"}
"""The batch norm that follows each conv, by the conv's module name."""


def block_forward(block: nn.Module) -> BlockForward:
  """The integer forward of ``block``; a clear error for a block type without one."""
  kind = type(block).__name__
  if kind not in BLOCKS:
    raise ValueError(f"block type {kind} has no integer form; register one in "
                     f"maxpart_jax.deploy.integer.BLOCKS (known: {', '.join(BLOCKS)})")
  return BLOCKS[kind]
