"""Fitness of genomes (docs/method.md §6-7, Eq. 10-12), evaluated K candidates at a time.

``F = P · punish(λ1, E, E_b) · punish(λ2, ε, ε_b)`` with
``punish(λ, v, b) = λ^(v/b − 1)`` if ``v > b`` else 1, where

* ``E`` is the analytic edge energy (:mod:`maxpart_jax.energy`), of the searched
  model or of an ``energy_info`` stand-in with the same layers (a narrow model
  searched on a CPU can be charged the energy of its paper-size original);
* ``ε = acc_float − acc_quant``: validation accuracy of the pre-trained float model
  minus that of the model fine-tuned with its edge fake-quantized by the genome
  (SGD, lr 1e-3, momentum 0.9; one epoch unless ``finetune_steps`` says otherwise);
* ``P`` is the mean privacy of the quantized IR at split ``p`` on a fixed set of
  validation images, computed with the fine-tuned weights (**Decision**: the model
  that would be deployed).

The K candidates of a step are fine-tuned together: their variables are stacked on
a leading candidate axis placed split over all devices (``NamedSharding``), and jit
partitions the work along it, so on 8 TPU cores 8 candidates train at once. The
candidates of a device are taken one per call or ``jax.vmap``-ped into one
computation (``candidate_loop``). All candidates see the same batches, so a genome's
fitness does not depend on which other genomes share its step, up to float rounding:
with ``vmap``, or on another device count or pipeline, the same genome's fine-tuned
weights can differ in their last bits, and an 8-bit IR code on a rounding boundary then
flips by one step (privacy moves by ~1e-3; the tests bound it). With the default
``map`` on a fixed device count, a genome's metrics repeat bit for bit. A candidate whose
fine-tuning diverges (non-finite loss or weights) gets fitness 0; one whose privacy is not
finite too, and one whose IR collapsed (every channel constant) is marked.

With ``pipeline="fused"`` (the default on GPUs and TPUs) the training and
validation images sit on the devices as uint8, and the whole fine-tuning, the
validation accuracy and the privacy score are one compiled program each: nothing
goes back to the host between steps. ``device`` (the default on CPUs, where XLA
compiles loops of convolutions badly) makes the same batches on the devices with
one call per step; ``host`` is the old step-by-step loop with numpy batches. All
see the same batches (:mod:`maxpart_jax.data`). ``compute_dtype`` and
``matmul_precision`` set the numerics of convolutions and matmuls
(:class:`~maxpart_jax.models.layers.Numerics`).

The compiled programs are module-level functions whose model, dataset and metric are
static arguments, so every evaluator of equal settings in a process shares them: a
resumed search, the baselines after a search or the next seed of a study compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxpart_jax import distributed, data, privacy
from maxpart_jax.energy import DeviceConfig, population_energy, population_latency
from maxpart_jax.privacy.defenses import Stack, population_costs, split_costs
from maxpart_jax.genome import Genome, to_policy
from maxpart_jax.models import SplitModel, Variables
from maxpart_jax.models.layers import resolve_numerics
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.privacy import attacks
from maxpart_jax.quant import QuantPolicy, check_activation_levels
from maxpart_jax.train import (PIPELINES, Progress, StepRunner, TrainState, TrainStep,
                               count_correct, resolve_pipeline)


ATTACK_METRIC = "attack_ssim"
"""The privacy metric measured by an inversion attack (:func:`attack_privacy`)."""


@dataclasses.dataclass(frozen=True)
class FitnessConfig:
  """Everything the fitness of a genome depends on besides the genome.

  Attributes:
    eps_bound: accuracy-loss bound ε_b (fraction, e.g. 0.03).
    lambda_energy, lambda_accuracy: λ1 and λ2 of Eq. 12, in (0, 1).
    lambda_latency: the same punishment for latency above ``device.latency_bound_ms``
      (a third factor of Eq. 11, only when that bound is set).
    device: energy constants, the budget E_b, speed, link and latency bound.
    transmission: count the energy of sending the IR.
    finetune_steps: SGD steps of fine-tuning per candidate (None: one epoch).
    finetune_lr, finetune_momentum, batch_size: the fine-tuning optimizer.
    metric, normalization: the privacy score: one of :data:`privacy.METRICS` (the
      paper's P), or ``attack_ssim``: 1 − SSIM of what a learned decoder reconstructs from
      the candidate's IR (:func:`attack_privacy`; the expensive, honest option).
    attack: how the ``attack_ssim`` attacker trains its decoders.
    attack_images: the attacker's own images (drawn from the training split, disjoint
      from the validation images the privacy is measured on).
    per_channel: per-channel weight quantization.
    activation_levels: ``paper`` (Eq. 5's step for every activation) or ``unsigned``
      (all 2^b codes for non-negative activations); see :mod:`maxpart_jax.quant`.
    seed: the fine-tuning data order.
    candidate_loop: how a device runs its candidates: ``vmap`` (all in one batched
      computation, where convolutions become grouped convolutions) or ``map`` (one per
      device per call, calls in a loop). ``auto`` is ``map``: measured faster or equal on
      CPUs (17x) and on an H200 (per candidate, K=1: 1.21 s of fine-tuning, vmapped
      K=4/8/16: 1.64/1.34/1.27 s; ``results/benchmarks/README.md``).
    compute_dtype: ``float32``, ``bfloat16`` or ``auto`` (bfloat16 on GPU/TPU, float32
      on CPU) for convolutions and matmuls.
    matmul_precision: precision of float32 operands (``highest``: true float32).
    pipeline: ``fused``, ``device``, ``host`` or ``auto`` (``fused`` on GPU/TPU, ``device``
      on CPU); see the module docstring.
  """

  eps_bound: float = 0.03
  lambda_energy: float = 0.1
  lambda_accuracy: float = 0.1
  lambda_latency: float = 0.1
  device: DeviceConfig = DeviceConfig()
  transmission: bool = True
  finetune_steps: int | None = None
  finetune_lr: float = 1e-3
  finetune_momentum: float = 0.9
  batch_size: int = 128
  metric: str = "mse"
  normalization: str = "zscore"
  per_channel: bool = False
  activation_levels: str = "paper"
  seed: int = 0
  candidate_loop: str = "auto"
  compute_dtype: str = "auto"
  matmul_precision: str = "highest"
  pipeline: str = "auto"
  attack: attacks.DecoderConfig = attacks.DecoderConfig(steps=300)
  attack_images: int = 2000

  def __post_init__(self):
    for name in ("lambda_energy", "lambda_accuracy", "lambda_latency"):
      if not 0.0 < getattr(self, name) < 1.0:
        raise ValueError(f"{name} (λ) must be in (0, 1), got {getattr(self, name)}")
    if self.eps_bound <= 0:
      raise ValueError(f"the accuracy-loss bound must be > 0, got {self.eps_bound}")
    if self.finetune_steps is not None and self.finetune_steps < 0:
      raise ValueError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
    if self.candidate_loop not in ("auto", "vmap", "map"):
      raise ValueError(f"candidate_loop must be auto, vmap or map, got {self.candidate_loop!r}")
    if self.metric not in (*privacy.METRICS, ATTACK_METRIC):
      raise ValueError(f"unknown privacy metric {self.metric!r}; choose from "
                       f"{(*privacy.METRICS, ATTACK_METRIC)}")
    if self.attack_images < 1:
      raise ValueError(f"attack_images must be >= 1, got {self.attack_images}")
    if self.pipeline not in PIPELINES:
      raise ValueError(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
    check_activation_levels(self.activation_levels)
    # Checks both names; the platform only decides what "auto" becomes.
    resolve_numerics(self.compute_dtype, self.matmul_precision, "cpu")


def punish(lam: float, value: jax.Array, bound: float) -> jax.Array:
  """``λ^(v/b − 1)`` above the bound, 1 within it (Eq. 12)."""
  return jnp.where(value > bound, jnp.power(lam, value / bound - 1.0), 1.0)


def combine(privacy_: jax.Array, energy: jax.Array, eps: jax.Array, config: FitnessConfig,
            latency: jax.Array | None = None) -> jax.Array:
  """Eq. 11: privacy times the energy and accuracy punishments (and the latency one when
  ``config.device.latency_bound_ms`` is set; then ``latency`` in ms is required)."""
  fitness = (privacy_ * punish(config.lambda_energy, energy, config.device.budget_mj)
             * punish(config.lambda_accuracy, eps, config.eps_bound))
  bound = config.device.latency_bound_ms
  if bound > 0:
    if latency is None:
      raise ValueError("a latency bound is set (device.latency_bound_ms): combine needs latency")
    fitness = fitness * punish(config.lambda_latency, latency, bound)
  return fitness


def violations(metrics: dict[str, float], config: FitnessConfig) -> list[str]:
  """The constraints of Eq. 4 that evaluated ``metrics`` break; empty: feasible.

  Feasible means a finite fitness, no divergence, ``E < E_b`` and ``ε < ε_b`` (and
  latency below ``device.latency_bound_ms`` when that is set). The
  fitness only *punishes* a violation (Eq. 12), so the genome with the highest fitness
  can be infeasible; the search reports the best feasible one (docs/method.md §7).
  """
  out = []
  if metrics["diverged"]:
    out.append("diverged during fine-tuning")
  elif metrics.get("failed") or not math.isfinite(metrics["fitness"]):
    out.append("non-finite privacy or fitness")
  if metrics.get("collapsed"):
    out.append("the edge collapsed: every IR channel is constant in every image")
  if not metrics["energy_mj"] < config.device.budget_mj:
    out.append(f"E = {metrics['energy_mj']:.4f} mJ >= E_b = {config.device.budget_mj} mJ")
  if not metrics["eps"] < config.eps_bound:
    out.append(f"ε = {metrics['eps']:.4f} >= ε_b = {config.eps_bound}")
  bound = config.device.latency_bound_ms
  if bound > 0 and not metrics["latency_ms"] < bound:
    out.append(f"latency {metrics['latency_ms']:.3f} ms >= bound {bound} ms")
  return out


# Violation of a candidate that failed (diverged, non-finite, collapsed): worse than any
# breach of the bounds, so constraint domination ranks it last.
FAILED_VIOLATION = 1e6


def violation_degree(metrics: dict[str, np.ndarray], config: FitnessConfig) -> np.ndarray:
  """How far each candidate is from Eq. 4's feasible set, for constraint domination.

  0 exactly when :func:`violations` is empty; else the relative excess over the bounds,
  ``(E - E_b) / E_b + (ε - ε_b) / ε_b`` (+ the latency's) over the broken ones (each at
  least 1e-6, so a value on the bound counts as broken), or :data:`FAILED_VIOLATION` for a
  failed candidate.
  """
  energy = np.asarray(metrics["energy_mj"], np.float64)
  eps = np.asarray(metrics["eps"], np.float64)

  def excess(value, bound):
    with np.errstate(invalid="ignore"):
      return np.where(value < bound, 0.0, (value - bound) / bound + 1e-6)

  over = excess(energy, config.device.budget_mj) + excess(eps, config.eps_bound)
  if config.device.latency_bound_ms > 0:
    over = over + excess(np.asarray(metrics["latency_ms"], np.float64),
                         config.device.latency_bound_ms)
  failed = (np.asarray(metrics["diverged"], bool) | np.asarray(metrics["failed"], bool)
            | np.asarray(metrics["collapsed"], bool)
            | ~np.isfinite(np.asarray(metrics["fitness"], np.float64))
            | ~np.isfinite(energy) | ~np.isfinite(eps))
  return np.where(failed, FAILED_VIOLATION, over)


def check_same_layers(info: ModelInfo, other: ModelInfo) -> None:
  """Raises ``ValueError`` unless ``other`` has the blocks and layers of ``info``.

  A genome of one model then means the same deployment on the other, which may
  differ in width (channels) only.
  """
  mine = [(l.block, l.kind, l.quantizable) for l in info.layers]
  theirs = [(l.block, l.kind, l.quantizable) for l in other.layers]
  if mine != theirs or info.max_split != other.max_split:
    raise ValueError(f"the energy model ({other.num_layers} layers, {len(other.blocks)} blocks) "
                     f"does not have the layers of the searched model ({info.num_layers} layers, "
                     f"{len(info.blocks)} blocks)")


def candidate_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh whose single axis ``candidates`` spans ``devices`` (default: all)."""
  return Mesh(np.array(devices if devices is not None else jax.devices()), ("candidates",))


# The evaluator's compiled programs. Model, dataset and metric are static arguments, so
# evaluators of equal settings (a resumed search, the baselines after a search, the seeds of
# a study) share the compilations.

@functools.partial(jax.jit, static_argnums=(0, 1))
def _count_correct_each(model: SplitModel, dataset: str, variables: Variables, policies: Any,
                        images: jax.Array, labels: jax.Array) -> jax.Array:
  """(K,) correct predictions of candidate-stacked variables and policies on one batch
  (float images, or uint8 ones normalized here)."""
  if images.dtype == jnp.uint8:
    images = data.normalize_on_device(images, dataset)
  count = lambda v, policy: count_correct(model, v, images, labels, policy)
  return jax.vmap(count)(variables, policies)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _count_correct_scan(model: SplitModel, dataset: str, variables: Variables, policies: Any,
                        images: jax.Array, labels: jax.Array) -> jax.Array:
  """:func:`_count_correct_each` summed over stacked batches, in one program."""
  k = jax.tree.leaves(variables)[0].shape[0]
  body = lambda total, batch: (
      total + _count_correct_each(model, dataset, variables, policies, *batch), None)
  return jax.lax.scan(body, jnp.zeros((k,), jnp.int32), (images, labels))[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def privacy_all_splits(model: SplitModel, metric: str, normalization: str,
                        variables: Variables, policies: Any, x: jax.Array,
                        images: jax.Array) -> jax.Array:
  """(K, max_split, 2): for each candidate, at every split, the mean privacy over
  ``images`` and whether the IR collapsed (every channel constant in every image)."""

  def scores(variables, policy):
    h, out = x, []
    for q in range(1, model.info.max_split + 1):
      h = model.apply(variables, h, start=q - 1, stop=q, policy=policy)
      out.append(jnp.stack([
          jnp.mean(privacy.privacy_score(images, h, metric, normalization=normalization)),
          jnp.all(privacy.flat_channels(h)).astype(jnp.float32)]))
    return jnp.stack(out)

  return jax.vmap(scores)(variables, policies)


@jax.jit
def _all_finite(params: Any, loss: jax.Array) -> jax.Array:
  """(K,): whether each candidate's loss and weights are finite, as one program."""
  leaves = [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
            for x in jax.tree.leaves(params)]
  return functools.reduce(jnp.logical_and, leaves, jnp.isfinite(loss))


class Evaluator:
  """Evaluates batches of genomes for one model, dataset and fitness config.

  Host-side object that owns the data on the devices and calls the compiled,
  candidate-vmapped programs; :meth:`evaluate` maps ``Genome`` (K, ...) to per-candidate
  metrics.
  """

  def __init__(self, model: SplitModel, variables: Variables, train: data.Split,
               val: data.Split, privacy_images: np.ndarray, config: FitnessConfig,
               mesh: Mesh | None = None, val_batch_size: int = 500,
               candidates_per_call: int = 1, energy_info: ModelInfo | None = None,
               stack: Stack = Stack()):
    self.mesh = mesh or candidate_mesh()
    self.num_devices = self.mesh.devices.size
    platform = self.mesh.devices.flat[0].platform
    self.numerics = resolve_numerics(config.compute_dtype, config.matmul_precision, platform)
    self.pipeline = resolve_pipeline(config.pipeline, platform)
    self.model, self.variables, self.config = model.with_numerics(self.numerics), variables, config
    self.energy_info = energy_info or model.info
    check_same_layers(model.info, self.energy_info)
    self.stack = stack
    # (max_split,): the splits the stack can run at, on the searched model (whose IRs stage 2
    # defends) and on the energy stand-in (whose layers are charged): they may differ in width.
    self.stack_legal = (split_costs(model.info, stack).legal
                        & split_costs(self.energy_info, stack).legal)
    if stack.items:
      illegal = [int(q) + 1 for q in np.flatnonzero(~self.stack_legal)]
      if illegal:
        logging.info("defenses %s cannot run at splits %s (their IR is too narrow on the "
                     "searched or the energy model): those candidates cost infinite energy",
                     stack.spec(), illegal)
    self.train, self.val, self.val_batch_size = train, val, val_batch_size
    self.privacy_images = np.asarray(privacy_images, np.float32)
    # Fixed inputs go to the devices once, not once per evaluation.
    self._privacy_inputs = self._replicated(
        (data.normalize(self.privacy_images, train.dataset), self.privacy_images))
    loop = "map" if config.candidate_loop == "auto" else config.candidate_loop
    self.candidate_loop = loop
    # Every compiled call sees exactly `chunk` candidates (a multiple of the device count),
    # so a step whose cache hits leave fewer genomes to evaluate does not recompile.
    # "map" runs one candidate per device per call and loops over calls.
    per_call = 1 if loop == "map" else max(candidates_per_call, 1)
    self.chunk = -(-per_call // self.num_devices) * self.num_devices
    self.steps = (config.finetune_steps if config.finetune_steps is not None else
                  data.steps_per_epoch(len(train), config.batch_size, drop_remainder=True))
    step = TrainStep(self.model, optax.sgd, (config.finetune_lr, config.finetune_momentum),
                     candidates=True)
    # Every candidate sees these batches (the first `steps` of epochs 0, 1, ...).
    self.draws = data.draws_for_steps(len(train), config.batch_size, self.steps, seed=config.seed)
    self._run_steps = StepRunner(step, train, self.pipeline,
                                 NamedSharding(self.mesh, PartitionSpec()))
    self.seconds = {"finetune": 0.0, "accuracy": 0.0, "privacy": 0.0}
    self.float_accuracy = self.float_accuracy_on()
    self.decoders: dict[tuple[int, int], attacks.TrainedDecoder] = {}
    if config.metric == ATTACK_METRIC:
      if jax.process_count() > 1:
        raise ValueError("fitness.metric=attack_ssim scores one candidate at a time on this "
                         "process's devices: it does not run across several processes")
      if config.attack_images > len(train):
        raise ValueError(f"attack_images={config.attack_images} is more than the {len(train)} "
                         "training images the attacker draws its own from; lower it")
      self.attack_images = train.take(config.attack_images, seed=config.seed).float_images()

  # --- sharding helpers -------------------------------------------------------

  def _candidates(self, tree: Any) -> Any:
    """Places a candidate-stacked pytree with its leading axis split over devices."""
    return jax.device_put(distributed.for_global_put(tree),
                          NamedSharding(self.mesh, PartitionSpec("candidates")))

  def _replicated(self, tree: Any) -> Any:
    return jax.device_put(distributed.for_global_put(tree), NamedSharding(self.mesh, PartitionSpec()))

  # --- compiled per-candidate programs ---------------------------------------------
  # The module-level programs below, vmapped over the candidate axis; candidate-stacked
  # inputs are placed split over the mesh (:meth:`_candidates`), so jit partitions the work
  # over devices.

  # --- evaluation ------------------------------------------------------------

  def _stacked_variables(self) -> Variables:
    """``chunk`` candidate-sharded copies of the pre-trained variables."""
    return self._candidates(
        jax.tree.map(lambda x: jnp.broadcast_to(x, (self.chunk, *x.shape)), self.variables))

  def float_accuracy_on(self, split: data.Split | None = None) -> float:
    """Top-1 accuracy of the pre-trained float model on ``split`` (default: val)."""
    return float(self.accuracy(self._stacked_variables(), None, split)[0])

  def _device_batches(self, split: data.Split) -> Any:
    """``split`` on the devices, replicated, as the pipeline reads it: stacked uint8
    batches (``fused``), a list of uint8 batches (``device``) or of normalized float
    batches (``host``)."""
    if self.pipeline == "host":
      batches = [(b["image"], b["label"])
                 for b in data.iterate_batches(split, self.val_batch_size, train=False)]
    else:
      # As few batches as val_batch_size allows, evened out so that padding stays small.
      num_batches = -(-len(split) // self.val_batch_size)
      images, labels = data.eval_arrays(split, -(-len(split) // num_batches))
      batches = (images, labels) if self.pipeline == "fused" else list(zip(images, labels))
    return self._replicated(batches)

  @functools.cached_property
  def _val_batches(self) -> Any:
    """The validation split on the devices, kept: every candidate is scored on it."""
    return self._device_batches(self.val)

  def accuracy(self, variables: Variables, policies: Any, split: data.Split | None = None) -> np.ndarray:
    """(K,) top-1 accuracy of candidate-stacked ``variables`` on ``split`` (default: val)."""
    batches = self._val_batches if split is None else self._device_batches(split)
    dataset = self.train.dataset
    if self.pipeline == "fused":
      correct = _count_correct_scan(self.model, dataset, variables, policies, *batches)
    else:
      correct = 0
      for images, labels in batches:
        correct = correct + _count_correct_each(self.model, dataset, variables, policies,
                                                images, labels)
    return distributed.to_host(correct) / len(split or self.val)

  def costs(self, genomes: Genome) -> tuple[np.ndarray, np.ndarray]:
    """(K,) edge energy (mJ) and latency (ms) of ``genomes`` on the energy model, with the
    defenses' layers and message when the search has a defense stack
    (:func:`maxpart_jax.privacy.defenses.population_costs`); infinite at a split where the
    stack cannot run on the searched model or the stand-in (:attr:`stack_legal`)."""
    if not self.stack.items:
      energy = population_energy(self.energy_info, genomes, self.config.device,
                                 self.config.transmission)
      latency = population_latency(self.energy_info, genomes, self.config.device)
      return np.asarray(energy.total_mj), np.asarray(latency.total_ms)
    energy, latency = population_costs(self.energy_info, genomes, self.stack,
                                       self.config.device, self.config.transmission)
    legal = self.stack_legal[np.asarray(genomes.p) - 1]
    return (np.where(legal, np.asarray(energy.total_mj), np.inf),
            np.where(legal, np.asarray(latency.total_ms), np.inf))

  def policies(self, genomes: Genome) -> Any:
    """Candidate-sharded quantization policies of K genomes."""
    return self._candidates(
        jax.vmap(lambda g: to_policy(self.model.info, g, self.config.per_channel,
                                     self.config.activation_levels))(genomes))

  def pad(self, genomes: Genome) -> Genome:
    """Repeats the last genome so that K is a multiple of the compiled chunk size."""
    pad = -int(genomes.p.shape[0]) % self.chunk
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, 0)]), genomes)

  def warm_up(self, genomes: Genome) -> None:
    """Runs what :meth:`evaluate` runs for ``genomes`` (every compilation included) with
    one fine-tuning step instead of all: benchmarks time compilation and work apart."""
    seconds = dict(self.seconds)
    self._evaluate_chunk(self.pad(jax.tree.map(lambda x: x[:self.chunk], genomes)), None,
                         finetune=True, steps=min(self.steps, 1))
    self.seconds = seconds

  def finetune(self, genomes: Genome, policies: Any = None,
               steps: int | None = None) -> tuple[Variables, np.ndarray]:
    """Fine-tunes one copy of the model per genome; returns stacked variables, diverged (K,).

    ``policies``: :meth:`policies` of ``genomes``, if the caller has them already.
    ``steps``: run only the first ``steps`` of the configured fine-tuning steps.
    """
    steps = self.steps if steps is None else min(steps, self.steps)
    k = genomes.p.shape[0]
    policies = self.policies(genomes) if policies is None else policies
    stack = lambda x: jnp.broadcast_to(x, (k, *x.shape))
    params = jax.tree.map(stack, self.variables["params"])
    state = TrainState(step=jnp.zeros((k,), jnp.int32), params=params,
                       batch_stats=jax.tree.map(stack, self.variables["batch_stats"]),
                       opt_state=jax.vmap(self._run_steps.step_fn.tx.init)(params))
    state = self._candidates(state)
    loss = jnp.zeros((k,), jnp.float32)
    if steps:
      state, sums = self._run_steps(state, self.draws, 0, steps, policies)
      loss = sums["loss"]  # a non-finite loss at any step makes the sum so
    # Wait for the fine-tuning before the next multi-device program: on the CPU backend
    # two such programs in flight can starve each other's collectives of worker threads
    # (seen with 8 emulated devices: an all-gather waiting forever for its last participant).
    jax.block_until_ready(state)
    return state.variables, ~distributed.to_host(_all_finite(state.params, loss))

  def decoder(self, split: int, ir_bits: int) -> attacks.TrainedDecoder:
    """The ``attack_ssim`` attacker's decoder for IRs cut at ``split`` and quantized to
    ``ir_bits``, trained on the first call and kept (one decoder, leading axis 1).

    **Decision**: every candidate of a split and IR width meets the same decoder, trained
    on the IRs of the pre-trained float edge (the IR alone quantized) on the attacker's
    images: an attacker who knows where the network is cut and how wide the IR is, but not
    each candidate's fine-tuned weights. A decoder per candidate would cost a training
    per evaluation.
    """
    key = (int(split), int(ir_bits))
    if key not in self.decoders:
      t = time.time()
      policy = QuantPolicy.ir_only(self.model.info.num_layers, key[0], key[1],
                                   self.config.activation_levels)
      irs = attacks.edge_irs(self.model, self.variables, key[0], policy, self.attack_images,
                             dataset=self.train.dataset)
      self.decoders[key] = attacks.train_decoders(
          jax.random.key(self.config.seed), irs[None], jnp.asarray(self.attack_images),
          self.config.attack)[0]
      logging.info("attack_ssim: decoder for split %d, %d-bit IR trained in %.0f s", *key,
                   time.time() - t)
    return self.decoders[key]

  def attack_privacy(self, variables: Variables, policies: Any,
                     genomes: Genome) -> tuple[np.ndarray, np.ndarray]:
    """(K,) privacy ``1 − SSIM`` of the decoder's reconstructions of the privacy images
    from each candidate's IR (its fine-tuned weights, its quantization), and (K,) whether
    that IR collapsed (every channel constant in every image)."""
    splits, ir_bits = np.asarray(genomes.p), np.asarray(policies.ir_bits)
    priv, collapsed = [], []
    for i, (p, bits) in enumerate(zip(splits, ir_bits)):
      take = lambda x, i=i: x[i]
      ir = attacks.edge_irs(self.model, jax.tree.map(take, variables), int(p),
                            jax.tree.map(take, policies), self.privacy_images,
                            dataset=self.train.dataset)
      recon = attacks.decode(self.decoder(p, bits), ir[None])[0]
      priv.append(1.0 - attacks.reconstruction_scores(recon, self.privacy_images)["ssim"].mean())
      collapsed.append(bool(jnp.all(privacy.flat_channels(ir))))
    return np.asarray(priv, np.float32), np.asarray(collapsed)

  def evaluate(self, genomes: Genome, test: data.Split | None = None,
               finetune: bool = True, progress: str = "",
               on_chunk: Callable[[int, dict[str, np.ndarray]], None] | None = None
               ) -> dict[str, np.ndarray]:
    """Metrics of K genomes: fitness, privacy, energy_mj, eps, latency_ms, accuracy, diverged.

    Args:
      genomes: K genomes (leading axis).
      test: also report ``test_accuracy`` on this split (final reports only).
      finetune: ``False`` measures the pre-trained weights as they are (a float
        baseline, which nothing needs to adapt to).
      progress: if given, a log line with an ETA after every call, named by it (for
        long batches such as the initial population).
      on_chunk: called after every compiled call with the index of its first genome and
        its genomes' metrics (a caller checkpoints them: a killed run loses one call).
    """
    k = int(genomes.p.shape[0])
    padded = self.pad(genomes)
    log = Progress(k, every=1, name=f"{progress}: candidate", unit="candidate") if progress else None
    chunks = []
    for i in range(0, int(padded.p.shape[0]), self.chunk):
      chunks.append(self._evaluate_chunk(jax.tree.map(lambda x: x[i:i + self.chunk], padded),
                                         test, finetune))
      if on_chunk:
        on_chunk(i, {name: v[:k - i] for name, v in chunks[-1].items()})
      if log:
        log(min(i + self.chunk, k))
    return {name: np.concatenate([c[name] for c in chunks])[:k] for name in chunks[0]}

  def _evaluate_chunk(self, padded: Genome, test: data.Split | None, finetune: bool,
                      steps: int | None = None) -> dict[str, np.ndarray]:
    """:meth:`evaluate` of exactly ``chunk`` genomes (``steps``: see :meth:`finetune`)."""
    energy, latency = self.costs(padded)
    policies = self.policies(padded)
    t0 = time.time()
    if finetune:
      variables, diverged = self.finetune(padded, policies, steps)
    else:
      variables, diverged = self._stacked_variables(), np.zeros(self.chunk, bool)
    t1 = time.time()
    accuracy = self.accuracy(variables, policies)
    extra = {} if test is None else {"test_accuracy": self.accuracy(variables, policies, test)}
    t2 = time.time()
    if self.config.metric == ATTACK_METRIC:
      priv, collapsed = self.attack_privacy(variables, policies, padded)
    else:
      all_splits = distributed.to_host(privacy_all_splits(self.model, self.config.metric,
                                                  self.config.normalization, variables,
                                                  policies, *self._privacy_inputs))
      priv, collapsed = all_splits[np.arange(len(all_splits)), np.asarray(padded.p) - 1].T
      collapsed = collapsed > 0
    t3 = time.time()
    self.seconds["finetune"] += t1 - t0
    self.seconds["accuracy"] += t2 - t1
    self.seconds["privacy"] += t3 - t2
    eps = self.float_accuracy - accuracy
    fitness = np.asarray(combine(jnp.asarray(priv), jnp.asarray(energy), jnp.asarray(eps),
                                 self.config, jnp.asarray(latency)))
    bad = diverged | ~np.isfinite(fitness) | ~np.isfinite(priv)
    for i in np.flatnonzero(bad | collapsed):
      why = ("diverged during fine-tuning" if diverged[i] else
             f"privacy {priv[i]}, fitness {fitness[i]}" if bad[i] else
             "collapsed: every IR channel is constant in every image")
      logging.warning("candidate p=%d w=%s %s%s", int(padded.p[i]),
                      np.asarray(padded.w_bits[i]).tolist(), why,
                      ": fitness set to 0" if bad[i] else "")
    fitness = np.where(bad, 0.0, fitness)
    return dict(fitness=fitness, privacy=priv, energy_mj=energy, eps=eps, latency_ms=latency,
                accuracy=accuracy,
                diverged=diverged, failed=bad, collapsed=collapsed, **extra)
