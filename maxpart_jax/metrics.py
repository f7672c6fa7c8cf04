"""TensorBoard scalars of pre-training and of the search, beside their JSON files.

    writer = MetricWriter(os.path.join(workdir, "tensorboard"), resume_step=step)
    writer.scalars(step, {"train/loss": 2.3, "val/accuracy": 0.41})
    writer.close()
    # tensorboard --logdir workdirs/

Written with tensorboardX (event files only, no TensorFlow). :func:`read_scalars` reads
them back, for tests and notebooks.
"""

from __future__ import annotations

import glob
import math
import os
import struct

from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2


class MetricWriter:
  """Scalars to event files in ``logdir``.

  ``resume_step``: the step a resumed run restarts from; TensorBoard hides what an earlier,
  killed process wrote at or after it, so no step shows twice.
  """

  def __init__(self, logdir: str, resume_step: int | None = None):
    self._writer = SummaryWriter(logdir, purge_step=resume_step or None, flush_secs=30)

  def scalars(self, step: int, values: dict[str, float | None]) -> None:
    """Writes every finite value of ``values`` at ``step`` (None and NaN are skipped)."""
    for name, value in values.items():
      if value is not None and math.isfinite(value):
        self._writer.add_scalar(name, float(value), int(step))

  def flush(self) -> None:
    """Writes what is buffered; called with every checkpoint, so a killed run loses nothing
    that its checkpoint holds."""
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` of every event file in ``logdir`` (later files win)."""
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def _records(path: str):
  """The payloads of a TFRecord file (length, its CRC, payload, its CRC)."""
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      payload = f.read(length)
      f.read(4)
      yield payload
