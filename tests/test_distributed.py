"""Several processes as one search (jax.distributed, gloo collectives on the CPU): the same
search and reproduction as one process over the same number of devices, and a job that
loses a process stops within a bound and resumes to the same result."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from maxpart_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5
STOP_BOUND_S = 90  # heartbeat timeout, the coordination service's shutdown, a loaded machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(smoke, workdir, script: str) -> list[str]:
  """``experiments.search`` or ``experiments.reproduce`` (which searches in ``workdir/search``
  with the same settings, then evaluates the baselines) on the session's smoke model."""
  return [sys.executable, "-m", f"experiments.{script}",
          f"--config=experiments/configs/{script}.py:smoke",
          f"--config.data_dir={smoke.data_dir}",
          f"--config.model_dir={smoke.model_dir}", "--config.fitness.compute_dtype=float32",
          f"--config.pretrain.steps_per_epoch={smoke.pretrain.steps_per_epoch}",
          "--config.search.iterations=12", f"--workdir={workdir}"]


def _launch(smoke, workdir, processes: int, devices: int, script: str = "search"
            ) -> list[subprocess.Popen]:
  """``processes`` processes with ``devices`` CPU devices each, joined as one job."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  command = _command(smoke, workdir, script)
  if processes > 1:
    port = _free_port()
    command += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                f"--heartbeat_timeout={HEARTBEAT_S}"]
  logs = pathlib.Path(workdir).parent
  return [subprocess.Popen(command + ([f"--process_id={i}"] if processes > 1 else []), cwd=REPO,
                           env=env, stdout=open(logs / f"{pathlib.Path(workdir).name}.{i}.log", "a"),
                           stderr=subprocess.STDOUT) for i in range(processes)]


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
  return [p.wait(timeout=timeout) for p in procs]


def _results(workdir) -> dict:
  out = {}
  for name in ("evaluations", "history", "best"):
    with open(pathlib.Path(workdir) / f"{name}.json") as f:
      out[name] = json.load(f)
  return out


def _assert_same_search(got: dict, want: dict) -> None:
  """Same genomes in the same order, the same history and answer; metrics to float rounding."""
  assert [e["key"] for e in got["evaluations"]] == [e["key"] for e in want["evaluations"]]
  for a, b in zip(got["evaluations"], want["evaluations"]):
    for m in ("fitness", "privacy", "eps", "energy_mj", "accuracy"):
      assert a[m] == pytest.approx(b[m], rel=1e-6, abs=1e-7), m
  assert [h["best_p"] for h in got["history"]] == [h["best_p"] for h in want["history"]]
  for a, b in zip(got["history"], want["history"]):
    assert a["best_fitness"] == pytest.approx(b["best_fitness"], rel=1e-6)
  assert got["best"]["genome"] == want["best"]["genome"]
  assert got["best"]["test_accuracy"] == pytest.approx(want["best"]["test_accuracy"], abs=1e-9)


@pytest.fixture(scope="module")
def one_process(smoke, tmp_path_factory):
  """The reference: the reproduction (search and baselines) in one process over 4 devices."""
  workdir = tmp_path_factory.mktemp("one_process") / "reproduce"
  assert _wait(_launch(smoke, workdir, 1, 4, "reproduce")) == [0]
  with open(workdir / "report.json") as f:
    return {**_results(workdir / "search"), "report": json.load(f)}


def test_two_processes_reproduce_like_one_over_the_same_devices(smoke, one_process, tmp_path):
  workdir = tmp_path / "reproduce"
  codes = _wait(_launch(smoke, workdir, 2, 2, "reproduce"))
  assert codes == [0, 0], (tmp_path / "reproduce.0.log").read_text()[-3000:]
  got = _results(workdir / "search")
  _assert_same_search(got, one_process)
  assert got["best"]["devices"] == 4
  with open(workdir / "report.json") as f:
    report = json.load(f)
  want = one_process["report"]["strategies"]
  assert list(report["strategies"]) == list(want)
  for name, row in report["strategies"].items():
    assert row["p"] == want[name]["p"] and row.get("w_bits") == want[name].get("w_bits"), name
    for m in ("privacy", "energy_mj", "test_accuracy"):
      assert row[m] == pytest.approx(want[name][m], rel=1e-6, abs=1e-7), (name, m)
  assert report["claims"] == one_process["report"]["claims"]


def test_a_lost_process_stops_the_job_and_a_rerun_resumes(smoke, one_process, tmp_path):
  workdir = tmp_path / "search"
  procs = _launch(smoke, workdir, 2, 2)
  deadline = time.time() + 300
  while not (workdir / "search_state.npz").exists():  # the initial population is stored
    assert time.time() < deadline and procs[0].poll() is None, "the job did not start"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  code = procs[0].wait(timeout=STOP_BOUND_S + 60)
  assert code != 0 and time.time() - killed < STOP_BOUND_S
  log = (tmp_path / "search.0.log").read_text()
  assert "another process of this job stopped" in log or "distributed service" in log
  assert _wait(_launch(smoke, workdir, 2, 2)) == [0, 0]
  _assert_same_search(_results(workdir), one_process)


def test_one_process_joins_nothing_and_half_a_job_is_refused():
  assert distributed.initialize() is False
  with pytest.raises(ValueError, match="give all of"):
    distributed.initialize(coordinator_address="localhost:1")
