r"""The paper's privacy analyses on pre-trained models and real test images.

  python -m experiments.privacy_analysis --analysis=all --workdir=results/privacy \
      --vgg11=workdirs/cpu_vgg11/model --resnet18=pretrained/cpu_resnet18/model

Analyses (each writes ``<name>.json`` and ``<name>.png`` into ``--workdir``):
  fig3_ir_visualization  input images next to the most input-like channel after each of the
                         first five layers of VGG11
  fig4_vgg11_metrics     VGG11 privacy per layer under mse, ssim and kl, each normalized to [0, 1]
  fig5_resnet18_layers   ResNet18 privacy per conv layer and per block (Fig. 5 and Fig. 7)
  fig8_bits              ResNet18 privacy of the IR at every split at 2/4/8 bits vs float: the IR
                         alone quantized (the paper's Fig. 8), and the whole edge with it
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from absl import app, flags, logging
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from maxpart_jax import checkpoint, data, privacy, runs
from maxpart_jax.genome import uniform_genome
from maxpart_jax.privacy import profile

ANALYSES = ("fig3_ir_visualization", "fig4_vgg11_metrics", "fig5_resnet18_layers", "fig8_bits")

_ANALYSIS = flags.DEFINE_string("analysis", "all", f"one of {ANALYSES} or 'all'")
_WORKDIR = flags.DEFINE_string("workdir", "results/privacy", "output folder")
_VGG = flags.DEFINE_string("vgg11", "workdirs/cpu_vgg11/model", "pre-trained VGG11 (model dir)")
_RESNET = flags.DEFINE_string("resnet18", "pretrained/cpu_resnet18/model",
                              "pre-trained ResNet18 (model dir)")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 500, "test images the scores average over")
_SEED = flags.DEFINE_integer("seed", 0, "which test images")


def _images(meta: dict[str, Any], n: int, seed: int) -> np.ndarray:
  """``n`` random test images in [0, 1] of the model's dataset (fixed by ``seed``)."""
  return data.load_split("test", dataset=meta["dataset"]).take(n, seed=seed).float_images()


def fig3_ir_visualization(vgg_dir: str, n: int, seed: int) -> tuple[dict[str, Any], plt.Figure]:
  """Most input-like channel after each of the first five VGG11 layers, for four images."""
  model, variables, meta = checkpoint.load_model(vgg_dir)
  images = _images(meta, 4, seed)
  x = data.normalize(images, meta["dataset"])
  layers = min(5, model.info.max_split)
  fig, axes = plt.subplots(len(images), layers + 1, figsize=(2 * (layers + 1), 2 * len(images)))
  out: dict[str, Any] = {"model": meta["model"], "images": []}
  for r, image in enumerate(images):
    axes[r, 0].imshow(image)
    axes[r, 0].set_title("input" if r == 0 else "")
    row = []
    for q in range(1, layers + 1):
      ir = model.edge(variables, x[r:r + 1], q)
      score, channel = privacy.privacy_score(image[None], ir, return_index=True)
      c = int(channel[0])
      axes[r, q].imshow(np.asarray(ir[0, ..., c]), cmap="gray")
      axes[r, q].set_title(f"layer {q}, ch {c}\nP={float(score[0]):.2f}", fontsize=8)
      row.append({"layer": q, "channel": c, "privacy": float(score[0]),
                  "shape": list(ir.shape[1:])})
    out["images"].append(row)
  for ax in axes.ravel():
    ax.axis("off")
  fig.suptitle("VGG11: most input-like IR channel per layer (MSE privacy)")
  return out, fig


def fig4_vgg11_metrics(vgg_dir: str, n: int, seed: int) -> tuple[dict[str, Any], plt.Figure]:
  """VGG11 per-layer privacy under the three metrics, each normalized to [0, 1]."""
  model, variables, meta = checkpoint.load_model(vgg_dir)
  images = _images(meta, n, seed)
  out: dict[str, Any] = {"model": meta["model"], "num_images": n, "metrics": {}}
  fig, ax = plt.subplots(figsize=(6, 4))
  for metric in privacy.METRICS:
    prof = profile.block_profile(model, variables, images, dataset=meta["dataset"], metric=metric)
    raw = [b["privacy"] for b in prof["blocks"]]
    out["metrics"][metric] = {"raw": raw, "normalized": profile.normalize_01(raw),
                              "std": [b["privacy_std"] for b in prof["blocks"]]}
    ax.plot(range(1, len(raw) + 1), out["metrics"][metric]["normalized"], "o-", label=metric)
  out["labels"] = [b["label"] for b in prof["blocks"]]
  ax.set_xlabel("layer (split after conv unit)"), ax.set_ylabel("normalized privacy")
  ax.set_title(f"VGG11 privacy per layer ({n} CIFAR test images)"), ax.legend()
  return out, fig


