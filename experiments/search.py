r"""Searches the partition point and mixed-precision policy of the edge (docs/method.md §7).

  python -m experiments.search --config=experiments/configs/search.py:quick --workdir=workdirs/search_quick

Pre-trains the model first if ``config.model_dir`` holds none. Resumes from
``--workdir`` when restarted with the same command. Writes ``best.json`` (the best
genome that meets the constraints, with its test accuracy, privacy and energy; the best
by fitness beside it when that one breaks them), ``history.json``/``.csv``,
``fitness.png`` (Fig. 10) and ``policy.png`` (Fig. 12).

Several processes (hosts) run one search when each is started with the same command plus
``--distributed`` (TPU pod slices, SLURM, Open MPI) or ``--coordinator_address=host:port
--num_processes=n --process_id=i`` (docs/scaling.md, "Several hosts"); process 0 writes the workdir.

With ``config.defense.stack`` set (``search.py:quick_defended``), a defended search
(:mod:`maxpart_jax.jobs.defense_stage`): the search with the stack's costs, then its
finalists fine-tuned with the stack and attacked adaptively; also writes ``defended.json``
and ``defended_grid.png``.
"""

from absl import app, flags

from experiments import common

from maxpart_jax.jobs.driver import run_search
from maxpart_jax.jobs.defense_stage import defended_summary, run_defended_search
from maxpart_jax.jobs.settings import stack_from_config, validate_config

_CONFIG = common.define_config("experiments/configs/search.py:quick",
                               "search config file and variant")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the search state and results go",
                               required=True)
common.define_join_flags()


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  if stack_from_config(_CONFIG.value).items:
    report = common.run_in_workdir(_CONFIG.value, _WORKDIR.value,
                                   lambda: run_defended_search(_CONFIG.value, _WORKDIR.value),
                                   validate=validate_config)
    print(defended_summary(report))
    return
  report = common.run_in_workdir(_CONFIG.value, _WORKDIR.value,
                                 lambda: run_search(_CONFIG.value, _WORKDIR.value),
                                 validate=validate_config)
  label = "best" if report["feasible"] else "best (INFEASIBLE: " + "; ".join(report["violations"]) + ")"
  print(f"{label}: p={report['p']} ({report['block']}), privacy {report['privacy']:.4f}, "
        f"energy {report['energy_mj']:.4f} mJ (budget {report['budget_mj']}), "
        f"test accuracy {report['test_accuracy']:.4f} (float {report['float_test_accuracy']:.4f}), "
        f"{report['evaluations']} evaluations in {report['search_seconds']:.0f} s")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
