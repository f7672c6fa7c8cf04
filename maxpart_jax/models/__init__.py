"""Model zoo: CIFAR networks as block chains that split exactly between blocks.

>>> model = get_model("resnet18", width=0.25)
>>> variables = model.init(jax.random.key(0))
>>> ir = model.edge(variables, images, p=3)          # blocks 1..3 on the device
>>> logits = model.cloud(variables, ir, p=3)         # == model.full(variables, images)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax.models.metadata import ModelInfo, derive_info
from maxpart_jax.models.layers import Chain, Numerics
from maxpart_jax.models.mobilenet import mobilenet_v1
from maxpart_jax.models.resnet import resnet18, resnet50
from maxpart_jax.models.vgg import vgg11
from maxpart_jax.quant import QuantPolicy
from maxpart_jax.registry import Registry

Variables = dict[str, Any]

MODELS: Registry[Callable[..., Chain]] = Registry("model", aliases={"mobilenet": "mobilenet_v1"})
"""Builders of the block chains by name; a new model registers here
(``MODELS.register("name", builder)``)."""
for _name, _builder in (("vgg11", vgg11), ("resnet18", resnet18), ("resnet50", resnet50),
                        ("mobilenet_v1", mobilenet_v1)):
  MODELS.register(_name, _builder)


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A Flax block chain with its metadata and pure edge / cloud / full functions.

  Equal architectures compare (and hash) equal, so that compiled programs taking the model
  as a static argument are shared between instances.

  Attributes:
    name: registry name of the architecture.
    chain: the Linen module; ``variables`` are its ``params`` and ``batch_stats``.
    input_shape: per-example input shape (H, W, C).
    kwargs: the builder arguments ``chain`` was made with (see :func:`get_model`).
  """

  name: str
  chain: Chain
  input_shape: tuple[int, int, int] = (32, 32, 3)
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def numerics(self) -> Numerics:
    """Compute dtype and precision of the convolutions and matmuls."""
    return self.kwargs.get("numerics", Numerics())

  def with_numerics(self, numerics: Numerics) -> SplitModel:
    """The same architecture (same variables) computing with ``numerics``."""
    if numerics == self.numerics:
      return self
    return get_model(self.name, **{**self.kwargs, "numerics": numerics})

  @functools.cached_property
  def info(self) -> ModelInfo:
    """Block / layer metadata traced from ``chain`` (computed once)."""
    return derive_info(self.chain, self.input_shape)

  def init(self, key: jax.Array) -> Variables:
    """Fresh variables (``params`` and ``batch_stats``) for this model."""
    return dict(_init(self.chain, key, self.input_shape))

  def apply(self, variables: Variables, x: jax.Array, *, train: bool = False, start: int = 0,
            stop: int | None = None, policy: QuantPolicy | None = None) -> Any:
    """Runs blocks ``start..stop-1`` (jitted; inlined when called under an outer jit).

    With ``train=True`` batch norm uses batch statistics and the result is
    ``(output, {"batch_stats": ...})``, as with Linen's ``mutable``.
    """
    if start == 0:
      self.check_images(x)
    mutable = ("batch_stats",) if train else False
    return _apply(self.chain, variables, x, train=train, start=start, stop=stop, policy=policy,
                  mutable=mutable)

  def full(self, variables: Variables, x: jax.Array) -> jax.Array:
    """Logits of the whole float model (inference mode)."""
    return self.apply(variables, x)

  def edge(self, variables: Variables, x: jax.Array, p: int,
           policy: QuantPolicy | None = None) -> jax.Array:
    """The IR after blocks ``1..p``; quantized as ``policy`` says if one is given."""
    return self.apply(variables, x, stop=self.info.check_split(p), policy=policy)

  def cloud(self, variables: Variables, ir: jax.Array, p: int) -> jax.Array:
    """Logits from the IR of split ``p`` (the cloud runs in float)."""
    p = self.info.check_split(p)
    expected = self.info.blocks[p - 1].out_shape
    if tuple(ir.shape[1:]) != expected:
      raise ValueError(f"IR shape {tuple(ir.shape[1:])} does not match split p={p} of "
                       f"{self.name}, which expects {expected}")
    return self.apply(variables, ir, start=p)

  def check_images(self, x: jax.Array) -> None:
    """Raises ``ValueError`` for a batch that is not (N, *input_shape) finite floats."""
    if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(f"{self.name} expects images of shape (N, {', '.join(map(str, self.input_shape))}),"
                       f" got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{self.name} expects float images (normalized), got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
      raise ValueError(f"images passed to {self.name} contain NaN or inf")


# Jitted once per process with the module as a static argument: equal modules (the same
# architecture built twice, e.g. by a resumed run or another evaluator) share one compiled
# program. Compiling the random initializers takes seconds on a CPU.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(chain: Chain, key: jax.Array, input_shape: tuple[int, ...]) -> Variables:
  return chain.init(key, jnp.zeros((1, *input_shape), jnp.float32))


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("train", "start", "stop", "mutable"))
def _apply(chain: Chain, variables: Variables, x: jax.Array, **kwargs: Any) -> Any:
  return chain.apply(variables, x, **kwargs)


def available_models() -> list[str]:
  """Names accepted by :func:`get_model` (aliases included)."""
  return MODELS.names()


def model_from_spec(spec: dict[str, Any], **kwargs: Any) -> SplitModel:
  """The model a stored spec names (``{"name": ..., **builder kwargs}``, as in model.json),
  with ``kwargs`` as further builder arguments."""
  spec = dict(spec)
  return get_model(spec.pop("name"), **kwargs, **spec)


def get_model(name: str, **kwargs: Any) -> SplitModel:
  """Builds a registered model; ``kwargs`` go to its builder (width, num_classes, numerics, ...)."""
  builder = MODELS.get(name)
  return SplitModel(MODELS.aliases.get(name, name), builder(**kwargs), kwargs=dict(kwargs))
