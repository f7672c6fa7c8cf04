r"""Does the paper's privacy score predict how well the IR can be inverted?

  python -m experiments.attack_study --config=experiments/configs/attacks.py:cpu \
      --workdir=workdirs/attacks --out=results/attacks

The study itself is :mod:`maxpart_jax.studies.attack_study`: per model and split, resumable from
``--workdir``. ``--models`` runs some of the config's models (their rows join those already
in the workdir; the others are left out of the outputs). Writes ``study.json``,
``scatter.png``, ``splits_<model>.png`` and ``grid_<model>.png`` to ``--out``.
"""

from __future__ import annotations

from absl import app, flags

from experiments import common
from maxpart_jax.studies import attack_study

_CONFIG = common.define_config("experiments/configs/attacks.py:cpu", "attack study config")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/attacks", "resumable state of the study")
_OUT = flags.DEFINE_string("out", "results/attacks", "where the JSON and the plots go")
_MODELS = flags.DEFINE_list("models", None, "the config's models to run (default: all)")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  try:
    result = attack_study.run(_CONFIG.value, _WORKDIR.value, _OUT.value, _MODELS.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  for key, c in result["correlations"]["all"].items():
    if key.endswith("_ssim"):
      print(f"Spearman rho {key:28s} {c['rho']:+.3f} (p = {c['p']:.2g}, n = {c['n']})")
  print(f"attack seconds: {result['seconds']}; wrote {_OUT.value}/study.json and plots")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
