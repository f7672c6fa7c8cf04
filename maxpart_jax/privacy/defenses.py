"""Defenses of the IR: pure, registered transforms and losses applied at the split.

An undefended split sends the IR of blocks ``1..p``. A defense changes what is sent (the
*message*) or how the edge is fine-tuned, so that a decoder trained on the messages of the
attacker's own images cannot turn them back into images (docs/method.md §13). Every defense
is a :class:`Defense`: a handful of pure functions of arrays, a PRNG key and one
``strength``, kept in :data:`DEFENSES` under a name that configs use
(``"bottleneck:8,adversarial:30"``, :func:`parse_stack`):

===============  ===========================================  ===============================
defense          what it does                                 strength
===============  ===========================================  ===============================
``adversarial``  fine-tunes the network against an inner      α: the loss subtracts α times
                 decoder (min-max; ResSFL, DeepObfuscator)    the inner decoder's MSE
``dcor``         distance correlation between image and       weight of dCor in the loss
                 message in the loss (NoPeek)
``bottleneck``   a learned 1x1 convolution that sends fewer   channels sent
                 channels; its inverse opens the cloud part
``noise``        Gaussian noise on the message, drawn on the  σ relative to the message's
                 device (Shredder-like, fixed scale)          RMS per image
===============  ===========================================  ===============================

The functions of a defense (``params`` is its own pytree of learned arrays, ``{}`` if none):

* ``init(key, irs, strength) -> params`` from a sample of undefended IRs (N, h, w, c);
* ``send(params, ir, key, strength) -> message``: on the device, after block ``p``;
* ``receive(params, message, strength) -> ir``: the first thing the cloud runs;
* ``penalty(images, message, strength) -> scalar``: added to the fine-tuning loss;
* ``message_channels(c, strength) -> int`` and ``edge_layer(ir_shape, strength) ->
  (macs, params)``: what the device pays, for the energy model and the payload.

A stack of defenses applies the ``send`` functions in order and the ``receive`` functions in
reverse order, and adds their penalties. ``adversarial`` marks the one defense whose loss
needs an inner decoder; the fine-tuning loop (:mod:`maxpart_jax.privacy.defended`) trains
it. A new defense is one :class:`Defense` passed to :func:`register`; :func:`check_defense`
runs the generic checks every registered defense passes (also for users' own).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax.energy import (PJ_PER_MJ, DeviceConfig, Energy, Latency, layer_costs, link_cost,
                                population_energy, population_latency)
from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.registry import Registry

Params = Any
DCOR_EPS = 1e-9
"""Added under every square root of the distance correlation: its gradient at zero
(constant features, a dead message) would be NaN otherwise."""
NOISE_EPS = 1e-12
NOISE_KEY_IMPL, NOISE_KEY_WORDS = "threefry4x32", 4
"""The PRNG of an image's noise key: Threefry-4x32-20 (Salmon et al. 2011), whose key is 4
uint32 words, 128 bits. A ``threefry2x32`` key holds 64 bits; one seeded from 32 bits was
found by trying seeds (issue 39), and whoever finds the key subtracts the noise."""
# What drawing noise costs the device, per element of the IR (docs/method.md §13). The
# convention: one 32-bit integer or float operation (a multiply-add being one, as CPUs fuse
# it) counts as one MAC at the IR's bits, as every layer a defense adds is charged. Not a
# bound either way: at 8 bits a MAC costs 0.875 pJ, a 32-bit integer add 0.1 pJ and a 32-bit
# float multiply 3.7 pJ (Horowitz 2014).
NOISE_OPS_PER_ELEMENT = (
    1  # the RMS: the element squared and accumulated
    + 152  # Threefry-4x32-20, one block per element: 40 mixes of add, rotate, xor; 4 + 5 * 5
    #        key-injection adds; 3 xors folding the 4 output words into one (a rotation is one
    #        instruction on a CPU; XLA writes it as two shifts and an or)
    + 56  # N(0, 1) as jax.random.normal draws it, sqrt(2) erfinv(u): 5 to make u uniform on
    #       (-1, 1) of the bits (shift, or, subtract, multiply-add, max); 50 for XLA's
    #       single-precision erfinv (w = -log1p(-x^2): 3, and 20 for log1p's polynomial; the
    #       branch at w = 5 with a square root: 5; its 9 coefficients selected per element; 8
    #       multiply-adds; the product with x; the edge case at |x| = 1: 4); 1 times sqrt(2)
    + 1)  # the scale-and-add: message = ir + (strength * rms) * z, one multiply-add
NOISE_OPS_PER_IMAGE = 4
"""The RMS's mean (a division), the epsilon, the square root and ``strength * rms``."""


