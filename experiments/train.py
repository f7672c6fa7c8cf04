r"""Pre-trains a CIFAR model; resumes from ``--workdir`` after an interruption.

  python -m experiments.train --config=experiments/configs/train.py:cpu --workdir=workdirs/cpu_resnet18

Writes the model for the search to ``<workdir>/model``, plus ``results.json``
(test accuracy, wall time), ``history.json`` and ``curves.png``.
"""

from absl import app, flags

from experiments import common

from maxpart_jax.train import train_and_evaluate, validate_train_config

_CONFIG = common.define_config("experiments/configs/train.py:cpu",
                               "training config file and variant")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and results go", required=True)


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  common.run_in_workdir(_CONFIG.value, _WORKDIR.value,
                        lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value),
                        validate=validate_train_config)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
