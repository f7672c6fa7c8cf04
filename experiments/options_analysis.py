r"""What two options the paper leaves open change, on a pre-trained model and real images.

  python -m experiments.options_analysis --model_dir=pretrained/cpu_resnet18/model \
      --out=results/options

1. ``activation_levels``: Eq. 5's step ``c / (2^(b-1) - 1)`` on non-negative activations
   ("paper", the default) against all ``2^b`` codes (``c / (2^b - 1)``, "unsigned"). For
   uniform edges (8-bit weights, 2/4/8-bit activations) at every split: validation top-1
   of the whole model (edge quantized, cloud float, no fine-tuning) and the privacy of the
   IR sent.
2. ``metric``: ``mse`` (Eq. 2; an inverted copy scores 4) against ``mse_abs`` (2 (1 - |r|),
   the sign ignored), on the float and the 8-bit edge at every split, and the share of
   images whose most input-like channel is anti-correlated with the input.

Writes ``options.json``, ``options.png`` and prints a summary.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments import common
from maxpart_jax import checkpoint, data, privacy, runs
from maxpart_jax.genome import to_policy, uniform_genome
from maxpart_jax.privacy import profile
from maxpart_jax.quant import ACTIVATION_LEVELS
from maxpart_jax.train import evaluate

_MODEL_DIR = flags.DEFINE_string("model_dir", "pretrained/cpu_resnet18/model", "pre-trained model")
_OUT = flags.DEFINE_string("out", "results/options", "output folder")
_VAL_IMAGES = flags.DEFINE_integer("val_images", 1000, "validation images for top-1")
_PRIVACY_IMAGES = flags.DEFINE_integer("privacy_images", 256, "validation images for privacy")
A_BITS = (2, 4, 8)


def anti_correlated_share(model, variables, images: np.ndarray, x: np.ndarray, q: int,
                          policy=None) -> float:
  """Share of images whose most input-like channel at split ``q`` (under ``mse_abs``) is
  anti-correlated with the input: ``mse`` and ``mse_abs`` disagree on it."""
  ir = model.apply(variables, jnp.asarray(x), stop=q, policy=policy)
  plain = privacy.privacy_score(jnp.asarray(images), ir, "mse")
  either = privacy.privacy_score(jnp.asarray(images), ir, "mse_abs")
  return float(np.mean(np.asarray(either) < np.asarray(plain) - 1e-6))


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  start = time.time()
  model, variables, meta = checkpoint.load_model(_MODEL_DIR.value)
  split = dict(dataset=meta["dataset"], val_fraction=meta["split"]["val_fraction"],
               seed=meta["split"]["data_seed"])
  val = data.load_split("val", **split)
  acc_split = val.take(min(_VAL_IMAGES.value, len(val)), seed=0)
  images = val.take(_PRIVACY_IMAGES.value, seed=1).float_images()
  x = data.normalize(images, val.dataset)
  info = model.info
  splits = list(range(1, info.max_split + 1))
  out = {"model": meta["model"], "labels": [b.label for b in info.blocks[:info.max_split]],
         "val_images": len(acc_split), "privacy_images": len(images),
         "float_top1": evaluate(model, variables, acc_split), "levels": {}, "metric": {}}
  for levels in ACTIVATION_LEVELS:
    out["levels"][levels] = {}
    for a_bits in A_BITS:
      genome = uniform_genome(info, 1, 8, a_bits)
      accuracy = [evaluate(model, variables, acc_split, policy=to_policy(
          info, genome.replace(p=jnp.int32(q)), activation_levels=levels)) for q in splits]
      priv = [b["privacy"] for b in profile.block_profile(
          model, variables, images, dataset=val.dataset, genome=genome,
          activation_levels=levels)["blocks"]]
      out["levels"][levels][str(a_bits)] = {"top1": accuracy, "privacy": priv}
      logging.info("%s levels, %d-bit activations: top-1 %s", levels, a_bits,
                   " ".join(f"{a:.3f}" for a in accuracy))
  for name, genome in (("float", None), ("8-bit", uniform_genome(info, 1, 8, 8))):
    row = {m: [b["privacy"] for b in profile.block_profile(
        model, variables, images, dataset=val.dataset, genome=genome, metric=m)["blocks"]]
           for m in ("mse", "mse_abs")}
    row["anti_correlated_share"] = [anti_correlated_share(
        model, variables, images, x, q,
        None if genome is None else to_policy(info, genome.replace(p=jnp.int32(q))))
        for q in splits]
    out["metric"][name] = row
  out["seconds"] = time.time() - start
  out["environment"] = runs.environment()
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.write_json(os.path.join(_OUT.value, "options.json"), out)
  _plot(out, os.path.join(_OUT.value, "options.png"))
  print(summary(out))


def summary(out: dict) -> str:
  """The numbers of ``options.json`` as a few lines of text."""
  lines = [f"float top-1 {out['float_top1']:.4f} on {out['val_images']} validation images"]
  for a_bits in A_BITS:
    paper, unsigned = (out["levels"][l][str(a_bits)] for l in ACTIVATION_LEVELS)
    lines.append(f"{a_bits}-bit activations, top-1 per split paper / unsigned: " + ", ".join(
        f"{p:.3f}/{u:.3f}" for p, u in zip(paper["top1"], unsigned["top1"])))
    lines.append(f"{a_bits}-bit activations, privacy per split paper / unsigned: " + ", ".join(
        f"{p:.3f}/{u:.3f}" for p, u in zip(paper["privacy"], unsigned["privacy"])))
  for name, row in out["metric"].items():
    lines.append(f"{name} edge, privacy mse / mse_abs per split: " + ", ".join(
        f"{a:.3f}/{b:.3f}" for a, b in zip(row["mse"], row["mse_abs"])))
    lines.append(f"{name} edge, share of images decided by an inverted channel: " + ", ".join(
        f"{s:.2f}" for s in row["anti_correlated_share"]))
  return "\n".join(lines)


def _plot(out: dict, path: str) -> None:
  splits = range(1, len(out["labels"]) + 1)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for a_bits, marker in zip(A_BITS, "osd"):
    for levels, style in zip(ACTIVATION_LEVELS, ("-", "--")):
      row = out["levels"][levels][str(a_bits)]
      axes[0].plot(splits, row["top1"], marker + style, ms=4, label=f"{a_bits}-bit, {levels}")
      axes[1].plot(splits, row["privacy"], marker + style, ms=4, label=f"{a_bits}-bit, {levels}")
  axes[0].axhline(out["float_top1"], color="k", ls=":", label="float")
  axes[0].set_ylabel("validation top-1 (no fine-tuning)")
  axes[1].set_ylabel("privacy (mse)")
  for name, color in zip(out["metric"], ("k", "C3")):
    axes[2].plot(splits, out["metric"][name]["mse"], "-", color=color, label=f"{name}: mse")
    axes[2].plot(splits, out["metric"][name]["mse_abs"], "--", color=color,
                 label=f"{name}: mse_abs")
  axes[2].set_ylabel("privacy")
  for ax, title in zip(axes, ("accuracy: activation levels", "privacy: activation levels",
                              "privacy: mse vs mse_abs")):
    ax.set_xticks(splits, out["labels"], rotation=45, fontsize=7)
    ax.set_title(title), ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
