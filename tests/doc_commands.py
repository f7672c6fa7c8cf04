"""Parses experiment commands through their scripts' absl flags, in a process of its own.

Reads a JSON list of ``{"script": "experiments.search", "argv": [...], "where": "..."}`` on
stdin and prints a JSON list of ``{"where": ..., "error": ...}`` for each command whose flags,
config file, config variant or ``--config.field`` overrides the script would refuse. Each
script is imported once; the flags a command adds (its ``--config.field`` overrides) and, after
its last command, the flags its script defined are removed, so scripts that define the same
flag names can be checked one after another. Run from the repository root.
"""

from __future__ import annotations

import collections
import importlib
import json
import sys

from absl import flags


def check(commands: list[dict]) -> list[dict]:
  """The commands that fail to parse, each with the error absl or ml_collections raised."""
  errors = []
  by_script = collections.defaultdict(list)
  for command in commands:
    by_script[command["script"]].append(command)
  fv = flags.FLAGS
  for script, script_commands in by_script.items():
    before = set(fv)
    try:
      importlib.import_module(script)
    except Exception as e:  # pylint: disable=broad-except  (reported, not raised)
      errors += [{"where": c["where"], "error": f"cannot import {script}: {e!r}"}
                 for c in script_commands]
      continue
    own = set(fv)
    for command in script_commands:
      argv = [script, *command["argv"]]
      sys.argv = argv  # ml_collections reads the --config.field overrides from sys.argv
      try:
        fv(argv)
      except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
        errors.append({"where": command["where"], "error": f"{type(e).__name__}: {e}"})
      fv.unparse_flags()
      for name in set(fv) - own:
        delattr(fv, name)
    for name in own - before:
      delattr(fv, name)
  return errors


if __name__ == "__main__":
  json.dump(check(json.load(sys.stdin)), sys.stdout)
