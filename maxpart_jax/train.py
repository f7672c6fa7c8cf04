"""Training steps: SGD with momentum, weight decay and a cosine schedule (optax), the steps'
pipelines and data parallelism. The pre-training job that runs them from a config is
:func:`maxpart_jax.jobs.pretrain.train_and_evaluate`.

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
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxpart_jax import data
from maxpart_jax.models import SplitModel, Variables
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


def pretrain_optimizer(learning_rate: float, warmup_steps: int, total_steps: int,
                       weight_decay: float, momentum: float,
                       nesterov: bool) -> optax.GradientTransformation:
  """The pre-training optimizer (:func:`maxpart_jax.jobs.pretrain.make_optimizer` reads
  these values from a config)."""
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


