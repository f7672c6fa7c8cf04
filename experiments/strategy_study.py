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
within E_b and ε_b; :func:`maxpart_jax.search.pareto.hypervolume`) and the best feasible privacy, after
every evaluation. Every search runs in ``<workdir>/<algorithm>_seed<s>`` and resumes there
(``--first_seed`` splits the seeds over jobs that share a workdir);
all score candidates on the same images (those of ``search.seed = 0``). Writes
``strategies.json`` and ``strategies.png`` to ``--out``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from experiments import common
from maxpart_jax import checkpoint
from maxpart_jax.jobs import driver, settings, storage
from maxpart_jax.studies.strategy_study import algorithm_config, curves, plot, summarize

_CONFIG = common.define_config("experiments/configs/search.py:quick", "search config and variant")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/strategy_study", "one folder per search")
_OUT = flags.DEFINE_string("out", "results/pareto/strategies", "where the JSON and plot go")
_SEEDS = flags.DEFINE_integer("seeds", 3, "searches per algorithm (search.seed = 0, 1, ...)")
_FIRST_SEED = flags.DEFINE_integer(
    "first_seed", 0, "the first search.seed (run seeds in several jobs over one --workdir)")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["ga", "nsga2", "random"], "algorithms to compare")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  base = _CONFIG.value
  budget, eps_bound = base.fitness.budget_mj, base.fitness.eps_bound
  evaluators, results = {}, {}
  seeds = range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value)
  for algorithm in _ALGORITHMS.value:
    results[algorithm] = []
    for seed in seeds:
      config = algorithm_config(base, algorithm, seed)
      workdir = os.path.join(_WORKDIR.value, f"{algorithm}_seed{seed}")
      logging.info("%s, seed %d (%d of %d): %s", algorithm, seed, seed - seeds[0] + 1,
                   len(seeds), workdir)
      try:
        report = driver.run_search(config, workdir, common.study_evaluator(evaluators, config))
      except driver.SearchFailed as e:  # its evaluations still count
        logging.warning("%s", e)
        with open(os.path.join(workdir, "best.json")) as f:
          report = json.load(f)
      evaluations = storage.load_evaluations(workdir)
      results[algorithm].append({
          **curves(evaluations, settings.fitness_from_config(config)),
          "evaluations": len(evaluations),
          "candidates": report["lookups"], "reported_p": report["p"],
          "reported_privacy": report["privacy"], "feasible": report["feasible"],
          "seconds": report["search_seconds"]})
  summary = {a: summarize(r) for a, r in results.items()}
  out = {"config": common.summary(base), "seeds": _SEEDS.value,
         "first_seed": _FIRST_SEED.value,
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
