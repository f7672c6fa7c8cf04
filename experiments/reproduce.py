r"""Reproduces the paper's comparison for one model: baselines, search, Tables 2/4/5, Figs. 10-12.

  python -m experiments.reproduce --config=experiments/configs/reproduce.py:cpu_resnet18 \
      --workdir=workdirs/reproduce_cpu_resnet18

Pre-trains the model first if ``config.model_dir`` holds none, runs (or resumes) the
search in ``<workdir>/search``, evaluates the baselines (full precision, 8-bit
uniform, 8-bit conv/fc, 8-bit at the searched split) with the search's own
fine-tuning and privacy images, and writes ``report.md``, ``report.json``,
``fig10_fitness.png``, ``fig11_energy.png``, ``fig12_policy.png`` and
``table4_strategies.png`` to ``--workdir``. Restarting the same command resumes. Several
processes run it as one with the join flags of ``experiments.search`` (docs/scaling.md, "Several hosts").
"""

from absl import app, flags

from experiments import common

from maxpart_jax.jobs.settings import validate_config
from maxpart_jax.studies.reproduce import run_reproduction

_CONFIG = common.define_config("experiments/configs/reproduce.py:cpu_resnet18",
                               "reproduction config file and variant")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the search state and the report go",
                               required=True)
common.define_join_flags()


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  report = common.run_in_workdir(_CONFIG.value, _WORKDIR.value,
                                 lambda: run_reproduction(_CONFIG.value, _WORKDIR.value),
                                 validate=validate_config)
  for name, claim in report["claims"].items():
    print(f"{name.replace('_', ' ')}: {'holds' if claim['holds'] else 'does not hold'}")
  print(f"report: {_WORKDIR.value}/report.md")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
