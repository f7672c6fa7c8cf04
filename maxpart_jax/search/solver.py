"""A model of the problem, solved: per-layer estimates and knapsacks per split (method §15).

Most of what decides a genome is cheap to know before any fine-tuning:

* its edge **energy** (and latency) is exact and additive over the edge's layers (Eq. 7-9);
* its **privacy** depends mostly on the split and the IR's width (the float model's IR-only
  profile, :func:`maxpart_jax.privacy.profile.block_profile`), plus what quantizing each edge
  layer adds to it (its measured *privacy gain* at that split);
* its **accuracy loss** is close to additive over layers for small perturbations: per layer
  and bit choice, a Hessian-trace estimate of the weights' part (HAWQ-V2, Dong et al. 2020:
  ``½ Tr(H_l) / n_l · ‖Q_b(W_l) − W_l‖²``) plus the measured cost of quantizing the layer's
  inputs (``estimator="hessian"``), or the measured validation loss increase with only that
  layer quantized (``"loss"``). All measured once per model (:func:`measure_estimates`) and
  cached beside it (:func:`cached_estimates`), on hold-out images apart from those ε is
  judged on (:func:`estimate_split`).

For every split and IR width, multiple-choice knapsacks with the edge energy strictly
below E_b (and the latency below its bound, if set), solved to proven optimality by scipy's
HiGHS (:func:`multiple_choice_knapsack`): the bits of least predicted loss, the bits of most
predicted privacy whose predicted ε is strictly below ε_b (the search's feasibility,
ε < ε_b), and the same strictly below each fraction of ε_b in ``margins`` (fallbacks at
the split). The answers, most private first among those predicted to keep ε < ε_b, are
the *plan* (:func:`plan`): the ``solver`` algorithm evaluates them in order, the
``solver`` init operator seeds a population with them
(:mod:`maxpart_jax.search.algorithms`, :mod:`maxpart_jax.search.operators`).

A loss converts to an accuracy drop by one slope fitted over the single-layer measurements
(one layer's accuracy drop on a thousand images is mostly noise; the loss is smooth). The
fine-tuning each candidate gets repairs part of the loss, which the prediction does not
model; the measured ε, not the predicted one, decides feasibility.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize, sparse

from maxpart_jax import checkpoint, data, distributed
from maxpart_jax.energy import DeviceConfig, PJ_PER_MJ, layer_costs, layer_energy_pj
from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.models import SplitModel, Variables
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.privacy.profile import block_profile
from maxpart_jax.quant import FLOAT_BITS, QuantPolicy, quantize_weights
from maxpart_jax.search.fitness import privacy_all_splits
from maxpart_jax.train import Progress, cross_entropy

ESTIMATORS = ("loss", "hessian")
"""How a layer's accuracy cost is predicted: the measured loss increase with that layer alone
quantized, or the Hessian-trace estimate of its weights' part plus the measured cost of its
inputs' quantization."""


