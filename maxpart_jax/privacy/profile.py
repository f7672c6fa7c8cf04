"""Privacy profiles: the privacy of the IR after every block (or layer) of a model.

For block splits the IR is exactly what the edge would send at that split: with a
genome, the edge layers are fake-quantized by the genome's genes and the IR is
quantized to the genome's IR bits (``genome.p`` is ignored: every split ``q`` is
scored as the genome truncated at ``q``). With ``ir_bits`` instead, only the IR is
quantized and the edge runs in float, as the paper's Fig. 8 does. Per-layer profiles
score the raw output
of every conv / dense layer (before batch norm and ReLU, projection shortcuts
included) of the float model, the view of the paper's Fig. 5.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxpart_jax import data, privacy
from maxpart_jax.genome import Genome, to_policy
from maxpart_jax.models import SplitModel, Variables
from maxpart_jax.models.layers import QConv, QDense
from maxpart_jax.quant import QuantPolicy, check_bits


def classifier(model: SplitModel, variables: Variables,
               dataset: str = "cifar100") -> Callable[[jax.Array], jax.Array]:
  """``images in [0, 1] -> logits`` of the float model, as the KL metric needs it."""
  info = data.dataset_info(dataset)
  mean, std = jnp.asarray(info.mean), jnp.asarray(info.std)
  return lambda images: model.apply(variables, (images - mean) / std)


def batched(fn: Callable[[slice], jax.Array], n: int, batch_size: int) -> np.ndarray:
  """``fn`` over consecutive slices of ``n`` examples, concatenated (on the host)."""
  return np.concatenate([np.asarray(fn(slice(i, i + batch_size))) for i in range(0, n, batch_size)])


def block_profile(model: SplitModel, variables: Variables, images: np.ndarray, *,
                  dataset: str = "cifar100", genome: Genome | None = None, metric: str = "mse",
                  normalization: str = "zscore", per_channel: bool = False,
                  batch_size: int = 100, ir_bits: int | None = None,
                  activation_levels: str = "paper") -> dict[str, Any]:
  """Privacy after every legal split ``1..max_split``.

  Args:
    images: (N, H, W, 3) float images in [0, 1] (unnormalized).
    genome: quantize the edge as this genome says; ``None`` scores the float model.
    ir_bits: quantize only the IR, to these bits (the edge stays float; not with ``genome``).
    activation_levels: the step of non-negative activations (:mod:`maxpart_jax.quant`).
    metric, normalization: as in :func:`maxpart_jax.privacy.privacy_score`.

  Returns:
    ``{"metric", "blocks": [{"index", "label", "privacy", "privacy_std"}, ...]}``,
    privacy being the mean of P over the images.
  """
  if genome is not None and ir_bits is not None:
    raise ValueError("give a genome (the whole edge quantized) or ir_bits (the IR only), not both")
  if ir_bits is not None:
    check_bits([ir_bits], "ir_bits")
  classify_fn = classifier(model, variables, dataset) if metric == "kl" else None
  x_all = data.normalize(np.asarray(images, np.float32), dataset)
  rows = []
  for q in range(1, model.info.max_split + 1):
    if genome is not None:
      policy = to_policy(model.info, genome.replace(p=jnp.int32(q)), per_channel,
                         activation_levels)
    elif ir_bits is not None:
      policy = QuantPolicy.ir_only(model.info.num_layers, q, ir_bits, activation_levels)
    else:
      policy = None
    score = _block_scorer(model, q, metric, normalization, classify_fn)
    scores = batched(lambda s: score(variables, x_all[s], images[s], policy), len(images),
                      batch_size)
    rows.append({"index": q, "label": model.info.blocks[q - 1].label,
                 "privacy": float(scores.mean()), "privacy_std": float(scores.std())})
  return {"metric": metric, "normalization": normalization, "blocks": rows}


@functools.lru_cache(maxsize=256)
def _block_scorer(model, q, metric, normalization, classify_fn):
  """Jitted ``(variables, x, images, policy) -> P`` for split ``q`` (cached per split)."""

  @jax.jit
  def score(variables, x, images, policy):
    ir = model.apply(variables, x, stop=q, policy=policy)
    return privacy.privacy_score(images, ir, metric, normalization=normalization,
                                 classify_fn=classify_fn)

  return score


def layer_outputs(model: SplitModel, variables: Variables, x: jax.Array) -> dict[str, jax.Array]:
  """Raw outputs of every conv / dense layer of the float model, by layer name."""
  outputs: dict[str, jax.Array] = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (QConv, QDense)):
      outputs["/".join(context.module.path)] = out
    return out

  with nn.intercept_methods(capture):
    model.chain.apply(variables, x)
  return outputs


def layer_profile(model: SplitModel, variables: Variables, images: np.ndarray, *,
                  dataset: str = "cifar100", metric: str = "mse", normalization: str = "zscore",
                  batch_size: int = 100) -> dict[str, Any]:
  """Privacy of the output of every conv layer of the float model (the classifier excluded)."""
  info = model.info
  classify_fn = classifier(model, variables, dataset) if metric == "kl" else None
  convs = [l for l in info.layers if l.kind != "dense"]

  @jax.jit
  def scores(variables, x, imgs):
    outs = layer_outputs(model, variables, x)
    return jnp.stack([privacy.privacy_score(imgs, outs[l.name], metric, normalization=normalization,
                                            classify_fn=classify_fn) for l in convs], axis=-1)

  x_all = data.normalize(np.asarray(images, np.float32), dataset)
  all_scores = batched(lambda s: scores(variables, x_all[s], images[s]), len(images), batch_size)
  rows = [{"id": l.id, "name": l.name, "block": l.block, "block_label": info.blocks[l.block].label,
           "kind": l.kind, "privacy": float(all_scores[:, j].mean()),
           "privacy_std": float(all_scores[:, j].std())} for j, l in enumerate(convs)]
  return {"metric": metric, "normalization": normalization, "layers": rows}


def normalize_01(values: list[float]) -> list[float]:
  """Min-max scaling of a profile to [0, 1] (the paper's normalized plots)."""
  v = np.asarray(values, np.float64)
  span = v.max() - v.min()
  return ((v - v.min()) / span if span > 0 else np.zeros_like(v)).tolist()
