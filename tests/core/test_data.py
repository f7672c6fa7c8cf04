"""Tests of maxpart_jax.data: sources, splits, normalization, augmentation, batching.

Real-data tests read the offline CIFAR shards: $MAXPART_DATA_DIR if set, else
<repo>/../shared/data/cifar100 (and its sibling cifar10); they are skipped when
the shards are absent. Everything else uses tiny shards written to tmp_path or
tfds's mock data, so no test downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REAL_DIR, REPO, needs_real
from experiments import make_shards
from maxpart_jax import data

REAL_CIFAR10_DIR = REAL_DIR.parent / "cifar10"
# Published CIFAR-100 train statistics (also measured in the shards' README.md).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
  """Tests choose their source explicitly; a developer's MAXPART_DATA_DIR must not leak in."""
  monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)


def _fake_arrays(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
  labels = rng.permutation(np.arange(n) % num_classes)
  return images, labels


def _write_shards(folder: pathlib.Path,
                  kind: str,
                  images,
                  labels,
                  num_shards: int = 2,
                  **extra) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for i, (im, lb) in enumerate(
      zip(np.array_split(images, num_shards), np.array_split(labels, num_shards))):
    np.savez(folder / f"{kind}-{i:02d}.npz", image=im, label=lb, **extra)


def _fake_folder(folder: pathlib.Path,
                 n_train=200,
                 n_test=50,
                 num_classes=10,
                 seed=0) -> pathlib.Path:
  images, labels = _fake_arrays(n_train + n_test, num_classes, seed)
  _write_shards(folder, "train", images[:n_train], labels[:n_train])
  _write_shards(folder, "test", images[n_train:], labels[n_train:], num_shards=1)
  return folder


def _records(split: data.Split) -> np.ndarray:
  """Each example's image bytes plus label as one sortable row (a multiset of examples)."""
  flat = np.ascontiguousarray(split.images).reshape(len(split), -1)
  rows = np.concatenate(
      [flat, split.labels.astype("<i4").view(np.uint8).reshape(len(split), 4)], axis=1)
  return np.sort(np.ascontiguousarray(rows).view(f"V{rows.shape[1]}").ravel())


# --- real data ------------------------------------------------------------------


@needs_real
def test_real_split_sizes_dtypes_and_class_balance():
  sizes = {s: data.load_split(s, data_dir=REAL_DIR) for s in data.SPLITS}
  assert {
      s: len(v) for s, v in sizes.items()
  } == {
      "train": 45000,
      "val": 5000,
      "test": 10000,
      "train_full": 50000,
  }
  for split in sizes.values():
    assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
    assert (split.labels.dtype == np.int32 and split.num_classes == 100 and
            split.dataset == "cifar100")
  assert np.all(np.bincount(sizes["test"].labels, minlength=100) == 100)
  assert np.all(np.bincount(sizes["train_full"].labels, minlength=100) == 500)
  # stratified hold-out: exactly 10% of every class
  assert np.all(np.bincount(sizes["val"].labels, minlength=100) == 50)


def _channel_mean_std(images: np.ndarray, transform) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of ``transform(chunk)`` over all images, in float64 chunks."""
  total, total_sq, count = np.zeros(3), np.zeros(3), 0
  for chunk in np.array_split(images, 10):
    x = np.asarray(transform(chunk), np.float64).reshape(-1, 3)
    total, total_sq, count = total + x.sum(0), total_sq + (x**2).sum(0), count + len(x)
  mean = total / count
  return mean, np.sqrt(total_sq / count - mean**2)


@needs_real
def test_real_train_statistics_match_published_values_and_constants():
  images = data.load_split("train_full", data_dir=REAL_DIR).images
  mean, std = _channel_mean_std(images, lambda x: x / 255)
  np.testing.assert_allclose(mean, CIFAR100_MEAN, atol=1e-3)
  np.testing.assert_allclose(std, CIFAR100_STD, atol=1e-3)
  assert data.DATASETS["cifar100"].mean == CIFAR100_MEAN
  assert data.DATASETS["cifar100"].std == CIFAR100_STD


@needs_real
def test_real_normalized_train_has_zero_mean_unit_std():
  images = data.load_split("train_full", data_dir=REAL_DIR).images
  mean, std = _channel_mean_std(images, lambda x: data.normalize(x, "cifar100"))
  np.testing.assert_allclose(mean, 0.0, atol=2e-3)
  np.testing.assert_allclose(std, 1.0, atol=2e-3)


@needs_real
def test_real_val_and_train_partition_the_training_set_deterministically():
  full = data.load_split("train_full", data_dir=REAL_DIR)
  train, val = (
      data.load_split("train", data_dir=REAL_DIR),
      data.load_split("val", data_dir=REAL_DIR),
  )
  merged = data.Split(
      np.concatenate([train.images, val.images]),
      np.concatenate([train.labels, val.labels]),
      100,
      "cifar100",
  )
  np.testing.assert_array_equal(_records(merged), _records(full))
  # Same seed, same images (recomputed after clearing the cache); another seed, other images.
  data.clear_cache()
  again = data.load_split("val", data_dir=REAL_DIR)
  np.testing.assert_array_equal(again.images, val.images)
  other = data.load_split("val", data_dir=REAL_DIR, seed=1)
  assert len(other) == 5000 and not np.array_equal(other.labels, val.labels)
  # Pinned: changing the hold-out silently would change every search result.
  digest = hashlib.sha256(
      np.ascontiguousarray(val.images).tobytes() + val.labels.astype("<i4").tobytes())
  assert digest.hexdigest() == "b69f289dfe4c0d4c1b7f9f7c42a4580e04abed654e78aa3349da68b57a062a57"


@pytest.mark.skipif(
    not (REAL_CIFAR10_DIR / "test-00.npz").is_file(),
    reason=f"no CIFAR-10 shards in {REAL_CIFAR10_DIR}",
)
def test_real_cifar10_from_a_root_folder_and_its_missing_train_split():
  test = data.load_split("test", dataset="cifar10", data_dir=REAL_CIFAR10_DIR.parent)
  assert len(test) == 9966 and test.num_classes == 10
  assert set(np.unique(test.labels)) == set(range(10))
  with pytest.raises(data.DataError, match=r"no train-\*\.npz shards"):
    data.load_split("train", dataset="cifar10", data_dir=REAL_CIFAR10_DIR.parent)


# --- hold-out on small fake data ---------------------------------------------------


def test_holdout_is_stratified_and_independent_of_source_order(tmp_path):
  images, labels = _fake_arrays(300, 10, seed=1)
  _write_shards(tmp_path / "a", "train", images, labels, num_shards=3)
  perm = np.random.default_rng(5).permutation(300)
  _write_shards(tmp_path / "b", "train", images[perm], labels[perm], num_shards=4)
  val_a = data.load_split("val", data_dir=tmp_path / "a", val_fraction=0.2, seed=3)
  val_b = data.load_split("val", data_dir=tmp_path / "b", val_fraction=0.2, seed=3)
  assert len(val_a) == 60 and np.all(np.bincount(val_a.labels, minlength=10) == 6)
  np.testing.assert_array_equal(_records(val_a), _records(val_b))
  train_a = data.load_split("train", data_dir=tmp_path / "a", val_fraction=0.2, seed=3)
  assert len(train_a) == 240 and len(np.intersect1d(_records(train_a), _records(val_a))) == 0


def test_holdout_counts_for_uneven_fraction_and_zero_fraction(tmp_path):
  folder = _fake_folder(tmp_path, n_train=101, num_classes=7)
  assert len(data.load_split("val", data_dir=folder, val_fraction=0.15)) == round(0.15 * 101)
  assert len(data.load_split("val", data_dir=folder, val_fraction=0.0)) == 0
  assert len(data.load_split("train", data_dir=folder, val_fraction=0.0)) == 101


# --- source selection ---------------------------------------------------------------


def _forbid_tfds(monkeypatch):

  def fail(*args, **kwargs):
    raise AssertionError("tfds must not be used when a local folder is selected")

  monkeypatch.setattr(tfds, "builder", fail)


def test_env_var_selects_local_source_over_tfds(tmp_path, monkeypatch):
  folder = _fake_folder(tmp_path / "shards", n_train=40, num_classes=10)
  _forbid_tfds(monkeypatch)
  monkeypatch.setenv(data.ENV_DATA_DIR, str(folder))
  split = data.load_split("train_full", dataset="cifar10")
  np.testing.assert_array_equal(split.images, _fake_arrays(90, 10)[0][:40])


def test_data_dir_argument_beats_env_var_and_root_layout(tmp_path, monkeypatch):
  _fake_folder(tmp_path / "env", n_train=30, seed=1)
  _fake_folder(tmp_path / "root" / "cifar10", n_train=20, seed=2)
  _forbid_tfds(monkeypatch)
  monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "env"))
  assert len(data.load_split("train_full", dataset="cifar10", data_dir=tmp_path / "root")) == 20
  assert len(data.load_split("train_full", dataset="cifar10")) == 30


# --- malformed sources --------------------------------------------------------------


def test_missing_folder_names_path_and_how_to_fix(tmp_path):
  with pytest.raises(data.DataError) as err:
    data.load_split("test", data_dir=tmp_path / "nope")
  message = str(err.value)
  assert str(tmp_path / "nope") in message and data.ENV_DATA_DIR in message and "uint8" in message


def test_missing_split_shards(tmp_path):
  images, labels = _fake_arrays(10, 10)
  _write_shards(tmp_path, "train", images, labels)
  with pytest.raises(data.DataError, match=r"no test-\*\.npz shards.*train-00\.npz"):
    data.load_split("test", dataset="cifar10", data_dir=tmp_path)


@pytest.mark.parametrize(
    "image, label, pattern",
    [
        (
            np.zeros((4, 32, 32, 3), np.float32),
            np.zeros(4, np.int64),
            r"'image' must be \(N, 32, 32, 3\) uint8.*float32",
        ),
        (
            np.zeros((4, 28, 28, 3), np.uint8),
            np.zeros(4, np.int64),
            r"'image' must be.*\(4, 28, 28, 3\)",
        ),
        (
            np.zeros((4, 32, 32, 3), np.uint8),
            np.zeros(3, np.int64),
            r"'label' must be \(N,\) integers with N = 4",
        ),
        (
            np.zeros((4, 32, 32, 3), np.uint8),
            np.zeros(4, np.float32),
            r"'label' must be \(N,\) integers",
        ),
        (
            np.zeros((4, 32, 32, 3), np.uint8),
            np.array([0, 1, 10, 2]),
            r"labels must be in \[0, 10\), got range \[0, 10\]",
        ),
        (
            np.zeros((4, 32, 32, 3), np.uint8),
            np.array([0, -1, 3, 2]),
            r"labels must be in \[0, 10\)",
        ),
    ],
)
def test_malformed_arrays(tmp_path, image, label, pattern):
  np.savez(tmp_path / "test-00.npz", image=image, label=label)
  with pytest.raises(data.DataError, match=pattern):
    data.load_split("test", dataset="cifar10", data_dir=tmp_path)


def test_missing_label_array_and_unreadable_shard(tmp_path):
  np.savez(tmp_path / "test-00.npz", image=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2))
  with pytest.raises(data.DataError,
                     match=r"lacks array\(s\) \['label'\]; it has \['image', 'labels'\]"):
    data.load_split("test", dataset="cifar10", data_dir=tmp_path)
  (tmp_path / "train-00.npz").write_bytes(b"not a zip file")
  with pytest.raises(data.DataError, match=r"cannot read shard .*train-00\.npz"):
    data.load_split("train", dataset="cifar10", data_dir=tmp_path)


def test_bad_names_and_arguments_list_valid_choices(tmp_path):
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*\['cifar10', 'cifar100'\]"):
    data.load_split("train", dataset="mnist", data_dir=tmp_path)
  with pytest.raises(ValueError,
                     match=r"unknown split 'valid'.*'train', 'val', 'test', 'train_full'"):
    data.load_split("valid", data_dir=tmp_path)
  for fraction in (1.0, -0.1):
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
      data.load_split("val", data_dir=tmp_path, val_fraction=fraction)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.normalize(np.zeros((1, 32, 32, 3), np.uint8), "svhn")


# --- tfds ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset, num_classes", [("cifar100", 100), ("cifar10", 10)])
def test_tfds_source_with_mock_data(tmp_path, monkeypatch, dataset, num_classes):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  # mock_data turns download_and_prepare into a no-op, so neither TensorFlow nor the
  # network (whose reachability is probed before a real download) is needed here.
  monkeypatch.setattr(data, "_missing_prepare_modules", lambda: [])
  monkeypatch.setattr(data, "_reachable", lambda host: True)
  data.clear_cache()
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    full = data.load_split("train_full", dataset=dataset)
    train = data.load_split("train", dataset=dataset, val_fraction=0.25)
    val = data.load_split("val", dataset=dataset, val_fraction=0.25)
    test = data.load_split("test", dataset=dataset)
    source = tfds.data_source(dataset, split="train")
    examples = sorted((source[i] for i in range(len(source))), key=lambda ex: ex["id"])
  data.clear_cache()
  assert full.images.shape == (40, 32, 32, 3) and full.images.dtype == np.uint8
  assert (full.labels.dtype == np.int32 and full.labels.max() < num_classes and
          full.num_classes == num_classes)
  np.testing.assert_array_equal(full.images, np.stack([ex["image"] for ex in examples]))
  np.testing.assert_array_equal(full.labels, [ex["label"] for ex in examples])
  assert (len(train), len(val), len(test)) == (30, 10, 40)
  merged = data.Split(
      np.concatenate([train.images, val.images]),
      np.concatenate([train.labels, val.labels]),
      num_classes,
      dataset,
  )
  np.testing.assert_array_equal(_records(merged), _records(full))


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None,
    reason="TensorFlow is installed: preparing would download",
)
def test_tfds_unprepared_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  data.clear_cache()
  with pytest.raises(data.DataError) as err:
    data.load_split("test")
  message = str(err.value)
  assert ("maxpart_jax[tfds]" in message and "tensorflow-cpu" in message and
          "'tensorflow'" in message)
  assert str(tmp_path) in message and data.ENV_DATA_DIR in message


@pytest.mark.parametrize("reachable", [False, True])
def test_offline_download_fails_in_one_line_naming_the_way_out(tmp_path, monkeypatch, reachable):
  """Offline, tfds retried for minutes and ended in a 160-line ConnectionError; now one
  DataError naming MAXPART_DATA_DIR and the shard script (unreachable host: no download
  is even tried; a failed download: its error in one line)."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  monkeypatch.setattr(data, "_missing_prepare_modules", lambda: [])
  monkeypatch.setattr(data, "_reachable", lambda host: reachable)

  def no_network(self, *args, **kwargs):
    assert reachable, "downloaded although the host is unreachable"
    raise ConnectionError("HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max "
                          "retries exceeded\n...150 more lines...")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  data.clear_cache()
  with pytest.raises(data.DataError) as err:
    data.load_split("test")
  message = str(err.value)
  assert data.ENV_DATA_DIR in message and "experiments.make_shards" in message
  assert "\n" not in message and err.value.__cause__ is None
  assert ("ConnectionError: HTTPSConnectionPool" in message) == reachable


def _official_archive(path, images, labels, coarse=None):
  """A CIFAR python archive as the official one is laid out (pickled dicts, rows of 1024
  R, 1024 G, 1024 B values), written independently of experiments.make_shards."""
  import io, pickle, tarfile
  cifar100 = coarse is not None
  root = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
  members = {"train": ["train"], "test": ["test"]} if cifar100 else {
      "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
  with tarfile.open(path, "w:gz") as tar:
    for split, names in members.items():
      chunks = np.array_split(np.arange(len(images[split])), len(names))
      for name, rows in zip(names, chunks):
        record = {b"data": images[split][rows].transpose(0, 3, 1, 2).reshape(len(rows), -1),
                  b"fine_labels" if cifar100 else b"labels": labels[split][rows].tolist()}
        if cifar100:
          record[b"coarse_labels"] = coarse[split][rows].tolist()
        payload = pickle.dumps(record, protocol=2)
        info = tarfile.TarInfo(f"{root}/{name}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("classes", [100, 10])
def test_make_shards_from_the_official_archive(tmp_path, classes):
  """Catches a wrong channel order or transpose, lost images or labels, and shards that
  load_split cannot read (a pixel of the wrong colour or place fails the equality)."""
  rng = np.random.default_rng(classes)
  images = {s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            for s, n in (("train", 25), ("test", 10))}
  labels = {s: np.arange(len(images[s])) % classes for s in images}
  coarse = {s: labels[s] // 5 for s in images} if classes == 100 else None
  archive = tmp_path / "archive.tar.gz"
  _official_archive(archive, images, labels, coarse)
  out = tmp_path / "shards"
  with pytest.raises(ValueError, match="not that of a published CIFAR archive"):
    make_shards.read_archive(str(archive))  # refused before unpickling
  trusted = (hashlib.md5(archive.read_bytes()).hexdigest(),)
  make_shards.write_shards(make_shards.read_archive(str(archive), trusted), str(out),
                           shard_size=10)
  assert sorted(os.listdir(out)) == ["test-00.npz", "train-00.npz", "train-01.npz", "train-02.npz"]
  dataset = "cifar100" if classes == 100 else "cifar10"
  for split in ("train", "test"):
    got = data.load_split(f"{split}_full" if split == "train" else split, dataset=dataset,
                          data_dir=str(out))
    np.testing.assert_array_equal(got.images, images[split])
    np.testing.assert_array_equal(got.labels, labels[split])
  if coarse is not None:
    with np.load(out / "test-00.npz") as f:
      np.testing.assert_array_equal(f["coarse_label"], coarse["test"])
  bad = tmp_path / "bad.tar.gz"
  with __import__("tarfile").open(bad, "w:gz"):
    pass
  with pytest.raises(ValueError, match="not an official CIFAR python archive"):
    make_shards.read_archive(str(bad), (hashlib.md5(bad.read_bytes()).hexdigest(),))


def test_make_shards_command_line(tmp_path):
  """The script as docs/data.md runs it: shards written, and a bad archive is one error line."""
  import subprocess, sys
  rng = np.random.default_rng(0)
  images = {s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            for s, n in (("train", 4), ("test", 2))}
  labels = {s: np.zeros(len(images[s]), int) for s in images}
  _official_archive(tmp_path / "a.tar.gz", images, labels, labels)
  (tmp_path / "bad.tar.gz").write_bytes(b"not a tar file")
  run = lambda archive, *flags: subprocess.run(
      [sys.executable, "-m", "experiments.make_shards", f"--archive={tmp_path / archive}",
       f"--out={tmp_path / 'out'}", *flags], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  unknown = run("a.tar.gz")
  assert unknown.returncode != 0 and "not that of a published CIFAR archive" in unknown.stderr
  assert not (tmp_path / "out").exists()
  md5 = {name: hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
         for name in ("a.tar.gz", "bad.tar.gz")}
  ok = run("a.tar.gz", f"--md5={md5['a.tar.gz']}")
  bad = run("bad.tar.gz", f"--md5={md5['bad.tar.gz']}")
  assert ok.returncode == 0 and "export MAXPART_DATA_DIR=" in ok.stdout, ok.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "out")) == ["test-00.npz", "train-00.npz"]
  assert bad.returncode != 0 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr


# --- normalization ------------------------------------------------------------------


def test_normalize_values_and_input_kinds():
  images = np.zeros((2, 32, 32, 3), np.uint8)
  images[0, 0, 0] = (255, 0, 51)
  out = data.normalize(images, "cifar100")
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(
      out[0, 0, 0],
      [(1 - 0.5071) / 0.2673, (0 - 0.4865) / 0.2564, (0.2 - 0.4409) / 0.2762],
      rtol=1e-6,
  )
  np.testing.assert_allclose(data.normalize(images.astype(np.float64) / 255, "cifar100"),
                             out,
                             rtol=1e-6)
  np.testing.assert_allclose(
      data.normalize(images, "cifar10")[1, 0, 0],
      -np.array([0.4914, 0.4822, 0.4465]) / [0.2470, 0.2435, 0.2616],
      rtol=1e-6,
  )
  with pytest.raises(TypeError, match="uint8 or float"):
    data.normalize(images.astype(np.int32))


# --- augmentation -------------------------------------------------------------------


def _reference_augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Per-image crop and flip, drawing the numbers in the order augment documents."""
  offsets = rng.integers(0, 9, size=(len(images), 2))
  flips = rng.random(len(images)) < 0.5
  out = []
  for image, (dy, dx), flip in zip(images, offsets, flips):
    padded = np.zeros((40, 40, 3), images.dtype)
    padded[4:36, 4:36] = image
    crop = padded[dy:dy + 32, dx:dx + 32]
    out.append(np.fliplr(crop) if flip else crop)
  return np.stack(out)


def test_augment_matches_per_image_reference():
  images = _fake_arrays(64, 10, seed=2)[0]
  got = data.augment(images, np.random.default_rng(11))
  np.testing.assert_array_equal(got, _reference_augment(images, np.random.default_rng(11)))
  assert got.dtype == np.uint8 and not np.array_equal(got, images)
  floats = images.astype(np.float32) / 255
  np.testing.assert_array_equal(
      data.augment(floats, np.random.default_rng(3)),
      _reference_augment(floats, np.random.default_rng(3)),
  )


class _FixedDraws:
  """Stands in for a Generator: fixed crop offsets and flips."""

  def __init__(self, offset: int, flip: bool):
    self.offset, self.flip = offset, flip

  def integers(self, low, high, size):
    assert (low, high) == (0, 2 * data.PAD + 1)
    return np.full(size, self.offset)

  def random(self, n):
    return np.full(n, 0.0 if self.flip else 1.0)


def test_augment_centered_crop_flip_and_shift():
  images = _fake_arrays(3, 10, seed=4)[0]
  np.testing.assert_array_equal(data.augment(images, _FixedDraws(4, flip=False)), images)
  np.testing.assert_array_equal(data.augment(images, _FixedDraws(4, flip=True)), images[:, :, ::-1])
  shifted = data.augment(images, _FixedDraws(0,
                                             flip=False))  # top-left crop: image moves down-right
  assert not shifted[:, :4].any() and not shifted[:, :, :4].any()
  np.testing.assert_array_equal(shifted[:, 4:, 4:], images[:, :28, :28])


# --- batching -----------------------------------------------------------------------


def _id_split(n: int) -> data.Split:
  """Labels are example ids, so batches can be traced back to examples."""
  images = _fake_arrays(n, 10, seed=7)[0]
  return data.Split(images=images,
                    labels=np.arange(n, dtype=np.int32),
                    num_classes=n,
                    dataset="cifar100")


def test_train_epoch_visits_every_example_once():
  split = _id_split(103)
  batches = list(data.iterate_batches(split, 10, train=True, drop_remainder=False))
  seen = np.concatenate([b["label"] for b in batches])
  assert (sorted(seen) == list(range(103)) and
          len(batches) == data.steps_per_epoch(103, 10, False) == 11)
  dropped = list(data.iterate_batches(split, 10,
                                      train=True))  # train drops the remainder by default
  seen = np.concatenate([b["label"] for b in dropped])
  assert len(dropped) == data.steps_per_epoch(103, 10, True) == 10 and len(np.unique(seen)) == 100
  batch = dropped[0]
  assert batch["image"].shape == (10, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32


def test_train_order_and_augmentation_depend_only_on_seed_and_epoch():
  split = _id_split(64)

  def epoch(seed, epoch):
    batches = list(data.iterate_batches(split, 16, train=True, seed=seed, epoch=epoch))
    return np.concatenate([b["label"] for b in batches
                          ]), np.concatenate([b["image"] for b in batches])

  labels, images = epoch(0, 0)
  labels_again, images_again = epoch(0, 0)
  np.testing.assert_array_equal(labels, labels_again)
  np.testing.assert_array_equal(images, images_again)
  assert not np.array_equal(labels, epoch(0, 1)[0]) and not np.array_equal(labels, epoch(1, 0)[0])
  assert not np.array_equal(labels, np.arange(64))
  # the images are augmented: not the plain normalized examples, but crops/flips of them
  assert not np.array_equal(images, data.normalize(split.images[labels]))
  padded = np.pad(split.images[labels[:4]], ((0, 0), (4, 4), (4, 4), (0, 0)))
  for image, example in zip(images[:4], padded):
    candidates = [
        data.normalize(crop) for dy in range(9) for dx in range(9) for crop in (
            example[dy:dy + 32, dx:dx + 32],
            example[dy:dy + 32, dx:dx + 32][:, ::-1],
        )
    ]
    assert any(np.array_equal(image, c) for c in candidates)


def test_eval_batches_are_in_order_unaugmented_and_keep_the_remainder():
  split = _id_split(25)
  batches = list(data.iterate_batches(split, 10, train=False))
  assert [len(b["label"]) for b in batches] == [10, 10, 5] and data.steps_per_epoch(25, 10,
                                                                                    False) == 3
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), np.arange(25))
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]),
                                data.normalize(split.images))


def test_batching_argument_errors_are_raised_at_call_time():
  split = _id_split(5)
  with pytest.raises(ValueError, match="batch_size must be > 0"):
    data.iterate_batches(split, 0, train=False)
  with pytest.raises(ValueError, match="no batch"):
    data.iterate_batches(split, 8, train=True)
  assert len(list(data.iterate_batches(split, 8, train=False))) == 1
  with pytest.raises(ValueError, match="batch_size must be > 0"):
    data.steps_per_epoch(10, -1, True)


def test_split_take_and_float_images():
  split = _id_split(20)
  np.testing.assert_array_equal(split.take(3).labels, [0, 1, 2])
  sample = split.take(5, seed=1)
  assert len(np.unique(sample.labels)) == 5 and np.all(np.diff(sample.labels) > 0)
  np.testing.assert_array_equal(sample.labels, split.take(5, seed=1).labels)
  np.testing.assert_array_equal(sample.images, split.images[sample.labels])
  floats = split.float_images()
  assert floats.dtype == np.float32 and floats.min() >= 0 and floats.max() <= 1
  np.testing.assert_allclose(floats * 255, split.images, atol=1e-4)
  with pytest.raises(ValueError, match=r"n must be in \[0, 20\]"):
    split.take(21)


# --- the device pipeline ------------------------------------------------------------


def test_device_batches_equal_host_batches_bit_for_bit():
  """iterate_batches (numpy), host_batch and device_batch under jit give identical batches.

  Catches draws taken in another order than the host pipeline's, a crop with rows and
  columns swapped, a flip on the wrong axis, and float normalization that rounds
  differently on the device (XLA turns x / 255 into x * (1/255)).
  """
  import jax
  images, labels = _fake_arrays(70, 100, seed=3)
  split = data.Split(images=images, labels=labels.astype(np.int32), num_classes=100,
                     dataset="cifar100")
  draws = data.train_draws(len(split), 16, seed=5, epoch=2)
  assert len(draws) == 4 and draws.offset.max() <= 2 * data.PAD and draws.flip.any()
  on_device = data.to_device(split)
  make = jax.jit(lambda d: data.device_batch(*on_device, d, "cifar100"))
  for step, batch in enumerate(data.iterate_batches(split, 16, train=True, seed=5, epoch=2)):
    host = data.host_batch(split, draws, step)
    device = jax.device_get(make(draws.step(step)))
    for name in ("image", "label"):
      np.testing.assert_array_equal(host[name], batch[name])
      np.testing.assert_array_equal(device[name], batch[name])


def test_draws_for_steps_continue_into_the_next_epoch():
  """Fine-tuning longer than an epoch uses epoch 0's batches, then epoch 1's."""
  draws = data.draws_for_steps(50, 8, 9, seed=1)  # 6 batches per epoch
  first, second = (data.train_draws(50, 8, seed=1, epoch=e) for e in (0, 1))
  for name in ("index", "offset", "flip"):
    expected = np.concatenate([getattr(first, name), getattr(second, name)[:3]])
    np.testing.assert_array_equal(getattr(draws, name), expected)
  assert len(data.draws_for_steps(50, 8, 0, seed=1)) == 0
  with pytest.raises(ValueError, match="no batch"):
    data.train_draws(5, 8, seed=0, epoch=0)


def test_eval_arrays_pad_the_last_batch_with_labels_nothing_predicts():
  split = _id_split(25)
  images, labels = data.eval_arrays(split, 10)
  assert images.shape == (3, 10, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels.ravel()[:25], np.arange(25))
  np.testing.assert_array_equal(labels.ravel()[25:], -1)
  np.testing.assert_array_equal(images.reshape(-1, 32, 32, 3)[:25], split.images)