@dataclasses.dataclass(frozen=True)
class Defense:
  """One registered defense; see the module docstring for the functions' contracts.

  Attributes:
    name: the registry key.
    strength_range: ``(lo, hi)`` inclusive range of legal strengths.
    integer_strength: strengths must be whole numbers (a channel count).
    signed: the message can be negative, so it is quantized on ``[-c, c]``.
    adversarial: the fine-tuning trains an inner decoder and subtracts ``strength`` times
      its reconstruction MSE from the loss.
  """

  name: str
  init: Callable[[jax.Array, jax.Array, float], Params]
  send: Callable[[Params, jax.Array, jax.Array, float], jax.Array]
  receive: Callable[[Params, jax.Array, float], jax.Array]
  penalty: Callable[[jax.Array, jax.Array, float], jax.Array]
  message_channels: Callable[[int, float], int]
  edge_layer: Callable[[tuple[int, int, int], float], tuple[int, int]]
  strength_range: tuple[float, float]
  integer_strength: bool = False
  signed: bool = False
  adversarial: bool = False

  def check_strength(self, strength: float, ir_channels: int | None = None) -> float:
    """``strength`` as a float, or a ``ValueError`` naming the defense and the legal range."""
    lo, hi = self.strength_range
    if ir_channels is not None and self.integer_strength:
      hi = min(hi, ir_channels)
    s = float(strength)
    if not np.isfinite(s) or not lo <= s <= hi or (self.integer_strength and s != int(s)):
      kind = "a whole number" if self.integer_strength else "a number"
      raise ValueError(f"{self.name} strength must be {kind} in [{lo:g}, {hi:g}], got {strength!r}")
    return s


def _check_name(name: str, defense: Defense) -> None:
  if name != defense.name:
    raise ValueError(f"defense {defense.name!r} registered as {name!r}")
  if ":" in name or "," in name:
    raise ValueError(f"defense names cannot contain ':' or ',': {name!r}")


DEFENSES: Registry[Defense] = Registry("defense", check=_check_name)


def register(defense: Defense) -> Defense:
  """Adds ``defense`` to :data:`DEFENSES` (a name can be registered once)."""
  return DEFENSES.register(defense.name, defense)


def get_defense(name: str) -> Defense:
  """The registered defense ``name``, or a ``ValueError`` listing the registered ones."""
  return DEFENSES.get(name)


# ---------------------------------------------------------------------------- the defenses

def _no_params(key: jax.Array, irs: jax.Array, strength: float) -> Params:
  del key, irs, strength
  return {}


def _identity_send(params: Params, ir: jax.Array, key: jax.Array, strength: float) -> jax.Array:
  del params, key, strength
  return ir


def _identity_receive(params: Params, message: jax.Array, strength: float) -> jax.Array:
  del params, strength
  return message


def _no_penalty(images: jax.Array, message: jax.Array, strength: float) -> jax.Array:
  del images, message, strength
  return jnp.zeros((), jnp.float32)


def _same_channels(channels: int, strength: float) -> int:
  del strength
  return channels


def _free(ir_shape: tuple[int, int, int], strength: float) -> tuple[int, int]:
  del ir_shape, strength
  return 0, 0


def image_keys(key: jax.Array, start: int, n: int) -> jax.Array:
  """The noise keys of images ``start..start+n-1``, whatever the batching (the messages,
  the attacks, the parity check and the exported edge program draw alike): image ``i``'s is
  the :data:`NOISE_KEY_IMPL` key of the 128 bits ``bits(fold_in(key, i))``. A function of
  ``key``, for reproducible runs; a deployed edge draws its keys from the operating system
  (:func:`maxpart_jax.deploy.artifact.fresh_noise_keys`)."""
  words = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), (NOISE_KEY_WORDS,),
                                             jnp.uint32))(jnp.arange(start, start + n))
  return jax.random.wrap_key_data(words, impl=NOISE_KEY_IMPL)


