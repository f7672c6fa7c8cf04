"""A search config (``experiments/configs/search.py``) as the objects the search runs with.

:func:`validate_config` checks a config before any work is done; the ``*_from_config``
functions translate its sections into the evolution's strategy and space, the fitness
settings and the edge device.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
import ml_collections

from maxpart_jax import data
from maxpart_jax.energy import DeviceConfig
from maxpart_jax.jobs import planning
from maxpart_jax.jobs.pretrain import validate_train_config
from maxpart_jax.models import available_models, get_model
from maxpart_jax.models.metadata import ModelInfo
from maxpart_jax.privacy import attacks, defended, defenses
from maxpart_jax.privacy.attacks import DecoderConfig
from maxpart_jax.quant import check_bits
from maxpart_jax.search import algorithms, evolution
from maxpart_jax.search.fitness import FitnessConfig
from maxpart_jax.search.operators import SearchSpace


def strategy_from_config(config: ml_collections.ConfigDict) -> evolution.Strategy:
  """The static evolution settings of ``config.search``."""
  s = config.search
  return evolution.Strategy(pop_size=s.pop_size, num_tournaments=s.num_tournaments, init=s.init,
                            sample=s.sample, select=s.select, mutate=s.mutate,
                            crossover=s.crossover, replace=s.replace)


def space_from_config(config: ml_collections.ConfigDict, info: ModelInfo) -> SearchSpace:
  """The search space of ``config.search`` for a model."""
  s = config.search
  return SearchSpace(w_choices=jnp.asarray(s.w_bits, jnp.int32),
                     a_choices=jnp.asarray(s.a_bits, jnp.int32), prob_p=jnp.float32(s.prob_p),
                     prob_gene=jnp.float32(s.prob_gene), max_split=info.max_split,
                     num_layers=info.num_layers, sample_size=s.sample_size)


def fitness_from_config(config: ml_collections.ConfigDict) -> FitnessConfig:
  """The fitness settings of ``config.fitness``."""
  f = config.fitness
  return FitnessConfig(
      eps_bound=f.eps_bound, lambda_energy=f.lambda_energy, lambda_accuracy=f.lambda_accuracy,
      lambda_latency=f.lambda_latency, device=device_from_config(config),
      transmission=f.transmission,
      finetune_steps=f.finetune_steps, finetune_lr=f.finetune_lr,
      finetune_momentum=f.finetune_momentum, batch_size=f.batch_size, metric=f.metric,
      normalization=f.normalization, per_channel=f.per_channel,
      activation_levels=f.activation_levels, seed=f.seed,
      candidate_loop=f.candidate_loop, compute_dtype=f.compute_dtype,
      matmul_precision=f.matmul_precision, pipeline=f.pipeline,
      attack=DecoderConfig(**{k: v for k, v in f.attack.to_dict().items() if k != "images"}),
      attack_images=f.attack.images)


def device_from_config(config: ml_collections.ConfigDict) -> DeviceConfig:
  """The edge device of ``config.device`` with the budget ``config.fitness.budget_mj``."""
  return DeviceConfig(budget_mj=config.fitness.budget_mj, **config.device.to_dict())


def stack_from_config(config: ml_collections.ConfigDict) -> defenses.Stack:
  """The defense stack of ``config.defense.stack`` (empty, or a config from before defended
  searches: an undefended search)."""
  return defenses.parse_stack(config.defense.stack if "defense" in config else "")


def finetune_from_config(config: ml_collections.ConfigDict) -> defended.FinetuneConfig:
  """How stage 2 fine-tunes a finalist with the stack."""
  return defended.FinetuneConfig(seed=config.search.seed, **config.defense.finetune.to_dict())


def attacker_from_config(config: ml_collections.ConfigDict
                         ) -> tuple[attacks.DecoderConfig, attacks.WhiteboxConfig]:
  """The adaptive decoder's and the white-box attack's settings of ``config.defense``."""
  decoder = {k: v for k, v in config.defense.attack.to_dict().items() if k != "images"}
  return (attacks.DecoderConfig(**decoder),
          attacks.WhiteboxConfig(**config.defense.whitebox.to_dict()))


def validate_defense(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the problem in ``config.defense`` (no work done)."""
  stack = stack_from_config(config)
  if not stack.items:
    return
  ft = finetune_from_config(config)
  decoder, _ = attacker_from_config(config)
  if stack.adversarial_weight:
    defended.check_attacker(decoder, ft)
  for name in ("finalists", "victims", "whitebox_victims", "init_images", "grid_images"):
    if config.defense[name] < 1:
      raise ValueError(f"defense.{name} must be >= 1, got {config.defense[name]}")
  if config.defense.order not in ("depth", "fitness"):
    raise ValueError(f"defense.order must be 'depth' or 'fitness', got {config.defense.order!r}")
  if config.defense.whitebox_victims > config.defense.victims:
    raise ValueError("defense.whitebox_victims must be <= defense.victims")
  if config.defense.attack.images < 1:
    raise ValueError(f"defense.attack.images must be >= 1, got {config.defense.attack.images}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` with the problem for a config that cannot run (no work done).

  First imports ``config.operator_modules`` (comma-separated), where user operators
  register themselves.
  """
  for module in filter(None, (m.strip() for m in config.operator_modules.split(","))):
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f"config.operator_modules names {module!r}, which cannot be imported "
                       f"({e}). It must be importable from where the search runs: start it "
                       f"from the folder that holds {module.replace('.', '/')}.py, or add that "
                       "folder to PYTHONPATH") from None
  s = config.search
  if not s.w_bits or not s.a_bits:
    raise ValueError("search.w_bits and search.a_bits must not be empty")
  check_bits(list(s.w_bits), "search.w_bits")
  check_bits(list(s.a_bits), "search.a_bits")
  if not 1 <= s.sample_size <= s.pop_size:
    raise ValueError(f"search.sample_size S={s.sample_size} must be in 1..N "
                     f"(search.pop_size={s.pop_size})")
  if s.iterations < 0:
    raise ValueError(f"search.iterations must be >= 0, got {s.iterations}")
  for name in ("prob_p", "prob_gene"):
    if not 0.0 <= s[name] <= 1.0:
      raise ValueError(f"search.{name} must be in [0, 1], got {s[name]}")
  if config.fitness.budget_mj <= 0:
    raise ValueError(f"fitness.budget_mj (E_b) must be > 0, got {config.fitness.budget_mj}")
  for name, value, low in (("privacy_images", config.privacy_images, 1),
                           ("val_images", config.val_images, 0),
                           ("log_every_steps", config.log_every_steps, 1),
                           ("fitness.batch_size", config.fitness.batch_size, 1),
                           ("fitness.finetune_steps", config.fitness.finetune_steps, 0)):
    if value is not None and value < low:
      raise ValueError(f"{name} must be >= {low}, got {value}")
  validate_train_config(config.pretrain, "pretrain.")  # the model name among the rest
  strategy_from_config(config)  # unknown operators
  algorithms.get_algorithm(s.algorithm)
  fitness_from_config(config)  # λ, ε_b, metric
  validate_defense(config)
  planning.validate_solver(config)
  energy_model = config.energy_model.get("name")
  if energy_model and energy_model not in available_models():
    raise ValueError(f"unknown model {energy_model!r} in energy_model; available: "
                     f"{available_models()}")


def energy_info_from_config(config: ml_collections.ConfigDict) -> ModelInfo | None:
  """Metadata of ``config.energy_model``, whose energy counts (None: the searched model's).

  A CPU-size search runs a narrow model but may charge the energy of the paper-size
  one: same blocks and layers, more channels.
  """
  spec = config.energy_model.to_dict()
  return info_from_spec(spec) if spec.get("name") else None


def info_from_spec(spec: dict[str, Any]) -> ModelInfo:
  """Metadata of the model ``{"name": ..., **builder kwargs}`` names (None values are dropped)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
            if v is not None and k != "name"}
  return get_model(spec["name"], **kwargs).info


def check_data_sizes(config: ml_collections.ConfigDict, train: data.Split, val: data.Split) -> None:
  """Raises ``ValueError`` naming the field that asks for more images than the split holds
  (a search by the solver needs twice ``val_images``: :func:`planning.estimates_images`)."""
  for name, value, split, what in (
      ("privacy_images", config.privacy_images, val, "validation"),
      ("val_images", config.val_images, val, "validation"),
      ("fitness.batch_size", config.fitness.batch_size, train, "training")):
    if value > len(split):
      raise ValueError(f"{name}={value} is more than the {len(split)} {what} images of this "
                       f"split (pretrain.val_fraction={config.pretrain.val_fraction}); lower it")
  if planning.needs_plan(config) and 2 * config.val_images > len(val):
    raise ValueError(f"the solver measures its estimates on {config.val_images} hold-out images "
                     f"apart from the val_images={config.val_images} that ε is judged on, but "
                     f"this split holds out {len(val)} (pretrain.val_fraction="
                     f"{config.pretrain.val_fraction}); lower val_images to at most "
                     f"{len(val) // 2}")
