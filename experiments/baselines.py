r"""The paper's baselines for any model and budget, without a search (docs/method.md §8).

  python -m experiments.baselines --config=experiments/configs/reproduce.py:cpu_resnet18 \
      --config.fitness.budget_mj=0.3 [--searched_p=6] [--analytic] [--json=PATH]

Full precision, 8-bit uniform and 8-bit conv/fc (plus 8-bit uniform at ``--searched_p``):
blocks and weight layers on the edge (#B, #L), edge energy, and, unless ``--analytic``,
privacy of the IR sent and test top-1 after the search's fine-tuning. ``--analytic``
needs no data and no checkpoint: energies of the config's energy model (or its model).
"""

import json
import sys

from absl import app, flags

from experiments import common

from maxpart_jax.jobs import build, settings
from maxpart_jax.studies import baselines, reporting
from maxpart_jax.studies.reproduce import analytic_table

_CONFIG = common.define_config("experiments/configs/reproduce.py:cpu_resnet18",
                               "reproduction (or search) config file and variant")
_SEARCHED_P = flags.DEFINE_integer("searched_p", None, "also 8-bit uniform at this split")
_ANALYTIC = flags.DEFINE_bool("analytic", False, "energies only: no data, no checkpoint")
_JSON = flags.DEFINE_string("json", None, "also write the rows as JSON here")


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  try:
    if _ANALYTIC.value:
      settings.validate_config(config)
      info = (settings.energy_info_from_config(config) or
              settings.info_from_spec(config.pretrain.model.to_dict()))
      rows = analytic_table(info, settings.fitness_from_config(config).device,
                            config.fitness.transmission, searched_p=_SEARCHED_P.value)
    else:
      evaluator = build.build_evaluator(config)
      todo = baselines.make_baselines(evaluator.energy_info, evaluator.config.device,
                                      evaluator.config.transmission, _SEARCHED_P.value)
      rows = baselines.evaluate_baselines(evaluator, todo, build.load_test_split(config, evaluator))
  except ValueError as e:  # bad config, split or checkpoint: say what is wrong, no traceback
    sys.exit(f"error: {e}")
  print(f"E_b = {config.fitness.budget_mj} mJ, {reporting.convention(config.fitness.transmission)}\n")
  print(reporting.strategy_table(rows, config.fitness.transmission, config.fitness.budget_mj))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
