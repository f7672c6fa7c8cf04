"""What every experiment script shares: its --config flag, a quiet log, and running a job in
its workdir (held, config recorded, errors as one line)."""

from __future__ import annotations

import copy
import logging as py_logging
import os
import re
import sys
from typing import Callable, TypeVar

from absl import flags, logging
import ml_collections
from ml_collections import config_flags

from maxpart_jax import distributed, runs

T = TypeVar("T")



def define_join_flags() -> None:
  """The flags that join several processes into one job (docs/scaling.md, "Several hosts"), for the
  scripts that can run so; :func:`parse_flags` joins before anything touches JAX."""
  flags.DEFINE_bool("distributed", False, "join a multi-process job found by "
                    "jax.distributed.initialize (TPU pod slices, SLURM, Open MPI)")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, to join a plain set of machines")
  flags.DEFINE_integer("num_processes", None, "processes in the job")
  flags.DEFINE_integer("process_id", None, "this process's index, 0 to n-1")
  flags.DEFINE_integer("heartbeat_timeout", 100, "seconds without a process's heartbeat "
                       "after which every other process of the job stops")


def define_config(default: str, help_: str) -> flags.FlagHolder:
  """``--config`` (a config file and variant, with ``--config.field=value`` overrides).

  ml_collections reads the overrides as the flag is defined, at import: a typo or an
  unknown variant would end the script in chained tracebacks, so they end it here in one
  line ("unknown config field search.pop_sise; did you mean search.pop_size?").
  """
  try:
    return config_flags.DEFINE_config_file("config", default, help_)
  except (AttributeError, KeyError, ValueError) as e:
    sys.exit(f"error: {config_error(e, sys.argv)}")


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run``'s flag parser, with config errors (a typo in an override, an unknown
  variant, a value of the wrong type) as one line instead of tracebacks:
  ``app.run(main, flags_parser=common.parse_flags)``."""
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    sys.exit(f"error: {config_error(e, argv)}")
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f"error: {lines[-1] if 'Traceback' in str(e) else ' '.join(lines)}")
  if "process_id" in flags.FLAGS:  # the script can run as several processes
    f = flags.FLAGS
    try:  # before anything touches JAX
      distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                             auto=f.distributed, heartbeat_timeout_s=f.heartbeat_timeout,
                             supervise=True)
    except ValueError as e:
      sys.exit(f"error: {e}")
  return rest


def config_error(error: Exception, argv: list[str]) -> str:
  """One line for an error ml_collections raised while applying ``argv``'s overrides."""
  text = str(error)
  unknown = re.search(r"'(\w+)\\?'", text)
  if isinstance(error, ValueError) or not unknown:
    return text.strip("'\"")
  name = unknown.group(1)
  suggestion = re.search(r'Did you mean \\?"(\w+)\\?"', text)
  for arg in filter(lambda a: a.startswith("--config."), argv):
    path = arg[len("--config."):].split("=")[0].split(".")
    if name in path:
      parent = path[:path.index(name)]
      hint = f"; did you mean {'.'.join(parent + [suggestion.group(1)])}?" if suggestion else ""
      return f"unknown config field {'.'.join(parent + [name])} (in {arg}){hint}"
  return f"unknown config field {name}"


def run_in_workdir(config: ml_collections.ConfigDict, workdir: str, job: Callable[[], T],
                   validate: Callable[[ml_collections.ConfigDict], None] | None = None) -> T:
  """Validates ``config``, holds ``workdir``, records the config there and runs ``job``.

  A ``ValueError`` (bad config, data, checkpoint or workdir; another run holding it)
  ends the process with its one-line message and exit code 1; an error that says another
  process of the job stopped ends it as every survivor ends
  (:func:`maxpart_jax.distributed.exit_lost_peer`).
  """
  try:
    if validate:
      validate(config)  # before anything is written
    with runs.workdir_lock(workdir):
      record_config(config, workdir)
      return job()
  except Exception as e:  # pylint: disable=broad-except  (a lost peer raises several kinds)
    if distributed.lost_peer(e):
      distributed.exit_lost_peer(e)
    if isinstance(e, ValueError):
      sys.exit(f"error: {e}")
    raise


def quiet_logs() -> None:
  """Drops JAX's INFO line about accelerator backends it did not find (libtpu on a CPU)."""
  py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)


def record_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the whole config to ``<workdir>/config.json`` and logs one line about it.

  Returns the path written.
  """
  path = os.path.join(workdir, "config.json")
  if distributed.is_leader():
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("%s; the whole config is in %s", summary(config), path)
  return path


def summary(config: ml_collections.ConfigDict) -> str:
  """One line naming what a search, reproduction or pre-training config will run."""
  train = config.pretrain if "pretrain" in config else config
  model = ", ".join(f"{k}={v}" for k, v in train.model.items() if k != "name")
  model = f"{train.model.name} ({model}) on {train.dataset}"
  if "search" not in config:
    steps = f", at most {train.steps_per_epoch} steps each" if train.steps_per_epoch else ""
    return (f"pre-training {model}: {train.num_epochs} epochs{steps}, batch {train.batch_size}, "
            f"learning rate {train.learning_rate}")
  s, f = config.search, config.fitness
  finetune = f"{f.finetune_steps} steps" if f.finetune_steps is not None else "one epoch"
  return (f"search of {model} from {config.model_dir}: N={s.pop_size} S={s.sample_size} "
          f"T={s.iterations} K={s.num_tournaments}; E_b={f.budget_mj} mJ "
          f"({'with' if f.transmission else 'without'} sending the IR), ε_b={f.eps_bound}; "
          f"{finetune} of fine-tuning per candidate")


def study_evaluator(evaluators: dict, config: ml_collections.ConfigDict):
  """The evaluator for one search of a multi-seed study, from ``evaluators`` (filled as
  needed): one per K (``search.num_tournaments``), built for ``search.seed = 0`` so that
  searches of every seed score their candidates on the same images."""
  from maxpart_jax.jobs import build
  k = config.search.num_tournaments
  if k not in evaluators:
    first = copy.deepcopy(config)
    first.search.seed = 0
    evaluators[k] = build.build_evaluator(first)
  return evaluators[k]
