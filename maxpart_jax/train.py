"""Pre-training: SGD with momentum, weight decay and a cosine schedule (optax).

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

Steps run in chunks that end where a log line or a checkpoint is due, or with the
epoch (:class:`StepRunner`). With ``config.pipeline="fused"`` (the default on GPUs
and TPUs) the training split sits on the accelerator as uint8, each batch is made
there, and a chunk is one compiled loop: the host only hears back at its end.
``device`` makes the same batches on the device with one call per step (the default
on CPUs, whose compiled loops are slow); ``host`` is the old step-by-step loop
with numpy batches. All give the same batches.

``config.devices`` spreads each batch over devices (data parallelism, :class:`DataParallel`):
``all`` over every device of every process, ``one`` on the first device, ``auto`` over all
when the job has several processes (:mod:`maxpart_jax.distributed`) and on one device
otherwise. The global batches are those of one device; with the ``host`` pipeline (``auto``
with several processes) each process makes only its own rows of every batch. Only process 0
writes the history, TensorBoard, plots and results; the checkpoints are orbax's multi-host
ones, so the workdir must be a folder every process sees (one machine, NFS, a bucket).

The steps are reusable: :func:`train_step` takes an optional quantization policy
(fine-tuning with a fake-quantized edge) and :func:`evaluate` gives top-1 accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxpart_jax import checkpoint, data, distributed, runs
from maxpart_jax.metrics import MetricWriter, NullWriter
from maxpart_jax.models import SplitModel, Variables, available_models, model_from_spec
from maxpart_jax.models.layers import Numerics, resolve_numerics
from maxpart_jax.quant import QuantPolicy

PIPELINES = ("auto", "fused", "device", "host")
DEVICES = ("auto", "all", "one")


@struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data order."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> Variables:
    return {"params": self.params, "batch_stats": self.batch_stats}

  @classmethod
  def create(cls, variables: Variables, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 of training ``variables`` with ``tx``."""
    return cls(step=jnp.int32(0), params=variables["params"],
               batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


class TrainingDiverged(ValueError):
  """The training loss became NaN or infinite."""


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


def resolve_pipeline(pipeline: str, platform: str | None = None, processes: int = 1) -> str:
  """``fused``, ``device`` or ``host``; ``auto`` is ``host`` with several processes (each
  makes only its own rows of a batch), else ``fused`` on GPUs and TPUs and ``device`` on
  CPUs, where XLA runs convolutions inside compiled loops several times slower
  (jax-ml/jax#12868; a training step 8-26x, measured) than one call per step."""
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
  if pipeline != "auto":
    return pipeline
  if processes > 1:
    return "host"
  return "device" if (platform or jax.default_backend()) == "cpu" else "fused"


def data_parallel_mesh(devices: str, batch_size: int) -> Mesh | None:
  """The one-axis (``data``) mesh that pre-training splits batches over, or None for one
  device (see the module docstring for ``devices``). Raises ``ValueError`` if the batch
  does not split evenly or several processes are asked to train on one device."""
  if devices not in DEVICES:
    raise ValueError(f"devices must be one of {DEVICES}, got {devices!r}")
  several = jax.process_count() > 1
  if devices == "one" and several:
    raise ValueError(f"devices='one' trains on one device, but this job has "
                     f"{jax.process_count()} processes: use devices='all' (or 'auto')")
  if devices == "one" or (devices == "auto" and not several):
    return None
  if batch_size % jax.device_count():
    raise ValueError(f"batch_size={batch_size} does not split over the {jax.device_count()} "
                     "devices of this job: choose a multiple of the device count")
  return Mesh(np.array(jax.devices()), ("data",))


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """``step_fn`` with the batch split over the ``data`` axis of ``mesh`` and the state
  replicated: XLA sums the gradients (and the batch-norm statistics) over the devices, so
  a step computes what it computes on one device, to rounding."""

  step_fn: Any
  mesh: Mesh

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec("data"))

  def __call__(self, state: Any, batch: dict[str, jax.Array], *args: Any) -> tuple[Any, Any]:
    batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
    state, metrics = self.step_fn(state, batch, *args)
    return jax.lax.with_sharding_constraint(state, self.replicated), metrics


