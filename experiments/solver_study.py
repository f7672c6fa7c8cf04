r"""How many fine-tunings the solver needs, against the searches that spend them all.

  python -m experiments.strategy_study --config=experiments/configs/search.py:quick \
      --config.search.iterations=48 --seeds=3 --algorithms=solver,ga_solver \
      --workdir=workdirs/solver_study_quick --out=workdirs/solver_study_quick/out
  python -m experiments.solver_study --config=experiments/configs/search.py:quick \
      --runs=workdirs/solver_study_quick --baseline=results/pareto/strategies/strategies.json \
      --out=results/search_solver/quick

Reads the finished searches in the ``--runs`` folders (``<algorithm>_seed<s>`` inside, as
``experiments.strategy_study`` leaves them; a search that used the solver is labelled with
its estimator and its plan's margins, e.g. ``solver[hessian; margins 0.75,0.5]`` or
``solver[loss; no margin]``; ``ga`` and ``random`` folders join the baseline)
and, from ``--baseline`` (files of the same config: a ``strategies.json``, one GA search's
``best.json``, or an earlier ``solver_study.json``, whose runs all join, marked with the file
they came from, as do the genomes it evaluated), the GA's and random search's curves of best
feasible privacy. An earlier study is how runs whose folders are gone stay in the comparison.
Reports, per
run: the best feasible privacy after each fine-tuned candidate (and after 1, 2, 4, ...), how
many candidates it took to come within ``--tolerance`` of the best any GA run reached with
its whole budget, and the search's time; and how well the solver's estimates rank what was
measured (Spearman ρ of predicted against measured ε and privacy, over every distinct genome
the runs evaluated, for both estimators). Writes ``solver_study.json`` and ``solver_study.png``.
"""

from __future__ import annotations

import glob
import json
import os

from absl import app, flags, logging
import numpy as np
from scipy import stats

from experiments import common
from maxpart_jax import checkpoint
from maxpart_jax.genome import Genome
from maxpart_jax.search import settings, solver, storage
from maxpart_jax.search.fitness import FitnessConfig, violations
from maxpart_jax.studies.strategy_study import curves

_CONFIG = common.define_config("experiments/configs/search.py:quick", "search config and variant")
_RUNS = flags.DEFINE_list("runs", ["workdirs/solver_study_quick"],
                          "folders of finished searches (<algorithm>_seed<s> inside)")
_BASELINE = flags.DEFINE_list(
    "baseline", ["results/pareto/strategies/strategies.json"],
    "strategies.json files with the GA's (and random search's) runs, GA searches' best.json "
    "(the final answer only, e.g. a reproduction's), earlier solver_study.json files (all their "
    "runs and genomes), or none when the --runs folders hold the GA's")
_OUT = flags.DEFINE_string("out", "results/search_solver/quick", "where the JSON and plot go")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.01, "how close to the GA's best counts as reached")


AFTER = (1, 2, 4, 6, 8, 16, 32, 64, 128)
"""Numbers of fine-tunings at which the summary reads every run's best feasible privacy."""


def _margins(report: dict) -> str:
  """What a solver search's ``best.json`` says of its plan's margins (a search stored before
  they existed had none)."""
  margins = report.get("identity", {}).get("search.solver.margins", [])
  return f"margins {','.join(f'{m:g}' for m in margins)}" if margins else "no margin"


def earlier_runs(path: str) -> tuple[dict[str, list[dict]], dict[str, dict], dict | None]:
  """The runs a result file holds, the genomes it evaluated (by key) and, for an earlier
  solver study that did not store its genomes, its ranking.

  A ``strategies.json`` gives its GA and random-search runs, a search's ``best.json`` its
  final answer, an earlier ``solver_study.json`` every run (each marked ``from``: ``path``).
  """
  with open(path) as f:
    earlier = json.load(f)
  if "summary" in earlier and "ranking" in earlier:  # a solver study
    runs = {name: [{**r, "from": r.get("from", path)} for r in rows]
            for name, rows in earlier["runs"].items()}
    if "evaluated" in earlier:
      return runs, {e["key"]: e for e in earlier["evaluated"]}, None
    ranking = {k: v for k, v in earlier["ranking"].items()
               if not isinstance(v, list)}  # the figures, not the per-genome arrays
    for estimator in solver.ESTIMATORS:
      ranking[estimator] = {k: v for k, v in ranking[estimator].items()
                            if not isinstance(v, list)}
    return runs, {}, ranking
  if "runs" in earlier:
    return {name: [{"best_feasible_privacy": r["best_feasible_privacy"],
                    "evaluations": r["evaluations"], "seconds": r["seconds"]}
                   for r in earlier["runs"][name]]
            for name in ("ga", "random") if name in earlier["runs"]}, {}, None
  # one search's report: where it ended, not how it got there
  return {"ga": [{"best_feasible_privacy": [earlier["privacy"]], "final_only": True,
                  "evaluations": earlier["evaluations"],
                  "seconds": earlier["search_seconds"]}]}, {}, None


