"""Figures written to files, without pyplot: no backend is chosen at import, so a notebook's
inline plots keep working, and no figure stays registered after it is saved."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

_FIGURE_ARGS = ("figsize", "layout", "dpi")


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
  """``plt.subplots`` for a figure that is only saved: ``figsize``, ``layout`` and ``dpi``
  go to the figure, the rest (``squeeze``, ``width_ratios``, ...) to its axes."""
  figure = Figure(**{k: kwargs.pop(k) for k in _FIGURE_ARGS if k in kwargs})
  return figure, figure.subplots(nrows, ncols, **kwargs)
