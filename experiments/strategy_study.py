r"""The paper's penalty GA, NSGA-II and random search, at the same number of candidates.

  python -m experiments.strategy_study --config=experiments/configs/search.py:quick \
      --config.search.iterations=48 --seeds=3 --workdir=workdirs/strategy_study \
      --out=results/pareto/strategies

Runs the real search of ``--config`` (fine-tuning, privacy and energy of every candidate) with
each algorithm and seed, all making ``N + search.iterations`` candidates:

* ``ga``: the paper's Algorithm 1 (K = 1) with the config's operators;
* ``nsga2``: NSGA-II, N children per generation (K = N), binary tournaments (S = 2) and
  uniform crossover, constraints by constraint domination;
* ``random``: N + iterations genomes from the ``init`` operator.

Compares the hypervolume of the feasible genomes each search evaluated (privacy, energy, ε
within E_b and ε_b; :func:`maxpart_jax.pareto.hypervolume`) and the best feasible privacy, after
every evaluation. Every search runs in ``<workdir>/<algorithm>_seed<s>`` and resumes there;
all score candidates on the same images (those of ``search.seed = 0``). Writes
``strategies.json`` and ``strategies.png`` to ``--out``.
"""

from __future__ import annotations

import copy
import json
import os

from absl import app, flags, logging
import ml_collections
import numpy as np

from experiments import common
from maxpart_jax import checkpoint, pareto
from maxpart_jax.search import driver

_CONFIG = common.define_config("experiments/configs/search.py:quick", "search config and variant")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/strategy_study", "one folder per search")
_OUT = flags.DEFINE_string("out", "results/pareto/strategies", "where the JSON and plot go")
_SEEDS = flags.DEFINE_integer("seeds", 3, "searches per algorithm (search.seed = 0, 1, ...)")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["ga", "nsga2", "random"], "algorithms to compare")


def algorithm_config(base: ml_collections.ConfigDict, algorithm: str,
                     seed: int) -> ml_collections.ConfigDict:
  """``base`` set up for ``algorithm`` and ``seed``, with the same candidate budget."""
  config = copy.deepcopy(base)
  config.search.update(algorithm=algorithm, seed=seed)
  n = config.search.pop_size
  if algorithm == "ga":
    config.search.num_tournaments = 1
  elif algorithm == "nsga2":
    config.search.update(num_tournaments=n, sample_size=2, crossover="uniform")
  else:
    config.search.num_tournaments = n
  if config.search.iterations % config.search.num_tournaments:
    raise ValueError(f"search.iterations={config.search.iterations} must be a multiple of the "
                     f"population size {n} (NSGA-II makes N children per generation)")
  return config


def curves(evaluations: list[dict], budget_mj: float, eps_bound: float) -> dict[str, list]:
  """Hypervolume (3 objectives and privacy-energy) and best feasible privacy after each of a
  search's distinct evaluations, in the order it made them."""
  out = {"hypervolume": [], "hypervolume_pe": [], "best_feasible_privacy": []}
  best = 0.0
  for i, e in enumerate(evaluations):
    if not e["violations"]:
      best = max(best, e["privacy"])
    out["best_feasible_privacy"].append(best)
    seen = evaluations[:i + 1]
    out["hypervolume"].append(pareto.hypervolume(seen, budget_mj, eps_bound))
    out["hypervolume_pe"].append(pareto.hypervolume(seen, budget_mj, eps_bound,
                                                    ("privacy", "energy_mj")))
  return out


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
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
  for color, (algorithm, runs) in zip(("tab:blue", "tab:orange", "tab:gray"), results.items()):
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
  plt.close(fig)


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  base = _CONFIG.value
  budget, eps_bound = base.fitness.budget_mj, base.fitness.eps_bound
  evaluators, results = {}, {}
  for algorithm in _ALGORITHMS.value:
    results[algorithm] = []
    for seed in range(_SEEDS.value):
      config = algorithm_config(base, algorithm, seed)
      k = config.search.num_tournaments
      if k not in evaluators:  # the images of search.seed = 0 for every search
        first = copy.deepcopy(config)
        first.search.seed = 0
        evaluators[k] = driver.build_evaluator(first)
      workdir = os.path.join(_WORKDIR.value, f"{algorithm}_seed{seed}")
      logging.info("%s, seed %d of %d: %s", algorithm, seed + 1, _SEEDS.value, workdir)
      try:
        report = driver.run_search(config, workdir, evaluators[k])
      except driver.SearchFailed as e:  # its evaluations still count
        logging.warning("%s", e)
        with open(os.path.join(workdir, "best.json")) as f:
          report = json.load(f)
      evaluations = driver.load_evaluations(workdir)
      results[algorithm].append({
          **curves(evaluations, budget, eps_bound), "evaluations": len(evaluations),
          "candidates": report["lookups"], "reported_p": report["p"],
          "reported_privacy": report["privacy"], "feasible": report["feasible"],
          "seconds": report["search_seconds"]})
  summary = {a: summarize(r) for a, r in results.items()}
  out = {"config": common.summary(base), "seeds": _SEEDS.value,
         "candidates_per_search": base.search.pop_size + base.search.iterations,
         "budget_mj": budget, "eps_bound": eps_bound, "summary": summary, "runs": results}
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.write_json(os.path.join(_OUT.value, "strategies.json"), out)
  plot(results, os.path.join(_OUT.value, "strategies.png"),
       f"{base.pretrain.model.name} ×{base.pretrain.model.width}: "
       f"{out['candidates_per_search']} candidates "
       f"per search, {_SEEDS.value} seeds")
  for algorithm, row in summary.items():
    print(f"{algorithm:7s} hypervolume {row['hypervolume']['mean']:.3e} ± "
          f"{row['hypervolume']['std']:.1e}  privacy-energy HV {row['hypervolume_pe']['mean']:.4f}"
          f" ± {row['hypervolume_pe']['std']:.4f}  best feasible P "
          f"{row['best_feasible_privacy']['mean']:.4f} ± {row['best_feasible_privacy']['std']:.4f}"
          f"  distinct evaluations {row['evaluations']['mean']:.1f}")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