def distance_correlation(x: jax.Array, y: jax.Array) -> jax.Array:
  """Sample distance correlation (Székely, Rizzo, Bakirov 2007) of two batches.

  ``x`` (N, ...) and ``y`` (N, ...) are flattened per example; Euclidean distances between
  examples are double-centred, ``dCor = dCov(x, y) / sqrt(dVar(x) dVar(y))``. 0 for
  independent samples in the limit, 1 for a similarity transform of each other.
  """
  def centred(z):
    z = z.reshape(z.shape[0], -1).astype(jnp.float32)
    sq = jnp.sum(z * z, axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    d = jnp.sqrt(d2 + DCOR_EPS)
    return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()

  a, b = centred(x), centred(y)
  dcov2 = jnp.mean(a * b)
  denom = jnp.sqrt(jnp.mean(a * a) * jnp.mean(b * b) + DCOR_EPS)
  return jnp.sqrt(jnp.maximum(dcov2, 0.0) / denom + DCOR_EPS)


def _dcor_penalty(images: jax.Array, message: jax.Array, strength: float) -> jax.Array:
  return strength * distance_correlation(images, message)


def _noise_send(params: Params, ir: jax.Array, key: jax.Array, strength: float) -> jax.Array:
  del params
  axes = tuple(range(1, ir.ndim))
  rms = jnp.sqrt(jnp.mean(jnp.square(ir), axis=axes, keepdims=True) + NOISE_EPS)
  # the scale is a property of the image's own IR, not something to learn through
  return ir + strength * jax.lax.stop_gradient(rms) * jax.random.normal(key, ir.shape, ir.dtype)


def _noise_cost(ir_shape: tuple[int, int, int], strength: float) -> tuple[int, int]:
  """The draw, the RMS and the addition in MAC-equivalents (:data:`NOISE_OPS_PER_ELEMENT`)."""
  del strength
  return int(np.prod(ir_shape)) * NOISE_OPS_PER_ELEMENT + NOISE_OPS_PER_IMAGE, 0


def _bottleneck_init(key: jax.Array, irs: jax.Array, strength: float) -> Params:
  """The best rank-k linear code of the sample (PCA over pixels): the bottleneck starts
  as the projection on the ``k`` principal directions of the IR's channels, its inverse
  as the transposed projection, so fine-tuning starts from the least lossy 1x1 code."""
  del key
  k = int(strength)
  z = irs.reshape(-1, irs.shape[-1]).astype(jnp.float32)
  mean = z.mean(0)
  cov = (z - mean).T @ (z - mean) / z.shape[0]
  _, vecs = jnp.linalg.eigh(cov)
  basis = vecs[:, ::-1][:, :k]  # (c, k), largest variance first
  return {"encode": {"kernel": basis, "bias": -mean @ basis},
          "decode": {"kernel": basis.T, "bias": mean}}


def _bottleneck_send(params: Params, ir: jax.Array, key: jax.Array, strength: float) -> jax.Array:
  del key, strength
  p = params["encode"]
  return jnp.einsum("nhwc,ck->nhwk", ir, p["kernel"],
                    precision=jax.lax.Precision.HIGHEST) + p["bias"]


def _bottleneck_receive(params: Params, message: jax.Array, strength: float) -> jax.Array:
  del strength
  p = params["decode"]
  return jnp.einsum("nhwk,kc->nhwc", message, p["kernel"],
                    precision=jax.lax.Precision.HIGHEST) + p["bias"]


def _bottleneck_channels(channels: int, strength: float) -> int:
  del channels
  return int(strength)


def _bottleneck_cost(ir_shape: tuple[int, int, int], strength: float) -> tuple[int, int]:
  h, w, c = ir_shape
  k = int(strength)
  return h * w * c * k, c * k + k


register(Defense("adversarial", init=_no_params, send=_identity_send, receive=_identity_receive,
                 penalty=_no_penalty, message_channels=_same_channels, edge_layer=_free,
                 strength_range=(0.0, 1e4), adversarial=True))
register(Defense("dcor", init=_no_params, send=_identity_send, receive=_identity_receive,
                 penalty=_dcor_penalty, message_channels=_same_channels, edge_layer=_free,
                 strength_range=(0.0, 1e4)))
register(Defense("bottleneck", init=_bottleneck_init, send=_bottleneck_send,
                 receive=_bottleneck_receive, penalty=_no_penalty,
                 message_channels=_bottleneck_channels, edge_layer=_bottleneck_cost,
                 strength_range=(1, 4096), integer_strength=True, signed=True))
register(Defense("noise", init=_no_params, send=_noise_send, receive=_identity_receive,
                 penalty=_no_penalty, message_channels=_same_channels, edge_layer=_noise_cost,
                 strength_range=(0.0, 100.0), signed=True))


# ------------------------------------------------------------------------------ stacks

@dataclasses.dataclass(frozen=True)
class Stack:
  """Defenses applied together, in order: ``((name, strength), ...)`` (hashable, static)."""

  items: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    names = [n for n, _ in self.items]
    for name in names:
      get_defense(name)
    if len(set(names)) != len(names):
      raise ValueError(f"a defense appears twice in {self.spec()!r}")

  @property
  def defenses(self) -> list[tuple[Defense, float]]:
    return [(get_defense(n), s) for n, s in self.items]

  @property
  def adversarial_weight(self) -> float:
    """α of the ``adversarial`` defense in the stack, 0 without one."""
    return sum(s for d, s in self.defenses if d.adversarial)

  @property
  def signed(self) -> bool:
    """Whether the message can be negative (quantized on ``[-c, c]``)."""
    return any(d.signed for d, _ in self.defenses)

  def spec(self) -> str:
    """The stack as :func:`parse_stack` reads it (``"none"`` when empty)."""
    return ",".join(f"{n}:{s:g}" for n, s in self.items) or "none"

  def check(self, ir_shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless every strength is legal for an IR of ``ir_shape``."""
    c = int(ir_shape[-1])
    for d, s in self.defenses:
      d.check_strength(s, c)
      c = d.message_channels(c, s)

  def init(self, key: jax.Array, irs: jax.Array) -> list[Params]:
    """Parameters of every defense, each from the sample its predecessors send."""
    params, x = [], irs
    for (d, s), k in zip(self.defenses, self._keys(key)):
      params.append(d.init(k, x, s))
      x = d.send(params[-1], x, k, s)
    return params

  def _keys(self, key: jax.Array) -> jax.Array:
    """One key per defense (``init`` and ``send`` draw the same way)."""
    return jax.random.split(key, max(len(self.items), 1))

  def check_params(self, params: list[Params]) -> None:
    """Raises ``ValueError`` unless there is one parameter set per defense."""
    if len(params) != len(self.items):
      raise ValueError(f"{len(params)} parameter sets for the {len(self.items)} defenses of "
                       f"{self.spec()!r}: initialize them with this stack's init")

  def send(self, params: list[Params], ir: jax.Array, key: jax.Array) -> jax.Array:
    """The message the device sends for an IR (before it is quantized)."""
    self.check_params(params)
    for (d, s), p, k in zip(self.defenses, params, self._keys(key)):
      ir = d.send(p, ir, k, s)
    return ir

  def receive(self, params: list[Params], message: jax.Array) -> jax.Array:
    """What the cloud part's first block gets from a message."""
    self.check_params(params)
    for (d, s), p in reversed(list(zip(self.defenses, params))):
      message = d.receive(p, message, s)
    return message

  def penalty(self, images: jax.Array, message: jax.Array) -> jax.Array:
    """The sum of the defenses' loss terms (without the adversarial one)."""
    return sum((d.penalty(images, message, s) for d, s in self.defenses),
               jnp.zeros((), jnp.float32))

  def message_shape(self, ir_shape: Sequence[int]) -> tuple[int, int, int]:
    h, w, c = (int(v) for v in ir_shape)
    for d, s in self.defenses:
      c = d.message_channels(c, s)
    return h, w, c

  def edge_layers(self, ir_shape: Sequence[int]) -> list[dict[str, Any]]:
    """The work each defense adds on the device: ``{"defense", "macs", "params",
    "in_elems"}`` per defense that costs anything."""
    out, shape = [], tuple(int(v) for v in ir_shape)
    for d, s in self.defenses:
      macs, params = d.edge_layer(shape, s)
      if macs or params:
        out.append({"defense": d.name, "macs": int(macs), "params": int(params),
                    "in_elems": int(np.prod(shape))})
      shape = (*shape[:2], d.message_channels(shape[2], s))
    return out


def parse_stack(spec: str) -> Stack:
  """``"bottleneck:8,adversarial:30"`` -> a :class:`Stack`; ``""`` or ``"none"``: no defense."""
  spec = spec.strip()
  if spec in ("", "none"):
    return Stack()
  items = []
  for part in spec.split(","):
    name, sep, value = part.strip().partition(":")
    if not sep:
      raise ValueError(f"defense {part!r} has no strength: write name:strength, "
                       f"e.g. 'noise:0.5' (registered: {sorted(DEFENSES)})")
    try:
      strength = float(value)
    except ValueError:
      raise ValueError(f"defense {name!r} has strength {value!r}, not a number") from None
    get_defense(name).check_strength(strength)
    items.append((name, strength))
  return Stack(tuple(items))


# ------------------------------------------------------------------------------ costs

@dataclasses.dataclass(frozen=True)
class SplitCosts:
  """What a stack adds at every split ``q`` (index ``q - 1``): whether it can run there
  (its strengths are legal for that IR), the MACs, parameters and inputs of its device
  layers, and the elements of the message."""

  legal: np.ndarray
  macs: np.ndarray
  params: np.ndarray
  in_elems: np.ndarray
  message_elems: np.ndarray


@functools.lru_cache(maxsize=64)
def split_costs(info: ModelInfo, stack: Stack) -> SplitCosts:
  """:class:`SplitCosts` of ``stack`` on the IR of every split of ``info`` (kept per model
  and stack: every evaluated batch of a search reads them)."""
  rows = []
  for block in info.blocks[:info.max_split]:
    try:
      stack.check(block.out_shape)
    except ValueError:
      rows.append((False, 0, 0, 0, 0))
      continue
    layers = stack.edge_layers(block.out_shape)
    rows.append((True, *(sum(l[k] for l in layers) for k in ("macs", "params", "in_elems")),
                 int(np.prod(stack.message_shape(block.out_shape)))))
  legal, macs, params, in_elems, sent = zip(*rows)
  return SplitCosts(np.asarray(legal), *(np.asarray(v, np.float64)
                                         for v in (macs, params, in_elems, sent)))


def population_costs(info: ModelInfo, genomes: Genome, stack: Stack,
                     device: DeviceConfig = DeviceConfig(), transmission: bool = True
                     ) -> tuple[Energy, Latency]:
  """Edge energy and latency of defended genomes (leading axis; traced ``p`` allowed).

  The undefended edge's layers (Eq. 8), plus every layer a defense adds, charged as a
  layer at the IR's bits (weights and inputs), plus sending the *message*: its elements
  at the IR's bits (a bottleneck sends fewer channels). A genome whose split the stack
  cannot run at (:func:`split_costs`) costs infinite energy and time.
  """
  t = split_costs(info, stack)
  i = genomes.p - 1
  bits = jax.vmap(lambda g: effective_bits(info, g)[2])(genomes).astype(jnp.float32)
  base = population_energy(info, genomes, device, transmission=False)
  base_time = population_latency(info, genomes, device)
  extra_pj, extra_s = layer_costs(jnp.asarray(t.macs)[i], jnp.asarray(t.params)[i],
                                  jnp.asarray(t.in_elems)[i], bits, bits, device)
  tx_mj, tx_ms = link_cost(jnp.asarray(t.message_elems, jnp.float32)[i] * bits, device)
  legal = jnp.asarray(t.legal)[i]
  energy = Energy(jnp.where(legal, base.compute_mj + extra_pj / PJ_PER_MJ, jnp.inf),
                  tx_mj if transmission else jnp.zeros_like(tx_mj))
  latency = Latency(jnp.where(legal, base_time.compute_ms + extra_s * 1e3, jnp.inf), tx_ms)
  return energy, latency


def defended_energy(info: ModelInfo, genome: Genome, stack: Stack,
                    device: DeviceConfig = DeviceConfig(), transmission: bool = True) -> Energy:
  """:func:`population_costs`' energy of one genome (concrete ``genome.p``); a stack that
  cannot run at its split is refused by name."""
  p = info.check_split(int(genome.p))
  stack.check(info.blocks[p - 1].out_shape)
  energy, _ = population_costs(info, jax.tree.map(lambda x: x[None], genome), stack, device,
                               transmission)
  return jax.tree.map(lambda x: x[0], energy)


def message_bits(info: ModelInfo, genome: Genome, stack: Stack) -> jax.Array:
  """Bits of the message a defended genome sends: its elements at the IR's bits."""
  p = info.check_split(int(genome.p))
  _, _, ir_bits = effective_bits(info, genome)
  return jnp.float32(np.prod(stack.message_shape(info.blocks[p - 1].out_shape))) * ir_bits


# ------------------------------------------------------------------------- generic checks

class DefenseCheckError(AssertionError):
  """A defense failed one of the generic checks; the message says which and why."""


CHECK_IR_SHAPE = (6, 6, 8)
"""The IR the checks run on: a batch of 5 such non-negative IRs."""


def check_defense(defense: Defense, strength: float | None = None) -> None:
  """Runs the generic checks on ``defense`` at ``strength`` (default: a mid-range value).

  It passes when its strength range is legal; ``init`` and ``send`` are pure (the same key
  gives the same result) and compile under ``jax.jit``; the message has the shape
  ``message_channels`` declares and is finite; ``receive`` returns the IR's shape; the
  penalty is a finite scalar with finite gradients through ``send``; the edge cost is
  non-negative whole numbers; and strength 0 (where legal) changes nothing that is sent.
  Raises :class:`DefenseCheckError`.
  """
  lo, hi = defense.strength_range
  if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
    raise DefenseCheckError(f"{defense.name}: strength_range {defense.strength_range} is not "
                            "a finite range of non-negative numbers")
  if strength is None:
    strength = min(max(lo, 4.0 if defense.integer_strength else 0.5), hi)
  try:
    _check(defense, float(strength))
  except DefenseCheckError as e:
    raise DefenseCheckError(f"{defense.name} at strength {strength:g}: {e}") from None
  except Exception as e:  # a crash is a failed check too
    raise DefenseCheckError(f"{defense.name} at strength {strength:g} failed: "
                            f"{type(e).__name__}: {e}") from e


def _require(ok: Any, message: str) -> None:
  if not bool(ok):
    raise DefenseCheckError(message)


def _check(d: Defense, s: float) -> None:
  d.check_strength(s, CHECK_IR_SHAPE[-1])
  irs = jax.nn.relu(jax.random.normal(jax.random.key(0), (5, *CHECK_IR_SHAPE)))
  images = jax.random.uniform(jax.random.key(1), (5, 12, 12, 3))
  key = jax.random.key(2)
  params = d.init(key, irs, s)
  again = d.init(key, irs, s)
  _require(_same(params, again), "init is not a pure function of its key and sample")
  msg = d.send(params, irs, key, s)
  _require(_same(msg, d.send(params, irs, key, s)), "send is not a pure function of its key")
  # compiled and eager programs may round differently (XLA fuses), not more
  _require(np.allclose(msg, jax.jit(d.send, static_argnums=3)(params, irs, key, s),
                       rtol=1e-5, atol=1e-6), "send gives other values under jax.jit")
  shape = (*CHECK_IR_SHAPE[:2], d.message_channels(CHECK_IR_SHAPE[2], s))
  _require(msg.shape == (5, *shape), f"send gives {msg.shape}; message_channels says "
                                      f"{(5, *shape)}")
  _require(np.all(np.isfinite(np.asarray(msg))), "the message is not finite")
  back = jax.jit(d.receive, static_argnums=2)(params, msg, s)
  _require(back.shape == irs.shape, f"receive gives {back.shape}, not the IR's {irs.shape}")
  pen, grad = jax.value_and_grad(
      lambda x: d.penalty(images, d.send(params, x, key, s), s))(irs)
  _require(jnp.shape(pen) == () and np.isfinite(float(pen)),
           f"penalty is not a finite scalar: {pen}")
  _require(np.all(np.isfinite(np.asarray(grad))), "penalty has non-finite gradients")
  macs, n_params = d.edge_layer(CHECK_IR_SHAPE, s)
  _require(all(isinstance(v, (int, np.integer)) and v >= 0 for v in (macs, n_params)),
           f"edge_layer gives {(macs, n_params)}, not two non-negative ints")
  if d.strength_range[0] == 0 and not d.integer_strength:
    p0 = d.init(key, irs, 0.0)
    _require(_same(d.send(p0, irs, key, 0.0), irs) and float(d.penalty(images, irs, 0.0)) == 0,
             "strength 0 changes the message or the loss")


def _same(a: Any, b: Any) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))
