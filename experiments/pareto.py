r"""The Pareto front (privacy up, edge energy down, accuracy up) of a search's evaluations.

  python -m experiments.pareto --workdir=workdirs/search_quick
  python -m experiments.pareto --workdir=workdirs/reproduce_cpu_resnet18 --out=results/pareto/r18

``--workdir`` is a search's workdir or a reproduction's (its search is in ``search/``; its
baselines are marked as reference points). Works on a finished search
(``evaluations.json``) or on one still running or killed (its latest state). E_b and ε_b
come from the workdir's ``config.json``. Writes ``pareto.json`` and ``pareto.png`` to
``--out`` (default: the search's workdir) and prints the front.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import common
from maxpart_jax import checkpoint
from maxpart_jax.energy import DeviceConfig
from maxpart_jax.search import pareto
from maxpart_jax.jobs import storage
from maxpart_jax.search.fitness import FitnessConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "a search's workdir", required=True)
_BASELINES = flags.DEFINE_string("baselines", "", "baselines.json to mark (default: the "
                                 "reproduction's, if --workdir is one)")
_OUT = flags.DEFINE_string("out", "", "output folder (default: the workdir)")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  workdir = search = _WORKDIR.value
  baselines_path = _BASELINES.value
  if os.path.isdir(os.path.join(workdir, "search")):  # a reproduction
    search = os.path.join(workdir, "search")
    baselines_path = baselines_path or os.path.join(workdir, "baselines.json")
  try:
    evaluations = storage.load_evaluations(search)
    with open(os.path.join(workdir, "config.json")) as f:
      stored = json.load(f)
    fitness = stored["fitness"]
    # Feasible as the search judged it: E_b, ε_b and the device's latency bound.
    config = FitnessConfig(eps_bound=fitness["eps_bound"], device=DeviceConfig(
        budget_mj=fitness["budget_mj"], **stored.get("device", {})))
    baselines = []
    if baselines_path:
      with open(baselines_path) as f:
        baselines = json.load(f)["rows"]
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  out = _OUT.value or search
  os.makedirs(out, exist_ok=True)
  result = pareto.front(evaluations, config)
  checkpoint.write_json(os.path.join(out, "pareto.json"), result)
  pareto.plot_front(result, evaluations, os.path.join(out, "pareto.png"), baselines)
  print(f"{len(result['points'])} of {result['considered']} evaluated genomes on the front "
        f"({result['left_out']} failed ones left out); E_b = {fitness['budget_mj']} mJ")
  for p in result["points"]:
    print(f"  p={p['genome']['p']:2d}  P={p['privacy']:.4f}  E={p['energy_mj']:.4f} mJ  "
          f"top-1={p['accuracy']:.4f}  eps={p['eps']:+.4f}  "
          f"{'feasible' if p.get('feasible') else 'infeasible'}")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
