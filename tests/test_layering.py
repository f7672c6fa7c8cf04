"""The package's layers, read from its imports (every import, also those inside functions):
the library below (core, privacy, search, deploy), the jobs above it, the studies on top;
no module imports a layer above its own and no imports go round in a circle."""

from __future__ import annotations

import ast
import collections
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "maxpart_jax")
# Each part of the package and the parts it may import. The core is every module not in a
# subpackage listed here (models, quant, genome, data, costs, train, checkpoint, ...).
MAY_IMPORT = {
    "core": {"core"},
    "privacy": {"core", "privacy"},
    "search": {"core", "privacy", "search"},
    "deploy": {"core", "privacy", "deploy"},
    "jobs": {"core", "privacy", "search", "deploy", "jobs"},
    "studies": {"core", "privacy", "search", "deploy", "jobs", "studies"},
}


def modules(root: str = PACKAGE) -> dict[str, str]:
  """Every module of the package by dotted name, with its file."""
  found = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def import_graph(found: dict[str, str]) -> dict[str, set[str]]:
  """Module → the package's modules it imports (``from pkg import mod`` counts as ``mod``)."""

  def known(name: str) -> str:
    while name not in found:
      name = name.rsplit(".", 1)[0]
    return name

  graph = collections.defaultdict(set)
  for module, path in found.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base
                 for a in node.names]
      else:
        continue
      graph[module] |= {known(n) for n in names if n.split(".")[0] == "maxpart_jax"} - {module}
  return graph


def part(module: str) -> str:
  sub = module.split(".")[1] if module.count(".") else ""
  return sub if sub in MAY_IMPORT else "core"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_package_has_no_import_circles():
  assert circles(import_graph(modules())) == []


def test_no_module_imports_a_layer_above_its_own():
  upward = [f"{m} ({part(m)}) imports {t} ({part(t)})"
            for m, targets in sorted(import_graph(modules()).items()) for t in sorted(targets)
            if part(t) not in MAY_IMPORT[part(m)]]
  assert upward == []


def test_the_import_reader_finds_circles_and_upward_imports(tmp_path):
  """On a hand-made package: a circle through a lazy import and a relative import, and a
  library module importing a job."""
  root = tmp_path / "maxpart_jax"
  for sub in ("search", "jobs"):
    (root / sub).mkdir(parents=True)
    (root / sub / "__init__.py").write_text("")
  (root / "__init__.py").write_text("")
  (root / "genome.py").write_text("def f():\n  from maxpart_jax.search import fitness\n")
  (root / "search" / "fitness.py").write_text("from .. import genome\n")
  (root / "search" / "driver.py").write_text("from maxpart_jax.jobs.storage import x\n")
  (root / "jobs" / "storage.py").write_text("import maxpart_jax.search.fitness\n")
  graph = import_graph(modules(str(root)))
  assert circles(graph) == [["maxpart_jax.genome", "maxpart_jax.search.fitness"]]
  assert graph["maxpart_jax.search" + ".driver"] == {"maxpart_jax.jobs.storage"}
  assert [part(m) for m in ("maxpart_jax.genome", "maxpart_jax.search" + ".driver",
                            "maxpart_jax.jobs.storage")] == ["core", "search", "jobs"]


def test_no_module_of_the_package_imports_pyplot_or_chooses_a_backend():
  """Figures come from :mod:`maxpart_jax.plotting` (``matplotlib.figure.Figure``): importing
  the package leaves a notebook's backend alone."""
  offenders = []
  for module, path in sorted(modules().items()):
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      imported = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                  [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      called = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "use" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "matplotlib")
      if called or any(name.startswith("matplotlib.pyplot") for name in imported):
        offenders.append(f"{module}:{node.lineno}")
  assert offenders == []


def test_the_energy_model_is_computed_in_one_module():
  """Every energy and time charged is built from :mod:`maxpart_jax.energy`'s functions: no
  other module reads the device's energy constants or MAC rates to compute a cost (a device
  is built, replaced or reported elsewhere, not priced)."""
  priced = {"mac_pj_per_bit", "mac_pj_offset", "mem_pj_per_bit", "mac_seconds",
            "mac_rate_gmacs"}
  offenders = []
  for module, path in sorted(modules().items()):
    if module == "maxpart_jax.energy":
      continue
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      name = (node.attr if isinstance(node, ast.Attribute) else
              node.id if isinstance(node, ast.Name) else None)
      if name in priced:
        offenders.append(f"{module}:{node.lineno} {name}")
  assert offenders == []
