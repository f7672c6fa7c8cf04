"""Pareto fronts of evaluated deployments: privacy up, edge energy down, accuracy up.

The paper's fitness (Eq. 11-12) folds three objectives into one number with fixed penalties,
so a search reports one genome per budget. The front shows the whole trade-off a search has
seen: every evaluated genome that no other beats in all three objectives at once. A point
``a`` dominates ``b`` when it is at least as good in every objective and strictly better in
one; equal points do not dominate each other, so duplicates stay on the front together.

:func:`dominates` and :func:`non_dominated` are jittable (``jnp``) and take any number of
objectives; :func:`front` works on a search's evaluations (``evaluations.json``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from maxpart_jax import plotting
from maxpart_jax.search.fitness import FitnessConfig, violations

OBJECTIVES = (("privacy", True), ("energy_mj", False), ("accuracy", True))
"""The objectives of a deployment and whether each is maximized."""


def dominates(objectives: jnp.ndarray, maximize: Sequence[bool]) -> jnp.ndarray:
  """``(n, n)`` boolean matrix: ``[i, j]`` is true when point ``i`` dominates point ``j``.

  Args:
    objectives: ``(n, m)`` values, one row per point.
    maximize: ``m`` flags, true where larger is better.
  """
  sign = jnp.where(jnp.asarray(maximize), 1.0, -1.0)
  x = jnp.asarray(objectives, jnp.float32) * sign
  at_least = jnp.all(x[:, None, :] >= x[None, :, :], axis=-1)
  better = jnp.any(x[:, None, :] > x[None, :, :], axis=-1)
  return at_least & better


def non_dominated(objectives: jnp.ndarray, maximize: Sequence[bool]) -> jnp.ndarray:
  """``(n,)`` mask of the points no other point dominates (the Pareto front)."""
  return ~jnp.any(dominates(objectives, maximize), axis=0)


def front(evaluations: Sequence[dict[str, Any]], config: FitnessConfig | None = None
          ) -> dict[str, Any]:
  """The fronts of a search's evaluated genomes.

  Candidates that diverged, failed or collapsed, or whose objectives are not finite, are left
  out: their numbers do not describe a working deployment.

  Returns:
    ``points``: the front over :data:`OBJECTIVES`, by energy; with the search's fitness
    ``config`` each point is marked ``feasible`` exactly as the search judges it
    (:func:`~maxpart_jax.search.fitness.violations`: E < E_b, ε < ε_b and, when set, the
    latency bound).
    ``privacy_energy``: with ``config``, the two-objective front (privacy up, energy down) of
    the genomes within the accuracy bound (and the latency bound): the most private
    deployment for every energy budget, what a deployer choosing E_b reads off. Also
    ``considered``, ``left_out``.
  """
  usable = [e for e in evaluations
            if not (e.get("diverged") or e.get("failed") or e.get("collapsed"))
            and all(math.isfinite(float(e[name])) for name, _ in OBJECTIVES)]
  points = _front_of(usable, OBJECTIVES)
  bounds = {"budget_mj": None, "eps_bound": None, "latency_bound_ms": None}
  within = []
  if config is not None:
    for p in points:
      p["feasible"] = not violations(p, config)
    # Within every bound but the energy one: the energy axis is what the front trades.
    unbudgeted = dataclasses.replace(config, device=dataclasses.replace(
        config.device, budget_mj=math.inf))
    within = _front_of([e for e in usable if not violations(e, unbudgeted)], OBJECTIVES[:2])
    bounds = {"budget_mj": config.device.budget_mj, "eps_bound": config.eps_bound,
              "latency_bound_ms": config.device.latency_bound_ms or None}
  return {"objectives": [{"name": n, "maximize": up} for n, up in OBJECTIVES],
          "points": points, "privacy_energy": within, "considered": len(usable),
          "left_out": len(evaluations) - len(usable), **bounds}


def hypervolume(evaluations: Sequence[dict[str, Any]], config: FitnessConfig,
                objectives: Sequence[str] = ("privacy", "energy_mj", "eps")) -> float:
  """Hypervolume (moocore) of the feasible evaluated genomes (feasible as the search judges
  it: :func:`~maxpart_jax.search.fitness.violations`): the volume of the feasible box
  ``0 <= P``, ``E < E_b``, ``ε < ε_b`` that they dominate, over ``objectives`` (privacy up,
  energy and ε down; any subset, e.g. ``("privacy", "energy_mj")`` for the
  privacy-energy plane of the genomes within ε_b). One number per search that grows with
  every genome that pushes the front out, and is 0 when nothing feasible was found.
  """
  import moocore
  bounds = {"privacy": 0.0, "energy_mj": config.device.budget_mj, "eps": config.eps_bound}
  sign = {"privacy": -1.0, "energy_mj": 1.0, "eps": 1.0}
  rows = [[sign[o] * float(e[o]) for o in objectives] for e in evaluations
          if not violations(e, config) and e["privacy"] > 0]
  if not rows:
    return 0.0
  return float(moocore.hypervolume(np.array(rows), ref=np.array([bounds[o] for o in objectives])))


def _front_of(entries: Sequence[dict[str, Any]], objectives: Sequence[tuple[str, bool]]
              ) -> list[dict[str, Any]]:
  """Copies of the non-dominated ``entries`` over ``objectives``, by energy."""
  if not entries:
    return []
  values = np.array([[float(e[name]) for name, _ in objectives] for e in entries])
  mask = np.asarray(non_dominated(values, [up for _, up in objectives]))
  return sorted((dict(e) for e, keep in zip(entries, mask) if keep),
                key=lambda p: (p["energy_mj"], -p["privacy"]))


def plot_front(result: dict[str, Any], evaluations: Sequence[dict[str, Any]], path: str,
               baselines: Sequence[dict[str, Any]] = (), title: str = "") -> None:
  """Privacy against edge energy: every evaluation in gray, the front coloured by accuracy,
  the feasible region shaded (E < E_b), and the baselines as reference points."""

  fig, ax = plotting.subplots(figsize=(7.5, 5), layout="constrained")
  ax.scatter([e["energy_mj"] for e in evaluations], [e["privacy"] for e in evaluations],
             s=12, color="0.75", label="evaluated")
  pts = result["points"]
  if pts:
    sc = ax.scatter([p["energy_mj"] for p in pts], [p["privacy"] for p in pts],
                    c=[100 * p["accuracy"] for p in pts], cmap="viridis", s=45,
                    edgecolors=["black" if p.get("feasible") else "red" for p in pts],
                    label="Pareto front (black edge: feasible)")
    fig.colorbar(sc, ax=ax, label="validation top-1 (%)")
  within = result.get("privacy_energy") or []
  if within:
    ax.step([p["energy_mj"] for p in within], [p["privacy"] for p in within], where="post",
            color="tab:blue", lw=1.2,
            label=f"most private within ε_b = {result['eps_bound']}, per energy")
  for b in baselines:
    ax.scatter(b["energy_mj"], b["privacy"], marker="*", s=140, color="tab:orange",
               edgecolors="k", zorder=3)
    ax.annotate(b["strategy"], (b["energy_mj"], b["privacy"]), fontsize=7,
                xytext=(4, 4), textcoords="offset points")
  if result.get("budget_mj") is not None:
    lo, hi = ax.get_xlim()
    ax.axvline(result["budget_mj"], color="k", ls="--", lw=1)
    ax.axvspan(lo, result["budget_mj"], color="green", alpha=0.06,
               label=f"E < E_b = {result['budget_mj']} mJ")
    ax.set_xlim(lo, hi)
  ax.set(xlabel="edge energy (mJ per image)", ylabel="privacy P (higher is more private)",
         title=title or "Pareto front: privacy, energy and accuracy")
  ax.legend(fontsize=7, loc="lower right")
  fig.savefig(path, dpi=110)
