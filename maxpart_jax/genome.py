"""Genomes: a partition point plus per-layer bit widths (docs/method.md §3, §7).

A :class:`Genome` ``(p, w_bits, a_bits)`` names a candidate deployment: blocks
``1..p`` run on the edge, each edge layer ``i`` with ``w_bits[i]``-bit weights and
``a_bits[i]``-bit inputs. Genes of layers after ``p`` are masked (the cloud runs in
float), and so are the genes of layers the model marks unquantizable (by default
its first conv and its classifier). Everything here is jittable and works on a
population by ``jax.vmap``.

**Decision** (the paper is silent): the IR is sent at the activation bits of the
last layer of block ``p``; if that layer is not quantized, the IR is float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from maxpart_jax.models import SplitModel, Variables
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.quant import FLOAT_BITS, QuantPolicy, check_activation_levels, check_bits


@struct.dataclass
class Genome:
  """Partition point and bit genes; leaves may carry a leading population axis.

  Attributes:
    p: int32 number of edge blocks, ``1..info.max_split``.
    w_bits: (num_layers,) int32 weight bits by layer id.
    a_bits: (num_layers,) int32 input-activation bits by layer id.
  """

  p: jax.Array
  w_bits: jax.Array
  a_bits: jax.Array

  def to_json(self) -> dict[str, Any]:
    """One concrete genome as ``{"p", "w_bits", "a_bits"}`` of plain ints (as in best.json)."""
    return {"p": int(self.p), "w_bits": np.asarray(self.w_bits).tolist(),
            "a_bits": np.asarray(self.a_bits).tolist()}

  @classmethod
  def from_json(cls, g: dict[str, Any]) -> Genome:
    """The inverse of :meth:`to_json`."""
    return cls(p=jnp.int32(g["p"]), w_bits=jnp.asarray(g["w_bits"], jnp.int32),
               a_bits=jnp.asarray(g["a_bits"], jnp.int32))


def uniform_genome(info: ModelInfo, p: int, w_bits: int, a_bits: int | None = None) -> Genome:
  """Every layer at ``w_bits`` weights and ``a_bits`` (default: ``w_bits``) inputs."""
  a_bits = w_bits if a_bits is None else a_bits
  shape = (info.num_layers,)
  return Genome(p=jnp.int32(p), w_bits=jnp.full(shape, w_bits, jnp.int32),
                a_bits=jnp.full(shape, a_bits, jnp.int32))


def validate_genome(info: ModelInfo, genome: Genome) -> None:
  """Raises ``ValueError`` naming the problem if a concrete genome (or population) is illegal."""
  w, a, p = (np.asarray(genome.w_bits), np.asarray(genome.a_bits), np.asarray(genome.p))
  for name, bits in (("w_bits", w), ("a_bits", a)):
    if bits.shape[-1:] != (info.num_layers,) or bits.shape[:-1] != p.shape:
      raise ValueError(f"genome {name} has shape {bits.shape}; the model has "
                       f"{info.num_layers} layers and p has shape {p.shape}")
    check_bits(bits, f"genome {name}")
  for pi in p.ravel():
    info.check_split(int(pi))


def effective_bits(info: ModelInfo, genome: Genome) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bits actually used: masked genes become ``FLOAT_BITS``.

  Returns:
    ``(w_bits, a_bits, ir_bits)``: per-layer weight and input bits (float for
    cloud and unquantizable layers) and the bits of the IR sent at split ``p``.
  """
  on_edge = jnp.asarray(info.layer_block) < genome.p
  quantized = on_edge & jnp.asarray(info.quantizable)
  w = jnp.where(quantized, genome.w_bits, FLOAT_BITS).astype(jnp.int32)
  a = jnp.where(quantized, genome.a_bits, FLOAT_BITS).astype(jnp.int32)
  ir_bits = a[jnp.asarray(info.block_last_layer)[genome.p - 1]]
  return w, a, ir_bits


def to_policy(info: ModelInfo, genome: Genome, per_channel: bool = False,
              activation_levels: str = "paper") -> QuantPolicy:
  """The :class:`QuantPolicy` a forward pass needs to run ``genome``."""
  check_activation_levels(activation_levels)
  w, a, ir_bits = effective_bits(info, genome)
  return QuantPolicy(w_bits=w, a_bits=a, split=jnp.asarray(genome.p, jnp.int32),
                     ir_bits=ir_bits, per_channel=per_channel,
                     activation_levels=activation_levels)


def quantized_apply(model: SplitModel, variables: Variables, x: jax.Array, genome: Genome, *,
                    per_channel: bool = False, activation_levels: str = "paper",
                    train: bool = False) -> Any:
  """The whole model with its edge fake-quantized by ``genome`` and the cloud in float.

  ``genome`` is traced data: one compiled function serves every partition point
  and policy, and a population can be ``jax.vmap``-ped over it. ``per_channel`` and
  ``activation_levels`` are the quantizer settings (:func:`to_policy`).
  """
  policy = to_policy(model.info, genome, per_channel, activation_levels)
  return model.apply(variables, x, train=train, policy=policy)


def quantized_edge(model: SplitModel, variables: Variables, x: jax.Array, genome: Genome, *,
                   per_channel: bool = False, activation_levels: str = "paper") -> jax.Array:
  """The quantized IR the edge sends for ``genome`` (``genome.p`` must be concrete)."""
  policy = to_policy(model.info, genome, per_channel, activation_levels)
  return model.edge(variables, x, int(genome.p), policy)
