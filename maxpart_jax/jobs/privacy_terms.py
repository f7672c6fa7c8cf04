"""Searches made with different privacy terms, their best genomes measured by every term.

A search that maximises the paper's score P (``fitness.metric="mse"``) and one that maximises
an attack's failure (``attack_ssim``, docs/method.md §10) may choose different splits and bit
widths. :func:`compare` evaluates the best genome of each search under each term, exactly as
a search evaluates a candidate (``experiments/privacy_term_compare.py`` runs it).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from maxpart_jax.jobs import build
from maxpart_jax.jobs.export import reported_genome
from maxpart_jax.search.fitness import violations


def searched_metric(search: str, report: dict[str, Any]) -> str:
  """The privacy term the search in ``search`` optimised: in its best.json, or for searches
  older than that field, in the config.json the search script wrote beside it."""
  if "privacy_metric" in report:
    return report["privacy_metric"]
  with open(os.path.join(search, "config.json")) as f:
    return json.load(f)["fitness"]["metric"]


def compare(config: ml_collections.ConfigDict, searches: list[str],
            metrics: list[str]) -> list[dict[str, Any]]:
  """One row per (search, metric): the search's best genome evaluated with ``metric``."""
  reported = [reported_genome(s) for s in searches]
  genomes = jax.tree.map(lambda *x: jnp.stack(x), *[g for g, _ in reported])
  rows = []
  for metric in metrics:
    measured = copy.deepcopy(config)
    measured.fitness.metric = metric
    evaluator = build.build_evaluator(measured)
    out = evaluator.evaluate(genomes, test=build.load_test_split(measured, evaluator))
    for i, (search, (_, report)) in enumerate(zip(searches, reported)):
      rows.append({
          "search": search, "searched_metric": searched_metric(search, report), "metric": metric,
          "p": report["p"], "block": report["block"],
          "w_bits": [l["w_bits"] for l in report["edge_layers"]],
          "reported_privacy": report["privacy"],
          **{k: float(out[k][i]) for k in ("privacy", "fitness", "energy_mj", "eps",
                                            "test_accuracy")},
          "violations": violations({k: float(v[i]) for k, v in out.items()},
                                   evaluator.config)})
  return rows


def markdown(rows: list[dict[str, Any]]) -> str:
  """The rows as a table, one line per (search, metric)."""
  lines = ["| search (its privacy term) | split | weight bits | measured by | privacy | "
           "fitness | energy (mJ) | ε (val) | test top-1 | constraints |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['search']} ({r['searched_metric']}) | {r['p']} ({r['block']}) | "
        f"{'/'.join(map(str, r['w_bits']))} | {r['metric']} | {r['privacy']:.4f} | "
        f"{r['fitness']:.4f} | {r['energy_mj']:.4f} | {r['eps']:.4f} | "
        f"{r['test_accuracy']:.4f} | {'; '.join(r['violations']) or 'met'} |")
  return "\n".join(lines) + "\n"
