r"""Algorithm 1 (K = 1) against the batched variant (K > 1) on real searches.

  python -m experiments.k_study_search --config=experiments/configs/search.py:quick \
      --seeds=10 --ks=1,8 --workdir=workdirs/k_study_quick --out=results/search_k/quick

``experiments/k_study.py`` compares the two on a cheap synthetic fitness; this runs the real
search of ``--config`` (fine-tuning, privacy and energy of every candidate) ``--seeds`` times
for each K, with the same number of children (``search.iterations``), and compares the final
best fitness and the children evaluated until it was first reached.

Every search runs in ``<workdir>/k<K>_seed<s>`` and resumes there when restarted, so the
study can be stopped and continued (it takes hours on a CPU). All searches score their
candidates on the same images (those of ``search.seed = 0``), so fitness values compare
across seeds. Writes ``k_study_search.json`` and ``k_study_search.png`` to ``--out``.
"""

from __future__ import annotations

import copy
import json
import os

from absl import app, flags, logging
import numpy as np

from experiments import common, k_compare
from maxpart_jax import checkpoint, runs
from maxpart_jax.jobs import driver

_CONFIG = common.define_config("experiments/configs/search.py:quick", "search config and variant")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/k_study_quick", "one folder per search")
_OUT = flags.DEFINE_string("out", "results/search_k/quick", "where the JSON and the plot go")
_SEEDS = flags.DEFINE_integer("seeds", 10, "searches per K (search.seed = 0, 1, ...)")
_KS = flags.DEFINE_list("ks", ["1", "8"], "children per step to compare")


def curve(history: list[dict], pop_size: int, k: int) -> dict[str, np.ndarray]:
  """Children evaluated, best fitness and best feasible fitness (NaN: none yet) after the
  initial population and after every step of one search's ``history.json``."""
  return {"children": pop_size + k * np.array([h["step"] for h in history], np.int64),
          "best": np.array([h["best_fitness"] for h in history], np.float64),
          "best_feasible": np.array([np.nan if h["best_feasible_fitness"] is None
                                     else h["best_feasible_fitness"] for h in history])}


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  base = _CONFIG.value
  ks = [int(k) for k in _KS.value]
  evaluators, outs = {}, {}
  for k in ks:
    curves = []
    for seed in range(_SEEDS.value):
      config = copy.deepcopy(base)
      config.search.num_tournaments, config.search.seed = k, seed
      workdir = os.path.join(_WORKDIR.value, f"k{k}_seed{seed}")
      logging.info("K = %d, seed %d of %d: %s", k, seed + 1, _SEEDS.value, workdir)
      try:
        driver.run_search(config, workdir, common.study_evaluator(evaluators, config))
      except driver.SearchFailed as e:  # its history still counts
        logging.warning("%s", e)
      with open(os.path.join(workdir, "history.json")) as f:
        curves.append(curve(json.load(f), config.search.pop_size, k))
    outs[k] = {name: np.stack([c[name] for c in curves]) for name in ("best", "best_feasible")}
    outs[k]["children"] = curves[0]["children"]
  rows = [k_compare.summarize(k, outs[k]) for k in ks]
  tests = k_compare.compare(rows) if len(ks) == 2 else {}
  result = {"config": common.summary(base), "seeds": _SEEDS.value,
            "iterations": base.search.iterations, "rows": rows, **tests,
            "environment": runs.environment()}
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.write_json(os.path.join(_OUT.value, "k_study_search.json"), result)
  k_compare.plot(outs, os.path.join(_OUT.value, "k_study_search.png"),
                 f"Algorithm 1 vs batched, {_SEEDS.value} real searches each")
  print(k_compare.report(rows, tests))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
