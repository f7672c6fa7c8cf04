"""The report of a finished search: the reported genome's test-set numbers, ``best.json``,
the history and evaluation files, the Pareto front and the plots."""

from __future__ import annotations

import csv
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from maxpart_jax import checkpoint, distributed, runs
from maxpart_jax.genome import Genome, effective_bits
from maxpart_jax.jobs import plots
from maxpart_jax.jobs.build import load_test_split
from maxpart_jax.jobs.caching import (
  METRICS,
  CachedEvaluator,
  best_feasible,
  effective_key,
  evaluations_list,
  failure_counts,
)
from maxpart_jax.search import algorithms, pareto
from maxpart_jax.search.fitness import Evaluator, violations


def history_row(state: algorithms.State, cached: CachedEvaluator, step: int) -> dict[str, Any]:
  best = cached.cache[effective_key(cached.evaluator.model.info, state.best)]
  feasible = best_feasible(cached.cache, cached.evaluator.config)
  return {"step": step, "evaluations": len(cached.cache), "lookups": cached.lookups,
          "best_fitness": float(state.best_fitness),
          "mean_fitness": float(jnp.mean(state.fitness)), "best_p": int(state.best.p),
          "best_privacy": best["privacy"], "best_energy_mj": best["energy_mj"],
          "best_eps": best["eps"],
          "best_feasible_fitness": feasible[1]["fitness"] if feasible else None}


def final_report(config: ml_collections.ConfigDict, workdir: str, evaluator: Evaluator,
                 cached: CachedEvaluator, state: algorithms.State, meta_out: dict[str, Any]
                 ) -> dict[str, Any]:
  """Test-set numbers of the reported genome, history files and plots.

  The reported genome is the best *feasible* one (Eq. 4). The best by fitness is named
  beside it when it differs; if no genome was feasible, it is reported with its
  violations, and ``feasible`` is false.
  """
  info = evaluator.model.info
  by_fitness_key = effective_key(info, state.best)
  feasible = best_feasible(cached.cache, evaluator.config)
  key = feasible[0] if feasible else by_fitness_key
  best = state.best if key == by_fitness_key else Genome.from_json(cached.cache[key]["genome"])
  metrics = cached.cache[key]
  broken = violations(metrics, evaluator.config)
  if broken:
    logging.warning("no evaluated genome meets the constraints; reporting the best by fitness, "
                    "which breaks: %s", "; ".join(broken))
  test = load_test_split(config, evaluator)
  test_accuracy = float(evaluator.evaluate(jax.tree.map(lambda x: x[None], best),
                                           test=test)["test_accuracy"][0])
  float_test = evaluator.float_accuracy_on(test)
  w, a, ir_bits = effective_bits(info, best)
  by_fitness = cached.cache[by_fitness_key]
  report = {
      "model": evaluator.model.name, "dataset": evaluator.train.dataset, "p": int(best.p),
      "block": info.blocks[int(best.p) - 1].label,
      "ir_bits": int(ir_bits),
      # The bits that run: edge layers only (32: left in float, e.g. the stem conv).
      "edge_layers": [{"layer": layer.name, "block": info.blocks[layer.block].label,
                       "w_bits": int(w[layer.id]), "a_bits": int(a[layer.id])}
                      for layer in info.layers if layer.block < int(best.p)],
      # The genome with every gene that does not run (cloud layers, unquantized layers)
      # set to 32: evaluates exactly like the one the search found.
      "genome": Genome(p=best.p, w_bits=w, a_bits=a).to_json(),
      "fitness": metrics["fitness"], **{f"val_{m}": metrics[m] for m in METRICS},
      "feasible": not broken, "violations": broken,
      "best_by_fitness": {
          "same_genome": key == by_fitness_key, "p": int(state.best.p),
          "block": info.blocks[int(state.best.p) - 1].label,
          **{m: by_fitness[m] for m in ("fitness", "privacy", "energy_mj", "eps")},
          "violations": violations(by_fitness, evaluator.config)},
      "test_accuracy": test_accuracy, "float_test_accuracy": float_test,
      "test_eps": float_test - test_accuracy, "energy_mj": metrics["energy_mj"],
      "latency_ms": metrics["latency_ms"], "latency_bound_ms": config.device.latency_bound_ms,
      "privacy": metrics["privacy"], "privacy_metric": config.fitness.metric,
      "budget_mj": config.fitness.budget_mj, "eps_bound": config.fitness.eps_bound,
      "float_val_accuracy": evaluator.float_accuracy,
      "evaluations": len(cached.cache), "lookups": cached.lookups,
      "cache_hit_rate": cached.hits / max(cached.lookups, 1), "search_seconds": meta_out["seconds"],
      **failure_counts(cached.cache), "collapsed": bool(metrics["collapsed"]),
      "phase_seconds": meta_out["phase_seconds"], "steps": int(state.step),
      "tournaments_per_step": config.search.num_tournaments, "devices": evaluator.num_devices,
      "environment": runs.environment(),
      # What the result depends on (storage.search_identity): export_split checks it.
      "identity": meta_out["identity"],
  }
  if "solver" in meta_out:  # what the solver's plan cost (search.algorithm or init "solver")
    report["solver"] = meta_out["solver"]
  if distributed.is_leader():  # the others computed the same report
    _write_files(workdir, evaluator, cached, report, meta_out)
  logging.info("best genome: p=%d (%s), P=%.4f, E=%.4f mJ, latency %.3f ms, test accuracy "
               "%.4f (float %.4f)", report["p"], report["block"], report["privacy"],
               report["energy_mj"], report["latency_ms"], test_accuracy, float_test)
  return report


def _write_files(workdir: str, evaluator: Evaluator, cached: CachedEvaluator,
                 report: dict[str, Any], meta_out: dict[str, Any]) -> None:
  """``best.json``, the history and evaluation files, the Pareto front and the plots."""
  checkpoint.write_json(os.path.join(workdir, "best.json"), report)
  checkpoint.write_json(os.path.join(workdir, "history.json"), meta_out["history"])
  with open(os.path.join(workdir, "history.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(meta_out["history"][0]))
    writer.writeheader()
    writer.writerows(meta_out["history"])
  evaluations = evaluations_list(cached.cache, evaluator.config)
  checkpoint.write_json(os.path.join(workdir, "evaluations.json"), evaluations)
  front = pareto.front(evaluations, evaluator.config)
  checkpoint.write_json(os.path.join(workdir, "pareto.json"), front)
  pareto.plot_front(front, evaluations, os.path.join(workdir, "pareto.png"),
                    title=f"{evaluator.model.name}: Pareto front of the evaluated genomes")
  plots.fitness_curve(meta_out["history"], os.path.join(workdir, "fitness.png"),
                      title=f"{evaluator.model.name}: best fitness (Fig. 10)")
  plots.policy_bits(report, os.path.join(workdir, "policy.png"))
