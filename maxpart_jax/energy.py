"""Analytic energy of the edge part (docs/method.md §5, Eq. 7-9, Table 3).

``E(M_edge, Π) = Σ_{i on edge} E_L(L_i^{π_i}) + E_T(IR)`` with
``E_L = N_MAC · E_MAC(b_w) + N_in · E_mem(b_a) + N_param · E_mem(b_w)``
(**Decision**: the paper's Eq. 8 pairs counts and energies the wrong way round;
this is its evident intent) and ``E_T = bits(IR) · E_tx``. Only conv (projection
shortcuts included) and dense layers count; BN, activations, pooling and additions
are neglected, as in the paper. Energies are per image. Everything is jittable and
cheap, so a whole population is scored with one ``jax.vmap``.

Beyond the paper, the same device description gives the **latency** of a deployment and
models an **unreliable link** (docs/method.md §11):

* compute time ``Σ_{i on edge} N_MAC,i / rate(b_i)``, where a MAC of operand width
  ``b_i = max(w_i, a_i)`` runs at the rate of the narrowest listed width that holds it
  (``mac_rate_bits`` / ``mac_rate_gmacs``: a device without 4-bit instructions lists no 4);
* the IR goes in packets of ``packet_bits`` payload plus ``header_bits``; each packet is
  lost with probability ``loss_rate`` and resent until it arrives, so it is sent
  ``1 / (1 - loss_rate)`` times on average. The expected bits on air (:func:`link_bits`)
  cost ``tx_pj_per_bit`` each and take ``1 / bandwidth`` each, and every lost packet adds
  ``retry_timeout_ms`` before its resend.

With the defaults (no headers, no loss) the energy is exactly the paper's.
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
  """Energy, speed and link of an edge device.

  Energy defaults: 45 nm CMOS (Horowitz 2014) and the paper's 100 pJ/bit, 1 Mbps link. The
  MAC rates are illustrative (a small CPU: 1 GMAC/s in float, 2x at 16 bits, 4x at 8 bits
  by SIMD packing, no faster below); put your device's measured rates there.

  Attributes:
    mac_pj_per_bit, mac_pj_offset: a k-bit MAC costs ``mac_pj_per_bit·k + mac_pj_offset`` pJ.
    mem_pj_per_bit: a k-bit memory access costs ``mem_pj_per_bit·k`` pJ.
    tx_pj_per_bit: transmission energy per bit on air.
    budget_mj: the energy budget ``E_b = α·B`` (paper: 0.35 mJ).
    mac_rate_bits, mac_rate_gmacs: operand widths (descending, the first 32) and the MACs
      per second (in 10^9) the device runs at each.
    bandwidth_mbps: link rate in 10^6 bits per second.
    packet_bits, header_bits: payload and header bits of one packet.
    loss_rate: probability that a packet is lost (then resent), in [0, 1).
    retry_timeout_ms: time from sending a packet that is lost to resending it.
    latency_bound_ms: a bound on edge latency (compute + transmission); 0: none.
  """

  mac_pj_per_bit: float = 3.1 / 32
  mac_pj_offset: float = 0.1
  mem_pj_per_bit: float = 2.5
  tx_pj_per_bit: float = 100.0
  budget_mj: float = 0.35
  mac_rate_bits: tuple[int, ...] = (32, 16, 8)
  mac_rate_gmacs: tuple[float, ...] = (1.0, 2.0, 4.0)
  bandwidth_mbps: float = 1.0
  packet_bits: int = 12000
  header_bits: int = 0
  loss_rate: float = 0.0
  retry_timeout_ms: float = 0.0
  latency_bound_ms: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "mac_rate_bits", tuple(int(b) for b in self.mac_rate_bits))
    object.__setattr__(self, "mac_rate_gmacs", tuple(float(r) for r in self.mac_rate_gmacs))
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if (min(value, default=0) if isinstance(value, tuple) else value) < 0:
        raise ValueError(f"DeviceConfig.{field.name} must be >= 0, got {value}")
    if self.budget_mj <= 0:
      raise ValueError(f"energy budget must be > 0 mJ, got {self.budget_mj}")
    bits, rates = self.mac_rate_bits, self.mac_rate_gmacs
    if (len(bits) != len(rates) or not bits or bits[0] != 32 or list(bits) != sorted(bits)[::-1]
        or len(set(bits)) != len(bits) or min(rates) <= 0):
      raise ValueError(f"mac_rate_bits {bits} must be distinct widths in descending order from "
                       f"32, with one positive rate each in mac_rate_gmacs {rates}")
    if not 0.0 <= self.loss_rate < 1.0:
      raise ValueError(f"loss_rate must be in [0, 1), got {self.loss_rate}: with every packet "
                       "lost nothing arrives")
    if self.bandwidth_mbps <= 0 or self.packet_bits <= 0:
      raise ValueError(f"bandwidth_mbps ({self.bandwidth_mbps}) and packet_bits "
                       f"({self.packet_bits}) must be > 0")

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


def layer_costs(macs: jax.Array, params: jax.Array, in_elems: jax.Array, w_bits: jax.Array,
                a_bits: jax.Array, device: DeviceConfig = DeviceConfig()
                ) -> tuple[jax.Array, jax.Array]:
  """Energy (pJ, Eq. 8) and compute time (s) of layers with these MACs, parameters and input
  elements at these weight and activation bits.

  The one per-layer cost of the project: the edge's layers (:func:`layer_energy_pj`,
  :func:`edge_latency`), a defense stack's device layers
  (:func:`maxpart_jax.privacy.defenses.population_costs`) and the solver's tables are all
  charged through it, so a change to the energy model is a change here.
  """
  w = jnp.asarray(w_bits, jnp.float32)
  a = jnp.asarray(a_bits, jnp.float32)
  macs = jnp.asarray(macs, jnp.float32)
  mac = device.mac_pj_per_bit * w + device.mac_pj_offset
  energy = (macs * mac + jnp.asarray(in_elems, jnp.float32) * device.mem_pj_per_bit * a
            + jnp.asarray(params, jnp.float32) * device.mem_pj_per_bit * w)
  return energy, macs * mac_seconds(jnp.maximum(w, a), device)


def layer_energy_pj(info: ModelInfo, w_bits: jax.Array, a_bits: jax.Array,
                    device: DeviceConfig = DeviceConfig()) -> jax.Array:
  """(L,) energy of every layer at the given bits, whether on the edge or not (Eq. 8)."""
  return layer_costs(info.layer_macs, info.layer_params, info.layer_in_elems, w_bits, a_bits,
                     device)[0]


def link_bits(payload_bits: jax.Array, device: DeviceConfig = DeviceConfig()
              ) -> tuple[jax.Array, jax.Array]:
  """Expected bits on air and expected lost packets to deliver ``payload_bits``.

  ``ceil(payload / packet_bits)`` packets, each ``header_bits`` more, each sent
  ``1 / (1 - loss_rate)`` times on average (resent until it arrives).
  """
  payload = jnp.asarray(payload_bits, jnp.float32)
  packets = jnp.ceil(payload / device.packet_bits)
  sends = 1.0 / (1.0 - device.loss_rate)
  return (payload + packets * device.header_bits) * sends, packets * (sends - 1.0)


def link_cost(payload_bits: jax.Array, device: DeviceConfig = DeviceConfig()
              ) -> tuple[jax.Array, jax.Array]:
  """Energy (mJ) and time (ms) of delivering ``payload_bits`` over the device's link: the
  expected bits on air (:func:`link_bits`) at ``tx_pj_per_bit`` and ``bandwidth_mbps``,
  plus ``retry_timeout_ms`` per expected lost packet."""
  on_air, lost = link_bits(payload_bits, device)
  return (on_air * device.tx_pj_per_bit / PJ_PER_MJ,
          on_air / (device.bandwidth_mbps * 1e3) + lost * device.retry_timeout_ms)


def ir_payload_bits(info: ModelInfo, genome: Genome) -> jax.Array:
  """Bits of the IR ``genome`` sends: the split block's output elements at the IR bits."""
  _, _, ir_bits = effective_bits(info, genome)
  return jnp.asarray(info.block_out_elems, jnp.float32)[genome.p - 1] * ir_bits