def collect(baselines: list[str], run_dirs: list[str], fitness: FitnessConfig
            ) -> tuple[dict[str, list[dict]], dict[str, dict], dict[str, dict]]:
  """Every run of ``baselines`` (:func:`earlier_runs`) and of the finished searches in
  ``run_dirs``, by algorithm; the distinct genomes they evaluated, by key (a search's own
  entry wins over an earlier file's); the rankings of earlier studies without genomes."""
  runs: dict[str, list[dict]] = {}
  evaluated: dict[str, dict] = {}
  rankings: dict[str, dict] = {}
  for path in baselines:
    found, genomes, ranking = earlier_runs(path)
    for name, rows in found.items():
      runs.setdefault(name, []).extend(rows)
    evaluated.update(genomes)
    if ranking is not None:
      rankings[path] = ranking
  folders = sorted(f for runs_dir in run_dirs for f in glob.glob(os.path.join(runs_dir, "*_seed*")))
  for folder in folders:
    algorithm = os.path.basename(folder).rsplit("_seed", 1)[0]
    if not os.path.exists(os.path.join(folder, "best.json")):
      logging.warning("%s has not finished: left out", folder)
      continue
    with open(os.path.join(folder, "best.json")) as f:
      report = json.load(f)
    if report.get("solver"):
      algorithm += f"[{report['solver']['estimator']}; {_margins(report)}]"
    evaluations = storage.load_evaluations(folder)
    for e in evaluations:
      evaluated[e["key"]] = e
    runs.setdefault(algorithm, []).append({
        "from": folder,
        "best_feasible_privacy": curves(evaluations, fitness)["best_feasible_privacy"],
        "evaluations": len(evaluations), "seconds": report["search_seconds"],
        "reported_p": report["p"], "reported_privacy": report["privacy"],
        "feasible": report["feasible"], "test_accuracy": report["test_accuracy"],
        "float_test_accuracy": report["float_test_accuracy"], "solver": report.get("solver")})
  return runs, evaluated, rankings


def first_within(curve: list[float], target: float, tolerance: float) -> int | None:
  """1-based number of candidates after which ``curve`` is within ``tolerance`` of
  ``target`` (None: never)."""
  hits = [i + 1 for i, v in enumerate(curve) if v >= target - tolerance]
  return hits[0] if hits else None


