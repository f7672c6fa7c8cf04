"""CIFAR ResNets (He et al. 2016): 3x3 stride-1 stem, no max-pool (docs/method.md §2).

Each BasicBlock / Bottleneck is one partition block; the stride sits on the 3x3
conv and a 1x1 projection shortcut is used where the shape changes.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from maxpart_jax.models.layers import (Chain, ConvBN, Head, LayerCounter, Numerics, QConv,
                                       batch_norm)
from maxpart_jax.quant import QuantPolicy


class BasicBlock(nn.Module):
  """Two 3x3 convs; layer ids: conv1, conv2, then the projection if any."""

  features: int
  strides: int
  project: bool
  first_layer: int
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               policy: QuantPolicy | None = None) -> jax.Array:
    i = self.first_layer
    y = QConv(self.features, 3, self.strides, layer_id=i, numerics=self.numerics,
              name="conv1")(x, policy)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = QConv(self.features, 3, 1, layer_id=i + 1, numerics=self.numerics,
              name="conv2")(y, policy)
    y = batch_norm(train, "bn2")(y)
    if self.project:
      x = QConv(self.features, 1, self.strides, layer_id=i + 2, numerics=self.numerics,
              name="proj")(x, policy)
      x = batch_norm(train, "proj_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand (x4); ids: conv1..3, then the projection."""

  features: int
  strides: int
  project: bool
  first_layer: int
  expansion: int = 4
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               policy: QuantPolicy | None = None) -> jax.Array:
    i, out = self.first_layer, self.features * self.expansion
    y = QConv(self.features, 1, 1, layer_id=i, numerics=self.numerics,
              name="conv1")(x, policy)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = QConv(self.features, 3, self.strides, layer_id=i + 1, numerics=self.numerics,
              name="conv2")(y, policy)
    y = nn.relu(batch_norm(train, "bn2")(y))
    y = QConv(out, 1, 1, layer_id=i + 2, numerics=self.numerics,
              name="conv3")(y, policy)
    y = batch_norm(train, "bn3")(y)
    if self.project:
      x = QConv(out, 1, self.strides, layer_id=i + 3, numerics=self.numerics,
              name="proj")(x, policy)
      x = batch_norm(train, "proj_bn")(x)
    return nn.relu(x + y)


def resnet(stage_sizes: Sequence[int], bottleneck: bool, width: float = 1.0,
           num_classes: int = 100, quantize_ends: bool = False,
           numerics: Numerics = Numerics()) -> Chain:
  """Builds a CIFAR ResNet as a chain of stem, residual blocks and head.

  Args:
    stage_sizes: residual blocks per stage (ResNet18: 2,2,2,2; ResNet50: 3,4,6,3).
    bottleneck: Bottleneck blocks (expansion 4) instead of BasicBlocks.
    width: channel multiplier; 1.0 gives 64/128/256/512 stage widths.
    num_classes: classifier outputs.
    quantize_ends: also quantize the stem conv and the classifier (off in the paper).
    numerics: compute dtype and precision of the convolutions and the classifier.
  """
  ids = LayerCounter()
  base = max(1, round(64 * width))
  blocks = [ConvBN(base, ids.take(), quantizable=quantize_ends, signed_input=True,
                   numerics=numerics)]
  labels = ["stem"]
  cin, expansion = base, (4 if bottleneck else 1)
  for stage, n in enumerate(stage_sizes):
    feats = base * 2**stage
    for j in range(n):
      strides = 2 if stage > 0 and j == 0 else 1
      project = strides != 1 or cin != feats * expansion
      n_layers = (3 if bottleneck else 2) + int(project)
      cls = Bottleneck if bottleneck else BasicBlock
      blocks.append(cls(feats, strides, project, ids.take(n_layers), numerics=numerics))
      labels.append(f"layer{stage + 1}.{j}")
      cin = feats * expansion
  blocks.append(Head(num_classes, ids.take(), quantizable=quantize_ends, numerics=numerics))
  labels.append("head")
  return Chain(tuple(blocks), tuple(labels))


def resnet18(width: float = 1.0, num_classes: int = 100, stage_sizes: Sequence[int] = (2, 2, 2, 2),
             quantize_ends: bool = False, numerics: Numerics = Numerics()) -> Chain:
  """CIFAR ResNet18: 8 BasicBlocks with 64/128/256/512 channels at ``width=1``."""
  return resnet(stage_sizes, False, width, num_classes, quantize_ends, numerics)


def resnet50(width: float = 1.0, num_classes: int = 100, stage_sizes: Sequence[int] = (3, 4, 6, 3),
             quantize_ends: bool = False, numerics: Numerics = Numerics()) -> Chain:
  """CIFAR ResNet50: 16 Bottlenecks (3-4-6-3), expansion 4, at ``width=1``."""
  return resnet(stage_sizes, True, width, num_classes, quantize_ends, numerics)
