"""CIFAR VGG with batch norm (Simonyan & Zisserman 2015), a chain model.

Every conv unit (conv, BN, ReLU and the max-pool that follows it, if any) is one
partition block, so a VGG splits after any of its convolution layers.
"""

from __future__ import annotations

from maxpart_jax.models.layers import Chain, ConvBN, Head, LayerCounter, Numerics

# Conv output channels; "M" is a 2x2 max-pool after the preceding conv.
VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11(width: float = 1.0, num_classes: int = 100, quantize_ends: bool = False,
          numerics: Numerics = Numerics()) -> Chain:
  """CIFAR VGG11-BN: 8 conv units and a linear classifier on the 1x1x512 map.

  Args:
    width: channel multiplier (1.0: 64..512 channels).
    num_classes: classifier outputs.
    quantize_ends: also quantize the first conv and the classifier.
    numerics: compute dtype and precision of the convolutions and the classifier.
  """
  ids = LayerCounter()
  blocks, labels = [], []
  convs = [c for c in VGG11_CFG if c != "M"]
  pools = [VGG11_CFG[i + 1] == "M" for i, c in enumerate(VGG11_CFG) if c != "M"]
  for j, (feats, pool) in enumerate(zip(convs, pools)):
    first = j == 0
    blocks.append(ConvBN(max(1, round(feats * width)), ids.take(), pool=pool,
                         quantizable=quantize_ends or not first, signed_input=first,
                         numerics=numerics))
    labels.append(f"conv{j + 1}")
  blocks.append(Head(num_classes, ids.take(), quantizable=quantize_ends, numerics=numerics))
  labels.append("head")
  return Chain(tuple(blocks), tuple(labels))
