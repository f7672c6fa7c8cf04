r"""Searches the partition point and mixed-precision policy of the edge (docs/method.md §7).

  python -m experiments.search --config=experiments/configs/search.py:quick --workdir=workdirs/search_quick

Pre-trains the model first if ``config.model_dir`` holds none. Resumes from
``--workdir`` when restarted with the same command. Writes ``best.json`` (the best
genome that meets the constraints, with its test accuracy, privacy and energy; the best
by fitness beside it when that one breaks them), ``history.json``/``.csv``,
``fitness.png`` (Fig. 10) and ``policy.png`` (Fig. 12).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

from maxpart_jax.search.driver import run_search, validate_config

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/search.py:quick",
                                          "search config file and variant")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the search state and results go",
                               required=True)


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  try:
    validate_config(_CONFIG.value)  # before anything is written
    common.record_config(_CONFIG.value, _WORKDIR.value)
    report = run_search(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # bad config / checkpoint: say what is wrong, no traceback
    sys.exit(f"error: {e}")
  label = "best" if report["feasible"] else "best (INFEASIBLE: " + "; ".join(report["violations"]) + ")"
  print(f"{label}: p={report['p']} ({report['block']}), privacy {report['privacy']:.4f}, "
        f"energy {report['energy_mj']:.4f} mJ (budget {report['budget_mj']}), "
        f"test accuracy {report['test_accuracy']:.4f} (float {report['float_test_accuracy']:.4f}), "
        f"{report['evaluations']} evaluations in {report['search_seconds']:.0f} s")


if __name__ == "__main__":
  app.run(main)
