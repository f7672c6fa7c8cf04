"""TensorBoard scalars of pre-training and of the search, beside their JSON files.

    writer = MetricWriter(os.path.join(workdir, "tensorboard"), resume_step=step)
    writer.scalars(step, {"train/loss": 2.3, "val/accuracy": 0.41})
    writer.close()
    # tensorboard --logdir workdirs/

Written with tensorboardX's event-file writer (no TensorFlow). :func:`read_scalars` reads
them back, for tests and notebooks.
"""

from __future__ import annotations

import glob
import math
import os
import struct
import time

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.summary import scalar

_FLUSH_SECONDS = 30.0


class MetricWriter:
  """Scalars to an event file of its own in ``logdir``, written synchronously.

  ``resume_step``: the step a resumed run restarts from; TensorBoard hides what an earlier,
  killed process wrote at or after it, so no step shows twice.

  tensorboardX's ``SummaryWriter`` queues events for a thread, so its ``flush`` does not
  promise that what was logged is on disk, and it names files by the second, so a run resumed
  within the second its killed predecessor started would overwrite that file. This writer
  writes in the caller's thread into a file named by process and nanosecond.
  """

  def __init__(self, logdir: str, resume_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    self._events = EventsWriter(os.path.join(logdir, "events"),
                                filename_suffix=f".{os.getpid()}.{time.time_ns()}")
    if resume_step:
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=resume_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._events.flush()
    self._flushed = time.time()

  def scalars(self, step: int, values: dict[str, float | None]) -> None:
    """Writes every finite value of ``values`` at ``step`` (None and NaN are skipped); on
    disk within ``_FLUSH_SECONDS`` so a live TensorBoard follows the run."""
    for name, value in values.items():
      if value is not None and math.isfinite(value):
        self._events.write_event(event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=scalar(name, float(value))))
    if time.time() - self._flushed > _FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    """Puts everything written so far on disk; called with every checkpoint, so a killed run
    loses nothing that its checkpoint holds."""
    self._events.flush()
    self._flushed = time.time()

  def close(self) -> None:
    self._events.close()


class NullWriter:
  """What a process other than the leader writes (several processes): nothing."""

  def scalars(self, step: int, values: dict[str, float | None]) -> None:
    del step, values

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` of the event files in ``logdir``, as TensorBoard shows them.

  Files are read in the order their writers started; a file whose writer resumed at step
  ``s`` (tensorboardX's ``purge_step``) hides what earlier files hold at steps >= ``s``.
  """
  files = [[event_pb2.Event.FromString(r) for r in _records(path)]
           for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*"))]
  out: dict[str, dict[int, float]] = {}
  for events in sorted((e for e in files if e), key=lambda e: e[0].wall_time):
    for event in events:
      if event.session_log.status == event_pb2.SessionLog.START:
        for steps in out.values():
          for step in [s for s in steps if s >= event.step]:
            del steps[step]
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
