"""Inversion attacks: how well can an adversary turn the IR the edge sends back into the image?

The paper's privacy score P (:mod:`maxpart_jax.privacy`) is a proxy: the distance between
the image and the IR channel that resembles it most. These attacks measure what P stands
for (docs/method.md §10):

* :func:`decoder_attack` (black-box query access): the attacker runs the edge, with the
  deployment's quantization, on auxiliary images of its own (disjoint from the victim's),
  trains a decoder from IR to image on those pairs, and decodes the victim's IRs.
* :func:`whitebox_attack` (the edge's weights and genome known): start from a gray image
  and minimise the relative IR mismatch plus total variation with Adam; gradients pass the
  quantizers straight through (:mod:`maxpart_jax.quant`).

Both are pure functions of ``(model, variables, policy, images, key, config)``: the same key
gives the same reconstructions. Several deployments that cut at the same split (e.g. the IR
at 32/8/4/2 bits) can train their decoders together under ``jax.vmap``
(:func:`decoder_attacks`, where it pays). Reconstructions are scored with dm-pix's SSIM
(Gaussian window 11, sigma 1.5, on RGB in [0, 1]) and PSNR in dB (capped at
:data:`MAX_PSNR`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import dm_pix
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from maxpart_jax import data, train
from maxpart_jax.models import SplitModel, Variables
from maxpart_jax.quant import QuantPolicy

MAX_PSNR = 100.0
"""PSNR of a perfect reconstruction (MSE 0 would give infinity)."""
PROGRESS_LINES = 10
"""Log lines of an attack's loop given a progress name (:func:`iterate`)."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """How the black-box attacker trains its decoder.

  Attributes:
    steps: Adam steps, each on ``batch_size`` (IR, image) pairs drawn with replacement.
    batch_size: pairs per step.
    learning_rate: peak Adam step, decayed to 0 by a cosine schedule.
    width: channels of the decoder at 16x16; 2x below that, half at full resolution.
    ssim_weight: loss = MSE + ``ssim_weight`` * (1 - SSIM).
  """

  steps: int = 600
  batch_size: int = 64
  learning_rate: float = 3e-3
  width: int = 32
  ssim_weight: float = 0.0

  def __post_init__(self):
    for name in ("steps", "batch_size", "width"):
      if getattr(self, name) < 1:
        raise ValueError(f"decoder {name} must be >= 1, got {getattr(self, name)}")
    if not self.learning_rate > 0 or self.ssim_weight < 0:
      raise ValueError(f"decoder learning_rate must be > 0 and ssim_weight >= 0, got "
                       f"{self.learning_rate}, {self.ssim_weight}")


@dataclasses.dataclass(frozen=True)
class WhiteboxConfig:
  """How the white-box attacker optimises its image.

  Attributes:
    steps: Adam steps on all victim images at once (each image is its own problem).
    learning_rate: Adam step in pixel units ([0, 1] images), constant.
    tv_weight: weight of the total variation (mean absolute difference of neighbours).
    init_noise: standard deviation of the noise added to the gray start (drawn from the key).
  """

  steps: int = 200
  learning_rate: float = 0.02
  tv_weight: float = 0.05
  init_noise: float = 0.01

  def __post_init__(self):
    if self.steps < 1 or not self.learning_rate > 0 or self.tv_weight < 0 or self.init_noise < 0:
      raise ValueError(f"white-box steps must be >= 1, learning_rate > 0, tv_weight and "
                       f"init_noise >= 0; got {self}")


@struct.dataclass
class TrainedDecoder:
  """A decoder's weights with the IR statistics it standardizes its input with."""

  params: Any
  ir_mean: jax.Array
  ir_std: jax.Array
  image_shape: tuple[int, int, int] = struct.field(pytree_node=False)
  width: int = struct.field(pytree_node=False)

  def __call__(self, ir: jax.Array) -> jax.Array:
    """Reconstructed images in [0, 1] from a batch of IRs."""
    module = Decoder(self.image_shape, self.width)
    return module.apply(self.params, (ir - self.ir_mean) / self.ir_std)


