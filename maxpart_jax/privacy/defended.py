"""Defended splits: fine-tuning a deployment with defenses, and attacking it adaptively.

A defended deployment (:class:`DefendedSplit`) runs blocks ``1..p`` quantized by a genome
(the IR at the IR's bits, as undefended), then the stack's ``send`` functions
(:mod:`maxpart_jax.privacy.defenses`) with their kernels quantized at the IR's bits, then
quantizes the message at the IR's bits (on ``[-c, c]`` if a defense makes it signed); the
cloud runs the stack's ``receive`` functions in float and blocks ``p+1..``. :func:`finetune` trains the whole
network and the defenses' parameters for cross-entropy plus the defenses' penalties; with an
``adversarial`` defense of strength α it also trains an inner decoder on the messages and
subtracts α times its reconstruction MSE (simultaneous gradient steps, the decoder trained
alone for ``decoder_warmup`` steps first).

A defense counts only against an attacker who knows it (docs/method.md §13):
:func:`adaptive_attacks` trains a *new* decoder from scratch (its own key) on the defended
messages of the attacker's own images, which the caller draws disjoint from the fine-tuning
images and the victims, for at least 4x the inner decoder's steps, and runs the white-box
attack through the defended edge, noise included (a fresh draw every step).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from maxpart_jax import data, train
from maxpart_jax.genome import Genome, to_policy
from maxpart_jax.models import SplitModel, Variables
from maxpart_jax.privacy import attacks
from maxpart_jax.privacy.defenses import Stack, image_keys
from maxpart_jax.quant import QuantPolicy, quantize_activations, quantize_weights

ATTACKER_STEPS_FACTOR = 4
"""The adaptive decoder trains at least this many times as long as the inner decoder."""
STANDARDIZE_EPS = 1e-6
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """How a defended deployment is fine-tuned.

  Attributes:
    steps: Adam steps of the network and the defenses' parameters.
    batch_size: training images per step (random crop and flip).
    learning_rate: Adam step of the network and the defenses' parameters.
    grad_clip: global gradient norm clip of those updates.
    decoder_learning_rate: Adam step of the inner decoder (``adversarial`` only).
    decoder_warmup: steps in which only the inner decoder learns from the messages.
    decoder_width: the inner decoder's width (:class:`maxpart_jax.privacy.attacks.Decoder`).
    decoder_steps: the inner decoder's Adam steps per step of the network (a stronger inner
      adversary; the adaptive attacker's rule counts ``steps * decoder_steps``).
    schedule: the network's learning rate over the steps: ``constant`` or ``cosine`` (decayed
      to 0).
    distill: weight of the KL divergence from the float model the fine-tuning starts from
      (undefended, unquantized, its predictions as soft targets) added to the loss.
    cloud_steps: steps after the joint fine-tuning that train only the cloud (the blocks
      after the split and the defenses' ``receive``) on the frozen edge's messages, with the
      same loss but no adversary: the messages, hence every attack, stay as they were.
    seed: batches, noise draws and the decoder's initialization.
  """

  steps: int = 600
  batch_size: int = 64
  learning_rate: float = 3e-4
  grad_clip: float = 1.0
  decoder_learning_rate: float = 2e-3
  decoder_warmup: int = 200
  decoder_width: int = 32
  decoder_steps: int = 1
  schedule: str = "constant"
  distill: float = 0.0
  cloud_steps: int = 0
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size", "decoder_width", "decoder_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"fine-tuning {name} must be >= 1, got {getattr(self, name)}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown fine-tuning schedule {self.schedule!r}; choose from {SCHEDULES}")
    if self.distill < 0 or self.cloud_steps < 0:
      raise ValueError("distill and cloud_steps must be >= 0, got "
                       f"{self.distill} and {self.cloud_steps}")
    if not 0 <= self.decoder_warmup < self.steps:
      raise ValueError(f"decoder_warmup must be in [0, steps), got {self.decoder_warmup}")
    if not (self.learning_rate > 0 and self.decoder_learning_rate > 0 and self.grad_clip > 0):
      raise ValueError("learning rates and grad_clip must be > 0")


@struct.dataclass
class DefendedSplit:
  """A defended deployment: the network's variables, the defenses' parameters, the policy.

  ``policy`` quantizes the edge and the IR as the genome says; :func:`message` adds the rest.
  """

  variables: Variables
  defense_params: list
  policy: QuantPolicy
  model: SplitModel = struct.field(pytree_node=False)
  split: int = struct.field(pytree_node=False)
  stack: Stack = struct.field(pytree_node=False)
  dataset: str = struct.field(pytree_node=False, default="cifar100")

  @property
  def message_shape(self) -> tuple[int, int, int]:
    return self.stack.message_shape(self.model.info.blocks[self.split - 1].out_shape)


def defended_split(model: SplitModel, variables: Variables, genome: Genome, stack: Stack,
                   sample_images: np.ndarray, key: jax.Array, *, dataset: str = "cifar100",
                   per_channel: bool = False, activation_levels: str = "paper") -> DefendedSplit:
  """A defended deployment before fine-tuning: the defenses initialized from the IRs of
  ``sample_images`` ((N, H, W, 3) floats in [0, 1])."""
  attacks.check_images(sample_images)
  split = model.info.check_split(int(genome.p))
  stack.check(model.info.blocks[split - 1].out_shape)
  policy = to_policy(model.info, genome, per_channel, activation_levels)
  irs = attacks.edge_irs(model, variables, split, policy, sample_images, dataset=dataset)
  return DefendedSplit(variables, stack.init(key, irs), policy, model, split, stack, dataset)


def _normalized(images: jax.Array, dataset: str) -> jax.Array:
  info = data.dataset_info(dataset)
  return (images - jnp.asarray(info.mean)) / jnp.asarray(info.std)


def _quantize_message(d: DefendedSplit, message: jax.Array) -> jax.Array:
  return quantize_activations(message, d.policy.ir_bits, signed=d.stack.signed,
                              levels=d.policy.activation_levels)


def device_params(d: DefendedSplit, params: list) -> list:
  """The defenses' parameters as the device uses them: every ``kernel`` (a layer the device
  runs, e.g. the bottleneck's) fake-quantized per tensor at the IR's bits, which is what
  :func:`~maxpart_jax.privacy.defenses.defended_energy` charges it at."""
  def quantize(path, leaf):
    is_kernel = getattr(path[-1], "key", None) == "kernel"
    return quantize_weights(leaf, d.policy.ir_bits) if is_kernel else leaf
  return jax.tree_util.tree_map_with_path(quantize, params)


def _send(d: DefendedSplit, params: list, ir: jax.Array, keys: jax.Array) -> jax.Array:
  """The quantized message of a batch of quantized IRs (the defenses' ``send`` per image: a
  message never depends on the other images of its batch)."""
  on_device = device_params(d, params)
  msg = jax.vmap(lambda x, k: d.stack.send(on_device, x[None], k)[0])(ir, keys)
  return _quantize_message(d, msg)


def message(d: DefendedSplit, images: jax.Array, keys: jax.Array) -> jax.Array:
  """What the defended device sends for ``images`` in [0, 1] (inference mode); ``keys``
  (one per image, :func:`image_keys`) draw the noise of the defenses that have some."""
  ir = d.model.apply(d.variables, _normalized(images, d.dataset), stop=d.split, policy=d.policy)
  return _send(d, d.defense_params, ir, keys)


def logits(d: DefendedSplit, images: jax.Array, keys: jax.Array) -> jax.Array:
  """The cloud's logits for ``images`` in [0, 1] through the defended split."""
  received = d.stack.receive(d.defense_params, message(d, images, keys))
  return d.model.apply(d.variables, received, start=d.split)


_message_batch = jax.jit(message)


@jax.jit
def _correct_batch(d, images, labels, keys):
  return jnp.sum(jnp.argmax(logits(d, images, keys), -1) == labels)


def messages(d: DefendedSplit, images: np.ndarray, key: jax.Array,
             batch_size: int = 500) -> jax.Array:
  """The messages of ``images`` ((N, H, W, 3) in [0, 1]); image ``i`` draws its noise with
  ``image_keys(key, i, 1)``."""
  attacks.check_images(images)
  return jnp.concatenate([
      _message_batch(d, jnp.asarray(images[i:i + batch_size]),
                     image_keys(key, i, len(images[i:i + batch_size])))
      for i in range(0, len(images), batch_size)])


def accuracy(d: DefendedSplit, split: data.Split, key: jax.Array, batch_size: int = 500) -> float:
  """Top-1 accuracy through the defended deployment (noise drawn from ``key``)."""
  correct = 0
  for i in range(0, len(split.images), batch_size):
    images = jnp.asarray(split.images[i:i + batch_size].astype(np.float32) / 255.0)
    correct += int(_correct_batch(d, images, jnp.asarray(split.labels[i:i + batch_size]),
                                  image_keys(key, i, len(images))))
  return correct / len(split.images)


# ------------------------------------------------------------------------- fine-tuning

def _standardize(x: jax.Array) -> jax.Array:
  """Per-channel batch standardization with ``sqrt(var + eps)``: the gradient of a
  standard deviation at zero variance is NaN."""
  axes = tuple(range(x.ndim - 1))
  mean = jax.lax.stop_gradient(jnp.mean(x, axis=axes, keepdims=True))
  var = jax.lax.stop_gradient(jnp.var(x, axis=axes, keepdims=True))
  return (x - mean) / jnp.sqrt(var + STANDARDIZE_EPS)


def _optimizers(config: FinetuneConfig):
  """The optimizers of the network (joint steps), the inner decoder and the cloud (cloud
  steps, on a schedule of their own)."""
  def network(steps):
    lr = (optax.cosine_decay_schedule(config.learning_rate, max(steps, 1))
          if config.schedule == "cosine" else config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(lr))

  return (network(config.steps), optax.adam(config.decoder_learning_rate),
          network(config.cloud_steps))


def _edge_message(d: DefendedSplit, params: Any, dparams: list, images: jax.Array,
                  key: jax.Array) -> tuple[jax.Array, Any]:
  """The message of a training batch (batch norm in training mode) and the new statistics."""
  variables = {"params": params, "batch_stats": d.variables["batch_stats"]}
  ir, upd = d.model.apply(variables, _normalized(images, d.dataset), stop=d.split,
                          policy=d.policy, train=True)
  return _send(d, dparams, ir, jax.random.split(key, ir.shape[0])), upd["batch_stats"]


def _decoder_mse(module, decoder, msg, images):
  return jnp.mean((module.apply(decoder, _standardize(msg)) - images) ** 2)


def _task_loss(config: FinetuneConfig, out: jax.Array, labels: jax.Array,
               teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy plus ``distill`` times KL(teacher || network) of the predictions, and the
  cross-entropy alone."""
  ce = train.cross_entropy(out, labels)
  if not config.distill:
    return ce, ce
  log_t = jax.nn.log_softmax(teacher)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - jax.nn.log_softmax(out)), axis=-1)
  return ce + config.distill * jnp.mean(kl), ce


def _apply_updates(d: DefendedSplit, tx: Any, opt_state: Any, grads: Any, loss: jax.Array,
                   batch_stats: Any) -> tuple[DefendedSplit, Any, jax.Array]:
  """One optimizer step of the network and the defenses' parameters, and whether the loss
  and every updated parameter are finite."""
  trainable = (d.variables["params"], d.defense_params)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  params, dparams = optax.apply_updates(trainable, updates)
  finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, dparams))]))
  d = d.replace(variables={"params": params, "batch_stats": batch_stats}, defense_params=dparams)
  return d, opt_state, finite


def _teacher_logits(d: DefendedSplit, teacher: Variables | None, images: jax.Array):
  if teacher is None:
    return None
  return jax.lax.stop_gradient(d.model.apply(teacher, _normalized(images, d.dataset)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(config: FinetuneConfig, image_shape, carry, batch, teacher):
  """The inner decoder's ``decoder_steps`` on the current messages, then one step of the
  network and the defenses against the updated decoder."""
  d, opt_state, decoder, decoder_opt, step = carry
  images, labels, key = batch
  net_tx, dec_tx, _ = _optimizers(config)
  module = attacks.Decoder(image_shape, config.decoder_width)
  alpha = jnp.where(step >= config.decoder_warmup, d.stack.adversarial_weight, 0.0)
  # A reconstruction worse than the batch's mean image says nothing about the image: the
  # reward stops there, or the edge learns to make the decoder paint inverted images,
  # which a fresh decoder reads as well as upright ones.
  no_information = jnp.mean((images - jnp.mean(images, axis=0)) ** 2)

  current = jax.lax.stop_gradient(
      _edge_message(d, d.variables["params"], d.defense_params, images, key)[0])
  soft = _teacher_logits(d, teacher, images)

  # unrolled: XLA runs convolutions inside loops far slower on CPUs (attacks.iterate)
  for _ in range(config.decoder_steps):
    grads = jax.grad(_decoder_mse, argnums=1)(module, decoder, current, images)
    updates, decoder_opt = dec_tx.update(grads, decoder_opt, decoder)
    decoder = optax.apply_updates(decoder, updates)

  def net_loss(trainable):
    params, dparams = trainable
    msg, stats = _edge_message(d, params, dparams, images, key)
    out, upd = d.model.apply({"params": params, "batch_stats": stats},
                             d.stack.receive(dparams, msg), start=d.split, train=True)
    task, ce = _task_loss(config, out, labels, soft)
    mse = _decoder_mse(module, decoder, msg, images)
    loss = task + d.stack.penalty(images, msg) - alpha * jnp.minimum(mse, no_information)
    return loss, (ce, mse, upd["batch_stats"], jnp.mean(jnp.argmax(out, -1) == labels))

  trainable = (d.variables["params"], d.defense_params)
  (loss, (ce, mse, stats, acc)), grads = jax.value_and_grad(net_loss, has_aux=True)(trainable)
  d, opt_state, finite = _apply_updates(d, net_tx, opt_state, grads, loss, stats)
  metrics = {"loss": loss, "ce": ce, "decoder_mse": mse, "no_information_mse": no_information,
             "accuracy": acc, "finite": finite}
  return (d, opt_state, decoder, decoder_opt, step + 1), metrics


@functools.partial(jax.jit, static_argnums=0)
def _cloud_step(config: FinetuneConfig, carry, batch, teacher):
  """One step of the cloud alone on the frozen edge's messages (inference mode): the edge's
  parameters and statistics get no gradient and no update, nor do the defenses' parameters
  that only ``send`` uses."""
  d, opt_state = carry
  images, labels, key = batch
  msg = jax.lax.stop_gradient(message(d, images, jax.random.split(key, images.shape[0])))
  soft = _teacher_logits(d, teacher, images)

  def cloud_loss(trainable):
    params, dparams = trainable
    out, upd = d.model.apply({"params": params, "batch_stats": d.variables["batch_stats"]},
                             d.stack.receive(dparams, msg), start=d.split, train=True)
    loss, ce = _task_loss(config, out, labels, soft)
    return loss, (ce, upd["batch_stats"], jnp.mean(jnp.argmax(out, -1) == labels))

  trainable = (d.variables["params"], d.defense_params)
  (loss, (ce, stats, acc)), grads = jax.value_and_grad(cloud_loss, has_aux=True)(trainable)
  d, opt_state, finite = _apply_updates(d, _optimizers(config)[2], opt_state, grads, loss, stats)
  return (d, opt_state), {"loss": loss, "ce": ce, "accuracy": acc, "finite": finite}


def inner_decoder_key(config: FinetuneConfig) -> jax.Array:
  """The key the inner decoder of a fine-tuning with ``config`` is initialized from."""
  return jax.random.split(jax.random.key(config.seed))[0]


class FinetuneDiverged(ValueError):
  """The defended fine-tuning produced a non-finite loss or weights."""


def finetune(d: DefendedSplit, train_split: data.Split, config: FinetuneConfig = FinetuneConfig(),
             log_every: int = 100) -> tuple[DefendedSplit, dict[str, Any]]:
  """Fine-tunes a defended deployment: ``steps`` joint steps, then ``cloud_steps`` of the
  cloud alone. Returns it and the per-step history (``cloud_*`` for the cloud steps). Raises
  :class:`FinetuneDiverged` on a non-finite step. The inner decoder starts from
  ``inner_decoder_key(config)``, which no attacker may share."""
  image_shape = tuple(d.model.input_shape)
  net_tx, dec_tx, cloud_tx = _optimizers(config)
  teacher = d.variables if config.distill else None  # the float model it starts from
  noise_key = jax.random.split(jax.random.key(config.seed))[1]
  decoder = attacks.Decoder(image_shape, config.decoder_width).init(
      inner_decoder_key(config), jnp.zeros((1, *d.message_shape)))
  rng = np.random.default_rng(config.seed)
  history: dict[str, list[float]] = {}
  total = config.steps + config.cloud_steps
  start = time.time()

  def batch(i):
    idx = rng.integers(0, len(train_split.images), config.batch_size)
    images = data.augment(train_split.images[idx], rng).astype(np.float32) / 255.0
    return (jnp.asarray(images), jnp.asarray(train_split.labels[idx]),
            jax.random.fold_in(noise_key, i))

  def record(i, metrics, prefix):
    metrics = jax.device_get(metrics)  # one transfer per step, not one per metric
    if not metrics["finite"]:
      raise FinetuneDiverged(f"defended fine-tuning ({d.stack.spec()}) diverged at step {i}: "
                             f"loss {float(metrics['loss'])}; lower the learning rate or the "
                             "defense's strength")
    for name, value in metrics.items():
      if name != "finite":
        history.setdefault(prefix + name, []).append(float(value))
    if log_every and ((i + 1) % log_every == 0 or i + 1 == total):
      elapsed = time.time() - start
      logging.info("defended fine-tuning %s: step %d/%d%s, ce %.3f, %.1f s, ETA %.0f s",
                   d.stack.spec(), i + 1, total, " (cloud)" if prefix else "",
                   np.mean(history[prefix + "ce"][-log_every:]), elapsed,
                   elapsed / (i + 1) * (total - i - 1))

  trainable = (d.variables["params"], d.defense_params)
  carry = (d, net_tx.init(trainable), decoder, dec_tx.init(decoder), jnp.int32(0))
  joint = dataclasses.replace(config, cloud_steps=0)  # one compilation, whatever follows
  for i in range(config.steps):
    carry, metrics = _train_step(joint, image_shape, carry, batch(i), teacher)
    record(i, metrics, "")
  d = carry[0]
  carry = (d, cloud_tx.init((d.variables["params"], d.defense_params)))
  for i in range(config.steps, total):
    carry, metrics = _cloud_step(config, carry, batch(i), teacher)
    record(i, metrics, "cloud_")
  return carry[0], history


# ------------------------------------------------------------------------------ attacks

def check_attacker(config: attacks.DecoderConfig, inner: FinetuneConfig) -> None:
  """Refuses an adaptive decoder that trains less than ``ATTACKER_STEPS_FACTOR`` times the
  inner decoder's steps, or is narrower than it."""
  inner_steps = inner.steps * inner.decoder_steps
  if config.steps < ATTACKER_STEPS_FACTOR * inner_steps or config.width < inner.decoder_width:
    raise ValueError(f"the adaptive decoder ({config.steps} steps, width {config.width}) must "
                     f"train at least {ATTACKER_STEPS_FACTOR}x the inner decoder's "
                     f"{inner_steps} steps at no smaller width ({inner.decoder_width})")


def adaptive_decoder_attack(d: DefendedSplit, aux_images: np.ndarray, victim_images: np.ndarray,
                            key: jax.Array, config: attacks.DecoderConfig,
                            inner: FinetuneConfig | None = None) -> dict[str, Any]:
  """A decoder trained from scratch on the defended messages of ``aux_images``.

  With ``inner`` (the fine-tuning's config), refuses an attacker weaker than the rules
  of docs/method.md §13: fewer than ``ATTACKER_STEPS_FACTOR`` times the inner decoder's
  steps, a narrower decoder, or a key the fine-tuning used (its seed, the inner decoder's
  initialization, its noise) for the attacker's own key, training key or initialization.
  """
  if inner is not None and d.stack.adversarial_weight:
    check_attacker(config, inner)
  aux_key, victim_key, train_key = jax.random.split(key, 3)
  if inner is not None:
    fine_tuning = jax.random.key(inner.seed)
    used = {tuple(np.asarray(jax.random.key_data(k)).tolist())
            for k in (fine_tuning, *jax.random.split(fine_tuning))}
    mine = {tuple(np.asarray(jax.random.key_data(k)).tolist())
            for k in (key, train_key, *jax.random.split(train_key))}
    if used & mine:
      raise ValueError("the adaptive attacker must not reuse the fine-tuning's seed or the "
                       "inner decoder's key")
  aux = messages(d, aux_images, aux_key)
  victims = messages(d, victim_images, victim_key)
  decoders, losses = attacks.train_decoders(train_key, aux[None], jnp.asarray(aux_images), config,
                                            progress="adaptive decoder")
  recon = attacks.decode(decoders, victims[None])[0]
  return attacks.summary(recon, victim_images, losses=np.asarray(losses[0]))


def whitebox_attack(d: DefendedSplit, victim_images: np.ndarray, key: jax.Array,
                    config: attacks.WhiteboxConfig = attacks.WhiteboxConfig()) -> dict[str, Any]:
  """The white-box attack through the defended edge (its weights, defenses and genome
  known): images whose message matches the victims' messages; noise is drawn afresh at
  every step (the attacker knows its distribution, not the victim's draw)."""
  attacks.check_images(victim_images)
  target_key, start_key, step_key = jax.random.split(key, 3)
  targets = messages(d, victim_images, target_key)
  shape = targets.shape
  x0 = jnp.clip(0.5 + config.init_noise * jax.random.normal(start_key, victim_images.shape), 0, 1)
  scale = jnp.mean(targets ** 2, axis=tuple(range(1, len(shape)))) + 1e-12
  carry = (x0, optax.adam(config.learning_rate).init(x0))
  (x, _), losses = attacks.iterate(_whitebox_step, (config,), carry,
                                   jax.random.split(step_key, config.steps), (d, targets, scale),
                                   progress="white-box attack")
  return attacks.summary(x, victim_images, losses=np.asarray(losses))


def _whitebox_step(config, carry, key, d, targets, scale):
  axes = tuple(range(1, targets.ndim))

  def objective(x):
    per_image = (jnp.mean((message(d, x, jax.random.split(key, x.shape[0])) - targets) ** 2, axis=axes) / scale
                 + config.tv_weight * attacks.total_variation(x))
    return jnp.sum(per_image), jnp.mean(per_image)

  x, opt_state = carry
  grads, loss = jax.grad(objective, has_aux=True)(x)
  updates, opt_state = optax.adam(config.learning_rate).update(grads, opt_state, x)
  return (jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0), opt_state), loss


def attack_both_sets(d: DefendedSplit, aux_images: np.ndarray, selection_victims: np.ndarray,
                     test_victims: np.ndarray, whitebox_images: int,
                     keys: tuple[jax.Array, jax.Array], decoder_config: attacks.DecoderConfig,
                     whitebox_config: attacks.WhiteboxConfig, inner: FinetuneConfig | None
                     ) -> dict[str, Any]:
  """Both adaptive attacks on the victims that choose and on the test victims that report.

  One decoder (trained on ``aux_images``' messages, key ``keys[0]``) decodes both sets; the
  white-box attack (key ``keys[1]``) inverts the first ``whitebox_images`` of each. Returns
  ``{"selection" | "test": {"decoder" | "whitebox": {"ssim", "psnr"}}, "decoder_final_loss",
  "seconds": {"decoder", "whitebox"}, "reconstructions": {"decoder", "whitebox"}}``, the
  reconstructions those of the test victims.
  """
  n_sel, n_wb = len(selection_victims), whitebox_images
  t0 = time.time()
  dec = adaptive_decoder_attack(d, aux_images, np.concatenate([selection_victims, test_victims]),
                                keys[0], decoder_config, inner)
  t1 = time.time()
  wb = whitebox_attack(d, np.concatenate([selection_victims[:n_wb], test_victims[:n_wb]]),
                       keys[1], whitebox_config)
  t2 = time.time()

  def scores(attack: dict[str, Any], lo: int, hi: int) -> dict[str, float]:
    return {"ssim": float(attack["ssim_per_image"][lo:hi].mean()),
            "psnr": float(attack["psnr_per_image"][lo:hi].mean())}

  return {
      "selection": {"decoder": scores(dec, 0, n_sel), "whitebox": scores(wb, 0, n_wb)},
      "test": {"decoder": scores(dec, n_sel, len(dec["ssim_per_image"])),
               "whitebox": scores(wb, n_wb, 2 * n_wb)},
      "decoder_final_loss": float(dec["losses"][-1]),
      "seconds": {"decoder": t1 - t0, "whitebox": t2 - t1},
      "reconstructions": {"decoder": dec["reconstructions"][n_sel:],
                          "whitebox": wb["reconstructions"][n_wb:]},
  }