@dataclasses.dataclass(frozen=True)
class Estimates:
  """What :func:`measure_estimates` measured for one model, images and bit choices.

  Attributes:
    w_choices, a_choices: the weight and activation widths measured.
    loss: (L, W, A) validation loss increase with only layer ``l`` quantized to
      ``(w, a)`` (0 for layers that are never quantized).
    accuracy_drop: (L, W, A) the same measurements' top-1 accuracy drop.
    act_loss: (L, A) loss increase with only layer ``l``'s inputs quantized.
    hessian_trace: (L,) Hutchinson estimate of ``Tr(H_l)`` (the loss's Hessian with respect
      to layer ``l``'s kernel).
    weight_error: (L, W) ``‖Q_w(W_l) − W_l‖²``.
    weight_count: (L,) ``n_l``, the kernel's entries.
    ir_loss, ir_accuracy_drop: (S, A) the float model with only the IR at split ``p``
      quantized (rows ``p = 1..max_split``).
    privacy: (S, A) the mean privacy of that IR on the privacy images.
    privacy_float: (S,) the same of the float IR (sent where the IR's layer is not quantized).
    privacy_gain: (L, W, A, S) how much quantizing only layer ``l`` to ``(w, a)`` raises the
      privacy of the float IR at split ``p`` (quantization noise hides the image; 0 where
      the layer is not on the edge of ``p``).
    float_loss, float_accuracy: the unquantized model's.
    seconds: measuring time by part.
  """

  w_choices: tuple[int, ...]
  a_choices: tuple[int, ...]
  loss: np.ndarray
  accuracy_drop: np.ndarray
  act_loss: np.ndarray
  hessian_trace: np.ndarray
  weight_error: np.ndarray
  weight_count: np.ndarray
  ir_loss: np.ndarray
  ir_accuracy_drop: np.ndarray
  privacy: np.ndarray
  privacy_float: np.ndarray
  privacy_gain: np.ndarray
  float_loss: float
  float_accuracy: float
  seconds: dict[str, float]

  def layer_cost(self, estimator: str = "loss") -> np.ndarray:
    """(L, W, A) predicted loss increase of each layer at each ``(w, a)``."""
    if estimator == "loss":
      return self.loss
    if estimator == "hessian":
      weights = 0.5 * self.hessian_trace[:, None] / np.maximum(self.weight_count[:, None], 1)
      return (weights * self.weight_error)[:, :, None] + self.act_loss[:, None, :]
    raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")

  @functools.cached_property
  def accuracy_per_loss(self) -> float:
    """The slope of accuracy drop against loss increase over every single-layer and IR
    measurement (least squares through 0): loss units to accuracy units."""
    x = np.concatenate([self.loss.ravel(), self.ir_loss.ravel()])
    y = np.concatenate([self.accuracy_drop.ravel(), self.ir_accuracy_drop.ravel()])
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    return float(np.sum(x[keep] * y[keep]) / max(np.sum(x[keep] ** 2), 1e-12))

  def to_json(self) -> dict[str, Any]:
    return {f.name: (getattr(self, f.name).tolist() if isinstance(getattr(self, f.name), np.ndarray)
                     else getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> Estimates:
    kwargs = {}
    for f in dataclasses.fields(cls):
      v = d[f.name]
      kwargs[f.name] = (tuple(v) if f.name.endswith("choices") else
                        np.asarray(v, np.float64) if isinstance(v, list) else v)
    return cls(**kwargs)


def single_layer_policy(num_layers: int, layer: int, w_bits: int, a_bits: int,
                        activation_levels: str = "paper", per_channel: bool = False
                        ) -> QuantPolicy:
  """Only ``layer`` quantized (weights to ``w_bits``, inputs to ``a_bits``; ``FLOAT_BITS``
  leaves either float), no IR quantized."""
  w = np.full(num_layers, FLOAT_BITS, np.int32)
  a = np.full(num_layers, FLOAT_BITS, np.int32)
  w[layer], a[layer] = w_bits, a_bits
  return QuantPolicy(w_bits=jnp.asarray(w), a_bits=jnp.asarray(a), split=jnp.int32(0),
                     ir_bits=jnp.int32(FLOAT_BITS), per_channel=per_channel,
                     activation_levels=activation_levels)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_correct(model: SplitModel, variables: Variables, policies: QuantPolicy,
                      x: jax.Array, labels: jax.Array) -> jax.Array:
  """(P, 2): summed cross-entropy and correct predictions of each stacked policy on a batch."""

  def one(policy):
    logits = model.apply(variables, x, policy=policy)
    return jnp.stack([cross_entropy(logits, labels) * labels.shape[0],
                      jnp.sum(jnp.argmax(logits, -1) == labels)])

  return jax.lax.map(one, policies)


def _policy_groups(policies: list[QuantPolicy], group: int):
  """``(start, stacked)`` for consecutive groups of ``group`` policies, the last one padded by
  repeating its last policy (one compiled shape)."""
  for i in range(0, len(policies), group):
    chunk = policies[i:i + group]
    chunk = chunk + [chunk[-1]] * (group - len(chunk))
    yield i, jax.tree.map(lambda *xs: jnp.stack(xs), *chunk)


def _groups(count: int, group: int = 8) -> int:
  """How many groups of ``group`` policies :func:`_policy_groups` makes of ``count``."""
  return -(-count // group)


def _score_policies(model: SplitModel, variables: Variables, policies: list[QuantPolicy],
                    x: np.ndarray, labels: np.ndarray, batch_size: int = 500,
                    group: int = 8, progress: Progress | None = None) -> np.ndarray:
  """(P, 2): mean loss and accuracy of each policy over the images; ``progress`` is told
  how many groups are done after each."""
  out = np.zeros((len(policies), 2))
  for done, (i, stacked) in enumerate(_policy_groups(policies, group), 1):
    total = sum(np.asarray(_loss_and_correct(model, variables, stacked, jnp.asarray(x[s]),
                                             jnp.asarray(labels[s])))
                for s in (slice(j, j + batch_size) for j in range(0, len(x), batch_size)))
    out[i:i + group] = (total / len(x))[:len(policies) - i]
    if progress:
      progress(done)
  return out


def _privacy_by_split(model: SplitModel, metric: str, normalization: str, variables: Variables,
                      policies: list[QuantPolicy], images: np.ndarray, dataset: str,
                      group: int = 8, progress: Callable[[], None] | None = None) -> np.ndarray:
  """(P, max_split): the mean privacy of the IR after every block for each policy (the
  search's own program, :func:`maxpart_jax.search.fitness.privacy_all_splits`);
  ``progress()`` after each group."""
  x = jnp.asarray(data.normalize(np.asarray(images, np.float32), dataset))
  images = jnp.asarray(images, jnp.float32)
  copies = jax.tree.map(lambda v: jnp.broadcast_to(v, (group, *v.shape)), variables)
  out = []
  for _, stacked in _policy_groups(policies, group):
    out.append(np.asarray(privacy_all_splits(model, metric, normalization, copies, stacked, x,
                                             images))[..., 0])
    if progress:
      progress()
  return np.concatenate(out)[:len(policies)]


def kernel_of(variables: Variables, layer_name: str) -> jax.Array:
  """The kernel of the layer named ``blocks_i/conv`` in ``variables``."""
  return _layer_params(variables["params"], layer_name)["kernel"]


def _layer_params(params: Any, layer_name: str) -> dict[str, Any]:
  for part in layer_name.split("/"):
    params = params[part]
  return params


def rademacher_probe(seed: int, index: int | jax.Array, like: Sequence[jax.Array]
                     ) -> list[jax.Array]:
  """Probe ``index`` of :func:`hessian_traces` with ``seed``: one array of independent ±1
  entries (each with probability ½) per array of ``like``, of its shape and dtype."""
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), index), len(like))
  return [jax.random.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, like)]


