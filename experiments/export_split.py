r"""Exports the split a search found as an integer edge artifact and a float cloud artifact,
and checks them against the fake-quantized model on the test set (docs/deploy.md).

  python -m experiments.export_split --config=experiments/configs/search.py:quick \
      --workdir=workdirs/search_quick --out=workdirs/deploy_quick

``--workdir`` is a finished search made with ``--config``; its reported genome is
fine-tuned as the search evaluated it and written to ``--out``/edge and ``--out``/cloud.
``--out``/parity.json holds the agreement with the fake-quantized model on
``--parity_images`` test images. For a defended search (``config.defense.stack``), the
defended answer (stage 2's fine-tuning, its defenses: a bottleneck as one more integer
layer) is exported, and parity is measured against the defended deployment.
"""

import json
import os

from absl import app, flags
import jax

from experiments import common
from maxpart_jax import runs
from maxpart_jax.checkpoint import write_json
from maxpart_jax.deploy import parity
from maxpart_jax.deploy import defended as deploy_defended
from maxpart_jax.jobs import defense_stage, export
from maxpart_jax.jobs.settings import stack_from_config

_CONFIG = common.define_config("experiments/configs/search.py:quick",
                               "the search config the workdir was made with")
_WORKDIR = flags.DEFINE_string("workdir", None, "a finished search", required=True)
_OUT = flags.DEFINE_string("out", None, "where edge/ and cloud/ go", required=True)
_PARITY = flags.DEFINE_integer("parity_images", 10000, "test images to check parity on (0: none)")


def _defended_answer() -> tuple:
  """A defended search's answer, exported with its defenses, and how to measure its parity."""
  d, genome, made = defense_stage.load_answer(_CONFIG.value, _WORKDIR.value)
  edge, cloud = deploy_defended.export(d, genome, made["model_spec"], _OUT.value)
  key = jax.random.key(_CONFIG.value.search.seed + 6)
  return (edge, cloud, f" with {d.stack.spec()}", made["test"],
          made["report"]["answer"]["test_accuracy"],
          lambda images, labels: deploy_defended.export_parity(d, edge, cloud, images, key, labels))


def _searched_answer() -> tuple:
  """A search's answer, exported, and how to measure its parity."""
  edge, cloud, made = export.export_searched(_CONFIG.value, _WORKDIR.value, _OUT.value)
  return (edge, cloud, "", made["test"], made["report"]["test_accuracy"],
          lambda images, labels: parity.parity(made["model"], made["variables"], made["genome"],
                                               edge, cloud, images, labels))


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  defended_search = bool(stack_from_config(_CONFIG.value).items)
  edge, cloud, defenses, test, search_accuracy, measure = (
      _defended_answer() if defended_search else _searched_answer())
  print(f"exported p={edge.spec.split} ({edge.spec.block_label}), {edge.spec.ir.bits}-bit IR "
        f"{edge.spec.ir.shape}{defenses}: {edge.spec.ir.message_bytes} bytes per image; "
        f"{_OUT.value}/edge, {_OUT.value}/cloud")
  if _PARITY.value:
    n = min(_PARITY.value, len(test))
    result = measure(test.images[:n], test.labels[:n])
    result.update(search_test_accuracy=search_accuracy, environment=runs.environment())
    write_json(os.path.join(_OUT.value, "parity.json"), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
