"""TensorBoard scalars: a resumed writer hides what a killed one wrote after the resume step."""

import os

from maxpart_jax import metrics


def test_resumed_writer_in_the_same_second_hides_the_killed_runs_later_steps(tmp_path):
  killed = metrics.MetricWriter(str(tmp_path))
  for step in range(4):
    killed.scalars(step, {"loss": float(step), "skipped": None})
  killed.flush()  # never closed, like a killed process
  # flush() has put every step on disk (a queued writer would still hold some).
  assert metrics.read_scalars(str(tmp_path)) == {"loss": {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0}}
  resumed = metrics.MetricWriter(str(tmp_path), resume_step=2)
  resumed.scalars(2, {"loss": 20.0, "nan": float("nan")})
  resumed.close()
  assert len(os.listdir(tmp_path)) == 2  # two files, even within one second
  # Step 3 of the killed run is hidden although the resumed run has not reached it yet.
  assert metrics.read_scalars(str(tmp_path)) == {"loss": {0: 0.0, 1: 1.0, 2: 20.0}}


def test_writer_without_resume_step_keeps_earlier_files(tmp_path):
  first = metrics.MetricWriter(str(tmp_path))
  first.scalars(0, {"a": 1.0})
  first.close()
  second = metrics.MetricWriter(str(tmp_path))
  second.scalars(1, {"b": 2.0})
  second.close()
  assert metrics.read_scalars(str(tmp_path)) == {"a": {0: 1.0}, "b": {1: 2.0}}
