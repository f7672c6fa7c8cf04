r"""Exports the split a search found as an integer edge artifact and a float cloud artifact,
and checks them against the fake-quantized model on the test set (docs/deploy.md).

  python -m experiments.export_split --config=experiments/configs/search.py:quick \
      --workdir=workdirs/search_quick --out=workdirs/deploy_quick

``--workdir`` is a finished search made with ``--config``; its reported genome is
fine-tuned as the search evaluated it and written to ``--out``/edge and ``--out``/cloud.
``--out``/parity.json holds the agreement with the fake-quantized model on
``--parity_images`` test images.
"""

import json
import os

from absl import app, flags

from experiments import common
from maxpart_jax import runs
from maxpart_jax.checkpoint import write_json
from maxpart_jax.deploy import parity

_CONFIG = common.define_config("experiments/configs/search.py:quick",
                               "the search config the workdir was made with")
_WORKDIR = flags.DEFINE_string("workdir", None, "a finished search", required=True)
_OUT = flags.DEFINE_string("out", None, "where edge/ and cloud/ go", required=True)
_PARITY = flags.DEFINE_integer("parity_images", 10000, "test images to check parity on (0: none)")


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  edge, cloud, made = parity.export_searched(_CONFIG.value, _WORKDIR.value, _OUT.value)
  print(f"exported p={edge.spec.split} ({edge.spec.block_label}), {edge.spec.ir.bits}-bit IR "
        f"{edge.spec.ir.shape}: {edge.spec.ir.message_bytes} bytes per image; "
        f"{_OUT.value}/edge, {_OUT.value}/cloud")
  if _PARITY.value:
    test = made["test"]
    n = min(_PARITY.value, len(test))
    result = parity.parity(made["model"], made["variables"], made["genome"], edge, cloud,
                           test.images[:n], test.labels[:n])
    result["search_test_accuracy"] = made["report"]["test_accuracy"]
    result["environment"] = runs.environment()
    write_json(os.path.join(_OUT.value, "parity.json"), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