def fig5_resnet18_layers(resnet_dir: str, n: int, seed: int) -> tuple[dict[str, Any], plt.Figure]:
  """ResNet18 privacy per conv layer (Fig. 5) and per block (Fig. 7)."""
  model, variables, meta = checkpoint.load_model(resnet_dir)
  images = _images(meta, n, seed)
  layers = profile.layer_profile(model, variables, images, dataset=meta["dataset"])
  blocks = profile.block_profile(model, variables, images, dataset=meta["dataset"])
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
  names = [f"{l['block_label']}/{l['name'].split('/')[-1]}" for l in layers["layers"]]
  a1.plot(range(len(names)), [l["privacy"] for l in layers["layers"]], "o-")
  a1.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
  a1.set_ylabel("privacy (MSE)"), a1.set_title("ResNet18: per conv layer")
  a2.plot([b["index"] for b in blocks["blocks"]], [b["privacy"] for b in blocks["blocks"]], "s-")
  a2.set_xticks([b["index"] for b in blocks["blocks"]], [b["label"] for b in blocks["blocks"]],
                rotation=45)
  a2.set_ylabel("privacy (MSE)"), a2.set_title("ResNet18: per block (split point)")
  fig.tight_layout()
  return {"model": meta["model"], "num_images": n, "layers": layers["layers"],
          "blocks": blocks["blocks"]}, fig


def fig8_bits(resnet_dir: str, n: int, seed: int) -> tuple[dict[str, Any], plt.Figure]:
  """ResNet18 privacy of the IR at every split at 2/4/8 bits and in float.

  ``ir_only``: only the IR is quantized, the edge runs in float (the paper's Fig. 8).
  ``whole_edge``: the edge layers too, uniformly (weights and activations at b bits; the
  first conv stays float, so a split after the stem sends a float IR).
  """
  model, variables, meta = checkpoint.load_model(resnet_dir)
  images = _images(meta, n, seed)
  score = lambda **kw: [b["privacy"] for b in profile.block_profile(
      model, variables, images, dataset=meta["dataset"], **kw)["blocks"]]
  out: dict[str, Any] = {"model": meta["model"], "num_images": n, "float": score(),
                         "ir_only": {}, "whole_edge": {}}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  splits = range(1, len(out["float"]) + 1)
  for bits, marker in ((2, "o"), (4, "s"), (8, "^")):
    out["ir_only"][str(bits)] = score(ir_bits=bits)
    out["whole_edge"][str(bits)] = score(genome=uniform_genome(model.info, 1, bits))
    line, = ax.plot(splits, out["ir_only"][str(bits)], f"{marker}-", ms=5,
                    label=f"{bits}-bit IR (paper)")
    ax.plot(splits, out["whole_edge"][str(bits)], f"{marker}--", ms=4, mfc="none",
            color=line.get_color(), label=f"{bits}-bit edge and IR")
  ax.plot(splits, out["float"], "k:", label="float")
  out["labels"] = [b.label for b in model.info.blocks[:len(out["float"])]]
  ax.set_xticks(splits, out["labels"], rotation=45)
  ax.set_ylabel("privacy (MSE)"), ax.legend(fontsize=7, ncol=2)
  ax.set_title("ResNet18: IR privacy vs. bits (solid: IR only, as the paper; dashed: whole edge)")
  fig.tight_layout()
  return out, fig


def run(name: str, fn: Callable[..., tuple[dict[str, Any], plt.Figure]], model_dir: str,
        workdir: str, n: int, seed: int) -> None:
  """Runs one analysis and writes its JSON and PNG."""
  start = time.time()
  out, fig = fn(model_dir, n, seed)
  out["seconds"] = time.time() - start
  out["environment"] = runs.environment()
  checkpoint.write_json(os.path.join(workdir, f"{name}.json"), out)
  fig.savefig(os.path.join(workdir, f"{name}.png"), dpi=120, bbox_inches="tight")
  plt.close(fig)
  logging.info("%s done in %.0f s", name, out["seconds"])


def main(argv: list[str]) -> None:
  del argv
  names = ANALYSES if _ANALYSIS.value == "all" else (_ANALYSIS.value,)
  unknown = [n for n in names if n not in ANALYSES]
  if unknown:
    raise app.UsageError(f"unknown analysis {unknown}; choose from {ANALYSES} or 'all'")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  fns = {"fig3_ir_visualization": (fig3_ir_visualization, _VGG.value),
         "fig4_vgg11_metrics": (fig4_vgg11_metrics, _VGG.value),
         "fig5_resnet18_layers": (fig5_resnet18_layers, _RESNET.value),
         "fig8_bits": (fig8_bits, _RESNET.value)}
  for i, name in enumerate(names):
    logging.info("analysis %d/%d: %s", i + 1, len(names), name)
    fn, model_dir = fns[name]
    run(name, fn, model_dir, _WORKDIR.value, _NUM_IMAGES.value, _SEED.value)


if __name__ == "__main__":
  app.run(main)
