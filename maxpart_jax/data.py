"""CIFAR-100 / CIFAR-10 input pipeline: whole splits as in-memory numpy arrays.

Sources
-------
* **local**: a folder of ``.npz`` shards, ``train-*.npz`` and ``test-*.npz`` (each
  kind sorted by file name and concatenated). Every shard holds ``image``
  (N, 32, 32, 3) uint8 RGB and ``label`` (N,) integers in ``[0, num_classes)``;
  other arrays are ignored. If the folder has a sub-folder named after the
  dataset (``<dir>/cifar100``), the shards are read from there, so one root can
  hold both datasets. Used when ``load_split(..., data_dir=...)`` is given or
  else when the environment variable ``MAXPART_DATA_DIR`` is set; the argument
  wins over the variable.
* **tfds**: ``tensorflow_datasets`` (``cifar100`` / ``cifar10``) in its data
  folder (``TFDS_DATA_DIR``, default ``~/tensorflow_datasets``), used when
  neither of the above is set.

TensorFlow and tfds (decision)
------------------------------
*Reading* needs no TensorFlow: the dataset is prepared in the ArrayRecord
format and read through tfds's random-access data source (PNGs decoded by
Pillow), then sorted by the tfds ``id`` (``train_00000``, ...) so the arrays
are in the original CIFAR order whatever order tfds stored them in.
*Preparing* (download and build, once per data folder) needs TensorFlow: the
tfds CIFAR builder reads the archive with ``tf.io.gfile`` and encodes PNGs
with TensorFlow, and tfds 4.9.10 also imports the ``importlib_resources``
backport, which it does not declare. Both come with the optional extra
``pip install "maxpart_jax[tfds]"`` (``tensorflow-cpu``, ``importlib_resources``);
TensorFlow is not a core dependency because it is large and only this one-off
step needs it. A missing module is reported before anything is downloaded.
A dataset that an earlier ``tfds.load`` prepared as TFRecord (no random access)
is read through ``tf.data`` when TensorFlow is installed; without TensorFlow
the error says to install the extra or to point ``TFDS_DATA_DIR`` at a fresh
folder.

Splits
------
``train_full`` is the whole training set, ``val`` a hold-out of
``round(val_fraction * N)`` training images, ``train`` the rest, ``test`` the
test set. The hold-out is stratified by class and depends only on the image
bytes, the labels and ``seed`` (each image gets a keyed BLAKE2 hash; within
each class images are ranked by hash, and the examples with the lowest
within-class quantile are held out), so the same seed selects the same images
from any source and in any shard order. ``train``/``val`` keep source order.

Training batches
----------------
Shuffled and augmented deterministically from ``(seed, epoch)``: zero padding
by 4 pixels (the usual CIFAR choice, as torchvision's ``RandomCrop(32,
padding=4)``; the padding is black before normalization), a random 32x32 crop
and a random horizontal flip, vectorized over the batch. Evaluation batches
are in order, unaugmented, and keep the last partial batch by default.

Two pipelines make the same training batches (**decision**). The *host* pipeline
(:func:`iterate_batches`) gathers, augments and normalizes each batch in numpy
and copies it to the device. The *device* pipeline keeps the split on the
accelerator as uint8 (:func:`to_device`) and builds each batch there with
:func:`device_batch`, inside the compiled training loop. Both draw their random
choices from the same numpy generator, in the same order (:func:`train_draws`:
a permutation, then per batch the crop offsets and the flips): those draws are
a few bytes per image per epoch, copied once per epoch, while the pixels never
leave the device. So a run gives the same batches, bit for bit, on either
pipeline and on any backend.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.util
import math
import os
import socket
import zipfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from maxpart_jax.registry import Registry

ENV_DATA_DIR = "MAXPART_DATA_DIR"
SPLITS = ("train", "val", "test", "train_full")
IMAGE_SHAPE = (32, 32, 3)
PAD = 4
TFDS_EXTRA = 'pip install "maxpart_jax[tfds]"'  # tensorflow-cpu, importlib_resources


class DataError(ValueError):
  """A data source is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset: classes, train-set channel statistics, tfds name."""

  num_classes: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  tfds_name: str


DATASETS: Registry[DatasetInfo] = Registry("dataset")
"""The datasets by name (their tfds name, classes and channel statistics); a new one
registers here."""
DATASETS.register("cifar100", DatasetInfo(num_classes=100, mean=(0.5071, 0.4865, 0.4409),
                                          std=(0.2673, 0.2564, 0.2762), tfds_name="cifar100"))
DATASETS.register("cifar10", DatasetInfo(num_classes=10, mean=(0.4914, 0.4822, 0.4465),
                                         std=(0.2470, 0.2435, 0.2616), tfds_name="cifar10"))


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: ``images`` (N, 32, 32, 3) uint8, ``labels`` (N,) int32.

  The arrays may be read-only views of the process-wide cache; copy before editing.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  dataset: str

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, n: int, *, seed: int | None = None) -> Split:
    """The first ``n`` examples, or with ``seed`` a random subset of ``n`` in index order.

      Use a seed when the source is sorted by class (the local test shards are).
      """
    if not 0 <= n <= len(self):
      raise ValueError(f"take(n={n}): n must be in [0, {len(self)}]")
    if seed is None:
      idx = np.arange(n)
    else:
      idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
    return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

  def float_images(self) -> np.ndarray:
    """Images as float32 in [0, 1], not normalized (e.g. for the privacy score)."""
    return self.images.astype(np.float32) / 255.0


def dataset_info(dataset: str) -> DatasetInfo:
  """The ``DatasetInfo`` of ``dataset``; an unknown name raises a ``ValueError`` listing all."""
  return DATASETS.get(dataset)


def load_split(
    split: str,
    *,
    dataset: str = "cifar100",
    data_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Split:
  """Loads one split (``train``, ``val``, ``test`` or ``train_full``) as numpy arrays.

  Args:
    split: which split; ``train`` and ``val`` partition ``train_full``.
    dataset: a key of ``DATASETS``.
    data_dir: folder of ``.npz`` shards; overrides ``MAXPART_DATA_DIR``. With
      neither, tfds is used.
    val_fraction: share of the training set held out as ``val``, in [0, 1).
    seed: selects the hold-out; keep it fixed for a whole study.
  """
  info = dataset_info(dataset)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  source = _resolve_source(dataset, data_dir)
  images, labels = _load_arrays(source, dataset, "test" if split == "test" else "train")
  if split in ("train", "val"):
    train_idx, val_idx = _holdout(source, dataset, float(val_fraction), seed)
    idx = train_idx if split == "train" else val_idx
    images, labels = images[idx], labels[idx]
  return Split(images=images, labels=labels, num_classes=info.num_classes, dataset=dataset)


def content_hash(dataset: str = "cifar100",
                 data_dir: str | os.PathLike[str] | None = None) -> str:
  """A hash of ``dataset``'s content (train and test images and labels), wherever it is read.

  A resumed run compares the content, not the location: moving the shards is harmless,
  changing them is not. Hashing CIFAR-100 takes about half a second; it is cached.
  """
  dataset_info(dataset)
  return _content_hash(_resolve_source(dataset, data_dir), dataset)


@functools.lru_cache(maxsize=8)
def _content_hash(source: _Source, dataset: str) -> str:
  digest = hashlib.blake2b(digest_size=16)
  for kind in ("train", "test"):
    images, labels = _load_arrays(source, dataset, kind)
    for array in (images, labels.astype(np.int64)):
      digest.update(f"{kind}|{array.dtype}|{array.shape}|".encode())
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def clear_cache() -> None:
  """Frees the arrays cached by ``load_split`` (they are kept per source and dataset)."""
  _load_arrays.cache_clear()
  _holdout.cache_clear()
  _content_hash.cache_clear()


def normalize(images: np.ndarray, dataset: str = "cifar100") -> np.ndarray:
  """Per-channel standardization with the dataset's train statistics, as float32.

  ``images`` are uint8 in [0, 255] or floats in [0, 1], channels last.
  """
  info = dataset_info(dataset)
  if images.dtype == np.uint8:
    x = images.astype(np.float32) / 255.0
  elif np.issubdtype(images.dtype, np.floating):
    x = images.astype(np.float32)
  else:
    raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
  if x.shape[-1:] != (3,):
    raise ValueError(f"images must have 3 channels last, got shape {images.shape}")
  return (x - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


def _augmentation_draws(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Crop offsets (n, 2) in ``[0, 2 * PAD]`` and flips (n,), drawn in this order."""
  offsets = rng.integers(0, 2 * PAD + 1, size=(n, 2))
  flips = rng.random(n) < 0.5
  return offsets, flips


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random crop of the zero-padded (by ``PAD``) image and random horizontal flip.

  ``images`` is (N, H, W, C) of any dtype; the result has the same shape and
  dtype. Draws, in this order: ``rng.integers(0, 2 * PAD + 1, size=(N, 2))``
  (row, column offset of the crop in the padded image), then
  ``rng.random(N) < 0.5`` (flip).
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
  return _crop_flip(images, *_augmentation_draws(rng, len(images)))


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of batches ``iterate_batches`` yields for ``num_examples`` examples."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size}")
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  if drop_remainder:
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of ``{"image": float32 (B, 32, 32, 3) normalized, "label": int32 (B,)}``.

  With ``train`` the order is a permutation and the images are augmented, both
  drawn from ``np.random.default_rng([seed, epoch])``; without it the order is
  the split's and images are only normalized. ``drop_remainder`` defaults to
  ``train``. Arguments are checked when this is called, not on the first batch.
  """
  if drop_remainder is None:
    drop_remainder = train
  num_steps = steps_per_epoch(len(split), batch_size, drop_remainder)
  if num_steps == 0 and len(split) > 0:
    raise ValueError(
        f"batch_size {batch_size} exceeds the {len(split)} examples and drop_remainder=True:"
        " the epoch would have no batch")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
  return _batches(split, batch_size, num_steps, train, np.random.default_rng([seed, epoch]))


def _batches(split: Split, batch_size: int, num_steps: int, train: bool,
             rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
  order = rng.permutation(len(split)) if train else np.arange(len(split))
  for step in range(num_steps):
    idx = order[step * batch_size:(step + 1) * batch_size]
    images = split.images[idx]
    if train:
      images = augment(images, rng)
    yield {"image": normalize(images, split.dataset), "label": split.labels[idx]}


# --- the device pipeline -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Draws:
  """The random choices behind training batches, one row per step.

  Attributes:
    index: (S, B) int32 example indices of each batch.
    offset: (S, B, 2) int32 row and column of each crop in the padded image.
    flip: (S, B) bool horizontal flips.
  """

  index: np.ndarray
  offset: np.ndarray
  flip: np.ndarray

  def __len__(self) -> int:
    return len(self.index)

  def step(self, i: jax.Array) -> Draws:
    """Row ``i`` (traced or concrete): the draws of one batch."""
    return jax.tree.map(lambda x: x[i], self)


jax.tree_util.register_dataclass(Draws, data_fields=["index", "offset", "flip"], meta_fields=[])


def train_draws(num_examples: int, batch_size: int, *, seed: int, epoch: int) -> Draws:
  """The draws of one epoch of :func:`iterate_batches` (``train=True``), without the pixels."""
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
  steps = steps_per_epoch(num_examples, batch_size, drop_remainder=True)
  if steps == 0 and num_examples > 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples: the epoch "
                     "would have no batch")
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(num_examples)[:steps * batch_size].reshape(steps, batch_size)
  draws = [_augmentation_draws(rng, batch_size) for _ in range(steps)]
  return Draws(index=order.astype(np.int32),
               offset=np.array([o for o, _ in draws], np.int32).reshape(steps, batch_size, 2),
               flip=np.array([f for _, f in draws], bool).reshape(steps, batch_size))


def draws_for_steps(num_examples: int, batch_size: int, steps: int, *, seed: int) -> Draws:
  """The draws of the first ``steps`` training batches, running into later epochs if needed."""
  per_epoch = steps_per_epoch(num_examples, batch_size, drop_remainder=True)
  epochs = [train_draws(num_examples, batch_size, seed=seed, epoch=e)
            for e in range(max(1, -(-steps // max(per_epoch, 1))))]
  return jax.tree.map(lambda *rows: np.concatenate(rows)[:steps], *epochs)


def host_batch(split: Split, draws: Draws, step: int,
               rows: slice = slice(None)) -> dict[str, np.ndarray]:
  """Batch ``step`` of ``draws`` made on the host (numpy), as :func:`iterate_batches` makes it;
  ``rows``: only those rows of it (a process's share of a batch split over processes)."""
  idx = draws.index[step][rows]
  images = _crop_flip(split.images[idx], draws.offset[step][rows], draws.flip[step][rows])
  return {"image": normalize(images, split.dataset), "label": split.labels[idx]}


def _crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  rows = offsets[:, :1] + np.arange(h)
  cols = offsets[:, 1:] + np.arange(w)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def eval_arrays(split: Split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """``split`` as (nb, batch_size, H, W, C) uint8 images and (nb, batch_size) labels.

  The last batch is padded with black images labelled -1, which no prediction
  matches, so counting correct predictions over every batch counts the split.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size}")
  pad = -len(split) % batch_size
  images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
  labels = np.concatenate([split.labels, np.full(pad, -1, np.int32)]).astype(np.int32)
  return (images.reshape(-1, batch_size, *split.images.shape[1:]),
          labels.reshape(-1, batch_size))


def to_device(split: Split, sharding: jax.sharding.Sharding | None = None) -> tuple[jax.Array, jax.Array]:
  """``(images uint8, labels int32)`` of ``split`` on the device(s), copied once."""
  return jax.device_put((split.images, split.labels), sharding)


def normalize_on_device(images: jax.Array, dataset: str = "cifar100") -> jax.Array:
  """:func:`normalize` of uint8 images inside a jitted function, bit for bit.

  Looks every pixel up in a (256, 3) table that :func:`normalize` itself computed:
  compiled float arithmetic may round differently (XLA turns a division by a
  constant into a multiplication by its reciprocal).
  """
  levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
  table = jnp.asarray(normalize(levels, dataset))
  return table[images.astype(jnp.int32), jnp.arange(3)]


def device_batch(images: jax.Array, labels: jax.Array, draws: Draws,
                 dataset: str) -> dict[str, jax.Array]:
  """One training batch built on the device from uint8 ``images`` and one row of ``draws``.

  Jittable; equal, bit for bit, to :func:`host_batch` of the same draws.
  """
  x = jnp.pad(images[draws.index], ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  h, w, c = images.shape[1:]
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  x = jax.vmap(crop)(x, draws.offset)
  x = jnp.where(draws.flip[:, None, None, None], x[:, :, ::-1], x)
  return {"image": normalize_on_device(x, dataset), "label": labels[draws.index]}


# --- sources -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where arrays come from: ``kind`` "local" (a shard folder) or "tfds" (its data folder)."""

  kind: str
  location: str
  origin: str = dataclasses.field(compare=False)  # how it was chosen, for messages only


def _resolve_source(dataset: str, data_dir: str | os.PathLike[str] | None) -> _Source:
  if data_dir is not None:
    folder, origin = os.fspath(data_dir), "the data_dir argument"
  elif os.environ.get(ENV_DATA_DIR):
    folder, origin = os.environ[ENV_DATA_DIR], f"${ENV_DATA_DIR}"
  else:
    return _Source("tfds", tfds.core.constants.get_default_data_dir(), "default (tfds)")
  folder = os.path.abspath(os.path.expanduser(folder))
  if os.path.isdir(os.path.join(folder, dataset)):
    folder = os.path.join(folder, dataset)
  return _Source("local", folder, origin)


@functools.lru_cache(maxsize=8)
def _load_arrays(source: _Source, dataset: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """Whole ``kind`` ("train"/"test") of a source, checked; arrays are read-only (cached)."""
  num_classes = DATASETS[dataset].num_classes
  if source.kind == "local":
    images, labels = _load_local(source, kind, num_classes)
  else:
    images, labels = _load_tfds(DATASETS[dataset].tfds_name, kind, source.location)
    _check_arrays(images, labels, num_classes, f"tfds {dataset} {kind} ({source.location})")
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def _format_help(num_classes: int) -> str:
  return (f"Expected a folder of train-*.npz and test-*.npz shards, each with arrays 'image' "
          f"(N, 32, 32, 3) uint8 and 'label' (N,) integers in [0, {num_classes}). Set "
          f"{ENV_DATA_DIR} (or pass data_dir=) to such a folder, or leave both unset to use tfds.")


def _load_local(source: _Source, kind: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  folder = source.location
  if not os.path.isdir(folder):
    raise DataError(f"data folder {folder!r} (from {source.origin}) does not exist. " +
                    _format_help(num_classes))
  paths = sorted(glob.glob(os.path.join(glob.escape(folder), f"{kind}-*.npz")))
  if not paths:
    found = sorted(os.listdir(folder))[:20]
    raise DataError(
        f"no {kind}-*.npz shards in {folder!r} (from {source.origin}) for the {kind!r} data; "
        f"found {found}. {_format_help(num_classes)}")
  images, labels = [], []
  for path in paths:
    try:
      with np.load(path, allow_pickle=False) as shard:
        files = list(shard.files)
        arrays = {key: shard[key] for key in ("image", "label") if key in files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
      raise DataError(
          f"cannot read shard {path!r} as .npz: {e}. {_format_help(num_classes)}") from e
    missing = [key for key in ("image", "label") if key not in arrays]
    if missing:
      raise DataError(f"shard {path!r} lacks array(s) {missing}; it has {files}. " +
                      _format_help(num_classes))
    _check_arrays(arrays["image"], arrays["label"], num_classes, f"shard {path!r}")
    images.append(arrays["image"])
    labels.append(arrays["label"].astype(np.int32))
  return np.concatenate(images), np.concatenate(labels)


def _check_arrays(image: np.ndarray, label: np.ndarray, num_classes: int, where: str) -> None:
  if image.dtype != np.uint8 or image.ndim != 4 or image.shape[1:] != IMAGE_SHAPE:
    raise DataError(
        f"{where}: 'image' must be (N, 32, 32, 3) uint8, got {image.shape} {image.dtype}")
  if label.ndim != 1 or len(label) != len(image) or not np.issubdtype(label.dtype, np.integer):
    raise DataError(f"{where}: 'label' must be (N,) integers with N = {len(image)} images, "
                    f"got {label.shape} {label.dtype}")
  if len(label) and (label.min() < 0 or label.max() >= num_classes):
    raise DataError(f"{where}: labels must be in [0, {num_classes}), got range "
                    f"[{label.min()}, {label.max()}]; is the folder the right dataset?")


# Where tfds downloads CIFAR from; checked first so that an offline machine fails in
# seconds instead of after minutes of retries.
CIFAR_HOST = "www.cs.toronto.edu"


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to ``host`` opens within ``timeout`` seconds."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _missing_prepare_modules() -> list[str]:
  """Modules that tfds needs to download and build CIFAR but that are not installed."""
  return [m for m in ("tensorflow", "importlib_resources") if importlib.util.find_spec(m) is None]


def _load_tfds(name: str, kind: str, tfds_dir: str) -> tuple[np.ndarray, np.ndarray]:
  builder = tfds.builder(name, data_dir=tfds_dir)
  if not builder.is_prepared():
    missing = _missing_prepare_modules()
    if missing:
      raise DataError(
          f"tfds dataset {name!r} is not prepared in {builder.data_dir!r} (TFDS_DATA_DIR), "
          f"and preparing it (download and build, once) needs the modules {missing}, which "
          f"are not installed: {TFDS_EXTRA} (tensorflow-cpu, importlib_resources). Or use "
          f"local data: set {ENV_DATA_DIR} to a folder of train-*.npz / test-*.npz shards "
          "with arrays 'image' (N, 32, 32, 3) uint8 and 'label' (N,).")
    builder = tfds.builder(name, data_dir=tfds_dir, file_format="array_record")
    offline = (f"Offline, set {ENV_DATA_DIR} to a folder of .npz shards; make them from the "
               "official archive (cifar-100-python.tar.gz, downloaded elsewhere) with "
               "`python -m experiments.make_shards --archive=... --out=DIR`.")
    if not _reachable(CIFAR_HOST):
      raise DataError(f"tfds must download {name!r} once, but {CIFAR_HOST} cannot be reached "
                      f"from this machine. {offline}")
    try:
      builder.download_and_prepare()
    except Exception as e:  # tfds surfaces network failures under many types
      raise DataError(f"downloading {name!r} for tfds failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}). {offline}") from None
  try:
    source = builder.as_data_source(split=kind)
  except NotImplementedError:  # prepared earlier as TFRecord: no random access
    source = None
  if source is None:
    examples = _tfds_as_numpy(builder, kind)
  else:
    rows = [source[i] for i in range(len(source))]  # tfds's mock lacks a working __getitems__
    examples = {key: np.stack([row[key] for row in rows]) for key in ("id", "image", "label")}
  order = np.argsort(examples["id"], kind="stable")  # original CIFAR order
  return examples["image"][order], examples["label"][order].astype(np.int32)


def _tfds_as_numpy(builder: tfds.core.DatasetBuilder, kind: str) -> dict[str, np.ndarray]:
  if importlib.util.find_spec("tensorflow") is None:
    raise DataError(
        f"tfds dataset {builder.name!r} in {builder.data_dir!r} was prepared as TFRecord, "
        f"which only TensorFlow reads. Install it ({TFDS_EXTRA}), or set TFDS_DATA_DIR to an "
        "empty folder so that it is prepared again as ArrayRecord (which also needs "
        f"TensorFlow, once), or set {ENV_DATA_DIR} to a folder of .npz shards.")
  return tfds.as_numpy(builder.as_dataset(split=kind, batch_size=-1))


# --- hold-out ----------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _holdout(source: _Source, dataset: str, val_fraction: float,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) indices into the training set: stratified, seeded, independent of order."""
  images, labels = _load_arrays(source, dataset, "train")
  n = len(labels)
  n_val = round(val_fraction * n)
  key = str(seed).encode()
  hashes = np.array(
      [
          int.from_bytes(hashlib.blake2b(im.tobytes(), digest_size=8, key=key).digest(), "little")
          for im in images
      ],
      dtype=np.uint64,
  )
  counts = np.bincount(labels, minlength=DATASETS[dataset].num_classes)
  by_class = np.lexsort((hashes, labels))  # class, then hash within class
  rank = np.empty(n, dtype=np.int64)
  rank[by_class] = np.arange(n) - (np.cumsum(counts) - counts)[labels[by_class]]
  quantile = (rank + 0.5) / counts[labels]
  chosen = np.lexsort((labels, hashes, quantile))[:n_val]
  is_val = np.zeros(n, dtype=bool)
  is_val[chosen] = True
  return np.flatnonzero(~is_val), np.flatnonzero(is_val)
