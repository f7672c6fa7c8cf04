"""Integer arithmetic of the edge program (docs/deploy.md).

Between layers every activation is a *wide* integer: int64 fixed point with
:data:`FRACTION_BITS` fractional bits, whose magnitude must stay below ``2^WIDE_BITS``
(:func:`overflowed` flags images whose values left that range; they are clipped, and the
edge program refuses to send their IR). A quantized layer (weight and input bits below
32) runs as integers only:

1. **Input codes.** Like :func:`maxpart_jax.quant.quantize_activations`, the clipping
   value is the image's own maximum ``M`` (a wide integer); the codes are
   ``round(V · L / M)`` by integer division (``L`` the number of positive levels).
2. **Integer convolution** of the codes with the weight codes, accumulated in int32
   (int64 where the worst case could overflow int32, e.g. 16-bit genes).
3. **Requantization** with batch norm folded in: the real output is
   ``a_c · (M · 2^-F / L) · s_w · acc + b_c``; the per-channel factor
   ``k_c = a_c · s_w / L`` is a fixed-point multiplier (31-bit mantissa and a shift), and
   the wide output ``round(acc · M · mantissa · 2^-shift) + B_c`` is computed exactly, in
   multi-word integer arithmetic, and rounded once (:func:`requantize`). ``B_c`` is the
   wide bias.

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
from maxpart_jax.registry import Registry

FRACTION_BITS = 32
"""Fractional bits of the wide activations: a resolution of 2.3e-10, finer than float32's
rounding of any activation above 4e-3 of the image's largest one (what decides a code)."""

WIDE_BITS = 45
"""Wide activations stay below ``2^45`` in magnitude, i.e. ±8192 in real units (the CIFAR
models peak below 25), so that ``2 · V · L`` of a 16-bit code computation fits int64."""

WIDE_LIMIT = 2 ** WIDE_BITS - 1
"""The largest wide magnitude (also the largest clipping value ``M`` an edge can send)."""

MANTISSA_BITS = 31
"""Fixed-point multipliers are ``mantissa · 2^-shift`` with ``2^30 <= mantissa < 2^31``."""

MAX_SHIFT = 150
"""The largest multiplier shift :func:`requantize` handles (a 160-bit product)."""

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


_LIMB = 32
_MASK = np.uint64(2 ** _LIMB - 1)


def _limbs(v: jax.Array, count: int) -> list[jax.Array]:
  """A non-negative int64 as ``count`` base-2^32 digits (uint64), least significant first."""
  u = v.astype(jnp.uint64)
  return [(u >> np.uint64(_LIMB * i)) & _MASK for i in range(count)]


def _normalize(columns: list[jax.Array]) -> list[jax.Array]:
  """Column sums (each below 2^63) to base-2^32 digits, carrying upwards; one more digit."""
  out, carry = [], jnp.zeros_like(columns[0])
  for column in columns:
    total = column + carry
    out.append(total & _MASK)
    carry = total >> np.uint64(_LIMB)
  return out + [carry]


def _multiply(x: list[jax.Array], y: list[jax.Array]) -> list[jax.Array]:
  """Schoolbook product of two digit lists (each digit below 2^32)."""
  columns = [jnp.zeros(jnp.broadcast_shapes(x[0].shape, y[0].shape), jnp.uint64)
             for _ in range(len(x) + len(y))]
  for i, xi in enumerate(x):
    for j, yj in enumerate(y):
      product = xi * yj  # < 2^64
      columns[i + j] = columns[i + j] + (product & _MASK)
      columns[i + j + 1] = columns[i + j + 1] + (product >> np.uint64(_LIMB))
  return _normalize(columns)[:-1]


def _digit(digits: list[jax.Array], index: jax.Array) -> jax.Array:
  """``digits[index]`` per element (0 beyond the last digit)."""
  out = jnp.zeros_like(digits[0])
  for i, d in enumerate(digits):
    out = jnp.where(index == i, d, out)
  return out