def edge_energy(info: ModelInfo, genome: Genome, device: DeviceConfig = DeviceConfig(),
                transmission: bool = True) -> Energy:
  """Energy the edge spends on ``genome``: its layers plus sending the IR (Eq. 7, 9)."""
  w, a, _ = effective_bits(info, genome)
  on_edge = jnp.asarray(info.layer_block) < genome.p
  compute = jnp.sum(jnp.where(on_edge, layer_energy_pj(info, w, a, device), 0.0))
  tx_mj, _ = link_cost(ir_payload_bits(info, genome), device)
  if not transmission:
    tx_mj = jnp.zeros_like(tx_mj)
  return Energy(compute / PJ_PER_MJ, tx_mj)


@struct.dataclass
class Latency:
  """Edge latency of one genome (or a population) in ms: computing the edge part, and
  delivering its IR over the link (retransmissions and their timeouts included)."""

  compute_ms: jax.Array
  transmission_ms: jax.Array

  @property
  def total_ms(self) -> jax.Array:
    return self.compute_ms + self.transmission_ms


def mac_seconds(bits: jax.Array, device: DeviceConfig = DeviceConfig()) -> jax.Array:
  """Seconds per MAC of operand width ``bits``: the rate of the narrowest listed width that
  holds it (a width below every listed one runs at the narrowest's rate)."""
  widths = jnp.asarray(device.mac_rate_bits, jnp.float32)
  rates = jnp.asarray(device.mac_rate_gmacs, jnp.float32) * 1e9
  fits = widths[None, :] >= jnp.asarray(bits, jnp.float32)[..., None]
  narrowest = jnp.max(jnp.where(fits, jnp.arange(widths.shape[0]), 0), axis=-1)
  return 1.0 / rates[narrowest]


def edge_latency(info: ModelInfo, genome: Genome, device: DeviceConfig = DeviceConfig()
                 ) -> Latency:
  """Time the edge takes on ``genome``: its layers' MACs, then sending the IR.

  The IR is always sent, so its time counts whatever the energy convention.
  """
  w, a, _ = effective_bits(info, genome)
  on_edge = jnp.asarray(info.layer_block) < genome.p
  _, seconds = layer_costs(info.layer_macs, info.layer_params, info.layer_in_elems, w, a, device)
  _, tx_ms = link_cost(ir_payload_bits(info, genome), device)
  return Latency(jnp.sum(jnp.where(on_edge, seconds, 0.0)) * 1e3, tx_ms)


def population_latency(info: ModelInfo, population: Genome,
                       device: DeviceConfig = DeviceConfig()) -> Latency:
  """:func:`edge_latency` of every genome of a population (leading axis), in one vmap."""
  return jax.vmap(lambda g: edge_latency(info, g, device))(population)


def population_energy(info: ModelInfo, population: Genome, device: DeviceConfig = DeviceConfig(),
                      transmission: bool = True) -> Energy:
  """:func:`edge_energy` of every genome of a population (leading axis), in one vmap."""
  return jax.vmap(lambda g: edge_energy(info, g, device, transmission))(population)
