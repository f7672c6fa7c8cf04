r"""Edge energy of every block split of a model under a uniform policy (docs/method.md §5).

  python -m experiments.energy_report --model=resnet18 --weight_bits=8 --act_bits=8 \
      [--transmission=true|false] [--budget_mj=0.35] [--json=PATH]

``--weight_bits=32`` is full precision. As in the paper, the first conv and the
classifier stay at 32 bits. Energy is analytic (per image): no data, no weights.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags
import numpy as np

from maxpart_jax.energy import DeviceConfig
from maxpart_jax.models import SplitModel, available_models, get_model
from maxpart_jax.studies.baselines import deepest_split, split_energies

_MODEL = flags.DEFINE_string("model", "resnet18", f"one of {available_models()}")
_WIDTH = flags.DEFINE_float("width", 1.0, "channel multiplier of the model")
_WBITS = flags.DEFINE_integer("weight_bits", 8, "weight bits of quantizable layers (32 = float)")
_ABITS = flags.DEFINE_integer("act_bits", None, "activation bits (default: --weight_bits)")
_TX = flags.DEFINE_bool("transmission", True, "include the energy of sending the IR")
_BUDGET = flags.DEFINE_float("budget_mj", DeviceConfig().budget_mj, "energy budget E_b in mJ")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON here")


def energy_report(model: SplitModel, weight_bits: int, act_bits: int, transmission: bool = True,
                  device: DeviceConfig = DeviceConfig()) -> dict[str, Any]:
  """Per-split energy of ``model`` at uniform bits, and the deepest split within budget."""
  info = model.info
  energy = split_energies(info, weight_bits, act_bits, device, transmission)
  compute, tx = np.asarray(energy.compute_mj), np.asarray(energy.transmission_mj)
  layers_on_edge = np.cumsum([len(b.layer_ids) for b in info.blocks])
  rows = [dict(index=p, block=info.blocks[p - 1].label, layers=int(layers_on_edge[p - 1]),
               compute_mj=float(compute[p - 1]), transmission_mj=float(tx[p - 1]),
               total_mj=float(compute[p - 1] + tx[p - 1]))
          for p in range(1, info.max_split + 1)]
  deepest = deepest_split(info, weight_bits, act_bits, device, transmission)
  return dict(model=model.name, weight_bits=weight_bits, act_bits=act_bits,
              transmission=transmission, budget_mj=device.budget_mj, splits=rows,
              deepest_split_within_budget=deepest or None)


def format_report(report: dict[str, Any]) -> str:
  """The report as a fixed-width text table."""
  lines = [f"{report['model']}: weights {report['weight_bits']} bit, activations "
           f"{report['act_bits']} bit, transmission {'on' if report['transmission'] else 'off'}, "
           f"budget {report['budget_mj']} mJ",
           f"{'split':>5}  {'block':<10} {'layers':>6} {'compute mJ':>11} {'transmit mJ':>11} "
           f"{'total mJ':>9}"]
  for r in report["splits"]:
    mark = " *" if r["index"] == report["deepest_split_within_budget"] else ""
    lines.append(f"{r['index']:>5}  {r['block']:<10} {r['layers']:>6} {r['compute_mj']:>11.4f} "
                 f"{r['transmission_mj']:>11.4f} {r['total_mj']:>9.4f}{mark}")
  deepest = report["deepest_split_within_budget"]
  lines.append("* deepest split within budget: " + (
      f"{deepest} ({report['splits'][deepest - 1]['block']})" if deepest else "none"))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  act_bits = _WBITS.value if _ABITS.value is None else _ABITS.value
  report = energy_report(get_model(_MODEL.value, width=_WIDTH.value), _WBITS.value, act_bits,
                         _TX.value, DeviceConfig(budget_mj=_BUDGET.value))
  print(format_report(report))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
