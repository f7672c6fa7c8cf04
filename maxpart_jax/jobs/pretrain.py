"""The pre-training job: SGD with momentum, weight decay and a cosine schedule (optax).

``train_and_evaluate(config, workdir)`` is the whole job; the absl script
``experiments/train.py`` is a thin shell around it, so tests and notebooks call it
directly. The run checkpoints every ``config.checkpoint_every_steps`` steps and at
the end of every epoch, and a restarted run resumes from the newest checkpoint:
the data order depends only on ``(seed, epoch)``, so a resumed run sees exactly
the batches an uninterrupted one would. ``history.json`` is written before each
checkpoint and carries the running sums of the epoch in progress, so a resumed run
ends with the same per-epoch history as an uninterrupted one. A workdir that holds a
run with other settings or data (:func:`train_identity`) is refused, a non-finite loss
stops the run before anything more is saved, and one run at a time holds the workdir.

The steps, their pipelines and data parallelism are :mod:`maxpart_jax.train`'s
(``config.pipeline``, ``config.devices``). Only process 0 writes the history, TensorBoard,
plots and results; the checkpoints are orbax's multi-host ones, so the workdir must be a
folder every process sees (one machine, NFS, a bucket).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from maxpart_jax import checkpoint, data, distributed, plotting, runs
from maxpart_jax.metrics import MetricWriter, NullWriter
from maxpart_jax.models import SplitModel, Variables, available_models, model_from_spec
from maxpart_jax.models.layers import Numerics, resolve_numerics
from maxpart_jax.train import (
  DEVICES,
  PIPELINES,
  DataParallel,
  Progress,
  StepRunner,
  TrainingDiverged,
  TrainState,
  TrainStep,
  data_parallel_mesh,
  evaluate,
  pretrain_optimizer,
  resolve_pipeline,
)

# Fields that do not change what pre-training computes (logging, checkpoint cadence, where
# the data lives: its content counts instead, and settings that count once resolved).
_NOT_IDENTITY = ("data_dir", "log_every_steps", "checkpoint_every_steps", "eval_every_epochs",
                 "compute_dtype", "matmul_precision", "pipeline", "devices")


def validate_train_config(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Raises ``ValueError`` naming the first field out of range (before any work).

  ``prefix``: how the fields are named in messages (``"pretrain."`` inside a search config).
  """
  data.dataset_info(config.dataset)
  if config.model.name not in available_models():
    raise ValueError(f"unknown model {config.model.name!r} in {prefix}model; available: "
                     f"{available_models()}")
  for name, low in (("num_epochs", 1), ("batch_size", 1), ("log_every_steps", 1),
                    ("checkpoint_every_steps", 1), ("eval_every_epochs", 0),
                    ("steps_per_epoch", 0), ("warmup_steps", 0), ("seed", 0), ("data_seed", 0),
                    ("learning_rate", 0.0), ("weight_decay", 0.0)):
    if config[name] < low:
      raise ValueError(f"{prefix}{name} must be >= {low}, got {config[name]}")
  for name, high in (("val_fraction", 1.0), ("label_smoothing", 1.0), ("momentum", 1.0)):
    if not 0.0 <= config[name] < high:
      raise ValueError(f"{prefix}{name} must be in [0, {high}), got {config[name]}")
  if config.pipeline not in PIPELINES:
    raise ValueError(f"{prefix}pipeline must be one of {PIPELINES}, got {config.pipeline!r}")
  if config.get("devices", "auto") not in DEVICES:
    raise ValueError(f"{prefix}devices must be one of {DEVICES}, got {config.devices!r}")


def train_identity(config: ml_collections.ConfigDict, numerics: Numerics, pipeline: str,
                   train_split: data.Split, data_parallel: bool = False) -> dict[str, Any]:
  """Everything pre-training's result depends on, as ``{field: value}`` (see
  :func:`maxpart_jax.runs.check_identity`): the config less :data:`_NOT_IDENTITY`, the
  resolved numerics and pipeline, whether batches are split over devices (their sums
  round differently; recorded only when they are, as runs before the setting were not)
  and the content of the data."""
  identity = {k: v for k, v in runs.flatten(config.to_dict()).items()
              if k.split(".")[0] not in _NOT_IDENTITY}
  identity.update({
      "resolved.compute_dtype": numerics.dtype, "resolved.matmul_precision": numerics.precision,
      "resolved.pipeline": pipeline,
      "data_content": data.content_hash(train_split.dataset, config.data_dir or None)})
  if data_parallel:
    identity["resolved.data_parallel"] = True
  return json.loads(json.dumps(identity, default=str))


