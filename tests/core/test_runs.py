"""Runs that never mix, lose or hide: resume identity, damaged checkpoints, non-finite numbers,
bad settings, and one writer per workdir. Each test names the bug it catches."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import conftest
from conftest import write_fake_cifar
from experiments import common
from experiments.configs import search as search_configs
from experiments.configs import train as train_configs
from maxpart_jax import checkpoint, data, runs, train
from maxpart_jax.genome import uniform_genome
from maxpart_jax.jobs import build, caching, driver, pretrain, settings, storage
from maxpart_jax.search.fitness import Evaluator, violations

REPO = str(conftest.REPO)


def _short_search(smoke):
  """The smoke search with its initial population only (4 candidates, about 5 s)."""
  config = copy.deepcopy(smoke)
  config.search.iterations = 0
  return config


def _train_config(data_dir):
  """Smoke pre-training: 2 epochs of 3 steps, a checkpoint mid-epoch and at each epoch end."""
  config = train_configs.get_config("smoke")
  config.data_dir = data_dir
  config.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope="module")
def trained(fake_data_dir, tmp_path_factory):
  """A finished pre-training of :func:`_train_config`: (its results, its workdir). Copy the
  workdir before changing anything in it."""
  workdir = tmp_path_factory.mktemp("trained")
  return pretrain.train_and_evaluate(_train_config(fake_data_dir), str(workdir)), workdir


# --- resume identity -----------------------------------------------------------------------


@pytest.mark.slow
def test_search_refuses_other_data_or_other_weights(smoke, tmp_path):
  """Catches a resume that mixes fitness values of two datasets or two pre-trained models
  in one cache: the data and weights are identified by content, not by path."""
  config = _short_search(smoke)
  first = driver.run_search(config, str(tmp_path / "search"))
  other_data = copy.deepcopy(config)
  other_data.data_dir = str(write_fake_cifar(tmp_path / "other_data", seed=1))
  with pytest.raises(runs.WorkdirError, match="Changed: data_content: was '[0-9a-f]+', now"):
    driver.run_search(other_data, str(tmp_path / "search"))
  # The same weights elsewhere resume fine; other weights in the same folder do not.
  moved = copy.deepcopy(config)
  moved.model_dir = str(tmp_path / "moved" / "model")
  shutil.copytree(config.model_dir, moved.model_dir)
  assert driver.run_search(moved, str(tmp_path / "search")) == first
  model, variables, meta = checkpoint.load_model(moved.model_dir)
  checkpoint.save_model(moved.model_dir, meta["model"],
                        jax.tree.map(lambda x: x * 1.01, variables), meta["dataset"], meta["split"])
  with pytest.raises(runs.WorkdirError, match="Changed: pretrained_weights_sha256"):
    driver.run_search(moved, str(tmp_path / "search"))


@pytest.mark.slow
def test_search_refuses_another_hold_out_split(smoke, tmp_path):
  """Catches a resume whose validation images (the hold-out of pretrain.data_seed /
  val_fraction) differ from the stored run's, for a model that matches the new split."""
  config = _short_search(smoke)
  driver.run_search(config, str(tmp_path / "search"))
  model_dir = tmp_path / "resplit" / "model"
  shutil.copytree(config.model_dir, model_dir)
  meta = json.loads((model_dir / "model.json").read_text())
  meta["split"]["data_seed"] = 1  # as if pre-trained holding out the data_seed=1 split
  (model_dir / "model.json").write_text(json.dumps(meta))
  changed = copy.deepcopy(config)
  changed.model_dir, changed.pretrain.data_seed = str(model_dir), 1
  with pytest.raises(runs.WorkdirError, match="pretrain.data_seed: was 0, now 1"):
    driver.run_search(changed, str(tmp_path / "search"))


@pytest.mark.slow
def test_pretraining_refuses_other_settings(fake_data_dir, trained, tmp_path):
  """Catches a pre-training resumed with another learning rate, seed or batch size (the
  last resumed at a wrong step and lost an epoch); logging cadence may change."""
  config = _train_config(fake_data_dir)
  shutil.copytree(trained[1], tmp_path, dirs_exist_ok=True)
  for field, value in (("learning_rate", 0.05), ("seed", 3), ("batch_size", 8)):
    changed = copy.deepcopy(config)
    changed[field] = value
    with pytest.raises(runs.WorkdirError, match=f"Changed: {field}: was"):
      pretrain.train_and_evaluate(changed, str(tmp_path))
  relogged = copy.deepcopy(config)
  relogged.log_every_steps = 2
  assert pretrain.train_and_evaluate(relogged, str(tmp_path)) == trained[0]