def hessian_traces(model: SplitModel, variables: Variables, layer_names: list[str],
                   x: np.ndarray, labels: np.ndarray, probes: int, seed: int = 0,
                   progress: Progress | None = None) -> np.ndarray:
  """Hutchinson estimates of ``Tr(H_l)`` for the kernels of ``layer_names``: the mean over
  the Rademacher probes ``v`` (:func:`rademacher_probe` ``0..probes-1``) of
  ``v_lᵀ (H v)_l``, all layers from the same Hessian-vector products (the float model's
  inference-mode loss on the images); ``progress`` is told how many probes are done."""
  kernels = [kernel_of(variables, n) for n in layer_names]

  def loss(ks, x, labels):
    params = jax.tree.map(lambda v: v, variables["params"])  # fresh dicts to write into
    for name, k in zip(layer_names, ks):
      _layer_params(params, name)["kernel"] = k
    logits = model.apply({**variables, "params": params}, x)
    return cross_entropy(logits, labels)

  @jax.jit
  def probe(index, x, labels):
    v = rademacher_probe(seed, index, kernels)
    _, hv = jax.jvp(lambda ks: jax.grad(loss)(ks, x, labels), (kernels,), (v,))
    return jnp.stack([jnp.sum(a * b) for a, b in zip(v, hv)])

  x, labels = jnp.asarray(x), jnp.asarray(labels)
  total = np.zeros(len(kernels))
  for i in range(probes):
    total += np.asarray(probe(jnp.int32(i), x, labels))
    if progress:
      progress(i + 1)
  return total / probes


