"""The solver in a search: its settings checked, its estimates measured (or read from the
cache beside the model) on the hold-out images apart from the ε images, and its plan
(:mod:`maxpart_jax.search.solver` does the work; this module reads a search config)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ml_collections
from absl import logging

from maxpart_jax import checkpoint, data
from maxpart_jax.models.layers import Numerics
from maxpart_jax.privacy import METRICS
from maxpart_jax.search.solver import (
  ESTIMATORS,
  Candidate,
  Estimates,
  cached_estimates,
  estimate_split,
  measure_estimates,
  plan,
)

PLAN_FILE = "solver_plan.json"
"""Where a search that uses the solver writes its plan (in the workdir)."""


def needs_plan(config: ml_collections.ConfigDict) -> bool:
  """Whether a search config runs on the solver's plan (its algorithm or init operator)."""
  return config.search.algorithm == "solver" or config.search.init == "solver"


def validate_solver(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the problem in ``config.search.solver`` (no work done)."""
  if not needs_plan(config):
    return
  s = config.search.solver
  if s.estimator not in ESTIMATORS:
    raise ValueError(f"search.solver.estimator must be one of {ESTIMATORS}, got {s.estimator!r}")
  for name in ("hessian_probes", "hessian_images"):
    if s[name] < 1:
      raise ValueError(f"search.solver.{name} must be >= 1, got {s[name]}")
  if not all(0 < f < 1 for f in s.margins):
    raise ValueError("search.solver.margins are fractions of ε_b strictly between 0 and 1, "
                     f"got {tuple(s.margins)}")
  if config.val_images < 1:
    raise ValueError("the solver measures its estimates on as many hold-out images as ε is "
                     "judged on, apart from them; val_images=0 judges ε on the whole hold-out: "
                     "set val_images to at most half of it")
  if config.fitness.metric not in METRICS:
    raise ValueError(f"the solver predicts privacy with the profile's metrics {METRICS}; "
                     f"fitness.metric={config.fitness.metric!r} is measured by attacks only: use "
                     "another search.algorithm / search.init")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The solver's plan for one search: its candidates, best first, and what it cost."""

  candidates: list[Candidate]
  estimator: str
  estimates_seconds: dict[str, float]
  measured_now: bool
  plan_seconds: float
  accuracy_per_loss: float

  def summary(self) -> dict[str, Any]:
    """What a search report says of its plan."""
    return {"estimator": self.estimator, "candidates": len(self.candidates),
            "predicted_feasible": sum(c.predicted_feasible for c in self.candidates),
            "estimates_seconds": sum(self.estimates_seconds.values()),
            "estimates_measured_now": self.measured_now, "plan_seconds": self.plan_seconds}

  def write(self, path: str) -> None:
    checkpoint.write_json(path, {**self.summary(), "accuracy_per_loss": self.accuracy_per_loss,
                                 "estimates_seconds_by_part": self.estimates_seconds,
                                 "plan": [dataclasses.asdict(c) for c in self.candidates]})


def estimates_images(config: ml_collections.ConfigDict, evaluator: Any) -> data.Split:
  """The images a search config's estimates are measured on: as many as the evaluator
  judges ε on, from the rest of ``config.pretrain``'s hold-out (:func:`estimate_split`)."""
  holdout = data.load_split("val", dataset=config.pretrain.dataset,
                            data_dir=config.data_dir or None,
                            val_fraction=config.pretrain.val_fraction,
                            seed=config.pretrain.data_seed)
  return estimate_split(holdout, evaluator.val.images, len(evaluator.val),
                        seed=config.search.seed + 2)  # + 1 draws the privacy images


def estimates_from_config(config: ml_collections.ConfigDict, evaluator: Any
                          ) -> tuple[Estimates, bool]:
  """The estimates of a search config's model, cached beside ``config.model_dir`` (measured
  first if missing, on :func:`estimates_images` and the evaluator's privacy images); also
  whether they were measured now."""
  f, s = evaluator.config, config.search.solver
  split = estimates_images(config, evaluator)
  w_choices = tuple(int(b) for b in config.search.w_bits)
  a_choices = tuple(int(b) for b in config.search.a_bits)
  settings = {"w_choices": w_choices, "a_choices": a_choices, "per_channel": f.per_channel,
              "activation_levels": f.activation_levels, "metric": f.metric,
              "normalization": f.normalization, "hessian_probes": s.hessian_probes,
              "hessian_images": s.hessian_images, "seed": f.seed, "float_model": True,
              # 2: with the layers' privacy gains; 3: on images apart from the ε images
              "version": 3}
  meta = {"variables_sha256": checkpoint.variables_sha256(evaluator.variables)}
  float_model = evaluator.model.with_numerics(Numerics())  # estimates in float32 everywhere
  return cached_estimates(
      config.model_dir, meta,
      lambda: measure_estimates(float_model, evaluator.variables, split,
                                evaluator.privacy_images, w_choices, a_choices,
                                per_channel=f.per_channel, activation_levels=f.activation_levels,
                                metric=f.metric, normalization=f.normalization,
                                hessian_images=s.hessian_images, hessian_probes=s.hessian_probes,
                                seed=f.seed),
      split, evaluator.privacy_images, settings)


def plan_from_config(config: ml_collections.ConfigDict, evaluator: Any) -> Plan:
  """The plan of a search config for its evaluator (:class:`~maxpart_jax.search.fitness.
  Evaluator`): its model's estimates (:func:`estimates_from_config`), then the knapsacks."""
  f, s = evaluator.config, config.search.solver
  estimates, measured_now = estimates_from_config(config, evaluator)
  t = time.time()
  candidates = plan(evaluator.model.info, estimates, evaluator.costs, f.device, f.eps_bound,
                    s.estimator, evaluator.energy_info, tuple(s.margins))
  if not candidates:
    raise ValueError(f"no split fits the energy budget E_b = {f.device.budget_mj} mJ at any "
                     "allowed bits: the solver has nothing to propose; raise fitness.budget_mj")
  seconds = time.time() - t
  logging.info("solver plan (%s estimator, %.1f s): %s", s.estimator, seconds, "; ".join(
      f"p={c.p} P~{c.predicted_privacy:.3f} eps~{c.predicted_eps:.3f}"
      f"{'' if c.predicted_feasible else ' (predicted infeasible)'}" for c in candidates))
  return Plan(candidates=candidates, estimator=s.estimator, estimates_seconds=estimates.seconds,
              measured_now=measured_now, plan_seconds=seconds,
              accuracy_per_loss=estimates.accuracy_per_loss)
