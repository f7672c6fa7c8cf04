"""Figures of attacks: victims beside their reconstructions."""

from __future__ import annotations

import numpy as np

from maxpart_jax import plotting


def reconstruction_grid(lines: list[tuple[str, np.ndarray]], path: str, title: str,
                        label_size: float = 6, label_width: float = 1.6) -> None:
  """One row per ``(label, images)`` (images (n, H, W, 3) in [0, 1]; the first row's count
  sets the columns, shorter rows leave blanks), written to ``path``."""
  n = len(lines[0][1])
  fig, axes = plotting.subplots(len(lines), n, figsize=(1.1 * n + label_width, 1.1 * len(lines)),
                           squeeze=False)
  for i, (label, images) in enumerate(lines):
    for j in range(n):
      if j < len(images):
        axes[i, j].imshow(np.clip(images[j], 0, 1))
      axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
    axes[i, 0].set_ylabel(label, fontsize=label_size, rotation=0, ha="right", va="center")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