def split_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The hold-out split a pre-training config trains beside (stored with the model)."""
  return {"val_fraction": config.val_fraction, "data_seed": config.data_seed}


def model_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{"name": ..., **builder kwargs}`` from ``config.model`` (JSON-friendly)."""
  spec = config.model.to_dict()
  return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                numerics: Numerics = Numerics()) -> SplitModel:
  """The model ``config.model`` names, with the dataset's number of classes."""
  return model_from_spec(model_spec(config), num_classes=num_classes, numerics=numerics)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """SGD (Nesterov) momentum, decoupled-from-BN weight decay, warmup + cosine learning rate."""
  return pretrain_optimizer(*_optimizer_args(config, total_steps))


def _optimizer_args(config: ml_collections.ConfigDict, total_steps: int) -> tuple:
  return (config.learning_rate, config.warmup_steps, total_steps, config.weight_decay,
          config.momentum, config.nesterov)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.dataset``, resuming from ``workdir`` if possible.

  Writes into ``workdir``: ``checkpoints/`` (resumable state), ``history.json``
  (per-epoch loss and accuracy), ``model/`` (the final model for the search),
  ``results.json`` (test / validation accuracy, wall time), ``curves.png`` and
  ``tensorboard/`` (the same numbers as TensorBoard scalars).
  Returns the results dict.
  """
  validate_train_config(config)
  with runs.workdir_lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """:func:`train_and_evaluate` inside the workdir lock."""
  train = data.load_split("train" if config.val_fraction > 0 else "train_full",
                          dataset=config.dataset, data_dir=config.data_dir or None,
                          val_fraction=config.val_fraction, seed=config.data_seed)
  numerics = resolve_numerics(config.compute_dtype, config.matmul_precision)
  pipeline = resolve_pipeline(config.pipeline, processes=jax.process_count())
  if config.batch_size > len(train):
    raise ValueError(f"batch_size={config.batch_size} is more than the {len(train)} training "
                     "images (every step takes a full batch); lower it")
  mesh = data_parallel_mesh(config.get("devices", "auto"), config.batch_size)
  model = build_model(config, train.num_classes, numerics)
  identity = train_identity(config, numerics, pipeline, train, data_parallel=mesh is not None)
  steps_per_epoch = epoch_steps(config, len(train))
  total_steps = steps_per_epoch * config.num_epochs
  step_fn = TrainStep(model, pretrain_optimizer, _optimizer_args(config, total_steps),
                      config.label_smoothing)
  new_state = lambda: TrainState.create(model.init(jax.random.key(config.seed)), step_fn.tx)
  run_fn, replicated, batch_sharding = step_fn, None, None
  if mesh is not None:
    run_fn = DataParallel(step_fn, mesh)
    replicated, batch_sharding = run_fn.replicated, run_fn.batch_sharding
  leader = distributed.is_leader()

  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  history_path = os.path.join(workdir, "history.json")
  history: dict[str, Any] = {"identity": identity, "epochs": [], "train_seconds": 0.0,
                             "checkpoints": {}}
  sums, seen = np.zeros(2), 0  # train loss and accuracy summed over the epoch's steps so far
  # The leader's folder decides whether and from which step every process resumes (another
  # process's view may lag or be another folder: restore_latest stops the job if it lacks
  # the step), and the leader's history is every process's.
  steps = distributed.from_leader(lambda: list(mngr.all_steps()), "list the checkpoints")
  if steps:
    stored = distributed.from_leader(lambda: _read_history(history_path),
                                     "read the pre-training history")
    runs.check_identity(stored and stored.get("identity"), identity, workdir, "pre-training")
  # A resumed run needs only the state's structure (restore_latest loads or raises), placed
  # like the state it restores (replicated over the data-parallel mesh).
  if steps:
    like = jax.eval_shape(new_state)
    if replicated is not None:
      like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          like)
  else:
    like = new_state()
    if replicated is not None:
      like = jax.device_put(distributed.for_global_put(like), replicated)
  restored, state = checkpoint.restore_latest(mngr, like, steps)
  if restored is not None:
    history = _history_at(stored, restored)
    at = history["checkpoints"][str(restored)]
    sums, seen = np.array(at["sums"], np.float64), at["seen"]
    logging.info("resuming from step %d of %d", restored, total_steps)
  logging.info("pre-training %s: %d steps, %s compute (%s precision), %s pipeline, %s",
               model.name, total_steps, numerics.dtype, numerics.precision, pipeline,
               "one device" if mesh is None else
               f"batches split over {mesh.size} devices of {jax.process_count()} process(es)")
  step = int(distributed.to_host(state.step))
  run_steps = StepRunner(run_fn, train, pipeline, replicated, batch_sharding)
  progress = Progress(total_steps, first=step, every=config.log_every_steps)
  writer = (MetricWriter(os.path.join(workdir, "tensorboard"), resume_step=step) if leader
            else NullWriter())
  segment_start = time.time()

  def save(step: int) -> None:
    # The history first: a kill in between leaves a history ahead of the newest
    # checkpoint, which the resumed run cuts back (never one behind it).
    history["train_seconds"] += time.time() - segment_start
    kept = set(mngr.all_steps())  # the steps orbax still holds, and this one
    history["checkpoints"] = {k: v for k, v in history["checkpoints"].items() if int(k) in kept}
    history["checkpoints"][str(step)] = {"sums": sums.tolist(), "seen": seen,
                                         "train_seconds": history["train_seconds"]}
    if leader:
      checkpoint.write_json(history_path, history)
    writer.flush()  # TensorBoard too: a resumed run rewrites what follows its checkpoint
    mngr.save(step, args=checkpoint.ocp.args.StandardSave(state))

  for epoch in range(step // steps_per_epoch, config.num_epochs):
    skip = step - epoch * steps_per_epoch
    draws = data.train_draws(len(train), config.batch_size, seed=config.data_seed, epoch=epoch)
    i = skip
    while i < steps_per_epoch:
      # A chunk ends where a log line or a checkpoint is due, or with the epoch.
      j = min(steps_per_epoch, i + _until_multiple(step, config.log_every_steps),
              i + _until_multiple(step, config.checkpoint_every_steps))
      state, chunk = run_steps(state, draws, i, j)
      chunk = jax.tree.map(distributed.to_host, chunk)
      if not np.isfinite(chunk["loss"]):
        raise TrainingDiverged(
            f"pre-training diverged: the loss is {float(chunk['loss'])} in steps {step + 1}-"
            f"{step + j - i} (epoch {epoch + 1}); nothing after step "
            f"{mngr.latest_step() or 0} was saved. Lower learning_rate (now "
            f"{config.learning_rate}) or raise warmup_steps, and use a new --workdir")
      sums += np.array([chunk["loss"], chunk["accuracy"]], np.float64)
      step, n, i, seen = step + j - i, j - i, j, seen + j - i
      progress(step, f"epoch {epoch + 1}/{config.num_epochs} loss {float(chunk['loss']) / n:.3f}")
      writer.scalars(step, {"train/loss": float(chunk["loss"]) / n,
                            "train/accuracy": float(chunk["accuracy"]) / n})
      if step % config.checkpoint_every_steps == 0 and step % steps_per_epoch:
        save(step)
        segment_start = time.time()
    record = {"epoch": epoch + 1, "step": step, "train_loss": float(sums[0] / seen),
              "train_accuracy": float(sums[1] / seen)}
    sums[:], seen = 0, 0
    if config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0:
      record["val_accuracy"] = _val_accuracy(config, model, _on_host(state.variables))
    history["epochs"].append(record)
    writer.scalars(step, {f"epoch/{k}": v for k, v in record.items() if isinstance(v, float)})
    logging.info("epoch %d/%d: %s", epoch + 1, config.num_epochs,
                 ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items()
                           if isinstance(v, float)))
    save(step)
    segment_start = time.time()

  variables = _on_host(state.variables)
  checkpoint.save_model(os.path.join(workdir, "model"), model_spec(config), variables,
                        config.dataset, split_spec(config))
  test = data.load_split("test", dataset=config.dataset, data_dir=config.data_dir or None)
  results = {
      "model": model_spec(config), "dataset": config.dataset, "epochs": config.num_epochs,
      "steps": total_steps, "train_seconds": history["train_seconds"],
      "compute_dtype": numerics.dtype, "matmul_precision": numerics.precision,
      "pipeline": pipeline, "device": jax.devices()[0].device_kind,
      "test_accuracy": evaluate(model, variables, test),
      "val_accuracy": _val_accuracy(config, model, variables) if config.val_fraction > 0 else None,
      "devices": 1 if mesh is None else mesh.size, "processes": jax.process_count(),
      "environment": runs.environment(),
  }
  writer.scalars(step, {"final/test_accuracy": results["test_accuracy"],
                        "final/val_accuracy": results["val_accuracy"]})
  writer.close()
  if leader:  # every process evaluated the same model
    checkpoint.write_json(os.path.join(workdir, "results.json"), results)
    plot_history(history, os.path.join(workdir, "curves.png"),
                 title=f"{model.name} {config.dataset}", test_accuracy=results["test_accuracy"])
  if jax.process_count() > 1:  # nobody reads the model before the leader has written it
    multihost_utils.sync_global_devices("pre-training written")
  logging.info("done: %s", results)
  return results


def epoch_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Training steps per epoch: full batches of the split, at most ``config.steps_per_epoch``
  when that is set (smoke runs take a fixed number of steps whatever the data size)."""
  full = data.steps_per_epoch(num_examples, config.batch_size, drop_remainder=True)
  return min(full, config.steps_per_epoch) if config.steps_per_epoch else full