class Decoder(nn.Module):
  """A small upsampling conv net: IR (h, w, c) -> image ``image_shape`` in [0, 1].

  3x3 convolutions with ReLU; nearest-neighbour upsampling by 2 until the image size is
  reached (the last step resizes to it exactly); sigmoid output. The convolutions run at
  ``highest`` precision, true float32 on every backend (a GPU's default, TF32, would make
  reconstructions depend on the kernel XLA picks).
  """

  image_shape: tuple[int, int, int]
  width: int

  def channels(self, size: int) -> int:
    """Channels at a resolution: ``2 width`` up to 8x8, ``width`` at 16x16, ``width/2`` above."""
    return 2 * self.width if size <= 8 else self.width if size <= 16 else max(self.width // 2, 8)

  @nn.compact
  def __call__(self, ir: jax.Array) -> jax.Array:
    height, width, channels = self.image_shape
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), precision=jax.lax.Precision.HIGHEST)
    x = nn.relu(conv(self.channels(ir.shape[1]))(ir))
    while x.shape[1] < height:
      h = min(2 * x.shape[1], height)
      w = min(2 * x.shape[2], width) if h < height else width
      x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "nearest")
      x = nn.relu(conv(self.channels(h))(x))
    x = nn.relu(conv(self.channels(height))(x))
    return nn.sigmoid(conv(channels)(x))


def edge_function(model: SplitModel, variables: Variables, split: int,
                  dataset: str = "cifar100") -> Callable[[jax.Array, QuantPolicy | None], jax.Array]:
  """``(images in [0, 1], policy) -> IR`` of the first ``split`` blocks (jittable).

  The policy quantizes the edge and the IR as it says (``None``: all float).
  """
  split = model.info.check_split(split)
  info = data.dataset_info(dataset)
  mean, std = jnp.asarray(info.mean), jnp.asarray(info.std)
  return lambda images, policy: model.apply(variables, (images - mean) / std, stop=split,
                                            policy=policy)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _edge(model, split, dataset, variables, images, policy):
  return edge_function(model, variables, split, dataset)(images, policy)


def edge_irs(model: SplitModel, variables: Variables, split: int, policy: QuantPolicy | None,
             images: np.ndarray, *, dataset: str = "cifar100", batch_size: int = 500) -> jax.Array:
  """The IRs the edge sends for ``images`` (what the black-box attacker can query)."""
  check_images(images)
  split = model.info.check_split(split)
  return jnp.concatenate([_edge(model, split, dataset, variables,
                                jnp.asarray(images[i:i + batch_size]), policy)
                          for i in range(0, len(images), batch_size)])


