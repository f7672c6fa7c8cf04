"""pytest plugin: how much of its tolerance each numeric comparison of the suite uses.

  .venv/bin/python -m pytest --tolerance-report=tolerances.json [tests ...]

For every ``np.testing.assert_allclose`` and ``pytest.approx`` comparison it records, per test
and per line of the test that made it, the largest ratio ``|actual − expected| / tolerance``
over the compared elements (0: equal). At the end it writes them to the JSON file and lists
the comparisons that passed within a factor :data:`MARGIN` of their tolerance: an ``==``
check above 1/3 of it, or a ``!=`` check below 3 times it. Such a test passes by a margin
that another CPU's rounding can take away (docs/testing.md, "Tests on other CPUs"). Comparisons
written as plain ``assert a < b`` are not seen; keep their margins in their comments.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import pytest

MARGIN = 3.0
_ratios: dict[str, dict[str, float]] = {}
_current = {"test": None}


def pytest_addoption(parser: pytest.Parser) -> None:
  parser.addoption("--tolerance-report", default=None, metavar="PATH",
                   help="write how much of its tolerance every numeric comparison used "
                        "(tests/tolerance_report.py)")


def _caller() -> str:
  """``file:line`` of the innermost frame in a test module."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None:
    name = os.path.basename(frame.f_code.co_filename)
    if name.startswith("test_") or name == "conftest.py":
      return f"{name}:{frame.f_lineno}"
    frame = frame.f_back
  return "?"


def _record(ratio: float) -> None:
  test = _current["test"]
  if test is None or not np.isfinite(ratio):
    return
  where = _ratios.setdefault(test, {})
  key = _caller()
  where[key] = max(where.get(key, 0.0), ratio)


def _allclose_ratio(actual: Any, desired: Any, rtol: float, atol: float) -> float:
  a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):  # inf - inf, x / 0
    diff = np.abs(a - d)
    tol = np.broadcast_to(atol + rtol * np.abs(d), diff.shape)
    ratio = np.where(diff == 0, 0.0, diff / tol)
  ratio = ratio[np.isfinite(diff)]
  return float(ratio.max(initial=0.0))


def pytest_configure(config: pytest.Config) -> None:
  if not config.getoption("--tolerance-report"):
    return
  from _pytest import approx as approx_module  # pylint: disable=import-outside-toplevel
  assert_allclose = np.testing.assert_allclose

  def recording_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
    try:
      _record(_allclose_ratio(actual, desired, rtol, atol))
    except (TypeError, ValueError):
      pass
    return assert_allclose(actual, desired, rtol, atol, *args, **kwargs)

  scalar_eq = approx_module.ApproxScalar.__eq__

  def recording_eq(self, actual):
    result = scalar_eq(self, actual)
    if np.ndim(actual) == 0:
      try:
        diff, tol = abs(actual - self.expected), self.tolerance
        _record(0.0 if diff == 0 else float(diff / tol) if tol > 0 else float("inf"))
      except (TypeError, ValueError):
        pass
    return result

  np.testing.assert_allclose = recording_allclose
  approx_module.ApproxScalar.__eq__ = recording_eq


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
  _current["test"] = item.nodeid
  return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
  _current["test"] = item.nodeid
  try:
    return (yield)
  finally:
    _current["test"] = None


def pytest_sessionfinish(session: pytest.Session) -> None:
  path = session.config.getoption("--tolerance-report")
  if not path:
    return
  with open(path, "w") as f:
    json.dump(_ratios, f, indent=1, sort_keys=True)
  close = sorted(((ratio, test, where) for test, rows in _ratios.items()
                  for where, ratio in rows.items() if 1 / MARGIN < ratio < MARGIN),
                 reverse=True)
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if reporter is None:
    return
  reporter.write_sep("-", f"tolerance report: {path}; comparisons within {MARGIN:g}x of "
                          f"their tolerance: {len(close)}")
  for ratio, test, where in close:
    reporter.write_line(f"  {ratio:7.3f}  {where}  {test}")
