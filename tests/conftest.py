"""Shared fixtures: small learnable fake CIFAR-100 shards."""

import pathlib

import numpy as np
import pytest


def write_fake_cifar(folder: pathlib.Path, n_train: int = 320, n_test: int = 100,
                     num_classes: int = 100, seed: int = 0) -> pathlib.Path:
  """Shards whose label is encoded in the mean colour, so a tiny model can learn them."""
  rng = np.random.default_rng(seed)
  palette = rng.integers(30, 225, (num_classes, 3))
  folder.mkdir(parents=True, exist_ok=True)
  for kind, n in (("train", n_train), ("test", n_test)):
    labels = np.arange(n) % num_classes
    noise = rng.integers(-30, 30, (n, 32, 32, 3))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    np.savez(folder / f"{kind}-00.npz", image=images, label=labels)
  return folder


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory) -> str:
  return str(write_fake_cifar(tmp_path_factory.mktemp("fake_cifar100")))


@pytest.fixture(scope="session")
def smoke(fake_data_dir, tmp_path_factory):
  """The smoke search config on fake data, with its model pre-trained once per session."""
  from experiments.configs import search as search_configs
  from maxpart_jax.search import driver
  config = search_configs.get_config("smoke")
  config.data_dir = fake_data_dir
  config.model_dir = str(tmp_path_factory.mktemp("pretrained") / "model")
  driver.load_or_pretrain(config)
  return config
