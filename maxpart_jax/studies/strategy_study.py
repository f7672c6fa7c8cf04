"""The comparison of search algorithms at equal candidate budgets (run by
``experiments/strategy_study.py``): configs with the same budget, curves of hypervolume and
best feasible privacy over a search's evaluations, their summary and plot."""

from __future__ import annotations

import copy
import itertools

import ml_collections
import numpy as np

from maxpart_jax import plotting
from maxpart_jax.search import pareto
from maxpart_jax.search.fitness import FitnessConfig


STUDY_ALGORITHMS = ("ga", "nsga2", "random", "solver", "ga_solver")
"""What a study compares: the registered algorithms, and ``ga_solver`` (the GA whose initial
population is the solver's plan, ``search.init = "solver"``)."""


def algorithm_config(base: ml_collections.ConfigDict, algorithm: str,
                     seed: int) -> ml_collections.ConfigDict:
  """``base`` set up for ``algorithm`` and ``seed``, with the same candidate budget (the
  ``solver`` stops earlier when nothing left in its plan can win; K = 1, so it fine-tunes one
  candidate at a time and stops as soon as it can)."""
  if algorithm not in STUDY_ALGORITHMS:
    raise ValueError(f"unknown study algorithm {algorithm!r}; choose from {STUDY_ALGORITHMS}")
  config = copy.deepcopy(base)
  config.search.update(algorithm=algorithm, seed=seed)
  if algorithm == "ga_solver":
    config.search.update(algorithm="ga", init="solver")
  n = config.search.pop_size
  if algorithm in ("ga", "ga_solver", "solver"):
    config.search.num_tournaments = 1
  elif algorithm == "nsga2":
    config.search.update(num_tournaments=n, sample_size=2, crossover="uniform")
  else:
    config.search.num_tournaments = n
  if config.search.iterations % config.search.num_tournaments:
    raise ValueError(f"search.iterations={config.search.iterations} must be a multiple of the "
                     f"population size {n} (NSGA-II makes N children per generation)")
  return config


def best_feasible_privacy(evaluations: list[dict]) -> list[float]:
  """The best privacy among a search's feasible evaluations so far (0: none yet), after each
  of its distinct evaluations, in the order it made them."""
  return list(itertools.accumulate(
      (0.0 if e["violations"] else e["privacy"] for e in evaluations), max, initial=0.0))[1:]


def curves(evaluations: list[dict], config: FitnessConfig) -> dict[str, list]:
  """Hypervolume (3 objectives and privacy-energy) and best feasible privacy after each of a
  search's distinct evaluations, in the order it made them."""
  prefixes = [evaluations[:i + 1] for i in range(len(evaluations))]
  return {"hypervolume": [pareto.hypervolume(seen, config) for seen in prefixes],
          "hypervolume_pe": [pareto.hypervolume(seen, config, ("privacy", "energy_mj"))
                             for seen in prefixes],
          "best_feasible_privacy": best_feasible_privacy(evaluations)}


def summarize(runs: list[dict]) -> dict:
  """Mean, standard deviation and per-seed values of the final numbers of one algorithm."""
  row = {}
  for name in ("hypervolume", "hypervolume_pe", "best_feasible_privacy", "evaluations",
               "candidates"):
    values = [r[name][-1] if isinstance(r[name], list) else r[name] for r in runs]
    row[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                 "seeds": values}
  return row


def plot(results: dict, path: str, title: str) -> None:
  """Hypervolume and best feasible privacy against distinct evaluations, one line per seed."""

  fig, axes = plotting.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
  colors = ("tab:blue", "tab:orange", "tab:gray", "tab:green", "tab:red")
  for color, (algorithm, runs) in zip(colors, results.items()):
    for i, run in enumerate(runs):
      x = np.arange(1, len(run["hypervolume"]) + 1)
      for ax, name in zip(axes, ("hypervolume", "best_feasible_privacy")):
        ax.plot(x, run[name], color=color, alpha=0.8, lw=1.2,
                label=algorithm if i == 0 else None)
  axes[0].set(xlabel="distinct genomes evaluated", ylabel="feasible hypervolume (P, E, ε)",
              title="front of the feasible genomes")
  axes[1].set(xlabel="distinct genomes evaluated", ylabel="best feasible privacy P",
              title="the answer a search reports")
  axes[0].legend()
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
