"""What every experiment script does first: quiet the log and record its config."""

from __future__ import annotations

import logging as py_logging
import os

from absl import logging
import ml_collections


def quiet_logs() -> None:
  """Drops JAX's INFO line about accelerator backends it did not find (libtpu on a CPU)."""
  py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)


def record_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the whole config to ``<workdir>/config.json`` and logs one line about it.

  Returns the path written.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
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
