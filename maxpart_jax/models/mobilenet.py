"""MobileNetV1 for CIFAR (Howard et al. 2017): 3x3 stride-1 stem, 13 separable blocks.

Each depthwise-separable block (3x3 depthwise conv, BN, ReLU, 1x1 pointwise conv,
BN, ReLU) is one partition block (docs/method.md §2).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from maxpart_jax.models.layers import (Chain, ConvBN, Head, LayerCounter, Numerics, QConv,
                                       batch_norm)
from maxpart_jax.quant import QuantPolicy

# (output channels, stride) of the 13 separable blocks.
MOBILENET_V1_CIFAR = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                      (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class SeparableBlock(nn.Module):
  """Depthwise 3x3 (layer ``first_layer``) then pointwise 1x1 (``first_layer + 1``)."""

  features: int
  strides: int
  first_layer: int
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               policy: QuantPolicy | None = None) -> jax.Array:
    c = x.shape[-1]
    x = QConv(c, 3, self.strides, groups=c, layer_id=self.first_layer, numerics=self.numerics,
              name="dw")(x, policy)
    x = nn.relu(batch_norm(train, "dw_bn")(x))
    x = QConv(self.features, 1, 1, layer_id=self.first_layer + 1, numerics=self.numerics,
              name="pw")(x, policy)
    return nn.relu(batch_norm(train, "pw_bn")(x))


def mobilenet_v1(width: float = 1.0, num_classes: int = 100, num_blocks: int = 13,
                 quantize_ends: bool = False, numerics: Numerics = Numerics()) -> Chain:
  """CIFAR MobileNetV1 as a chain of stem, separable blocks and head.

  Args:
    width: channel multiplier (1.0: stem 32 channels, last block 1024).
    num_classes: classifier outputs.
    num_blocks: keep the first ``num_blocks`` of the 13 separable blocks.
    quantize_ends: also quantize the stem conv and the classifier.
    numerics: compute dtype and precision of the convolutions and the classifier.
  """
  if not 1 <= num_blocks <= len(MOBILENET_V1_CIFAR):
    raise ValueError(f"num_blocks must be in 1..{len(MOBILENET_V1_CIFAR)}, got {num_blocks}")
  ids = LayerCounter()
  blocks = [ConvBN(max(1, round(32 * width)), ids.take(), quantizable=quantize_ends,
                   signed_input=True, numerics=numerics)]
  labels = ["stem"]
  for j, (feats, strides) in enumerate(MOBILENET_V1_CIFAR[:num_blocks]):
    blocks.append(SeparableBlock(max(1, round(feats * width)), strides, ids.take(2),
                                 numerics=numerics))
    labels.append(f"sep{j + 1}")
  blocks.append(Head(num_classes, ids.take(), quantizable=quantize_ends, numerics=numerics))
  labels.append("head")
  return Chain(tuple(blocks), tuple(labels))
