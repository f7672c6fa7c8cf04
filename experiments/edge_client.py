r"""Runs the edge half of an exported split on images and sends the IRs to the cloud service
(docs/deploy.md).

  python -m experiments.edge_client --artifact=workdirs/deploy_quick/edge \
      --server=http://127.0.0.1:8000 --images=test:256

``--token_file`` holds the service's bearer token, if it has one; ``--ca_file`` a CA
certificate to verify an HTTPS service with (e.g. a self-signed one). A service that cannot
be reached, refuses or answers something else ends the client with a one-line error.

``--images``: ``test:N`` (the first N test images of the dataset the artifact was made
for, read from ``--data_dir`` or $MAXPART_DATA_DIR) or an ``.npz`` file with a uint8
``image`` array (N, 32, 32, 3) and optionally ``label``. Prints the predictions, the
accuracy when labels are known, images per second and bytes sent per image.
"""

import json

from absl import app, flags
import numpy as np

from maxpart_jax import data, runs
from maxpart_jax.deploy import artifact, service

_ARTIFACT = flags.DEFINE_string("artifact", None, "an exported edge artifact", required=True)
_SERVER = flags.DEFINE_string("server", "http://127.0.0.1:8000", "the cloud service")
_IMAGES = flags.DEFINE_string("images", "test:256", "test:N or an .npz file (image, label)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "dataset folder for test:N "
                                "(default: $MAXPART_DATA_DIR, else tensorflow-datasets)")
_BATCH = flags.DEFINE_integer("batch_size", 64, "images per request")
_OUT = flags.DEFINE_string("out", None, "also write the summary as JSON here")
_TOKEN_FILE = flags.DEFINE_string("token_file", None, "a file holding the service's bearer token")
_CA_FILE = flags.DEFINE_string("ca_file", None, "CA certificate (PEM) to verify HTTPS with")


def load_images(spec: str, dataset: str, data_dir: str | None
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """``(uint8 images, labels or None)`` named by ``--images``."""
  if spec.startswith("test:"):
    count = spec[len("test:"):]
    if not count.isdigit() or int(count) < 1:
      raise ValueError(f"--images={spec}: expected test:N with N >= 1")
    test = data.load_split("test", dataset=dataset, data_dir=data_dir)
    return test.images[:int(count)], test.labels[:int(count)]
  with np.load(spec) as stored:
    if "image" not in stored:
      raise ValueError(f"{spec} has no 'image' array (found: {', '.join(stored.files)})")
    return stored["image"], stored["label"] if "label" in stored else None


def main(argv: list[str]) -> None:
  del argv
  try:
    edge = artifact.EdgeProgram.load(_ARTIFACT.value)
    images, labels = load_images(_IMAGES.value, edge.spec.dataset, _DATA_DIR.value)
    client = service.Client(_SERVER.value, token=service.read_token(_TOKEN_FILE.value),
                            ca_file=_CA_FILE.value)
    result = service.run_client(edge, client, images, labels, _BATCH.value)
  except (service.ServiceError, ValueError, OSError) as e:  # DataError is a ValueError
    raise SystemExit(f"edge_client: {e}") from None
  shown = result["predictions"][:16]
  print(f"predictions: {shown}{' ...' if len(result['predictions']) > 16 else ''}")
  if "accuracy" in result:
    print(f"accuracy: {result['accuracy']:.4f} on {result['images']} images")
  print(f"{result['images_per_second']:.1f} images/s end to end; {result['bytes_per_image']:.0f} "
        f"bytes sent per image (raw image: {result['raw_image_bytes']} bytes)")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({**result, "environment": runs.environment()}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
