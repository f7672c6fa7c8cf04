"""Several processes as one job (jax.distributed, gloo collectives on the CPU): the same
search, reproduction and data-parallel pre-training as one process over the same number of
devices, and a job that loses a process stops within a bound and resumes to the same result."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import conftest
from conftest import relative_distance
from maxpart_jax import checkpoint, distributed

REPO = conftest.REPO
HEARTBEAT_S = 5
STOP_BOUND_S = 90  # heartbeat timeout, the coordination service's shutdown, a loaded machine
START_BOUND_S = 300  # a job's start (imports, data, compilation) on a loaded machine


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
          # 4 + 6 candidates of one fine-tuning step each: these tests are about processes
          "--config.search.iterations=6", "--config.fitness.finetune_steps=1",
          f"--workdir={workdir}"]


def _pretrain_command(data_dir, workdir) -> list[str]:
  """The smoke pre-training (2 epochs of 3 steps, batch 16) with its batches split over
  every device, also in one process."""
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/train.py:smoke",
          f"--config.data_dir={data_dir}", "--config.devices=all", f"--workdir={workdir}"]


_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
  """Kills what a failed (or hung) test left running."""
  yield
  while _LAUNCHED:
    p = _LAUNCHED.pop()
    if p.poll() is None:
      p.kill()
      p.wait()


def _launch(smoke, workdir, processes: int, devices: int, script: str = "search",
            extra: tuple[str, ...] = (), follower_extra: tuple[str, ...] = ()
            ) -> list[subprocess.Popen]:
  """``processes`` processes with ``devices`` CPU devices each, joined as one job
  (``smoke``: the search config, or for ``script="train"`` the fake data's folder), with
  ``extra`` flags, and ``follower_extra`` after them in the processes other than 0 (a later
  flag overrides an earlier one). Process i logs to ``<workdir>.<i>.log`` beside ``workdir``."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  command = (_pretrain_command(smoke, workdir) if script == "train"
             else _command(smoke, workdir, script)) + list(extra)
  if processes > 1:
    port = _free_port()
    command += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                f"--heartbeat_timeout={HEARTBEAT_S}"]
  logs, procs = pathlib.Path(workdir).parent, []
  for i in range(processes):
    with open(logs / f"{pathlib.Path(workdir).name}.{i}.log", "a") as log:  # the child keeps it
      procs.append(subprocess.Popen(
          command + ([f"--process_id={i}"] if processes > 1 else [])
          + (list(follower_extra) if i else []),
          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  _LAUNCHED.extend(procs)
  return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
  return [p.wait(timeout=timeout) for p in procs]


def _wait_for(procs: list[subprocess.Popen], logs: list[pathlib.Path], line: str,
              timeout: float = START_BOUND_S) -> None:
  """Waits until every log holds ``line`` (every process still running)."""
  deadline = time.time() + timeout
  while not all(log.exists() and line in log.read_text() for log in logs):
    assert time.time() < deadline and all(p.poll() is None for p in procs), (
        f"the job did not reach {line!r}: " + logs[0].read_text()[-3000:])
    time.sleep(0.2)


def _last_line(log: pathlib.Path) -> str:
  return log.read_text().rstrip().splitlines()[-1]


def _assert_stopped_for_a_lost_peer(code: int, log: pathlib.Path) -> None:
  """The survivor of a lost process: the project's message last, and its exit code."""
  assert code == distributed.LOST_PEER_EXIT_CODE, log.read_text()[-3000:]
  assert _last_line(log) == distributed.LOST_PEER_MESSAGE


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


def test_a_lost_process_stops_the_job_and_the_rerun_reproduces_like_one_process(
    smoke, one_process, tmp_path):
  """Two processes of two devices each: one is killed once the search has stored its
  initial population; the other stops within the bound; the same command resumes, and the
  finished reproduction (search and baselines) is the one-process reproduction's."""
  workdir = tmp_path / "reproduce"
  procs = _launch(smoke, workdir, 2, 2, "reproduce")
  deadline = time.time() + 300
  while not (workdir / "search" / "search_state.npz").exists():
    assert time.time() < deadline and procs[0].poll() is None, "the job did not start"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  code = procs[0].wait(timeout=STOP_BOUND_S + 60)
  assert time.time() - killed < STOP_BOUND_S
  _assert_stopped_for_a_lost_peer(code, tmp_path / "reproduce.0.log")

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


@pytest.fixture(scope="module")
def pretrained(fake_data_dir, tmp_path_factory) -> pathlib.Path:
  """The smoke pre-training (2 epochs of 3 steps, checkpoints at steps 3 and 6) in one
  process over 4 devices (``one``) and in two processes of 2 devices each (``two``): the
  folder holding both workdirs. Copy a workdir before changing anything in it."""
  root = tmp_path_factory.mktemp("pretrain")
  for name, processes, devices in (("one", 1, 4), ("two", 2, 2)):
    codes = _wait(_launch(fake_data_dir, root / name, processes, devices, "train"))
    assert codes == [0] * processes, (root / f"{name}.0.log").read_text()[-3000:]
  return root


@pytest.mark.slow
def test_two_processes_pretrain_like_one_over_the_same_devices_and_resume(fake_data_dir,
                                                                         pretrained, tmp_path):
  """Data parallelism across processes: each process makes its rows of every batch, the
  gradients and batch statistics are summed over both, the result is one process's over
  the same 4 devices to float rounding; without its last checkpoint the job resumes to the
  very same model."""
  runs = {}
  for name in ("one", "two"):
    workdir = pretrained / name
    with open(workdir / "history.json") as f:
      history = json.load(f)
    with open(workdir / "results.json") as f:
      results = json.load(f)
    runs[name] = (history, results, checkpoint.load_model(str(workdir / "model")))
  (one_history, one_results, one_model), (two_history, two_results, two_model) = runs.values()
  assert two_results["processes"] == 2 and two_results["devices"] == one_results["devices"] == 4
  assert two_results["pipeline"] == "host"  # each process makes only its own rows
  assert len(two_history["epochs"]) == 2
  # Only the order of the sums over devices differs (measured here: weights 1.2e-7 apart,
  # losses 3e-8). The tolerances are test_device_pipelines_train_like_the_host_loop's: this
  # tiny net's batch norm can amplify a rounding difference to ~1e-4 on other CPUs, while
  # a wrong share of a batch or a gradient summed over one process only gives ~1.
  for a, b in zip(two_history["epochs"], one_history["epochs"]):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1.01 / (3 * 16))
  assert relative_distance(two_model[1], one_model[1]) < 1e-3
  assert two_results["test_accuracy"] == pytest.approx(one_results["test_accuracy"], abs=0.0101)

  # The job stopped after its first epoch's checkpoint: the same command resumes there.
  workdir = tmp_path / "two"
  shutil.copytree(pretrained / "two", workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  shutil.rmtree(workdir / "model")
  assert _wait(_launch(fake_data_dir, workdir, 2, 2, "train")) == [0, 0]
  assert "resuming from step 3 of 6" in (tmp_path / "two.1.log").read_text()
  resumed = checkpoint.load_model(str(workdir / "model"))
  assert resumed[2]["variables_sha256"] == two_model[2]["variables_sha256"]
  with open(workdir / "history.json") as f:
    assert json.load(f)["epochs"] == two_history["epochs"]


@pytest.mark.slow
def test_a_follower_that_does_not_see_the_leaders_checkpoint_stops_the_job(fake_data_dir,
                                                                          pretrained, tmp_path):
  """Processes whose workdirs are not one shared folder: the follower's copy lacks the
  leader's newest checkpoint. The leader's step decides for both; the follower cannot load
  it, and both stop at once, naming the requirement, instead of hanging or training on
  from different steps (the follower used to resume from its own newest step, 3)."""
  leader, follower = tmp_path / "two", tmp_path / "follower"
  shutil.copytree(pretrained / "two", leader)
  shutil.copytree(leader, follower)
  shutil.rmtree(follower / "checkpoints" / "6")
  procs = _launch(fake_data_dir, leader, 2, 2, "train", follower_extra=(f"--workdir={follower}",))
  codes = _wait(procs, timeout=START_BOUND_S)
  assert codes == [1, 1], (tmp_path / "two.1.log").read_text()[-3000:]
  for i in range(2):
    line = _last_line(tmp_path / f"two.{i}.log")
    assert line.startswith("error: process(es) [1] of this job cannot load checkpoint step 6 "
                           f"in {(follower if i else leader) / 'checkpoints'}, which process 0 "
                           "resumes from"), line
    assert line.endswith(f": {distributed.SHARED_FOLDER}"), line


def test_a_follower_without_the_leaders_model_stops_the_search(smoke, tmp_path):
  """The leader finds the pre-trained model; the follower's model_dir (not the leader's
  folder) is empty: both stop at once, the follower naming the requirement, instead of the
  follower pre-training alone while the leader searches (a hang)."""
  elsewhere = tmp_path / "elsewhere" / "model"
  elsewhere.mkdir(parents=True)
  procs = _launch(smoke, tmp_path / "search", 2, 2,
                  follower_extra=(f"--config.model_dir={elsewhere}",))
  codes = _wait(procs, timeout=START_BOUND_S)
  assert codes == [1, 1], (tmp_path / "search.1.log").read_text()[-3000:]
  follower = _last_line(tmp_path / "search.1.log")
  assert follower.startswith(f"error: process 1 of this job cannot load the pre-trained model at "
                             f"{elsewhere} that process 0 loads ("), follower
  assert follower.endswith(f": {distributed.SHARED_FOLDER}"), follower
  assert _last_line(tmp_path / "search.0.log") == (
      f"error: process(es) [1] of this job could not load the pre-trained model at "
      f"{smoke.model_dir} (their log says why); every process stops")


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0], ids=["follower", "leader"])
def test_the_survivor_of_a_lost_process_says_so_with_its_exit_code(fake_data_dir, tmp_path,
                                                                  killed):
  """Whichever process is killed once the job has started, the survivor ends within the
  bound with the project's message as its last line and exit code 75 (it used to be killed
  by SIGABRT, with or without the message): a lost follower reaches the leader through its
  next collective or, after the heartbeat timeout, the coordination service it runs; a lost
  leader takes that service along, which aborts the follower at once (the supervisor's
  path)."""
  workdir = tmp_path / "train"
  procs = _launch(fake_data_dir, workdir, 2, 2, "train", extra=("--config.num_epochs=100",))
  logs = [tmp_path / f"train.{i}.log" for i in range(2)]
  _wait_for(procs, logs, "the whole config is in")
  procs[killed].kill()
  killed_at = time.time()
  code = procs[1 - killed].wait(timeout=STOP_BOUND_S + 60)
  assert time.time() - killed_at < STOP_BOUND_S
  _assert_stopped_for_a_lost_peer(code, logs[1 - killed])


def test_one_process_joins_nothing_and_half_a_job_is_refused():
  assert distributed.initialize() is False
  with pytest.raises(ValueError, match="give all of"):
    distributed.initialize(coordinator_address="localhost:1")
