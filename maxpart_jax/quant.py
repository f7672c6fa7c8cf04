"""Fake quantization with the bit width as traced data (docs/method.md §3, Eq. 3, 5, 6).

Weights use a symmetric uniform quantizer on ``[-c, c]`` and activations an
unsigned one on ``[0, c]``; both use the step ``s = c / (2^(b-1) - 1)``, Eq. 5 as the
paper writes it (``activation_levels="paper"``). On ``[0, c]`` that step leaves half of
the ``2^b`` codes a b-bit activation is charged for unused; ``activation_levels="unsigned"``
uses them all, ``s = c / (2^b - 1)`` (docs/method.md §3). The bit
width ``b`` is an array, not a Python constant, so one compiled function serves
every policy and a population of policies can be ``jax.vmap``-ped. A bit width of
``FLOAT_BITS`` (32) is the "not quantized" sentinel: the tensor passes through
unchanged (and counts at 32 bits in the energy model).

Gradients flow through ``round`` with the clipped straight-through estimator:
``x_clipped + stop_gradient(q - x_clipped)``.
"""

from __future__ import annotations

from typing import Iterable

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

FLOAT_BITS = 32
"""Sentinel bit width meaning "not quantized" (float32)."""

ACTIVATION_LEVELS = ("paper", "unsigned")
"""How non-negative activations use their codes: Eq. 5's signed step, or all 2^b levels."""

MIN_BITS = 2
MAX_BITS = 16
"""Quantized bit widths allowed by the quantizer (``2^(b-1) - 1 >= 1``)."""


def _step(c: jax.Array, bits: jax.Array, signed: bool = True) -> jax.Array:
  """Quantization step ``c / (2^(b-1) - 1)`` (``signed``) or ``c / (2^b - 1)``; 1 where
  ``c == 0`` to avoid 0/0."""
  levels = jnp.exp2(jnp.asarray(bits, jnp.float32) - (1.0 if signed else 0.0)) - 1.0
  return jnp.where(c > 0, c / levels, 1.0)


def check_activation_levels(levels: str) -> None:
  """Raises ``ValueError`` unless ``levels`` is one of :data:`ACTIVATION_LEVELS`."""
  if levels not in ACTIVATION_LEVELS:
    raise ValueError(f"activation_levels must be one of {ACTIVATION_LEVELS}, got {levels!r}")


def _clip(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Clip with gradient 1 on the closed range ``[lo, hi]`` (``jnp.clip`` halves it at ties)."""
  return jnp.where(x > hi, hi, jnp.where(x < lo, lo, x))


def _ste(x_clipped: jax.Array, q: jax.Array) -> jax.Array:
  """Value of ``q`` with the gradient of ``x_clipped`` (straight-through)."""
  return x_clipped + jax.lax.stop_gradient(q - x_clipped)


def quantize_weights(w: jax.Array, bits: jax.Array, per_channel: bool = False) -> jax.Array:
  """Symmetric fake quantization of a weight tensor (Eq. 5-6).

  Args:
    w: kernel with the output channel on the last axis (HWIO or IO).
    bits: scalar bit width (traced); ``FLOAT_BITS`` returns ``w`` unchanged.
    per_channel: one clipping value per output channel instead of per tensor.
  """
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  c = jax.lax.stop_gradient(jnp.max(jnp.abs(w), axis=axes, keepdims=per_channel))
  s = _step(c, bits)
  w_clipped = _clip(w, -c, c)
  q = jnp.round(w_clipped / s) * s
  return jnp.where(bits >= FLOAT_BITS, w, _ste(w_clipped, q))


def quantize_activations(x: jax.Array, bits: jax.Array, signed: bool = False,
                         levels: str = "paper") -> jax.Array:
  """Fake quantization of activations, one clipping value ``c`` per example.

  Activations after ReLU are non-negative and use ``[0, c]`` with ``c = max x``;
  ``signed=True`` (a network's normalized input image) uses ``[-c, c]`` with
  ``c = max |x|``. ``c`` is taken over all non-batch axes of each example, so an
  image's quantized activations (and the IR the edge sends) do not depend on the
  other images in the batch, as on an edge device that processes one image.
  ``levels`` (static): the step on ``[0, c]``, see :data:`ACTIVATION_LEVELS`.
  """
  check_activation_levels(levels)
  axes = tuple(range(1, x.ndim))
  ref = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
  c = jax.lax.stop_gradient(jnp.max(ref, axis=axes, keepdims=True))
  s = _step(c, bits, signed=signed or levels == "paper")
  x_clipped = _clip(x, -c if signed else jnp.zeros_like(c), c)
  q = jnp.round(x_clipped / s) * s
  return jnp.where(bits >= FLOAT_BITS, x, _ste(x_clipped, q))


def check_bits(bits: Iterable[int] | np.ndarray, what: str = "bit width") -> None:
  """Raises ``ValueError`` unless every entry is in [MIN_BITS, MAX_BITS] or FLOAT_BITS.

  Only concrete values can be checked; call this at API boundaries, outside jit.
  """
  arr = np.asarray(bits)
  ok = ((arr >= MIN_BITS) & (arr <= MAX_BITS)) | (arr == FLOAT_BITS)
  if not np.all(ok):
    bad = sorted(set(np.asarray(arr[~ok]).ravel().tolist()))
    raise ValueError(
        f"{what} out of range: {bad}; allowed are {MIN_BITS}..{MAX_BITS} "
        f"or {FLOAT_BITS} (not quantized).")


@struct.dataclass
class QuantPolicy:
  """Per-layer bit widths for one forward pass, all traced.

  Attributes:
    w_bits: (num_layers,) weight bits of every conv/dense layer, by layer id.
    a_bits: (num_layers,) bits of every layer's input activations.
    split: number of edge blocks; the output of that block (the IR) is
      quantized to ``ir_bits``. 0 quantizes no IR.
    ir_bits: bits of the IR sent to the cloud.
    per_channel: static; one weight clipping value per output channel.
    activation_levels: static; the step of non-negative activations
      (:data:`ACTIVATION_LEVELS`).
  """

  w_bits: jax.Array
  a_bits: jax.Array
  split: jax.Array
  ir_bits: jax.Array
  per_channel: bool = struct.field(pytree_node=False, default=False)
  activation_levels: str = struct.field(pytree_node=False, default="paper")

  @classmethod
  def ir_only(cls, num_layers: int, split: int | jax.Array, ir_bits: int | jax.Array,
              activation_levels: str = "paper", per_channel: bool = False) -> "QuantPolicy":
    """A float edge whose IR at ``split`` alone is quantized to ``ir_bits`` (the paper's
    Fig. 8 view; ``FLOAT_BITS`` leaves the IR float too). ``per_channel`` only matters where
    such policies are stacked with others that quantize weights per channel."""
    check_activation_levels(activation_levels)
    floats = jnp.full((num_layers,), FLOAT_BITS, jnp.int32)
    return cls(w_bits=floats, a_bits=floats, split=jnp.asarray(split, jnp.int32),
               ir_bits=jnp.asarray(ir_bits, jnp.int32), activation_levels=activation_levels,
               per_channel=per_channel)
