"""The model and the fitness evaluator a search config names (pre-training the model first
when there is none), and the test split of the final report."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from maxpart_jax import checkpoint, data, distributed
from maxpart_jax.jobs.pretrain import model_spec, split_spec
from maxpart_jax.jobs.settings import (
  check_data_sizes,
  energy_info_from_config,
  fitness_from_config,
  stack_from_config,
  validate_config,
)
from maxpart_jax.search.fitness import Evaluator


def load_or_pretrain(config: ml_collections.ConfigDict):
  """The pre-trained model of ``config.model_dir``; pre-trains it first if there is none.

  In a job of several processes the leader decides whether the model is there; every process
  then loads it, and a process that cannot, or finds other weights than the leader's, stops
  every process (its ``model_dir`` is not the leader's).
  """
  spec_path = os.path.join(config.model_dir, "model.json")
  if not distributed.from_leader(lambda: os.path.exists(spec_path),
                                 f"look for the pre-trained model at {config.model_dir}"):
    from maxpart_jax.jobs.pretrain import train_and_evaluate
    if os.path.basename(os.path.normpath(config.model_dir)) != "model":
      raise ValueError(f"no pre-trained model at {config.model_dir}; pre-training writes "
                       "<workdir>/model, so point model_dir at a folder named model")
    workdir = os.path.dirname(os.path.abspath(config.model_dir))
    logging.info("no pre-trained model at %s: pre-training it first (%s)", config.model_dir,
                 workdir)
    train_and_evaluate(config.pretrain, workdir)
  model, variables, meta = _load_everywhere(config.model_dir)
  if meta["dataset"] != config.pretrain.dataset:
    raise ValueError(f"the model at {config.model_dir} was pre-trained on {meta['dataset']}, but "
                     f"config.pretrain.dataset is {config.pretrain.dataset}")
  stored, expected = meta["model"], model_spec(config.pretrain)
  if stored != expected:
    raise ValueError(f"the checkpoint at {config.model_dir} is {stored}, but the config asks for "
                     f"{expected}: point model_dir at a matching checkpoint")
  # The search validates on the hold-out of config.pretrain's split: it must be the one
  # the model did not train on.
  split = split_spec(config.pretrain)
  if "split" not in meta:
    raise ValueError(f"{config.model_dir}/model.json does not say which images the model held "
                     f"out; if it was pre-trained with {split}, add \"split\": "
                     f"{json.dumps(split)} to it, otherwise pre-train it again")
  if meta["split"] != split:
    raise ValueError(f"the model at {config.model_dir} was pre-trained holding out "
                     f"{meta['split']}, but config.pretrain asks for {split}: its validation "
                     "images would include training images. Use the stored settings "
                     "(--config.pretrain.val_fraction / data_seed) or another model_dir")
  return model, variables, meta


def _load_everywhere(model_dir: str) -> tuple[Any, Any, dict[str, Any]]:
  """:func:`checkpoint.load_model` in every process: the leader's weights in all, or an
  error in all (:func:`distributed.agree`)."""
  loaded, error = None, None
  try:
    loaded = checkpoint.load_model(model_dir)
  except (OSError, ValueError) as e:
    error = e
  sha = loaded[2].get("variables_sha256") if loaded else None
  leader = distributed.broadcast({"loaded": loaded is not None, "sha": sha})
  if not distributed.is_leader() and leader["loaded"]:
    where = f"process {jax.process_index()} of this job"
    if error:
      error = ValueError(f"{where} cannot load the pre-trained model at {model_dir} that "
                         f"process 0 loads ({error}): {distributed.SHARED_FOLDER}")
    elif sha != leader["sha"]:
      error = ValueError(f"{where} finds other weights at {model_dir} than process 0 (another "
                         f"variables_sha256): {distributed.SHARED_FOLDER}")
  distributed.agree(error, f"load the pre-trained model at {model_dir}")
  return loaded


def build_evaluator(config: ml_collections.ConfigDict) -> Evaluator:
  """Validates ``config``, loads (or pre-trains) its model and builds its fitness evaluator."""
  validate_config(config)
  split_kwargs = dict(dataset=config.pretrain.dataset, data_dir=config.data_dir or None,
                      val_fraction=config.pretrain.val_fraction, seed=config.pretrain.data_seed)
  train = data.load_split("train", **split_kwargs)
  val = train_val = data.load_split("val", **split_kwargs)
  check_data_sizes(config, train, val)  # before the model loads (or pre-trains)
  model, variables, _ = load_or_pretrain(config)
  if config.val_images:
    val = val.take(config.val_images, seed=config.search.seed)
  privacy_images = data.load_split("val", **split_kwargs).take(
      config.privacy_images, seed=config.search.seed + 1).float_images()
  evaluator = Evaluator(model, variables, train, val, privacy_images, fitness_from_config(config),
                        candidates_per_call=config.search.num_tournaments,
                        energy_info=energy_info_from_config(config),
                        stack=stack_from_config(config))
  # Pre-training reports accuracy on the whole hold-out; ε is measured on this subset.
  logging.info("float model: %.4f top-1 on the %d validation images ε is measured on (of %d "
               "held out); fine-tuning %d steps per candidate on %d device(s)",
               evaluator.float_accuracy, len(val), len(train_val), evaluator.steps,
               evaluator.num_devices)
  return evaluator


def load_test_split(config: ml_collections.ConfigDict, evaluator: Evaluator) -> data.Split:
  """The test split of the evaluator's dataset (final reports only)."""
  return data.load_split("test", dataset=evaluator.train.dataset, data_dir=config.data_dir or None)