def requantize(acc: jax.Array, m: jax.Array, mantissa: jax.Array, shift: jax.Array,
               sign: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``round(sign · acc · m · mantissa / 2^shift)`` exactly (halves rounded up), as int64,
  and where it left ``±WIDE_LIMIT`` (clipped there).

  ``acc``: int accumulators; ``m``: the images' clipping values (broadcastable, ``0 <= m
  <= WIDE_LIMIT``); ``mantissa``, ``shift``, ``sign``: the per-channel fixed-point
  multiplier (``0 <= mantissa < 2^31``, ``1 <= shift <= MAX_SHIFT``). The product of up to
  140 bits is
  formed in base-2^32 digits, the rounding constant added and the shift applied to the
  whole number: one rounding, no intermediate truncation.
  """
  narrow = acc.dtype == jnp.int32  # |acc| < 2^31: |acc| · mantissa < 2^62 fits one int64
  acc = acc.astype(jnp.int64) * sign
  negative = acc < 0
  if narrow:
    product = _multiply(_limbs(jnp.abs(acc) * mantissa.astype(jnp.int64), 2),
                        _limbs(m.astype(jnp.int64), 2))
  else:
    product = _multiply(_multiply(_limbs(jnp.abs(acc), 2), _limbs(m.astype(jnp.int64), 2)),
                        _limbs(mantissa.astype(jnp.int64), 1))
  shift = jnp.broadcast_to(jnp.asarray(shift, jnp.int64), product[0].shape)
  # floor((x + 2^(s-1)) / 2^s) of x = ±|x|: for x < 0 it is -floor((|x| + 2^(s-1) - 1) / 2^s).
  half = shift - 1
  rounding = [jnp.where(half // _LIMB == i, np.uint64(1) << (half % _LIMB).astype(jnp.uint64),
                        np.uint64(0)) for i in range(len(product))]
  product = _normalize([p + r for p, r in zip(product, rounding)])
  borrow = negative.astype(jnp.uint64)  # subtract 1 from |x| + 2^(s-1) >= 1 for x < 0
  digits = []
  for d in product:
    digits.append(jnp.where(d >= borrow, d - borrow, d + np.uint64(2 ** _LIMB) - borrow))
    borrow = jnp.where(d >= borrow, np.uint64(0), np.uint64(1))
  # Bits s.. of the rounded magnitude: digits q, q+1 and q+2 shifted by r (s = 32 q + r);
  # anything at bit 63 of the result or above is out of range.
  q, r = shift // _LIMB, (shift % _LIMB).astype(jnp.uint64)
  d0, d1, d2 = (_digit(digits, q + i) for i in range(3))
  r_or_1 = jnp.maximum(r, np.uint64(1))
  top = d2 & ((np.uint64(1) << (r_or_1 - np.uint64(1))) - np.uint64(1))  # bits below 63
  magnitude = ((d0 >> r) | (d1 << (np.uint64(_LIMB) - r))
               | jnp.where(r > 0, top << (np.uint64(2 * _LIMB) - r_or_1), np.uint64(0)))
  beyond = jnp.where(r > 0, (d2 >> (r_or_1 - np.uint64(1))) != 0,
                     (d2 != 0) | ((d1 >> np.uint64(_LIMB - 1)) != 0))
  for i, d in enumerate(digits):
    beyond = beyond | ((i >= q + 3) & (d != 0))
  clipped = beyond | (magnitude > np.uint64(WIDE_LIMIT))
  value = jnp.where(clipped, WIDE_LIMIT, magnitude.astype(jnp.int64))
  return jnp.where(negative, -value, value), clipped


def saturate(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Wide integers clipped to ``±WIDE_LIMIT``, and where they had to be (the edge never
  wraps around)."""
  v = v.astype(jnp.int64)
  return jnp.clip(v, -WIDE_LIMIT, WIDE_LIMIT), jnp.abs(v) > WIDE_LIMIT


