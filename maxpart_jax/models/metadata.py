"""Block and layer metadata derived from the model definition itself (docs/method.md §2).

:func:`derive_info` traces one forward pass with ``jax.eval_shape`` (no FLOPs,
no memory for activations) and intercepts every block and every conv / dense
call, recording what the layer really computes: kind, kernel, stride, groups,
input and output shapes, parameters, multiply-accumulates. Nothing is typed in
by hand, so the energy model cannot drift from the network it describes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax.models.layers import Chain, QConv, QDense

CONV, DEPTHWISE, DENSE = "conv", "depthwise_conv", "dense"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One conv or dense layer. Shapes are per example (no batch axis)."""

  id: int
  name: str
  block: int
  kind: str
  kernel: tuple[int, int] | None
  stride: int
  groups: int
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  params: int
  macs: int
  quantizable: bool

  @property
  def in_elems(self) -> int:
    """Input activation elements read by the layer."""
    return int(np.prod(self.in_shape))


@dataclasses.dataclass(frozen=True)
class BlockInfo:
  """One partition block: its label, its layers and the shape of its output (the IR)."""

  index: int
  label: str
  layer_ids: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def out_elems(self) -> int:
    return int(np.prod(self.out_shape))


@dataclasses.dataclass(frozen=True, eq=False)
class ModelInfo:
  """Ordered blocks and layers of a model, with numpy views for vectorized use.

  Block indices here are 0-based; a partition point ``p`` (1-based, docs/method.md §2) puts
  blocks ``0..p-1`` on the edge. Legal ``p`` are ``1..num_blocks - 1``: at least the
  stem on the edge, at least the classifier in the cloud.
  """

  input_shape: tuple[int, ...]
  layers: tuple[LayerInfo, ...]
  blocks: tuple[BlockInfo, ...]

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @property
  def num_blocks(self) -> int:
    return len(self.blocks)

  @property
  def max_split(self) -> int:
    """Deepest partition point: every block but the head on the edge."""
    return self.num_blocks - 1

  @functools.cached_property
  def layer_block(self) -> np.ndarray:
    """(L,) 0-based block index of every layer."""
    return np.array([l.block for l in self.layers], np.int32)

  @functools.cached_property
  def layer_macs(self) -> np.ndarray:
    return np.array([l.macs for l in self.layers], np.float64)

  @functools.cached_property
  def layer_params(self) -> np.ndarray:
    return np.array([l.params for l in self.layers], np.float64)

  @functools.cached_property
  def layer_in_elems(self) -> np.ndarray:
    return np.array([l.in_elems for l in self.layers], np.float64)

  @functools.cached_property
  def quantizable(self) -> np.ndarray:
    """(L,) bool: layers whose bits a policy may change."""
    return np.array([l.quantizable for l in self.layers], bool)

  @functools.cached_property
  def block_out_elems(self) -> np.ndarray:
    """(B,) elements of each block's output, i.e. the IR of split ``index + 1``."""
    return np.array([b.out_elems for b in self.blocks], np.float64)

  @functools.cached_property
  def block_last_layer(self) -> np.ndarray:
    """(B,) id of the last layer of each block (its bits set the IR's bits)."""
    return np.array([max(b.layer_ids) for b in self.blocks], np.int32)

  def check_split(self, p: int) -> int:
    """Returns ``p`` as an int, or raises ``ValueError`` if it is not a legal split."""
    if isinstance(p, (bool, np.bool_)) or int(p) != p or not 1 <= p <= self.max_split:
      raise ValueError(f"partition point p={p!r} out of range: legal splits are "
                       f"1..{self.max_split} (blocks {self.blocks[0].label}.."
                       f"{self.blocks[self.max_split - 1].label} on the edge)")
    return int(p)

  def table(self) -> str:
    """A per-layer text table (block, layer, kind, shapes, params, MACs)."""
    rows = [f"{'id':>3} {'block':<10} {'layer':<22} {'kind':<15} {'k':>2} {'s':>2} {'g':>5} "
            f"{'in':>14} {'out':>14} {'params':>10} {'MACs':>12} q"]
    for l in self.layers:
      k = l.kernel[0] if l.kernel else "-"
      rows.append(f"{l.id:>3} {self.blocks[l.block].label:<10} {l.name:<22} {l.kind:<15} "
                  f"{k:>2} {l.stride:>2} {l.groups:>5} {str(l.in_shape):>14} "
                  f"{str(l.out_shape):>14} {l.params:>10,} {l.macs:>12,} "
                  f"{'y' if l.quantizable else 'n'}")
    return "\n".join(rows)


def _layer_record(module: nn.Module, x: jax.Array, y: jax.Array, block: int) -> LayerInfo:
  """Describes one executed QConv / QDense call."""
  params = int(sum(np.prod(v.shape) for v in jax.tree.leaves(module.variables["params"])))
  in_shape, out_shape = tuple(x.shape[1:]), tuple(y.shape[1:])
  if isinstance(module, QDense):
    kind, kernel, stride, groups = DENSE, None, 1, 1
    macs = in_shape[-1] * out_shape[-1]
  else:
    k, groups = module.kernel_size, module.groups
    kind = DEPTHWISE if groups > 1 and groups == in_shape[-1] else CONV
    kernel, stride = (k, k), module.strides
    macs = k * k * in_shape[-1] * out_shape[-1] * out_shape[0] * out_shape[1] // groups
  return LayerInfo(id=module.layer_id, name="/".join(module.path), block=block, kind=kind,
                   kernel=kernel, stride=stride, groups=groups, in_shape=in_shape,
                   out_shape=out_shape, params=params, macs=int(macs),
                   quantizable=module.quantizable)


def derive_info(chain: Chain, input_shape: Sequence[int] = (32, 32, 3)) -> ModelInfo:
  """Traces ``chain`` once (shapes only) and returns its block / layer metadata."""
  layers: list[LayerInfo] = []
  block_out: list[tuple[int, ...]] = []
  block_layers: list[list[int]] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    is_block = isinstance(module.parent, Chain)
    if is_block:
      block_layers.append([])
    out = next_fun(*args, **kwargs)
    if is_block:
      block_out.append(tuple(out.shape[1:]))
    elif isinstance(module, (QConv, QDense)):
      layers.append(_layer_record(module, args[0], out, len(block_out)))
      block_layers[-1].append(module.layer_id)
    return out

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(chain.init, jax.random.key(0), x)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(chain.apply, variables, x)

  ids = [l.id for l in layers]
  if ids != list(range(len(layers))):
    raise ValueError(f"layer ids must be 0..L-1 in execution order, got {ids}")
  empty = [chain.labels[i] for i, b in enumerate(block_layers) if not b]
  if empty:
    raise ValueError(f"blocks without a conv/dense layer cannot be scored: {empty}")
  blocks = tuple(BlockInfo(i, chain.labels[i], tuple(ids_), shape)
                 for i, (ids_, shape) in enumerate(zip(block_layers, block_out)))
  return ModelInfo(tuple(input_shape), tuple(layers), blocks)