def measure_estimates(model: SplitModel, variables: Variables, split: data.Split,
                      privacy_images: np.ndarray, w_choices: tuple[int, ...],
                      a_choices: tuple[int, ...], *, per_channel: bool = False,
                      activation_levels: str = "paper", metric: str = "mse",
                      normalization: str = "zscore", hessian_images: int = 256,
                      hessian_probes: int = 16, seed: int = 0) -> Estimates:
  """Measures :class:`Estimates` of ``model``: losses on ``split`` (in a search, hold-out
  images apart from those ε is judged on: :func:`estimate_split`), privacy on the privacy
  images (floats in [0, 1]). Logs its progress, with an ETA, part by part."""
  info = model.info
  x = data.normalize(split.images, split.dataset)
  labels = np.asarray(split.labels, np.int32)
  seconds = {}
  t = time.time()
  edge = [l for l in info.layers if l.quantizable and l.block < info.max_split]
  single = lambda layer, w, a: single_layer_policy(info.num_layers, layer, w, a,
                                                   activation_levels, per_channel)
  policies = [single(0, FLOAT_BITS, FLOAT_BITS)]
  index = {}
  for l in edge:
    for w, a in itertools.product([*w_choices, FLOAT_BITS], a_choices):
      index[(l.id, w, a)] = len(policies)
      policies.append(single(l.id, w, a))
  for p in range(1, info.max_split + 1):
    for a in a_choices:
      index[("ir", p, a)] = len(policies)
      # per_channel too: the static fields of stacked policies must match
      policies.append(QuantPolicy.ir_only(info.num_layers, p, a, activation_levels, per_channel))
  gains = len(edge) * len(w_choices) * len(a_choices)  # single-layer privacy measurements
  logging.info("solver estimates: the losses of %d single-layer and IR policies on %d images, "
               "%d Hessian probes on %d, then the privacy of %d IR widths and %d single-layer "
               "policies on %d privacy images", len(policies), len(x), hessian_probes,
               min(hessian_images, len(x)), len(a_choices) + 1, gains, len(privacy_images))
  part = lambda name, total, unit, every=1: Progress(total, every=every,
                                                    name=f"solver estimates, {name}", unit=unit)
  scores = _score_policies(model, variables, policies, x, labels,
                           progress=part("losses: policy group", _groups(len(policies)), "group"))
  float_loss, float_accuracy = scores[0]
  shape = (info.num_layers, len(w_choices), len(a_choices))
  loss, acc_drop = np.zeros(shape), np.zeros(shape)
  act_loss = np.zeros((info.num_layers, len(a_choices)))
  for l in edge:
    for (i, w), (j, a) in itertools.product(enumerate(w_choices), enumerate(a_choices)):
      loss[l.id, i, j] = scores[index[(l.id, w, a)], 0] - float_loss
      acc_drop[l.id, i, j] = float_accuracy - scores[index[(l.id, w, a)], 1]
    for j, a in enumerate(a_choices):
      act_loss[l.id, j] = scores[index[(l.id, FLOAT_BITS, a)], 0] - float_loss
  ir = np.array([[scores[index[("ir", p, a)]] for a in a_choices]
                 for p in range(1, info.max_split + 1)])
  seconds["single_layers"] = time.time() - t

  t = time.time()
  names = [l.name for l in edge]
  take = min(hessian_images, len(x))
  traces = np.zeros(info.num_layers)
  traces[[l.id for l in edge]] = hessian_traces(
      model, variables, names, x[:take], labels[:take], hessian_probes, seed,
      progress=part("Hessian traces: probe", hessian_probes, "probe",
                    every=max(1, hessian_probes // 8)))
  weight_error = np.zeros((info.num_layers, len(w_choices)))
  weight_count = np.zeros(info.num_layers)
  for l in edge:
    kernel = kernel_of(variables, l.name)
    weight_count[l.id] = kernel.size
    for i, w in enumerate(w_choices):
      weight_error[l.id, i] = float(jnp.sum((quantize_weights(kernel, jnp.int32(w), per_channel)
                                             - kernel) ** 2))
  seconds["hessian"] = time.time() - t

  t = time.time()
  tell = part("privacy: profile or policy group", len(a_choices) + 1 + _groups(gains), "call")
  done = itertools.count(1)

  def profile(**kw) -> np.ndarray:
    out = np.array([row["privacy"] for row in block_profile(
        model, variables, privacy_images, dataset=split.dataset, metric=metric,
        normalization=normalization, activation_levels=activation_levels, **kw)["blocks"]])
    tell(next(done))
    return out

  privacy = np.stack([profile(ir_bits=a) for a in a_choices], axis=1)
  privacy_float = profile()
  by_split = _privacy_by_split(
      model, metric, normalization, variables,
      [single(l.id, w, a) for l in edge for w, a in itertools.product(w_choices, a_choices)],
      privacy_images, split.dataset, progress=lambda: tell(next(done)))
  gain = np.zeros((info.num_layers, len(w_choices), len(a_choices), info.max_split))
  rows = iter(by_split)
  for l in edge:
    for (i, _), (j, _) in itertools.product(enumerate(w_choices), enumerate(a_choices)):
      on_edge = np.arange(1, info.max_split + 1) > l.block  # splits whose edge holds l
      gain[l.id, i, j] = np.where(on_edge, next(rows) - privacy_float, 0.0)
  seconds["privacy"] = time.time() - t
  return Estimates(w_choices=tuple(w_choices), a_choices=tuple(a_choices), loss=loss,
                   accuracy_drop=acc_drop, act_loss=act_loss, hessian_trace=traces,
                   weight_error=weight_error, weight_count=weight_count,
                   ir_loss=ir[..., 0] - float_loss, ir_accuracy_drop=float_accuracy - ir[..., 1],
                   privacy=privacy, privacy_float=privacy_float, privacy_gain=gain,
                   float_loss=float(float_loss),
                   float_accuracy=float(float_accuracy), seconds=seconds)


# --- the knapsack ---------------------------------------------------------------


def multiple_choice_knapsack(cost: np.ndarray, weights: np.ndarray,
                             capacity: np.ndarray) -> tuple[np.ndarray, float] | None:
  """Exactly one option per item, minimizing the summed cost with every summed weight at
  most its capacity; ``None`` when no choice fits.

  Args:
    cost: (n, m) cost of option ``j`` of item ``i``; ``inf`` marks an option not allowed.
    weights: (c, n, m) the ``c`` resources each option uses (energy, latency).
    capacity: (c,) what each resource may sum to.

  Returns:
    ``(choice (n,), total cost)``. Solved as a 0-1 integer program by HiGHS
    (``scipy.optimize.milp``) with a relative MIP gap of 0 (its default, 1e-4, may stop at
    a worse choice): optimal up to HiGHS's absolute gap (1e-6, in the cost's units) and its
    feasibility tolerance (1e-7 over a capacity, which :func:`plan` checks exactly).
  """
  cost = np.asarray(cost, np.float64)
  n, m = cost.shape
  if n == 0:
    fits = np.all(np.asarray(capacity) >= 0)
    return (np.zeros(0, np.int64), 0.0) if fits else None
  weights = np.asarray(weights, np.float64).reshape(-1, n, m)
  allowed = np.isfinite(cost)
  if not allowed.any(axis=1).all():
    return None
  c = np.where(allowed, cost, 0.0).ravel()
  one_each = sparse.kron(sparse.eye(n), np.ones((1, m)))
  constraints = [optimize.LinearConstraint(one_each, 1, 1),
                 optimize.LinearConstraint(weights.reshape(len(weights), -1), -np.inf,
                                           np.asarray(capacity, np.float64))]
  result = optimize.milp(c, constraints=constraints, integrality=np.ones(n * m),
                         bounds=optimize.Bounds(0, allowed.ravel().astype(np.float64)),
                         options={"mip_rel_gap": 0.0})
  if result.status != 0 or result.x is None:
    return None
  choice = np.argmax(result.x.reshape(n, m), axis=1)
  return choice, float(cost[np.arange(n), choice].sum())


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One solved split: its genome, which knapsack chose it, and what the estimates predict.

  ``objective``: ``least_loss`` (the bits of least predicted loss under the budget),
  ``most_private`` (the bits of highest predicted privacy whose predicted ε is below ε_b)
  or ``most_private_<f>`` (the same below the fraction ``f`` of ε_b: a margin); below
  means strictly, as a measured ε must be (:func:`maxpart_jax.search.fitness.violations`).
  """

  genome: dict[str, Any]
  p: int
  ir_bits: int
  objective: str
  predicted_loss: float
  predicted_eps: float
  predicted_privacy: float
  energy_mj: float
  latency_ms: float
  predicted_feasible: bool


def plan(info: ModelInfo, estimates: Estimates, costs: Callable[[Genome], tuple[np.ndarray,
                                                                                np.ndarray]],
         device: DeviceConfig, eps_bound: float, estimator: str = "loss",
         energy_info: ModelInfo | None = None, margins: Sequence[float] = ()
         ) -> list[Candidate]:
  """Knapsacks for every split and IR width, under E_b (and the latency bound): the bits of
  least predicted loss, the bits of most predicted privacy among those whose predicted ε
  (:func:`predict`) is below ε_b (weights of fewer bits hide more of the image), and for
  each fraction ``f`` in ``margins`` the most private bits whose predicted ε is below
  ``f`` ε_b (an answer to fall back on at the same split when the first lands on the bound
  or the estimate is optimistic). Every bound is strict, as in the search's feasibility
  (E < E_b, ε < ε_b). Ranked most private first among those predicted to keep ε < ε_b,
  then the rest by predicted ε; equal genomes appear once; splits whose edge cannot fit
  the budget are left out.

  ``costs(genomes) -> (energy mJ, latency ms)``: the exact cost model the search charges
  (:meth:`maxpart_jax.search.fitness.Evaluator.costs`, defenses included); every returned
  genome is checked with it. ``energy_info``: the model whose layers are charged (a
  paper-size stand-in), default ``info``.
  """
  energy_info = energy_info or info
  w_choices, a_choices = estimates.w_choices, estimates.a_choices
  options = list(itertools.product(range(len(w_choices)), range(len(a_choices))))
  w_of = np.array([w_choices[i] for i, _ in options])
  a_of = np.array([a_choices[j] for _, j in options])
  layer_cost = estimates.layer_cost(estimator)
  cost_table = np.stack([layer_cost[:, i, j] for i, j in options], axis=1)  # (L, m)
  energy_table = np.stack([np.asarray(layer_energy_pj(energy_info, np.full(info.num_layers, w),
                                                      np.full(info.num_layers, a), device))
                           for w, a in zip(w_of, a_of)], axis=1) / PJ_PER_MJ
  latency_table = np.stack([np.asarray(layer_costs(
      energy_info.layer_macs, energy_info.layer_params, energy_info.layer_in_elems,
      np.full(info.num_layers, w), np.full(info.num_layers, a), device)[1]) * 1e3
      for w, a in zip(w_of, a_of)], axis=1)
  slope = estimates.accuracy_per_loss
  found: dict[str, tuple[Genome, str, float, float]] = {}
  for p in range(1, info.max_split + 1):
    edge = np.flatnonzero(np.asarray(info.quantizable) & (np.asarray(info.layer_block) < p))
    last = int(info.block_last_layer[p - 1])
    for j_ir, a_ir in enumerate(a_choices):
      allowed = np.ones((len(edge), len(options)), bool)
      if last in edge:
        allowed[list(edge).index(last)] = a_of == a_ir
      elif j_ir:  # the IR is float whatever a_ir says: one candidate for the split
        continue
      genome_of = lambda choice: _genome(info, p, edge, choice, w_of, a_of, max(w_choices),
                                         max(a_choices))
      chosen = np.argmax(allowed, axis=1)
      ref_energy, ref_latency = (float(v[0]) for v in costs(stack_genomes([genome_of(chosen)])))
      resources = [energy_table[edge]]
      capacity = [device.budget_mj - (ref_energy - energy_table[edge, chosen].sum())]
      if device.latency_bound_ms > 0:
        resources.append(latency_table[edge])
        capacity.append(device.latency_bound_ms - (ref_latency - latency_table[edge, chosen].sum()))

      def answer(choice: np.ndarray, eps_below: float = np.inf
                 ) -> tuple[Genome, float, float] | None:
        """The genome of ``choice`` with its energy and latency, if the exact cost model
        puts it below the bounds and its predicted ε is below ``eps_below``."""
        genome = genome_of(choice)
        energy, latency = (float(v[0]) for v in costs(stack_genomes([genome])))
        if not (energy < device.budget_mj and (device.latency_bound_ms <= 0
                                               or latency < device.latency_bound_ms)):
          return None
        if eps_below < np.inf and not predict(info, estimates, stack_genomes([genome]),
                                              estimator)["eps"][0] < eps_below:
          return None
        return genome, energy, latency

      solve = lambda cost, accept, extra=(), room=(): _solve_strictly_below(
          np.where(allowed, cost, np.inf), np.stack([*resources, *extra]),
          np.array([*capacity, *room]), accept)
      least = solve(cost_table[edge], answer)
      if least is None:
        continue
      solved = {"least_loss": least}
      ir_row = a_choices.index(a_ir) if last in edge else None
      ir_loss = estimates.ir_loss[p - 1, ir_row] if ir_row is not None else 0.0
      gain = np.stack([estimates.privacy_gain[:, i, j, p - 1] for i, j in options], axis=1)
      for fraction in (1.0, *margins):
        bound = fraction * eps_bound  # predicted ε = slope · (edge layers' loss + the IR's)
        loss_room = ([cost_table[edge]], [bound / slope - ir_loss]) if slope > 0 else ((), ())
        private = solve(-gain[edge], lambda choice: answer(choice, bound), *loss_room)
        if private is not None:
          solved["most_private" if fraction == 1.0 else f"most_private_{fraction:g}"] = private
      for objective, (genome, energy, latency) in solved.items():
        key = json.dumps(genome.to_json())
        if key not in found:
          found[key] = (genome, objective, energy, latency)
  if not found:
    return []
  genomes = stack_genomes([g for g, _, _, _ in found.values()])
  predicted = predict(info, estimates, genomes, estimator)
  _, _, ir = jax.vmap(lambda g: effective_bits(info, g))(genomes)
  out = [Candidate(genome=genome.to_json(), p=int(genome.p), ir_bits=int(ir[k]),
                   objective=objective, predicted_loss=float(predicted["loss"][k]),
                   predicted_eps=float(predicted["eps"][k]),
                   predicted_privacy=float(predicted["privacy"][k]), energy_mj=energy,
                   latency_ms=latency, predicted_feasible=bool(predicted["eps"][k] < eps_bound))
         for k, (genome, objective, energy, latency) in enumerate(found.values())]
  feasible = sorted((c for c in out if c.predicted_feasible), key=lambda c: -c.predicted_privacy)
  rest = sorted((c for c in out if not c.predicted_feasible), key=lambda c: c.predicted_eps)
  return feasible + rest


def predict(info: ModelInfo, estimates: Estimates, genomes: Genome,
            estimator: str = "loss") -> dict[str, np.ndarray]:
  """What the estimates predict for any genomes (leading axis): ``loss`` (the summed loss
  increase of their edge layers and IR), ``eps`` (its accuracy drop) and ``privacy`` (the
  IR's privacy at the split and width, plus each edge layer's privacy gain there)."""
  w, a, ir = (np.asarray(x) for x in jax.vmap(lambda g: effective_bits(info, g))(genomes))
  p = np.asarray(genomes.p)
  cost = estimates.layer_cost(estimator)
  w_index = {b: i for i, b in enumerate(estimates.w_choices)}
  a_index = {b: j for j, b in enumerate(estimates.a_choices)}
  loss = np.zeros(len(p))
  privacy = np.zeros(len(p))
  for k in range(len(p)):
    for l in np.flatnonzero(np.asarray(info.quantizable) & (np.asarray(info.layer_block) < p[k])):
      i, j = w_index[int(w[k, l])], a_index[int(a[k, l])]
      loss[k] += cost[l, i, j]
      privacy[k] += estimates.privacy_gain[l, i, j, p[k] - 1]
    if int(ir[k]) in a_index:
      loss[k] += estimates.ir_loss[p[k] - 1, a_index[int(ir[k])]]
      privacy[k] += estimates.privacy[p[k] - 1, a_index[int(ir[k])]]
    else:
      privacy[k] += estimates.privacy_float[p[k] - 1]
  return {"loss": loss, "eps": estimates.accuracy_per_loss * loss, "privacy": privacy}


def _solve_strictly_below(cost: np.ndarray, resources: np.ndarray, capacity: np.ndarray,
                          accept: Callable[[np.ndarray], tuple[Genome, float, float] | None]
                          ) -> tuple[Genome, float, float] | None:
  """``accept(choice)`` of the knapsack's choice, every capacity shrunk a little more each
  time ``accept`` refuses it (``None``): the bounds are strict, and float sums and HiGHS's
  feasibility tolerance may land on them or just over. ``None`` if no choice fits."""
  for margin in (1e-9, 1e-6, 1e-4, 1e-2):
    solved = multiple_choice_knapsack(cost, resources,
                                      capacity - margin * np.abs(capacity) - 1e-15)
    if solved is None:
      return None
    accepted = accept(solved[0])
    if accepted is not None:
      return accepted
  return None


def _genome(info: ModelInfo, p: int, edge: np.ndarray, choice: np.ndarray, w_of: np.ndarray,
            a_of: np.ndarray, w_rest: int, a_rest: int) -> Genome:
  """The genome of split ``p`` whose edge layers take the chosen options (the other genes,
  masked anyway, at the widest choices)."""
  w = np.full(info.num_layers, w_rest, np.int32)
  a = np.full(info.num_layers, a_rest, np.int32)
  w[edge], a[edge] = w_of[choice], a_of[choice]
  return Genome(p=jnp.int32(p), w_bits=jnp.asarray(w), a_bits=jnp.asarray(a))


def stack_genomes(genomes: list[Genome]) -> Genome:
  """``genomes`` with a leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *genomes)


def stacked_genomes(candidates: list[Candidate]) -> Genome:
  """The candidates' genomes with a leading axis, in order."""
  return stack_genomes([Genome.from_json(c.genome) for c in candidates])


# --- cached beside the model -------------------------------------------------------


def estimates_key(model_meta: dict[str, Any], split: data.Split, privacy_images: np.ndarray,
                  settings: dict[str, Any]) -> str:
  """What the estimates depend on, hashed: the weights, the images and the settings."""
  digest = hashlib.sha256()
  digest.update(model_meta.get("variables_sha256", "").encode())
  for array in (split.images, split.labels, np.asarray(privacy_images, np.float32)):
    digest.update(np.ascontiguousarray(array).tobytes())
  digest.update(json.dumps(settings, sort_keys=True).encode())
  return digest.hexdigest()[:20]


def cached_estimates(model_dir: str, model_meta: dict[str, Any], measure: Callable[[], Estimates],
                     split: data.Split, privacy_images: np.ndarray,
                     settings: dict[str, Any]) -> tuple[Estimates, bool]:
  """The estimates stored in ``<model_dir>/estimates/<key>.json``, or ``measure()`` stored
  there (by the leader; the others receive them). Returns ``(estimates, measured now)``.

  Estimates stored under another key (other weights, images or settings, e.g. those of an
  earlier version measured on the ε images) are never used; a log line says how they differ.
  """
  key = estimates_key(model_meta, split, privacy_images, settings)
  path = os.path.join(model_dir, "estimates", f"{key}.json")
  stored = None
  if distributed.is_leader() and os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
  stored = distributed.broadcast(stored)
  if stored is not None:
    return Estimates.from_json(stored["estimates"]), False
  if distributed.is_leader():
    logging.info("solver estimates: none stored for these weights, images and settings in %s%s",
                 os.path.dirname(path), _why_not_reused(os.path.dirname(path), settings))
  t = time.time()
  estimates = measure()
  logging.info("solver estimates measured in %.0f s (%s); stored in %s", time.time() - t,
               ", ".join(f"{k} {v:.0f} s" for k, v in estimates.seconds.items()), path)
  if distributed.is_leader():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.write_json(path, {"settings": settings, "estimates": estimates.to_json()})
  return estimates, True


def _why_not_reused(folder: str, settings: dict[str, Any]) -> str:
  """What sets the estimates stored in ``folder`` apart from ``settings`` (empty: none)."""
  reasons = []
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    try:
      with open(os.path.join(folder, name)) as f:
        other = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
      continue
    diff = [f"{k} {other.get(k)} (now {v})" for k, v in settings.items()
            if json.dumps(other.get(k)) != json.dumps(v)]
    reasons.append(f"{name}: " + (", ".join(diff) if diff else "other weights or images"))
  return f"; those stored there are not reused ({'; '.join(reasons)}): measuring" if reasons else ""


def estimate_split(holdout: data.Split, eps_images: np.ndarray, n: int, seed: int) -> data.Split:
  """``n`` images of ``holdout`` (drawn with ``seed``) none of which is one of ``eps_images``
  (compared by content): the estimates are measured apart from the images ε is judged on,
  so that the knapsacks' choice does not fit the noise of those. A ``ValueError`` if fewer
  remain."""
  taken = {np.ascontiguousarray(image).tobytes() for image in eps_images}
  rest = np.array([np.ascontiguousarray(image).tobytes() not in taken
                   for image in holdout.images])
  if rest.sum() < n:
    raise ValueError(f"the solver measures its estimates on {n} hold-out images apart from the "
                     f"{len(eps_images)} that ε is judged on, but only {rest.sum()} of the "
                     f"{len(holdout)} held out are apart from them: lower val_images")
  rest = dataclasses.replace(holdout, images=holdout.images[rest], labels=holdout.labels[rest])
  return rest.take(n, seed=seed)
