r"""Pre-trains a CIFAR model; resumes from ``--workdir`` after an interruption.

  python -m experiments.train --config=experiments/configs/train.py:cpu --workdir=workdirs/cpu_resnet18

Writes the model for the search to ``<workdir>/model``, plus ``results.json``
(test accuracy, wall time), ``history.json`` and ``curves.png``.

Several processes (hosts) train as one data-parallel job: run the same command on every
process with ``--distributed`` (TPU pod slices, SLURM, Open MPI) or
``--coordinator_address=host:port --num_processes=N --process_id=i``; the workdir must be a
folder every process sees (docs/scaling.md, "Several hosts").
"""

from absl import app, flags

from experiments import common

from maxpart_jax.jobs.pretrain import train_and_evaluate, validate_train_config

_CONFIG = common.define_config("experiments/configs/train.py:cpu",
                               "training config file and variant")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and results go", required=True)
common.define_join_flags()


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  common.run_in_workdir(_CONFIG.value, _WORKDIR.value,
                        lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value),
                        validate=validate_train_config)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