def check_images(images: np.ndarray) -> None:
  """Raises ``ValueError`` unless ``images`` are (N, H, W, 3) floats in [0, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"attack images must be (N, H, W, 3) floats in [0, 1], got "
                     f"{images.dtype} {images.shape}")
  if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
    raise ValueError("attack images must be finite and in [0, 1] (not normalized)")


def _loss(recon: jax.Array, images: jax.Array, ssim_weight: float) -> jax.Array:
  loss = jnp.mean((recon - images) ** 2)
  if ssim_weight:
    loss += ssim_weight * jnp.mean(1.0 - dm_pix.ssim(recon, images))
  return loss


def iterate(step: Callable, static: tuple, carry: Any, xs: Any, consts: tuple = (),
            fused: bool | None = None, progress: str = "") -> tuple[Any, Any]:
  """``lax.scan(lambda c, x: step(*static, c, x, *consts), carry, xs)``, compiled.

  ``step`` is a module-level function and ``static`` its hashable leading arguments, so
  that repeated calls reuse the compiled program. ``fused`` runs the steps as one compiled
  loop; otherwise one compiled call per step, which is much faster on CPUs, where XLA runs
  convolutions inside loops slowly (21x for a decoder's training step, measured;
  :func:`maxpart_jax.train.resolve_pipeline`). ``None``: fused on GPUs and TPUs only. Both
  give the same values up to float rounding. ``progress``: a name to log a line with the
  ETA under about every tenth of the steps (fused: the loop then runs in that many parts).
  """
  if fused is None:
    fused = train.resolve_pipeline("auto") == "fused"
  n = len(jax.tree.leaves(xs)[0])
  every = max(1, -(-n // PROGRESS_LINES)) if progress else n
  log = train.Progress(n, every=every, name=progress, unit="step")
  outs = []
  if fused:
    for lo in range(0, n, every):
      carry, out = _all_steps(step, static, carry,
                              jax.tree.map(lambda a: a[lo:lo + every], xs), consts)
      outs.append(out)
      if progress:
        jax.block_until_ready(carry)
        log(min(lo + every, n))
    return carry, jax.tree.map(lambda *o: jnp.concatenate(o), *outs)
  for i in range(n):
    carry, out = _one_step(step, static, carry, jax.tree.map(lambda a: a[i], xs), consts)
    outs.append(out)
    if progress and ((i + 1) % every == 0 or i + 1 == n):
      jax.block_until_ready(carry)
      log(i + 1)
  return carry, jax.tree.map(lambda *o: jnp.stack(o), *outs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_step(step, static, carry, x, consts):
  return step(*static, carry, x, *consts)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _all_steps(step, static, carry, xs, consts):
  return jax.lax.scan(lambda c, x: step(*static, c, x, *consts), carry, xs)


def _decoder_optimizer(config: DecoderConfig) -> optax.GradientTransformation:
  return optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_decoders(config, image_shape, key, irs):
  module = Decoder(image_shape, config.width)
  params = jax.vmap(lambda ir: module.init(key, ir[:1]))(irs)
  return params, jax.vmap(_decoder_optimizer(config).init)(params)


def _decoder_step(config, image_shape, carry, key, irs, mean, std, images):
  """One Adam step of every decoder, all on the same batch indices."""
  module, tx = Decoder(image_shape, config.width), _decoder_optimizer(config)
  idx = jax.random.randint(key, (config.batch_size,), 0, images.shape[0])

  def one(params, opt_state, irs, mean, std):
    x = (irs[idx] - mean) / std
    loss, grads = jax.value_and_grad(
        lambda p: _loss(module.apply(p, x), images[idx], config.ssim_weight))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, loss = jax.vmap(one)(*carry, irs, mean, std)
  return (params, opt_state), loss


def train_decoders(key: jax.Array, irs: jax.Array, images: jax.Array,
                   config: DecoderConfig = DecoderConfig(), fused: bool | None = None,
                   progress: str = "") -> tuple[TrainedDecoder, jax.Array]:
  """Fits one decoder per stack of IRs to (IR, image) pairs, all under ``jax.vmap``.

  Args:
    key: decides the initialization and the batches, the same for every decoder.
    irs: (G, N, h, w, c) the IRs of the N auxiliary images under G deployments.
    images: (N, H, W, 3) the auxiliary images in [0, 1].
    fused, progress: see :func:`iterate`.

  Returns:
    The G decoders (leaves with a leading G axis) and their (G, steps) training losses.
  """
  image_shape = tuple(images.shape[1:])
  axes = tuple(range(1, irs.ndim - 1))
  ir_mean = jnp.mean(irs, axis=axes, keepdims=True)[:, 0]
  ir_std = jnp.std(irs, axis=axes, keepdims=True)[:, 0] + 1e-6
  init_key, batch_key = jax.random.split(key)
  carry = _init_decoders(config, image_shape, init_key, irs)
  (params, _), losses = iterate(_decoder_step, (config, image_shape), carry,
                                jax.random.split(batch_key, config.steps),
                                (irs, ir_mean, ir_std, images), fused, progress)
  return TrainedDecoder(params, ir_mean, ir_std, image_shape, config.width), losses.T


def reconstruction_scores(recon: jax.Array, images: jax.Array) -> dict[str, np.ndarray]:
  """Per-image SSIM and PSNR (dB, at most :data:`MAX_PSNR`) of reconstructions in [0, 1]."""
  ssim = dm_pix.ssim(jnp.asarray(recon), jnp.asarray(images))
  mse = jnp.mean((jnp.asarray(recon) - jnp.asarray(images)) ** 2, axis=(1, 2, 3))
  psnr = jnp.minimum(-10.0 * jnp.log10(jnp.maximum(mse, 10 ** (-MAX_PSNR / 10))), MAX_PSNR)
  return {"ssim": np.asarray(ssim), "psnr": np.asarray(psnr)}


def summary(recon: jax.Array, victim_images: np.ndarray, **extra: Any) -> dict[str, Any]:
  """An attack's result: the reconstructions, their mean and per-image SSIM and PSNR, and
  ``extra`` (e.g. ``losses``)."""
  scores = reconstruction_scores(recon, victim_images)
  return {"reconstructions": np.asarray(recon), "ssim": float(scores["ssim"].mean()),
          "psnr": float(scores["psnr"].mean()), "ssim_per_image": scores["ssim"],
          "psnr_per_image": scores["psnr"], **extra}


def decoder_attack(model: SplitModel, variables: Variables, split: int,
                   policy: QuantPolicy | None, aux_images: np.ndarray,
                   victim_images: np.ndarray, key: jax.Array,
                   config: DecoderConfig = DecoderConfig(), *,
                   dataset: str = "cifar100", fused: bool | None = None) -> dict[str, Any]:
  """The black-box attack on one deployment (``split`` blocks, quantized by ``policy``).

  Returns ``{"reconstructions", "ssim", "psnr", "ssim_per_image", "psnr_per_image",
  "losses"}``: the decoded victim images, the mean and per-image scores, and the decoder's
  training loss per step.
  """
  return decoder_attacks(model, variables, split, [policy], aux_images, victim_images, key,
                         config, dataset=dataset, fused=fused)[0]


def decoder_attacks(model: SplitModel, variables: Variables, split: int,
                    policies: list[QuantPolicy | None], aux_images: np.ndarray,
                    victim_images: np.ndarray, key: jax.Array,
                    config: DecoderConfig = DecoderConfig(), *,
                    dataset: str = "cifar100", fused: bool | None = None,
                    vectorize: bool = False) -> list[dict[str, Any]]:
  """:func:`decoder_attack` for several deployments cut at the same ``split``.

  Every decoder starts from the same key (same initialization and batches), so their
  differences come from the IRs alone. ``vectorize`` trains them together under
  ``jax.vmap``, which turns their convolutions into grouped ones: on a 2-core CPU that was
  3.4-4.1x slower than one after another (4 decoders, ResNet18 splits 1, 5 and 9), so it is
  off by default.
  """
  check_images(aux_images)
  check_images(victim_images)
  aux, victims = [], []
  for policy in policies:
    aux.append(edge_irs(model, variables, split, policy, aux_images, dataset=dataset))
    victims.append(edge_irs(model, variables, split, policy, victim_images, dataset=dataset))
  aux_images = jnp.asarray(aux_images)
  if vectorize:
    decoders, losses = train_decoders(key, jnp.stack(aux), aux_images, config, fused)
    recon = decode(decoders, jnp.stack(victims))
  else:
    trained = [train_decoders(key, ir[None], aux_images, config, fused) for ir in aux]
    losses = [l[0] for _, l in trained]
    recon = [decode(d, ir[None])[0] for (d, _), ir in zip(trained, victims)]
  return [summary(recon[i], victim_images, losses=np.asarray(losses[i]))
          for i in range(len(policies))]


@jax.jit
def decode(decoders: TrainedDecoder, irs: jax.Array) -> jax.Array:
  """(G, N, H, W, 3) reconstructions of (G, N, h, w, c) IRs by G stacked decoders."""
  return jax.vmap(lambda d, ir: d(ir))(decoders, irs)


def total_variation(images: jax.Array) -> jax.Array:
  """Per-image mean absolute difference between vertical and horizontal neighbours."""
  dy = jnp.abs(images[:, 1:] - images[:, :-1]).mean(axis=(1, 2, 3))
  dx = jnp.abs(images[:, :, 1:] - images[:, :, :-1]).mean(axis=(1, 2, 3))
  return dy + dx


def whitebox_attack(model: SplitModel, variables: Variables, split: int,
                    policy: QuantPolicy | None, victim_images: np.ndarray, key: jax.Array,
                    config: WhiteboxConfig = WhiteboxConfig(), *,
                    dataset: str = "cifar100", fused: bool | None = None) -> dict[str, Any]:
  """The white-box attack: images whose IR matches the victims' IRs, from a gray start.

  Minimises, per image, ``|IR(x) - IR_victim|^2 / |IR_victim|^2 + tv_weight * TV(x)`` over
  ``x`` in [0, 1] (Adam, projected by clipping). Returns what :func:`decoder_attack`
  returns, with ``losses`` the mean objective per step.
  """
  targets = edge_irs(model, variables, split, policy, victim_images, dataset=dataset)
  split = model.info.check_split(split)
  recon, losses = _invert(model, split, dataset, config, variables, policy, targets, key, fused)
  return summary(recon, victim_images, losses=np.asarray(losses))


def _invert(model, split, dataset, config, variables, policy, targets, key, fused):
  shape = (targets.shape[0], *model.input_shape)
  x0 = jnp.clip(0.5 + config.init_noise * jax.random.normal(key, shape), 0.0, 1.0)
  carry = (x0, optax.adam(config.learning_rate).init(x0))
  scale = jnp.mean(targets ** 2, axis=tuple(range(1, targets.ndim))) + 1e-12
  (x, _), losses = iterate(_whitebox_step, (model, split, dataset, config), carry,
                           jnp.arange(config.steps), (variables, policy, targets, scale), fused)
  return x, losses


def _whitebox_step(model, split, dataset, config, carry, _, variables, policy, targets, scale):
  """One projected Adam step on the images (``scale``: each target's mean square)."""
  axes = tuple(range(1, targets.ndim))

  def objective(x):
    ir = edge_function(model, variables, split, dataset)(x, policy)
    per_image = (jnp.mean((ir - targets) ** 2, axis=axes) / scale
                 + config.tv_weight * total_variation(x))
    return jnp.sum(per_image), jnp.mean(per_image)

  x, opt_state = carry
  grads, loss = jax.grad(objective, has_aux=True)(x)
  updates, opt_state = optax.adam(config.learning_rate).update(grads, opt_state, x)
  return (jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0), opt_state), loss