def spearman(predicted: np.ndarray, measured: np.ndarray) -> float:
  """Spearman's ρ (NaN for fewer than 3 finite pairs)."""
  keep = np.isfinite(predicted) & np.isfinite(measured)
  if keep.sum() < 3:
    return float("nan")
  return float(stats.spearmanr(predicted[keep], measured[keep]).statistic)


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  config = _CONFIG.value
  fitness = settings.fitness_from_config(config)
  runs, evaluated, earlier_rankings = collect(_BASELINE.value, _RUNS.value, fitness)
  if not runs.get("ga"):
    raise app.UsageError("no GA run to compare with: give --baseline or a ga_seed<s> folder")
  target = max(r["best_feasible_privacy"][-1] for r in runs["ga"])
  summary = {}
  for algorithm, rows in runs.items():
    full = [r["best_feasible_privacy"] for r in rows if not r.get("final_only")]
    reached = [None if r.get("final_only") else
               first_within(r["best_feasible_privacy"], target, _TOLERANCE.value) for r in rows]
    summary[algorithm] = {
        "seeds": len(rows), "final_best_feasible_privacy": [r["best_feasible_privacy"][-1]
                                                            for r in rows],
        "fine_tunings_to_reach": reached, "fine_tunings": [r["evaluations"] for r in rows],
        "search_seconds": [r["seconds"] for r in rows],
        # the best feasible privacy after n fine-tunings (0: none feasible yet), each run
        "after": {n: [c[min(n, len(c)) - 1] for c in full] for n in AFTER
                  if full and n <= max(len(c) for c in full)}}

  # How well the estimates rank the measured genomes (every distinct one the runs evaluated).
  from maxpart_jax.search import build  # pylint: disable=import-outside-toplevel
  evaluator = build.build_evaluator(config)
  estimates, _ = solver.estimates_from_config(config, evaluator)
  genomes = [Genome.from_json(e["genome"]) for e in evaluated.values()]
  stacked = solver.stack_genomes(genomes)
  measured = {m: np.array([e[m] for e in evaluated.values()], np.float64)
              for m in ("eps", "privacy")}
  feasible = np.array([not violations(e, fitness) for e in evaluated.values()])
  ranking = {}
  for estimator in solver.ESTIMATORS:
    predicted = solver.predict(evaluator.model.info, estimates, stacked, estimator)
    ranking[estimator] = {
        "spearman_eps": spearman(predicted["eps"], measured["eps"]),
        "spearman_privacy": spearman(predicted["privacy"], measured["privacy"]),
        "predicted_feasible_agrees": float(np.mean((predicted["eps"] < fitness.eps_bound)
                                                   == (measured["eps"] < fitness.eps_bound))),
        "predicted_eps": predicted["eps"].tolist()}
  out = {"config": common.summary(config), "target_privacy": target,
         "eps_bound": fitness.eps_bound,
         "tolerance": _TOLERANCE.value, "baseline": _BASELINE.value,
         "estimates_seconds": estimates.seconds, "accuracy_per_loss": estimates.accuracy_per_loss,
         "summary": summary, "ranking": {"genomes": len(genomes),
                                         "feasible": int(feasible.sum()),
                                         "measured_eps": measured["eps"].tolist(),
                                         **ranking},
         "earlier_rankings": earlier_rankings, "runs": runs,
         "evaluated": list(evaluated.values())}
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.write_json(os.path.join(_OUT.value, "solver_study.json"), out)
  _plot(out, os.path.join(_OUT.value, "solver_study.png"))
  for algorithm, row in summary.items():
    print(f"{algorithm:9s} best feasible P {row['final_best_feasible_privacy']}  fine-tunings to "
          f"within {_TOLERANCE.value} of {target:.4f}: {row['fine_tunings_to_reach']} of "
          f"{row['fine_tunings']}  search s {[round(s) for s in row['search_seconds']]}")
  for estimator in solver.ESTIMATORS:
    r = ranking[estimator]
    print(f"{estimator:8s} Spearman eps {r['spearman_eps']:.3f}  privacy "
          f"{r['spearman_privacy']:.3f}  feasibility agrees {r['predicted_feasible_agrees']:.2f} "
          f"({len(genomes)} genomes)")
  for path, r in earlier_rankings.items():
    print(f"{path} (its genomes were not stored, so not merged): Spearman eps " +
          ", ".join(f"{e} {r[e]['spearman_eps']:.3f}" for e in solver.ESTIMATORS) +
          f" over its {r['genomes']} genomes")


def _plot(out: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
  colors = {"ga": "tab:blue", "random": "tab:gray", "solver[loss": "tab:red",
            "solver[hessian": "tab:orange", "ga_solver[loss": "tab:green",
            "ga_solver[hessian": "tab:olive"}
  for algorithm, rows in out["runs"].items():
    color = colors.get(algorithm.split(";")[0])
    style = ":" if "no margin" in algorithm else "-"  # a plan without margins
    for i, r in enumerate(rows):
      curve = r["best_feasible_privacy"]
      label = algorithm if i == 0 else None
      if r.get("final_only"):  # its answer after all its fine-tunings
        ax1.plot([r["evaluations"]], curve, "s", color=color, label=label)
        continue
      ax1.step(np.arange(1, len(curve) + 1), curve, where="post", color=color, ls=style,
               alpha=0.8, lw=1.4, marker="o", markersize=3, label=label)
  ax1.axhline(out["target_privacy"], color="k", ls=":", lw=1,
              label=f"GA's best ({out['target_privacy']:.3f})")
  ax1.set(xscale="log", xlabel="fine-tuned candidates", ylabel="best feasible privacy P",
          title="the answer after each fine-tuning")
  ax1.legend(fontsize=8)
  measured = np.array(out["ranking"]["measured_eps"])
  for estimator, marker in zip(solver.ESTIMATORS, ("o", "x")):
    r = out["ranking"][estimator]
    ax2.scatter(r["predicted_eps"], measured, marker=marker, s=18, alpha=0.7,
                label=f"{estimator}: Spearman ρ {r['spearman_eps']:.2f}")
  ax2.set(xlabel="predicted ε (before fine-tuning)", ylabel="measured ε",
          title="accuracy cost: predicted against measured")
  ax2.axhline(out["eps_bound"], color="k", ls=":", lw=1)
  ax2.legend(fontsize=8)
  fig.suptitle(out["config"], fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
