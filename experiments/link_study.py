r"""Where the best split moves with the link: energy per bit, bandwidth and a latency bound.

  python -m experiments.link_study --workdir=workdirs/reproduce_cpu_resnet18 \
      --out=results/link

Privacy and accuracy of a deployment do not depend on the link; its energy and latency do,
analytically (maxpart_jax/energy.py). This re-scores every genome a reproduction's search
measured under each link of a grid, with transmission
counted: for every energy per bit (``--tx_pj``, from the paper's 100 pJ/bit to the nJ/bit of
Wi-Fi and cellular radios) and bandwidth (``--bandwidth_mbps``), the most private genome
within E_b, ε_b and the latency bound (``--latency_bound_ms``; 0: none). No training runs, so
the grid takes seconds; the answers are the best among the genomes that search measured, not
what a new search per link would find. Writes ``link_study.json``, ``link_study.png`` and
``link_study.md`` to ``--out``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import ml_collections

from experiments import common
from maxpart_jax import checkpoint, runs
from maxpart_jax.jobs import settings
from maxpart_jax.studies.link_study import best_per_link, measured_pool, plot, table

_WORKDIR = flags.DEFINE_string("workdir", None, "a reproduction's workdir", required=True)
_OUT = flags.DEFINE_string("out", "results/link", "output folder")
_TX = flags.DEFINE_list("tx_pj", ["100", "300", "1000", "3000", "10000"],
                        "link energies per bit (pJ)")
_BANDWIDTH = flags.DEFINE_list("bandwidth_mbps", ["0.25", "1", "10", "100"], "link rates")
_LATENCY = flags.DEFINE_float("latency_bound_ms", 100.0, "latency bound (0: none)")
_LOSS = flags.DEFINE_float("loss_rate", 0.0, "packet loss rate of every link")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  try:
    with open(os.path.join(_WORKDIR.value, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
    pool = measured_pool(_WORKDIR.value)
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  if "device" not in config:  # a reproduction from before the device settings existed
    from experiments.configs import search as search_configs
    config.device = search_configs.get_config("quick").device
  info = settings.energy_info_from_config(config) or settings.info_from_spec(
      config.pretrain.model.to_dict())
  tx = [float(t) for t in _TX.value]
  bandwidths = [float(b) for b in _BANDWIDTH.value]
  out = {"workdir": _WORKDIR.value, "pool": len(pool), "budget_mj": config.fitness.budget_mj,
         "eps_bound": config.fitness.eps_bound, "energy_model": config.energy_model.to_dict(),
         "environment": runs.environment()}
  for name, bound, bws in (("no_latency_bound", 0.0, [bandwidths[0]]),
                           ("latency_bound", _LATENCY.value, bandwidths)):
    out[name] = [best_per_link(pool, config, info, t, b, bound, _LOSS.value)
                 for b in bws for t in tx]
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.write_json(os.path.join(_OUT.value, "link_study.json"), out)
  plot(out["no_latency_bound"], out["latency_bound"], tx, bandwidths, info.max_split,
       os.path.join(_OUT.value, "link_study.png"), _LATENCY.value)
  text = (f"# Best split per link ({len(pool)} measured genomes of {_WORKDIR.value})\n\n"
          f"## Energy only (E_b = {config.fitness.budget_mj} mJ, ε_b = "
          f"{config.fitness.eps_bound}, transmission counted)\n\n{table(out['no_latency_bound'])}"
          f"\n\n## With latency < {_LATENCY.value:g} ms\n\n{table(out['latency_bound'])}\n")
  with open(os.path.join(_OUT.value, "link_study.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
