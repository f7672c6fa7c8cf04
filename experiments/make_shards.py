r"""Makes the ``.npz`` shards that ``MAXPART_DATA_DIR`` reads from the official CIFAR archives.

  python -m experiments.make_shards --archive=cifar-100-python.tar.gz --out=data/cifar100
  export MAXPART_DATA_DIR=data/cifar100

For machines without internet access at run time: download the "python version"
archive once elsewhere (https://www.cs.toronto.edu/~kriz/cifar.html:
``cifar-100-python.tar.gz`` or ``cifar-10-python.tar.gz``), copy it over, and run this.
Needs neither TensorFlow nor tfds. The archive holds pickles, and unpickling runs code:
it is read only if its MD5 is the published one (or the one ``--md5`` vouches for). Writes ``train-00.npz`` … (10 000 images each) and
``test-00.npz`` in the original order, each with ``image`` (N, 32, 32, 3) uint8 RGB and
``label`` (fine labels for CIFAR-100, plus ``coarse_label``).
"""

from __future__ import annotations

import os
import pickle
import tarfile

from absl import app, flags
import numpy as np

from maxpart_jax import checkpoint

_ARCHIVE = flags.DEFINE_string("archive", None, "cifar-100-python.tar.gz or cifar-10-python.tar.gz",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "folder for the shards", required=True)
_SHARD = flags.DEFINE_integer("shard_size", 10_000, "images per shard")
_MD5 = flags.DEFINE_string("md5", None, "also accept an archive with this MD5 (one you trust: "
                           "it is unpickled)")

PUBLISHED_MD5 = {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
"""The MD5 sums https://www.cs.toronto.edu/~kriz/cifar.html publishes for its archives."""

# Members of each archive, per split, in the original order.
MEMBERS = {
    "cifar-100-python": {"train": ["train"], "test": ["test"]},
    "cifar-10-batches-py": {"train": [f"data_batch_{i}" for i in range(1, 6)],
                            "test": ["test_batch"]},
}


def read_archive(path: str, accept_md5: tuple[str, ...] = tuple(PUBLISHED_MD5.values())
                 ) -> dict[str, dict[str, np.ndarray]]:
  """``{"train": arrays, "test": arrays}`` from an official CIFAR python archive;
  ``ValueError`` before anything is unpickled if its MD5 is not in ``accept_md5``."""
  got = checkpoint.file_digest(path, "md5")
  if got not in accept_md5:
    published = ", ".join(f"{name} {digest}" for name, digest in PUBLISHED_MD5.items())
    raise ValueError(f"{path} has MD5 {got}, not that of a published CIFAR archive ({published})."
                     " Its pickles are not unpickled (that runs code): download it again from "
                     f"https://www.cs.toronto.edu/~kriz/cifar.html, or pass --md5={got} if you "
                     "trust this file")
  with tarfile.open(path, "r:gz") as tar:
    names = {m.name for m in tar.getmembers()}
    root = next((r for r in MEMBERS if any(n.startswith(r + "/") for n in names)), None)
    if root is None:
      raise ValueError(f"{path} is not an official CIFAR python archive: it has none of the "
                       f"folders {sorted(MEMBERS)}")
    out = {}
    for split, members in MEMBERS[root].items():
      parts = []
      for member in members:
        with tar.extractfile(f"{root}/{member}") as f:
          parts.append(pickle.load(f, encoding="bytes"))
      out[split] = _arrays(parts)
  return out


def _arrays(parts: list[dict[bytes, object]]) -> dict[str, np.ndarray]:
  """Images as (N, 32, 32, 3) uint8 (the archive stores rows of 1024 R, 1024 G, 1024 B)."""
  data = np.concatenate([np.asarray(p[b"data"], np.uint8) for p in parts])
  arrays = {"image": data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)}
  fine = b"fine_labels" if b"fine_labels" in parts[0] else b"labels"
  arrays["label"] = np.concatenate([np.asarray(p[fine], np.int64) for p in parts])
  if b"coarse_labels" in parts[0]:
    arrays["coarse_label"] = np.concatenate([np.asarray(p[b"coarse_labels"], np.int64)
                                             for p in parts])
  return arrays


def write_shards(arrays: dict[str, dict[str, np.ndarray]], out: str,
                 shard_size: int = 10_000) -> list[str]:
  """Writes ``<split>-NN.npz`` shards of ``shard_size`` images; returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = []
  for split, columns in arrays.items():
    n = len(columns["image"])
    for i, start in enumerate(range(0, n, shard_size)):
      path = os.path.join(out, f"{split}-{i:02d}.npz")
      np.savez(path, **{k: v[start:start + shard_size] for k, v in columns.items()})
      paths.append(path)
  return paths


def main(argv: list[str]) -> None:
  del argv
  try:
    arrays = read_archive(_ARCHIVE.value, tuple(PUBLISHED_MD5.values()) + tuple(
        filter(None, [_MD5.value])))
  except (OSError, tarfile.TarError, ValueError) as e:
    raise app.UsageError(f"cannot read {_ARCHIVE.value}: {e}") from None
  paths = write_shards(arrays, _OUT.value, _SHARD.value)
  print(f"wrote {len(paths)} shards ({len(arrays['train']['image'])} train, "
        f"{len(arrays['test']['image'])} test images) to {_OUT.value}; now "
        f"export MAXPART_DATA_DIR={_OUT.value}")


if __name__ == "__main__":
  app.run(main)
