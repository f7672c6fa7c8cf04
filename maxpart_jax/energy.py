"""Analytic energy of the edge part (docs/method.md §5, Eq. 7-9, Table 3).

``E(M_edge, Π) = Σ_{i on edge} E_L(L_i^{π_i}) + E_T(IR)`` with
``E_L = N_MAC · E_MAC(b_w) + N_in · E_mem(b_a) + N_param · E_mem(b_w)``
(**Decision**: the paper's Eq. 8 pairs counts and energies the wrong way round;
this is its evident intent) and ``E_T = bits(IR) · E_tx``. Only conv (projection
shortcuts included) and dense layers count; BN, activations, pooling and additions
are neglected, as in the paper. Energies are per image. Everything is jittable and
cheap, so a whole population is scored with one ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models.metadata import ModelInfo

PJ_PER_MJ = 1e9


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
  """Energy constants of an edge device (defaults: 45 nm CMOS, Horowitz 2014; 1 Mbps link).

  Attributes:
    mac_pj_per_bit, mac_pj_offset: a k-bit MAC costs ``mac_pj_per_bit·k + mac_pj_offset`` pJ.
    mem_pj_per_bit: a k-bit memory access costs ``mem_pj_per_bit·k`` pJ.
    tx_pj_per_bit: transmission energy per bit of IR.
    budget_mj: the energy budget ``E_b = α·B`` (paper: 0.35 mJ).
  """

  mac_pj_per_bit: float = 3.1 / 32
  mac_pj_offset: float = 0.1
  mem_pj_per_bit: float = 2.5
  tx_pj_per_bit: float = 100.0
  budget_mj: float = 0.35

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) < 0:
        raise ValueError(f"DeviceConfig.{field.name} must be >= 0, got {getattr(self, field.name)}")
    if self.budget_mj <= 0:
      raise ValueError(f"energy budget must be > 0 mJ, got {self.budget_mj}")

  @classmethod
  def from_battery(cls, capacity_mj: float, alpha: float, **kwargs) -> "DeviceConfig":
    """Budget as the fraction ``alpha`` of a battery of ``capacity_mj`` (E_b = α·B)."""
    if not 0 < alpha <= 1:
      raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return cls(budget_mj=alpha * capacity_mj, **kwargs)


@struct.dataclass
class Energy:
  """Edge energy of one genome (or a population) in mJ."""

  compute_mj: jax.Array
  transmission_mj: jax.Array

  @property
  def total_mj(self) -> jax.Array:
    return self.compute_mj + self.transmission_mj


def layer_energy_pj(info: ModelInfo, w_bits: jax.Array, a_bits: jax.Array,
                    device: DeviceConfig = DeviceConfig()) -> jax.Array:
  """(L,) energy of every layer at the given bits, whether on the edge or not (Eq. 8)."""
  w = jnp.asarray(w_bits, jnp.float32)
  a = jnp.asarray(a_bits, jnp.float32)
  mac = device.mac_pj_per_bit * w + device.mac_pj_offset
  return (jnp.asarray(info.layer_macs, jnp.float32) * mac
          + jnp.asarray(info.layer_in_elems, jnp.float32) * device.mem_pj_per_bit * a
          + jnp.asarray(info.layer_params, jnp.float32) * device.mem_pj_per_bit * w)


def edge_energy(info: ModelInfo, genome: Genome, device: DeviceConfig = DeviceConfig(),
                transmission: bool = True) -> Energy:
  """Energy the edge spends on ``genome``: its layers plus sending the IR (Eq. 7, 9)."""
  w, a, ir_bits = effective_bits(info, genome)
  on_edge = jnp.asarray(info.layer_block) < genome.p
  compute = jnp.sum(jnp.where(on_edge, layer_energy_pj(info, w, a, device), 0.0))
  tx = jnp.asarray(info.block_out_elems, jnp.float32)[genome.p - 1] * ir_bits * device.tx_pj_per_bit
  if not transmission:
    tx = jnp.zeros_like(tx)
  return Energy(compute / PJ_PER_MJ, tx / PJ_PER_MJ)


def population_energy(info: ModelInfo, population: Genome, device: DeviceConfig = DeviceConfig(),
                      transmission: bool = True) -> Energy:
  """:func:`edge_energy` of every genome of a population (leading axis), in one vmap."""
  return jax.vmap(lambda g: edge_energy(info, g, device, transmission))(population)