def _until_multiple(step: int, every: int) -> int:
  """Steps from ``step`` to the next multiple of ``every`` (``every`` if on one)."""
  return every - step % every


def _val_accuracy(config: ml_collections.ConfigDict, model: SplitModel,
                  variables: Variables) -> float:
  val = data.load_split("val", dataset=config.dataset, data_dir=config.data_dir or None,
                        val_fraction=config.val_fraction, seed=config.data_seed)
  return evaluate(model, variables, val)


def _on_host(tree: Any) -> Any:
  """``tree`` as numpy in every process (the state is replicated over the data-parallel
  mesh): every process then evaluates it on its own first device."""
  return jax.tree.map(distributed.to_host, tree)


def _read_history(path: str) -> dict[str, Any] | None:
  """``history.json`` as written, or None if there is none."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise runs.WorkdirError(f"{path} is not valid JSON ({e}); delete the workdir to pre-train "
                            "again") from None


def _history_at(history: dict[str, Any], step: int) -> dict[str, Any]:
  """The history as it was when checkpoint ``step`` was written (later entries dropped)."""
  if str(step) not in history.get("checkpoints", {}):
    raise runs.WorkdirError(f"the pre-training history has no record of checkpoint step {step}; "
                            "it was written by another run or version: use a new --workdir")
  history = dict(history, epochs=[e for e in history["epochs"] if e["step"] <= step],
                 train_seconds=history["checkpoints"][str(step)]["train_seconds"])
  history["checkpoints"] = {k: v for k, v in history["checkpoints"].items() if int(k) <= step}
  return history


def plot_history(history: dict[str, Any], path: str, title: str = "",
                 test_accuracy: float | None = None) -> None:
  """Loss and accuracy per epoch as a PNG, with the final test accuracy if given."""
  epochs = [e["epoch"] for e in history["epochs"]]
  fig, (ax1, ax2) = plotting.subplots(1, 2, figsize=(10, 3.8))
  ax1.plot(epochs, [e["train_loss"] for e in history["epochs"]], "o-", label="train loss")
  ax1.set_xlabel("epoch"), ax1.set_ylabel("cross-entropy"), ax1.legend()
  ax2.plot(epochs, [e["train_accuracy"] for e in history["epochs"]], "o-", label="train (augmented)")
  val = [(e["epoch"], e["val_accuracy"]) for e in history["epochs"] if "val_accuracy" in e]
  if val:
    ax2.plot(*zip(*val), "s-", label="validation")
  if test_accuracy is not None:
    ax2.plot([epochs[-1]], [test_accuracy], "*", markersize=12,
             label=f"test, final model ({100 * test_accuracy:.2f} %)")
  ax2.set_xlabel("epoch"), ax2.set_ylabel("top-1 accuracy"), ax2.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
