"""Pre-training: resumable runs, the saved model, and the optimizer pieces."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import train as train_configs
from maxpart_jax import checkpoint, data
from maxpart_jax.models import get_model
from maxpart_jax.train import cross_entropy, evaluate, make_optimizer, train_and_evaluate


def smoke_config(data_dir):
  config = train_configs.get_config("smoke")
  config.data_dir = data_dir
  config.num_epochs = 2
  config.checkpoint_every_steps = 5
  return config


def test_killed_run_resumes_to_the_same_result(fake_data_dir, tmp_path, monkeypatch):
  config = smoke_config(fake_data_dir)
  straight = train_and_evaluate(config, str(tmp_path / "a"))
  _, params_a, _ = checkpoint.load_model(str(tmp_path / "a" / "model"))

  calls = {"n": 0}
  real_augment = data.augment

  def crash_on_the_27th_batch(images, rng):
    calls["n"] += 1
    if calls["n"] == 27:  # step 27: mid epoch 2, after the checkpoint at step 25
      raise KeyboardInterrupt("simulated kill")
    return real_augment(images, rng)

  monkeypatch.setattr(data, "augment", crash_on_the_27th_batch)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, str(tmp_path / "b"))
  assert checkpoint.manager(str(tmp_path / "b" / "checkpoints")).latest_step() == 25
  monkeypatch.setattr(data, "augment", real_augment)
  resumed = train_and_evaluate(config, str(tmp_path / "b"))
  _, params_b, _ = checkpoint.load_model(str(tmp_path / "b" / "model"))

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               params_a, params_b)
  assert resumed["test_accuracy"] == straight["test_accuracy"]
  history = json.load(open(tmp_path / "b" / "history.json"))
  assert [e["epoch"] for e in history["epochs"]] == [1, 2]
  assert os.path.exists(tmp_path / "b" / "curves.png")


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


def test_load_model_rejects_mismatched_checkpoint(tmp_path):
  small = get_model("resnet18", width=0.0625, stage_sizes=(1, 1, 1, 1))
  variables = small.init(jax.random.key(0))
  spec = {"name": "resnet18", "width": 0.125, "stage_sizes": [1, 1, 1, 1]}
  checkpoint.save_model(str(tmp_path), spec, variables, "cifar100")
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
