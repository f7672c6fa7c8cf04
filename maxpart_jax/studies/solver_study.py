"""The solver study (run by ``experiments/solver_study.py``): the runs it compares, from
searches' folders and earlier result files, and the figures it reads from them."""

from __future__ import annotations

import glob
import json
import os

from absl import logging
import numpy as np
from scipy import stats

from maxpart_jax.search import solver
from maxpart_jax.jobs import storage
from maxpart_jax.studies.strategy_study import best_feasible_privacy


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


def collect(baselines: list[str], run_dirs: list[str], supersede: bool = False
            ) -> tuple[dict[str, list[dict]], dict[str, dict], dict[str, dict]]:
  """Every run of ``baselines`` (:func:`earlier_runs`) and of the finished searches in
  ``run_dirs``, by algorithm; the distinct genomes they evaluated, by key (a search's own
  entry wins over an earlier file's); the rankings of earlier studies without genomes.

  ``supersede``: the searches of ``run_dirs`` replace the baselines' runs of the same
  algorithm (a rerun of those rows after a change to the algorithm) instead of joining them.
  """
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
  rerun: set[str] = set()
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
    if supersede and algorithm not in rerun:
      rerun.add(algorithm)
      runs[algorithm] = []
    runs.setdefault(algorithm, []).append({
        "from": folder,
        "best_feasible_privacy": best_feasible_privacy(evaluations),
        "evaluations": len(evaluations), "seconds": report["search_seconds"],
        "reported_p": report["p"], "reported_privacy": report["privacy"],
        "feasible": report["feasible"], "test_accuracy": report["test_accuracy"],
        "float_test_accuracy": report["float_test_accuracy"], "solver": report.get("solver")})
  return runs, evaluated, rankings


AFTER = (1, 2, 4, 6, 8, 16, 32, 64, 128)
"""Numbers of fine-tunings at which the summary reads every run's best feasible privacy."""


def plan_candidates(algorithm: str, row: dict) -> int | None:
  """How many fine-tunings a run of the ``solver`` algorithm would have spent without its
  early stop: its plan's length (``search.iterations`` also stops it); None for other runs
  and for runs stored without their plan's summary."""
  if not algorithm.startswith("solver") or not row.get("solver"):
    return None
  return row["solver"]["candidates"]


def summarize(runs: dict[str, list[dict]], target: float, tolerance: float) -> dict[str, dict]:
  """Per algorithm, over its runs: the final best feasible privacy, how many fine-tunings
  each took to come within ``tolerance`` of ``target``, how many it spent (and, for the
  solver, how many its plan holds: :func:`plan_candidates`), its time, and its best
  feasible privacy after each of :data:`AFTER` fine-tunings."""
  summary = {}
  for algorithm, rows in runs.items():
    full = [r["best_feasible_privacy"] for r in rows if not r.get("final_only")]
    summary[algorithm] = {
        "seeds": len(rows), "final_best_feasible_privacy": [r["best_feasible_privacy"][-1]
                                                            for r in rows],
        "fine_tunings_to_reach": [None if r.get("final_only") else
                                  first_within(r["best_feasible_privacy"], target, tolerance)
                                  for r in rows],
        "fine_tunings": [r["evaluations"] for r in rows],
        "plan_candidates": [plan_candidates(algorithm, r) for r in rows],
        "search_seconds": [r["seconds"] for r in rows],
        # the best feasible privacy after n fine-tunings (0: none feasible yet), each run
        "after": {n: [c[min(n, len(c)) - 1] for c in full] for n in AFTER
                  if full and n <= max(len(c) for c in full)}}
  return summary


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
