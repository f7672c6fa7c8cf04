r"""The best genomes of searches made with different privacy terms, each measured by every term.

  python -m experiments.privacy_term_compare --config=experiments/configs/search.py:quick \
      --searches=results/search_quick,workdirs/search_quick_attack \
      --metrics=mse,attack_ssim --out=results/search_attack

A search that maximises the paper's score P (``fitness.metric="mse"``) and one that maximises
an attack's failure (``attack_ssim``: 1 − SSIM of a learned decoder's reconstructions) may
choose different splits and bit widths. This fine-tunes and evaluates the best genome of
every search in ``--searches`` (folders with a ``best.json``) under every term in
``--metrics``, with ``--config`` otherwise unchanged, exactly as the search evaluates a
candidate: privacy, fitness, energy, ε and test accuracy. A genome measured by the term its
own search used gets the value its search reported. Writes ``compare.json`` and
``compare.md`` to ``--out``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections

from experiments import common
from maxpart_jax import checkpoint
from maxpart_jax.deploy.parity import reported_genome
from maxpart_jax.search import driver
from maxpart_jax.search.fitness import violations

_CONFIG = common.define_config("experiments/configs/search.py:quick", "search config and variant")
_SEARCHES = flags.DEFINE_list("searches", ["results/search_quick", "workdirs/search_quick_attack"],
                              "folders of finished searches (best.json, config.json)")
_METRICS = flags.DEFINE_list("metrics", ["mse", "attack_ssim"], "privacy terms to measure by")
_OUT = flags.DEFINE_string("out", "results/search_attack", "where compare.json / .md go")


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
    evaluator = driver.build_evaluator(measured)
    out = evaluator.evaluate(genomes, test=driver.load_test_split(measured, evaluator))
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


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  rows = compare(_CONFIG.value, _SEARCHES.value, _METRICS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.write_json(os.path.join(_OUT.value, "compare.json"), {"rows": rows})
  with open(os.path.join(_OUT.value, "compare.md"), "w") as f:
    f.write(markdown(rows))
  print(markdown(rows))
  logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
