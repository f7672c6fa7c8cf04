"""The one registry mechanism, and every registry of the package built on it."""

import pytest

from maxpart_jax import data, models
from maxpart_jax.deploy import artifact, integer
from maxpart_jax.privacy import defenses
from maxpart_jax.registry import Registry
from maxpart_jax.search import algorithms, operators


def test_a_registry_refuses_twice_checks_at_registration_and_names_every_option():
  seen = []

  def check(name, entry):
    seen.append(name)
    if entry < 0:
      raise ValueError(f"{name} is negative")

  reg = Registry("widget", check=check, aliases={"w": "wide"})
  assert reg.register("wide", 3) == 3
  assert reg.register("narrow")(1) == 1  # as a decorator
  assert seen == ["wide", "narrow"] and dict(reg) == {"wide": 3, "narrow": 1}
  assert reg.get("w") == 3 and "w" not in reg and reg.names() == ["narrow", "w", "wide"]
  assert reg.get("wid", None) is None and reg.get("w", None) == 3  # dict.get with a default
  with pytest.raises(ValueError, match="a widget named 'wide' is already registered"):
    reg.register("wide", 4)
  with pytest.raises(ValueError, match="a widget named 'w' is already registered"):
    reg.register("w", 4)
  with pytest.raises(ValueError, match="bad is negative"):
    reg.register("bad", -1)
  assert "bad" not in reg
  with pytest.raises(ValueError, match=r"unknown widget 'wid'; registered: \['narrow', 'w', "
                                       r"'wide'\]"):
    reg.get("wid")
  assert reg.unregister("narrow") == 1 and reg.unregister("narrow", missing_ok=True) is None
  with pytest.raises(ValueError, match="unknown widget 'narrow'"):
    reg.unregister("narrow")


@pytest.mark.parametrize("registry, kind", [
    (models.MODELS, "model"), (data.DATASETS, "dataset"), (defenses.DEFENSES, "defense"),
    (algorithms.ALGORITHMS, "search algorithm"), (operators.OPERATORS["mutate"], "mutate operator"),
    (integer.BLOCKS, "block type with an integer form"),
    (artifact.INTEGER_DEFENSES, "defense with an integer form")])
def test_every_registry_of_the_package_speaks_with_one_error(registry, kind):
  assert isinstance(registry, Registry) and len(registry) > 0
  with pytest.raises(ValueError, match=f"unknown {kind} 'nope'; registered: "):
    registry.get("nope")


def test_the_lookups_refuse_unknown_names_through_their_registry():
  with pytest.raises(ValueError, match=r"unknown model 'alexnet'; registered: \[.*'mobilenet'"):
    models.get_model("alexnet")
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    data.dataset_info("mnist")
  with pytest.raises(ValueError, match="unknown search algorithm 'sa'"):
    algorithms.get_algorithm("sa")
  with pytest.raises(ValueError, match="unknown defense 'blur'"):
    defenses.parse_stack("blur:1")
  assert models.get_model("mobilenet", width=0.25).name == "mobilenet_v1"
