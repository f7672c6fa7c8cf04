"""Pre-training: resumable runs, the saved model, and the optimizer pieces."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REAL_DIR, SHIPPED_MODEL as SHIPPED, needs_real, relative_distance
from experiments.configs import train as train_configs
from maxpart_jax import checkpoint, data, metrics, train
from maxpart_jax.models import get_model
from maxpart_jax.train import cross_entropy, evaluate
from maxpart_jax.jobs import pretrain
from maxpart_jax.jobs.pretrain import make_optimizer, train_and_evaluate


def smoke_config(data_dir):
  """The smoke config over the whole fake split (18 steps per epoch)."""
  config = train_configs.get_config("smoke")
  config.data_dir = data_dir
  config.num_epochs = 2
  config.steps_per_epoch = 0
  config.checkpoint_every_steps = 5
  config.compute_dtype = "float32"  # as on a CPU, also on a GPU (where auto is bfloat16)
  return config


@pytest.mark.slow
def test_smoke_run_takes_a_fixed_number_of_steps(fake_data_dir, tmp_path):
  """A smoke run is 2 epochs of 3 steps on any data: on the real CIFAR-100 train split
  (45 000 images) the former smoke config ran 5 624 steps."""
  config = train_configs.get_config("smoke")
  assert pretrain.epoch_steps(config, 45_000) == 3 and pretrain.epoch_steps(config, 288) == 3
  assert pretrain.epoch_steps(config, 40) == 2  # fewer full batches than the cap
  config.data_dir = fake_data_dir
  train_and_evaluate(config, str(tmp_path))
  history = json.load(open(tmp_path / "history.json"))
  assert [e["step"] for e in history["epochs"]] == [3, 6]
  assert all(type(v) in (int, float) for e in history["epochs"] for v in e.values())


@pytest.mark.numerics
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(fake_data_dir, tmp_path, monkeypatch):
  """Catches a resume that restarts the data order, skips or repeats steps, or loses an
  epoch from the history, with steps in compiled loops whose chunks do not align with the
  checkpoints. (The one-call-per-step `device` pipeline, the CPU default, is killed and
  resumed with real SIGKILLs in test_runs.test_sigkill_after_checkpoints_loses_no_epoch_and_no_lock.)"""
  config = smoke_config(fake_data_dir)
  config.pipeline = "fused"
  config.log_every_steps = 4  # chunks of 1-4 steps, not aligned with the checkpoints
  straight = train_and_evaluate(config, str(tmp_path / "a"))
  _, params_a, _ = checkpoint.load_model(str(tmp_path / "a" / "model"))

  real_progress = train.Progress.__call__

  def kill_after_step_27(self, done, extra=""):
    real_progress(self, done, extra)
    if done >= 27:  # mid epoch 2 (18 steps each), after the checkpoint at step 25
      raise KeyboardInterrupt("simulated kill")

  monkeypatch.setattr(train.Progress, "__call__", kill_after_step_27)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, str(tmp_path / "b"))
  assert checkpoint.manager(str(tmp_path / "b" / "checkpoints")).latest_step() == 25
  monkeypatch.setattr(train.Progress, "__call__", real_progress)
  resumed = train_and_evaluate(config, str(tmp_path / "b"))
  _, params_b, _ = checkpoint.load_model(str(tmp_path / "b" / "model"))

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               params_a, params_b)
  assert resumed["test_accuracy"] == straight["test_accuracy"]
  history = json.load(open(tmp_path / "b" / "history.json"))
  # Epoch 2's means run over all its steps, those before the kill too.
  assert history["epochs"] == json.load(open(tmp_path / "a" / "history.json"))["epochs"]
  assert [e["epoch"] for e in history["epochs"]] == [1, 2]
  # TensorBoard: the epochs of the JSON history, and the final test accuracy.
  scalars = metrics.read_scalars(str(tmp_path / "b" / "tensorboard"))
  assert scalars["epoch/train_loss"] == pytest.approx(
      {e["step"]: e["train_loss"] for e in history["epochs"]}, rel=1e-6)
  assert list(scalars["final/test_accuracy"].values()) == pytest.approx([resumed["test_accuracy"]])
  assert max(scalars["train/loss"]) == history["epochs"][-1]["step"]
  assert os.path.exists(tmp_path / "b" / "curves.png")


@pytest.mark.numerics
@pytest.mark.slow
def test_device_pipelines_train_like_the_host_loop(fake_data_dir, tmp_path):
  """The fused pipeline (steps in compiled loops) and the device pipeline (batches made on
  the device, one call per step) against the host loop (numpy batches), in float32.

  Catches a wrong batch (index, crop, flip or normalization), a skipped or repeated step,
  or a chunk boundary that drops a step: another data order gives a relative distance
  of ~1. Tolerance: the same step compiled inside a loop rounds differently, and this
  tiny net's batch norm (4-channel layers, dead channels) amplifies that to a relative
  distance of ~1e-4 after 8 steps (measured; a 1e-7 change of the weights stays 1e-7).
  """
  params, hist = {}, {}
  for pipeline in ("host", "device", "fused"):
    config = smoke_config(fake_data_dir)
    config.pipeline = pipeline
    # 8 steps in chunks [0, 3), [3, 5), [5, 6), [6, 8) (logs every 3, checkpoints every 5).
    config.batch_size, config.num_epochs, config.learning_rate = 36, 1, 0.005
    config.log_every_steps, config.checkpoint_every_steps = 3, 5
    train_and_evaluate(config, str(tmp_path / pipeline))
    params[pipeline] = checkpoint.load_model(str(tmp_path / pipeline / "model"))[1]
    hist[pipeline] = json.load(open(tmp_path / pipeline / "history.json"))["epochs"][0]
  for pipeline in ("device", "fused"):
    assert relative_distance(params[pipeline], params["host"]) < 1e-3, pipeline
    assert hist[pipeline]["train_loss"] == pytest.approx(hist["host"]["train_loss"], rel=1e-4)
    # The epoch's accuracy counts 8 batches of 36 images: weights a rounding apart may flip
    # one prediction (measured: none flipped with AVX-512 or SSE4.2).
    assert hist[pipeline]["train_accuracy"] == pytest.approx(hist["host"]["train_accuracy"],
                                                            abs=1.01 / (8 * 36))


@pytest.mark.slow
def test_training_learns_and_saved_model_reloads(fake_data_dir, tmp_path):
  config = smoke_config(fake_data_dir)
  config.num_epochs = 4
  config.learning_rate = 0.05
  results = train_and_evaluate(config, str(tmp_path))
  history = json.load(open(tmp_path / "history.json"))["epochs"]
  assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.5
  model, variables, meta = checkpoint.load_model(str(tmp_path / "model"))
  assert meta["dataset"] == "cifar100" and model.info.num_blocks == 6
  test = data.load_split("test", data_dir=fake_data_dir)
  assert evaluate(model, variables, test) == results["test_accuracy"]
  assert results["test_accuracy"] > 0.05  # 100 classes: chance is 0.01


def test_shipped_model_is_the_quick_configs_and_its_checksum_is_verified(tmp_path):
  """The committed quick model loads, matches the quick config (architecture and hold-out),
  and a changed weight is refused (catches a loader that does not verify the checksum)."""
  from experiments.configs import search as search_configs
  quick = search_configs.get_config("quick")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(SHIPPED)))
  assert os.path.samefile(os.path.join(repo, quick.model_dir), SHIPPED)
  model, variables, meta = checkpoint.load_model(SHIPPED)
  assert meta["model"] == pretrain.model_spec(quick.pretrain)
  assert meta["split"] == pretrain.split_spec(quick.pretrain)
  assert meta["variables_sha256"] == checkpoint.variables_sha256(variables)
  changed = jax.tree.map(np.array, variables)  # writable copies
  changed["params"]["blocks_1"]["conv1"]["kernel"][0, 0, 0, 0] += 1e-3
  checkpoint.save_model(str(tmp_path), meta["model"], changed, meta["dataset"], meta["split"])
  with open(tmp_path / "model.json", "w") as f:
    json.dump(meta, f)  # the shipped checksum beside other weights
  with pytest.raises(ValueError, match="do not match the SHA-256"):
    checkpoint.load_model(str(tmp_path))


@needs_real
@pytest.mark.numerics
def test_shipped_model_has_its_published_test_accuracy():
  """58.50 % on the 10 000 real test images, as its README and results.json say, up to the
  images whose top two logits are closer than float rounding on another CPU can move them.

  Logits on two CPU code paths (AVX-512 and SSE4.2) differ by at most 6e-6; an image whose
  top two logits are 1e-4 apart (17 times that) or more has the same top-1 on any CPU.
  One test image is closer here, so the accuracy may move by 1e-4 (catches weights or a
  normalization that change even one confident prediction)."""
  model, variables, _ = checkpoint.load_model(SHIPPED)
  test = data.load_split("test", data_dir=REAL_DIR)
  with open(os.path.join(os.path.dirname(SHIPPED), "results.json")) as f:
    published = json.load(f)["test_accuracy"]
  assert published == 0.585
  logits = np.concatenate([
      np.asarray(model.full(variables, batch["image"]))
      for batch in data.iterate_batches(test, 1000, train=False)])
  top2 = np.sort(logits, axis=-1)[:, -2:]
  undecided = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))
  assert undecided <= 3  # the bound below stays a statement about a few images
  accuracy = float(np.mean(logits.argmax(-1) == test.labels))
  assert abs(accuracy - published) <= undecided / len(test)


def test_load_model_rejects_mismatched_checkpoint(tmp_path):
  small = get_model("resnet18", width=0.0625, stage_sizes=(1, 1, 1, 1))
  variables = small.init(jax.random.key(0))
  spec = {"name": "resnet18", "width": 0.125, "stage_sizes": [1, 1, 1, 1]}
  checkpoint.save_model(str(tmp_path), spec, variables, "cifar100",
                        {"val_fraction": 0.1, "data_seed": 0})
  with pytest.raises(ValueError, match="does not match model resnet18.*shape mismatch"):
    checkpoint.load_model(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no pre-trained model"):
    checkpoint.load_model(str(tmp_path / "nothing"))


def test_optimizer_decays_kernels_only_and_follows_cosine():
  config = train_configs.get_config("smoke")
  config.weight_decay, config.warmup_steps, config.learning_rate = 0.5, 0, 1.0
  tx = make_optimizer(config, total_steps=10)
  params = {"conv": {"kernel": jnp.ones(3)}, "bn": {"scale": jnp.ones(3)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradient: only the kernel moves, by lr * wd (Nesterov: (1 + momentum) * lr * wd).
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.5 * 1.9 * np.ones(3), rtol=1e-6)
  np.testing.assert_array_equal(updates["bn"]["scale"], np.zeros(3))


def test_cross_entropy_by_hand():
  logits = jnp.array([[2.0, 0.0, 0.0]])
  expected = -np.log(np.exp(2) / (np.exp(2) + 2))
  assert float(cross_entropy(logits, jnp.array([0]))) == pytest.approx(expected, rel=1e-6)
  smoothed = 0.9 * expected + 0.1 * np.mean(-np.log(np.exp([2, 0, 0]) / (np.exp(2) + 2)))
  assert float(cross_entropy(logits, jnp.array([0]), 0.1)) == pytest.approx(smoothed, rel=1e-6)


def test_unknown_variant_lists_choices():
  with pytest.raises(ValueError, match="unknown train config variant 'big'.*cpu_vgg11"):
    train_configs.get_config("big")


def test_a_process_makes_only_its_rows_of_a_split_batch(fake_data_dir):
  """``host_batch`` of some rows is those rows of the whole batch (data parallelism across
  processes builds each global batch from every process's rows); one process holds all."""
  split = data.load_split("train", data_dir=fake_data_dir)
  draws = data.train_draws(len(split), 16, seed=3, epoch=1)
  whole = data.host_batch(split, draws, 2)
  part = data.host_batch(split, draws, 2, slice(4, 12))
  np.testing.assert_array_equal(part["image"], whole["image"][4:12])
  np.testing.assert_array_equal(part["label"], whole["label"][4:12])
  mesh = train.data_parallel_mesh("all", 16)
  assert train.process_rows(train.DataParallel(None, mesh).batch_sharding, 16) == slice(0, 16)
  assert train.data_parallel_mesh("auto", 16) is None  # one process: one device, as before
  assert train.resolve_pipeline("auto", "gpu", processes=2) == "host"
  with pytest.raises(ValueError, match="devices must be one of"):
    train.data_parallel_mesh("some", 16)