def fused_steps(step_fn: Any, dataset: str) -> Any:
  """``step_fn(state, batch, *args) -> (state, metrics)`` as one loop over many steps.

  Returns ``run(state, images, labels, draws, start, stop, *args) -> (state, sums)``,
  to be jitted: it runs steps ``start..stop-1``, each on the batch that
  :func:`data.device_batch` makes from the uint8 ``images`` and row ``i`` of
  ``draws``, and returns the metrics summed over those steps. ``start`` and ``stop``
  are traced, so one compilation serves chunks of any length, and nothing goes back
  to the host between steps.
  """

  def run(state, images, labels, draws, start, stop, *args):
    def one(state, i):
      return step_fn(state, data.device_batch(images, labels, draws.step(i), dataset), *args)

    zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype),
                         jax.eval_shape(one, state, start)[1])

    def body(i, carry):
      state, sums = carry
      state, metrics = one(state, i)
      return state, jax.tree.map(jnp.add, sums, metrics)

    return jax.lax.fori_loop(start, stop, body, (state, zeros))

  return run


# StepRunner's programs, with the step function static: one compilation per distinct step
# (and dataset, shapes and shardings) in a process, whichever runner calls it.
@functools.partial(jax.jit, static_argnums=0)
def _host_step(step_fn, state, batch, *args):
  return step_fn(state, batch, *args)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _device_step(step_fn, dataset, state, images, labels, draws, i, *args):
  return step_fn(state, data.device_batch(images, labels, draws.step(i), dataset), *args)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _fused_loop(step_fn, dataset, state, images, labels, draws, start, stop, *args):
  return fused_steps(step_fn, dataset)(state, images, labels, draws, start, stop, *args)


class StepRunner:
  """Runs training steps ``start..stop-1`` of ``split`` on the batches of some draws.

  ``pipeline`` (resolved, see :func:`resolve_pipeline`):
    * ``fused``: the split on the device as uint8, batches made there, all the steps of
      a call in one compiled loop (:func:`fused_steps`);
    * ``device``: the same batches made on the device, one call per step;
    * ``host``: numpy batches (:func:`data.host_batch`) copied per step, one call per step.
  All three give the same batches. ``sharding`` places the split and the batches
  (e.g. replicated over a candidate mesh); ``batch_sharding`` splits the host pipeline's
  batches instead (over a data-parallel mesh: each process makes only the rows its devices
  hold). ``step_fn(state, batch, *args)`` must be jittable, hashable and return
  ``(state, metrics)``. It is a static argument of the compiled programs, so runners of
  equal steps (a :class:`TrainStep`) share them.
  """

  def __init__(self, step_fn: Any, split: data.Split, pipeline: str,
               sharding: jax.sharding.Sharding | None = None,
               batch_sharding: jax.sharding.Sharding | None = None):
    if pipeline not in PIPELINES[1:]:
      raise ValueError(f"pipeline must be resolved to one of {PIPELINES[1:]}, got {pipeline!r}")
    self.step_fn, self.split, self.pipeline, self.sharding = step_fn, split, pipeline, sharding
    self.batch_sharding = batch_sharding
    self._draws: tuple[data.Draws | None, Any] = (None, None)
    if pipeline != "host":
      self._arrays = data.to_device(split, sharding)

  def _device_draws(self, draws: data.Draws) -> Any:
    """``draws`` on the device(s), copied once per new set of draws."""
    if self._draws[0] is not draws:
      self._draws = (draws, jax.device_put(draws, self.sharding))
    return self._draws[1]

  def __call__(self, state: Any, draws: data.Draws, start: int, stop: int,
               *args: Any) -> tuple[Any, Any]:
    """``(state, metrics summed over the steps)``; the host waits for neither."""
    dataset = self.split.dataset
    if self.pipeline == "fused":
      return _fused_loop(self.step_fn, dataset, state, *self._arrays, self._device_draws(draws),
                         jnp.int32(start), jnp.int32(stop), *args)
    sums = None
    for i in range(start, stop):
      if self.pipeline == "host":
        batch = self._host_batch(draws, i)
        state, metrics = _host_step(self.step_fn, state, batch, *args)
      else:
        state, metrics = _device_step(self.step_fn, dataset, state, *self._arrays,
                                      self._device_draws(draws), jnp.int32(i), *args)
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    return state, sums

  def _host_batch(self, draws: data.Draws, i: int) -> Any:
    """Batch ``i`` on the devices; with ``batch_sharding``, made from this process's rows."""
    if self.batch_sharding is None:
      return jax.device_put(data.host_batch(self.split, draws, i), self.sharding)
    size = draws.index.shape[1]
    rows = process_rows(self.batch_sharding, size)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x,
                                                         (size, *x.shape[1:])),
        data.host_batch(self.split, draws, i, rows))