def overflowed(clipped: jax.Array) -> jax.Array:
  """Per image (N,): whether any of its values was clipped."""
  return jnp.any(clipped, axis=tuple(range(1, clipped.ndim)))


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
  return codes.astype(jnp.int32), m


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
  mantissa, shift, sign = fixed_point(a * step / largest_in)
  bias = np.round(b * 2.0 ** FRACTION_BITS).astype(np.int64)
  nonzero = mantissa > 0
  if np.any(nonzero & ((shift < 1) | (shift > MAX_SHIFT))) or np.any(np.abs(bias) > WIDE_LIMIT):
    raise ValueError(f"layer {spec.name}: its folded batch norm (scale up to "
                     f"{np.abs(a).max():.3g}, shift up to {np.abs(b).max():.3g}) is outside "
                     "what the integer edge represents")
  shift = np.where(nonzero, shift, 1)
  spec = dataclasses.replace(spec, acc_bits=acc_bits)
  return spec, {"w": codes, "k": mantissa, "shift": shift, "sign": sign, "bias": bias}


def _conv(x: jax.Array, w: jax.Array, spec: LayerSpec, out_dtype: Any,
          precision: Any = None) -> jax.Array:
  pad = spec.kernel // 2
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(spec.stride, spec.stride), padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=spec.groups,
      preferred_element_type=out_dtype, precision=precision)


def integer_layer(x: jax.Array, arrays: dict[str, jax.Array], spec: LayerSpec
                  ) -> tuple[jax.Array, jax.Array]:
  """Codes, integer convolution and exact requantization (batch norm folded): the wide
  output (int64) and where it had to be clipped."""
  codes, m = activation_codes(to_wide(x), spec.a_bits, spec.signed_input, spec.activation_levels)
  w = arrays["w"]
  operand = jnp.promote_types(w.dtype, code_dtype(levels(spec.a_bits, spec.signed_input,
                                                          spec.activation_levels)))
  acc_type = jnp.int32 if spec.acc_bits == 32 else jnp.int64
  acc = _conv(codes.astype(operand), w.astype(operand), spec, acc_type)
  out, clipped = requantize(acc, m[:, None, None, None], arrays["k"], arrays["shift"],
                            arrays["sign"])
  out, beyond = saturate(out + arrays["bias"])
  return out, clipped | beyond


def float_layer(x: jax.Array, arrays: dict[str, jax.Array], spec: LayerSpec
                ) -> tuple[jax.Array, jax.Array]:
  """A layer the genome leaves in float: float32 convolution and batch norm; the wide output
  (int64) and where it had to be clipped."""
  x = to_float(x)
  if spec.a_bits < FLOAT_BITS:
    x = quantize_activations(x, jnp.int32(spec.a_bits), signed=spec.signed_input,
                             levels=spec.activation_levels)
  y = _conv(x, arrays["w"], spec, jnp.float32, jax.lax.Precision.HIGHEST)
  y = jnp.clip(y * arrays["a"] + arrays["b"], -2.0 ** (WIDE_BITS + 1 - FRACTION_BITS),
               2.0 ** (WIDE_BITS + 1 - FRACTION_BITS))  # beyond the range either way
  return saturate(to_wide(y))


def relu(x: jax.Array) -> jax.Array:
  return jnp.maximum(x, 0)


def max_pool(x: jax.Array) -> jax.Array:
  """2×2, stride 2 (on wide integers)."""
  return nn.max_pool(x, (2, 2), strides=(2, 2))


# The integer form of each block type: `run(name, x)` applies the block's conv named
# `name` with its batch norm and returns int64 wide integers; `block` is the Flax module
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


BLOCKS: Registry[BlockForward] = Registry("block type with an integer form")
"""Integer forward of each block class, by class name; a new block type registers here
(``BLOCKS.register("MyBlock", forward)``)."""
for _kind, _forward in (("ConvBN", _conv_bn_unit), ("BasicBlock", _basic_block),
                        ("Bottleneck", _bottleneck), ("SeparableBlock", _separable)):
  BLOCKS.register(_kind, _forward)

BATCH_NORM_OF = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "conv3": "bn3",
                 "proj": "proj_bn", "dw": "dw_bn", "pw": "pw_bn"}
"""The batch norm that follows each conv, by the conv's module name."""


def block_forward(block: nn.Module) -> BlockForward:
  """The integer forward of ``block``; a clear error for a block type without one."""
  return BLOCKS.get(type(block).__name__)
