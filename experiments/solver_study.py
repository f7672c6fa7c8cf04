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
feasible privacy. An earlier study is how runs whose folders are gone stay in the comparison;
with ``--supersede`` the ``--runs`` searches replace its runs of the same label (a rerun).
Reports, per
run: the best feasible privacy after each fine-tuned candidate (and after 1, 2, 4, ...), how
many candidates it took to come within ``--tolerance`` of the best any GA run reached with
its whole budget, how many it fine-tuned (for the solver, beside its plan's length: what it
would have fine-tuned without its early stop), and the search's time; and how well the
solver's estimates rank what was measured (Spearman ρ of predicted against measured ε and
privacy, over every distinct genome the runs evaluated, for both estimators). Writes
``solver_study.json`` and ``solver_study.png``.
"""

from __future__ import annotations

import os

from absl import app, flags
import numpy as np

from experiments import common
from maxpart_jax import checkpoint
from maxpart_jax.genome import Genome
from maxpart_jax.search import solver
from maxpart_jax.jobs import planning, settings
from maxpart_jax.search.fitness import violations
from maxpart_jax.studies.solver_study import collect, spearman, summarize

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
_SUPERSEDE = flags.DEFINE_bool(
    "supersede", False, "the --runs searches replace the --baseline files' runs of the same "
    "algorithm label (a rerun of those rows) instead of joining them")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  config = _CONFIG.value
  fitness = settings.fitness_from_config(config)
  runs, evaluated, earlier_rankings = collect(_BASELINE.value, _RUNS.value, _SUPERSEDE.value)
  if not runs.get("ga"):
    raise app.UsageError("no GA run to compare with: give --baseline or a ga_seed<s> folder")
  target = max(r["best_feasible_privacy"][-1] for r in runs["ga"])
  summary = summarize(runs, target, _TOLERANCE.value)

  # How well the estimates rank the measured genomes (every distinct one the runs evaluated).
  from maxpart_jax.jobs import build  # pylint: disable=import-outside-toplevel
  evaluator = build.build_evaluator(config)
  estimates, _ = planning.estimates_from_config(config, evaluator)
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
    planned = (f" (plans of {row['plan_candidates']} without the early stop)"
               if any(n is not None for n in row["plan_candidates"]) else "")
    print(f"{algorithm:9s} best feasible P {row['final_best_feasible_privacy']}  fine-tunings to "
          f"within {_TOLERANCE.value} of {target:.4f}: {row['fine_tunings_to_reach']} of "
          f"{row['fine_tunings']}{planned}  search s {[round(s) for s in row['search_seconds']]}")
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
          title=f"accuracy cost: predicted against measured ({out['ranking']['genomes']} genomes)")
  ax2.axhline(out["eps_bound"], color="k", ls=":", lw=1)
  ax2.legend(fontsize=8)
  fig.suptitle(out["config"], fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