def process_rows(sharding: jax.sharding.Sharding, size: int) -> slice:
  """The rows of a ``size``-row array split by ``sharding`` that this process's devices hold
  (one contiguous block: the devices of a process are neighbours in the mesh)."""
  blocks = {(s[0].start or 0, size if s[0].stop is None else s[0].stop)
            for s in sharding.addressable_devices_indices_map((size,)).values()}
  start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
  if sum(b - a for a, b in blocks) != stop - start:
    raise ValueError(f"this process's devices hold rows {sorted(blocks)} of the batch, not one "
                     "block: build the mesh from jax.devices() in order")
  return slice(start, stop)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """SGD (Nesterov) momentum, decoupled-from-BN weight decay, warmup + cosine learning rate."""
  return pretrain_optimizer(*_optimizer_args(config, total_steps))


def _optimizer_args(config: ml_collections.ConfigDict, total_steps: int) -> tuple:
  return (config.learning_rate, config.warmup_steps, total_steps, config.weight_decay,
          config.momentum, config.nesterov)


def pretrain_optimizer(learning_rate: float, warmup_steps: int, total_steps: int,
                       weight_decay: float, momentum: float,
                       nesterov: bool) -> optax.GradientTransformation:
  """:func:`make_optimizer` from plain values."""
  warmup = min(warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total_steps)
  # Decay conv / dense kernels only: BN scales and biases are left alone.
  mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == "kernel", params)
  return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                     optax.sgd(schedule, momentum=momentum, nesterov=nesterov))


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """:func:`train_step` of ``model`` with the optimizer ``make_tx(*tx_args)``, as a value.

  Equal steps compare equal, so they share compiled programs (:class:`StepRunner`): a
  resumed run, or a second search in the same process, does not compile them again.
  ``candidates=True`` vmaps the step over a leading candidate axis of the state and the
  policy (the search fine-tunes one copy of the model per genome).
  """

  model: SplitModel
  make_tx: Callable[..., optax.GradientTransformation]
  tx_args: tuple = ()
  label_smoothing: float = 0.0
  candidates: bool = False

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.make_tx(*self.tx_args)

  def __call__(self, state: TrainState, batch: dict[str, jax.Array],
               policy: QuantPolicy | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    step = functools.partial(train_step, self.model, self.tx, label_smoothing=self.label_smoothing)
    if self.candidates:
      return jax.vmap(step, in_axes=(0, None, 0))(state, batch, policy)
    return step(state, batch, policy)


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy with optional label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def train_step(model: SplitModel, tx: optax.GradientTransformation, state: TrainState,
               batch: dict[str, jax.Array], policy: QuantPolicy | None = None,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step with batch statistics; ``policy`` fake-quantizes the edge (STE)."""

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                  batch["image"], train=True, policy=policy)
    return cross_entropy(logits, batch["label"], label_smoothing), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  changes, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, changes),
                        batch_stats=updates["batch_stats"], opt_state=opt_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return state, {"loss": loss, "accuracy": accuracy}


def evaluate(model: SplitModel, variables: Variables, split: data.Split, batch_size: int = 500,
             policy: QuantPolicy | None = None) -> float:
  """Top-1 accuracy of ``model`` on a whole split (inference-mode batch norm)."""
  correct = 0
  for batch in data.iterate_batches(split, batch_size, train=False):
    correct += int(_count_correct_jit(model, variables, batch["image"], batch["label"], policy))
  return correct / len(split)


def count_correct(model: SplitModel, variables: Variables, images: jax.Array, labels: jax.Array,
                  policy: QuantPolicy | None = None) -> jax.Array:
  """Number of correct top-1 predictions in one batch (inference-mode batch norm)."""
  logits = model.apply(variables, images, policy=policy)
  return jnp.sum(jnp.argmax(logits, -1) == labels)


_count_correct_jit = jax.jit(count_correct, static_argnums=0)


class Progress:
  """Periodic log lines with throughput and ETA for a loop of known length."""

  def __init__(self, total: int, first: int = 0, every: int = 50, name: str = "step",
               unit: str | None = None):
    self.total, self.first, self.every, self.name = total, first, every, name
    self.unit = unit or name
    self.last = first
    self.start = time.time()

  def __call__(self, done: int, extra: str = "") -> None:
    """Logs after ``done`` of ``total`` units if a multiple of ``every`` was reached since
    the last call (and always at the end)."""
    due = done // self.every > self.last // self.every or done == self.total
    self.last = done
    if not due:
      return
    elapsed = time.time() - self.start
    rate = (done - self.first) / max(elapsed, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    logging.info("%s %d/%d  %s  %.2f %s/s  elapsed %s  ETA %s", self.name, done, self.total,
                 extra, rate, self.unit, _hms(elapsed), _hms(eta))


def _hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  epochs = [e["epoch"] for e in history["epochs"]]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
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
  plt.close(fig)