def test_identity_message_names_every_change_and_old_workdirs(tmp_path):
  """Catches a refusal that hides which setting changed, or accepts a workdir without one."""
  with pytest.raises(runs.WorkdirError, match=r"Changed: a: was 1, now 2; c: was None, now 3\."
                                              r".*hint for a"):
    runs.check_identity({"a": 1, "b": [2]}, {"a": 2, "b": [2], "c": 3}, "w", "search",
                        hints={"a": "hint for a", "b": "hint for b"})
  runs.check_identity({"a": [1]}, {"a": [1]}, "w", "search")
  with pytest.raises(runs.WorkdirError, match="earlier version"):
    runs.check_identity(None, {"a": 1}, "w", "search")


# --- damaged checkpoints --------------------------------------------------------------------


def _damage(path, how: str) -> None:
  raw = path.read_bytes()
  if how == "truncated":
    path.write_bytes(raw[:len(raw) // 2])
  elif how == "emptied":
    path.write_bytes(b"")
  elif how == "flipped":
    middle = len(raw) // 2
    path.write_bytes(raw[:middle] + bytes(b ^ 0xFF for b in raw[middle:middle + 64])
                     + raw[middle + 64:])
  else:  # "deleted": a kill between the two renames of a save
    path.unlink()


def test_damaged_search_state_falls_back_to_the_previous_one(smoke, smoke_search, tmp_path,
                                                             caplog):
  """Catches a raw BadZipFile/EOFError naming no file, and a search that cannot recover
  although the state of the step before is intact: for a truncated, emptied, bit-flipped or
  missing newest state it resumes from the one before to the result of an undamaged run."""
  straight, finished = smoke_search
  strip = lambda r: {k: v for k, v in r.items() if k not in ("search_seconds", "phase_seconds")}
  evaluator = build.build_evaluator(smoke)  # one for all four resumes
  for how in ("truncated", "emptied", "flipped", "deleted"):
    workdir = tmp_path / how
    shutil.copytree(finished, workdir)
    _damage(workdir / storage.STATE_FILE, how)
    caplog.clear()
    with caplog.at_level("WARNING"):
      resumed = driver.run_search(smoke, str(workdir), evaluator)
    assert "resuming from the previous search state" in caplog.text, how
    assert strip(resumed) == strip(straight), how
  for name in (storage.STATE_FILE, storage.PREVIOUS_STATE_FILE):
    (workdir / name).write_bytes(b"not a state")
  with pytest.raises(runs.WorkdirError, match=f"no search state in .* loads \\({storage.STATE_FILE}: "):
    driver.run_search(smoke, str(workdir), evaluator)


@pytest.mark.slow
def test_pretraining_falls_back_to_an_earlier_intact_checkpoint(fake_data_dir, trained, tmp_path):
  """Catches ~1 800 lines of orbax tracebacks for a damaged newest step, when the step
  before it is intact: the run resumes from that one and ends like an undamaged run."""
  config = _train_config(fake_data_dir)
  straight, finished = trained
  shutil.copytree(finished, tmp_path / "b")
  newest = tmp_path / "b" / "checkpoints" / "6"
  for f in newest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0" * 7)
  resumed = pretrain.train_and_evaluate(config, str(tmp_path / "b"))
  assert resumed["test_accuracy"] == straight["test_accuracy"]
  assert (json.load(open(tmp_path / "b" / "history.json"))["epochs"]
          == json.load(open(finished / "history.json"))["epochs"])
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  for f in newest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"\0" * 7)
  with pytest.raises(ValueError, match="no checkpoint in .*checkpoints loads \\(step 6: "):
    pretrain.train_and_evaluate(config, str(tmp_path / "b"))


# --- kills ------------------------------------------------------------------------------------

_KILL_AFTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from experiments.configs import train as train_configs
    from maxpart_jax import checkpoint
    from maxpart_jax.jobs import pretrain
    real = checkpoint.ocp.CheckpointManager.save

    def save_then_die(self, *args, **kwargs):
      real(self, *args, **kwargs)
      os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.ocp.CheckpointManager.save = save_then_die
    config = train_configs.get_config("smoke")
    config.data_dir, config.checkpoint_every_steps = {data_dir!r}, 2
    pretrain.train_and_evaluate(config, {workdir!r})
""")


@pytest.mark.slow
def test_sigkill_after_checkpoints_loses_no_epoch_and_no_lock(fake_data_dir, trained, tmp_path):
  """Catches an epoch missing from history.json and the curves after a kill right after
  its checkpoint, epoch means taken over the steps after a resume only, and a lock left
  behind by a killed run. Real SIGKILLs: after the mid-epoch checkpoint of step 2, then
  right after the checkpoint that ends epoch 1 (step 3)."""
  config = _train_config(fake_data_dir)
  straight, finished = trained
  for _ in range(2):  # each run dies right after its first checkpoint
    script = _KILL_AFTER_SAVE.format(repo=REPO, data_dir=fake_data_dir,
                                     workdir=str(tmp_path / "b"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  history = json.load(open(tmp_path / "b" / "history.json"))
  assert [e["step"] for e in history["epochs"]] == [3]  # killed right after epoch 1's save
  resumed = pretrain.train_and_evaluate(config, str(tmp_path / "b"))  # the lock is free
  assert resumed["test_accuracy"] == straight["test_accuracy"]
  assert (json.load(open(tmp_path / "b" / "history.json"))["epochs"]
          == json.load(open(finished / "history.json"))["epochs"])


# --- non-finite numbers -----------------------------------------------------------------------


@pytest.mark.slow
def test_diverging_pretraining_stops_and_saves_no_nan(fake_data_dir, tmp_path):
  """Catches exit code 0 with NaN weights in model/ and a bare NaN in history.json."""
  config = _train_config(fake_data_dir)
  config.learning_rate, config.warmup_steps = 1e30, 0
  with pytest.raises(train.TrainingDiverged, match="loss is (nan|inf) in steps"):
    pretrain.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "model")
  if os.path.exists(tmp_path / "history.json"):
    json.loads((tmp_path / "history.json").read_text(), parse_constant=pytest.fail)


def test_nan_weights_are_neither_saved_nor_loaded(tmp_path):
  """Catches a search that accepts a NaN model (every candidate then 'diverges')."""
  spec = {"name": "resnet18", "width": 0.0625, "stage_sizes": [1, 1, 1, 1]}
  model = pretrain.build_model(train_configs.get_config("smoke"), 100)
  variables = model.init(jax.random.key(0))
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), variables)
  with pytest.raises(ValueError, match="the variables to save hold NaN"):
    checkpoint.save_model(str(tmp_path / "m"), spec, bad, "cifar100", {})
  checkpoint.save_model(str(tmp_path / "m"), spec, variables, "cifar100", {})
  with checkpoint.ocp.StandardCheckpointer() as ckpt:  # replaced behind the saver's back
    ckpt.save(str(tmp_path / "m" / "variables"), jax.device_get(bad), force=True)
  meta = json.loads((tmp_path / "m" / "model.json").read_text())
  del meta["variables_sha256"]
  (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="hold NaN or infinite values"):
    checkpoint.load_model(str(tmp_path / "m"))


def test_json_outputs_stay_valid_json(tmp_path):
  """Catches a bare NaN (invalid JSON) in history.json / best.json."""
  path = str(tmp_path / "x.json")
  checkpoint.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": (2, "x")})
  assert json.loads(open(path).read(), parse_constant=pytest.fail) == {
      "a": None, "b": [1.0, None], "c": [2, "x"]}


@pytest.mark.slow
def test_collapsed_edge_and_failed_privacy_are_named(smoke, caplog):
  """Catches a collapsed edge (every IR channel constant: privacy 2.0) passing as private,
  and a non-finite privacy logged as a divergence."""
  model, variables, _ = checkpoint.load_model(smoke.model_dir)
  dead = jax.tree.map(jnp.zeros_like, variables)  # conv outputs 0: the IR is BN's bias
  split = dict(data_dir=smoke.data_dir)
  train_split, val = data.load_split("train", **split), data.load_split("val", **split)
  images = val.take(8, seed=1).float_images()
  evaluator = Evaluator(model, dead, train_split, val, images,
                        settings.fitness_from_config(smoke))
  genomes = jax.tree.map(lambda *xs: jnp.stack(xs), *[uniform_genome(model.info, 2, 8, 8)] * 2)
  with caplog.at_level("WARNING"):
    out = evaluator.evaluate(genomes, finetune=False)
  assert out["collapsed"].all() and not out["diverged"].any()
  assert out["privacy"] == pytest.approx([2.0, 2.0])
  assert "collapsed: every IR channel is constant" in caplog.text
  entry = {m: float(out[m][0]) for m in caching.METRICS}
  assert "the edge collapsed: every IR channel is constant in every image" in violations(
      entry, evaluator.config)
  nan_privacy = dict(entry, collapsed=0.0, failed=1.0, privacy=float("nan"))
  assert violations(nan_privacy, evaluator.config)[0] == "non-finite privacy or fitness"


@pytest.mark.slow
def test_search_in_which_every_candidate_failed_fails(smoke, tmp_path):
  """Catches exit code 0 and a normal-looking best line when every candidate diverged."""
  config = _short_search(smoke)
  config.fitness.finetune_lr = 1e30
  with pytest.raises(driver.SearchFailed, match="every one of the 3 evaluated candidates "
                                                "failed \\(3 diverged"):
    driver.run_search(config, str(tmp_path))
  report = json.loads((tmp_path / "best.json").read_text())  # the result is kept
  assert report["failed_candidates"] == report["diverged_candidates"] == 3


# --- bad settings, before any work ----------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("log_every_steps", 0, "log_every_steps must be >= 1"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps must be >= 1"),
    ("num_epochs", 0, "num_epochs must be >= 1"),
    ("val_fraction", 1.0, r"val_fraction must be in \[0, 1.0\)"),
    ("pipeline", "gpu", "pipeline must be one of"),
])
def test_bad_training_config_is_one_line_before_any_work(tmp_path, field, value, message):
  """Catches raw ZeroDivisionError / optax tracebacks for zero intervals or epochs."""
  config = train_configs.get_config("smoke")
  config[field] = value
  with pytest.raises(ValueError, match=message):
    pretrain.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_training_batch_larger_than_the_data_is_refused(fake_data_dir, tmp_path):
  config = _train_config(fake_data_dir)
  config.batch_size = 10_000
  with pytest.raises(ValueError, match="batch_size=10000 is more than the 288 training images"):
    pretrain.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("field,value,message", [
    ("privacy_images", 0, "privacy_images must be >= 1"),
    ("privacy_images", 10_000, "privacy_images=10000 is more than the 32 validation images"),
    ("val_images", 10_000, "val_images=10000 is more than the 32 validation images"),
    ("fitness.batch_size", 10_000, "fitness.batch_size=10000 is more than the 288 training"),
    ("pretrain.log_every_steps", 0, "pretrain.log_every_steps must be >= 1"),
])
def test_search_sizes_are_checked_before_the_model_loads(fake_data_dir, tmp_path, field, value,
                                                         message):
  """Catches errors that name `take(n=…)` instead of the field, or come only after the
  model loaded (or pre-trained, here it would start pre-training)."""
  config = search_configs.get_config("smoke")
  config.data_dir, config.model_dir = fake_data_dir, str(tmp_path / "pre" / "model")
  target = config
  for part in field.split(".")[:-1]:
    target = target[part]
  target[field.split(".")[-1]] = value
  with pytest.raises(ValueError, match=message):
    driver.run_search(config, str(tmp_path / "search"))
  assert not os.path.exists(tmp_path / "pre")


def test_unwritable_workdir_is_refused_before_any_work(fake_data_dir, tmp_path):
  config = search_configs.get_config("smoke")
  config.data_dir, config.model_dir = fake_data_dir, str(tmp_path / "pre" / "model")
  (tmp_path / "file").write_text("")
  with pytest.raises(runs.WorkdirError, match="cannot write to the workdir .*file/search"):
    driver.run_search(config, str(tmp_path / "file" / "search"))
  assert not os.path.exists(tmp_path / "pre")


def test_config_typo_is_one_line_from_the_command_line(tmp_path):
  """Catches three chained tracebacks with "did you mean" only at their end."""
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.search", "--config=experiments/configs/search.py:smoke",
       "--config.search.pop_sise=4", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip() == ("error: unknown config field search.pop_sise (in "
                                 "--config.search.pop_sise=4); did you mean search.pop_size?")
  assert common.config_error(KeyError("'nosuch'"), ["--config.fitness.nosuch.x=1"]) == (
      "unknown config field fitness.nosuch (in --config.fitness.nosuch.x=1)")


# --- one writer per workdir -------------------------------------------------------------------


def test_second_writer_is_refused_until_the_first_dies(tmp_path):
  """Catches two runs writing one workdir at once, and a lock that outlives a SIGKILLed
  holder. The holder is a real process."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
       "from maxpart_jax import runs\nwith runs.workdir_lock(sys.argv[2]):\n"
       "  print('held', flush=True); time.sleep(600)", REPO, str(tmp_path)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runs.WorkdirError, match=f"in use by another run \\(pid {holder.pid} "):
      with runs.workdir_lock(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with runs.workdir_lock(str(tmp_path)):
    with runs.workdir_lock(str(tmp_path)):  # re-entrant within one process
      pass
  assert runs.unique_tmp("a/b.json") != runs.unique_tmp("a/b.json")
