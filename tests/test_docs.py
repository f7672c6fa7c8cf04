"""The README and the docs pages say only what works: every experiment command they show
parses through its script's flags and config, every relative link resolves, and the README
is a front page whose test command is the one CI runs."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
SEPARATORS = {"&&", "||", ";", "|", "&", "do", "then", "else"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "<<"}
PYTHONS = re.compile(r"^(\S*/)?python(3(\.\d+)?)?$")
# run_quick.sh's first arguments choose the search config; the rest go to experiments.search.
RUN_QUICK = {"--ga": "quick", "--defended": "quick_defended"}


def read(page: str) -> str:
  with open(os.path.join(REPO, page)) as f:
    return f.read()


def bash_blocks(text: str) -> list[tuple[int, str]]:
  """The fenced ```bash blocks of a markdown text, each with the line it starts on."""
  return [(text[:m.start()].count("\n") + 2, m.group(1))
          for m in re.finditer(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, re.M | re.S)]


def simple_commands(block: str) -> list[list[str]]:
  """The simple commands of a shell block (continuations joined, comments, redirections,
  ``VAR=value`` prefixes and ``time`` / ``nohup`` / ``taskset -c N`` wrappers dropped)."""
  tokens = []
  for line in block.replace("\\\n", " ").splitlines():
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens += [*lexer, ";"]
  commands, words, skip = [], [], False
  for token in tokens:
    if skip:
      skip = False
    elif token in REDIRECTS:
      skip = True
      if words and words[-1].isdigit():
        words.pop()
    elif token in SEPARATORS:
      if words:
        commands.append(words)
      words = []
    else:
      words.append(token)
  return [strip_wrappers(c) for c in commands]


def strip_wrappers(words: list[str]) -> list[str]:
  """``A=1 time nohup taskset -c 0 python ...`` → ``python ...``."""
  while words:
    if re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in ("time", "nohup", "exec"):
      words = words[1:]
    elif words[0] == "taskset":
      words = words[3:] if len(words) > 1 and words[1] == "-c" else words[2:]
    else:
      break
  return words


def experiment_commands(pages: list[str]) -> tuple[list[dict], list[str]]:
  """Every ``python -m experiments.X`` (and ``bash experiments/run_quick.sh``) command of the
  pages as ``{"script", "argv", "where"}``, and the problems found without parsing flags (a
  shell script or an experiment module that does not exist)."""
  commands, problems = [], []
  for page in pages:
    for line, block in bash_blocks(read(page)):
      for words in simple_commands(block):
        where = f"{page}:{line}: {' '.join(words)[:160]}"
        if len(words) >= 3 and PYTHONS.match(words[0]) and words[1] == "-m" \
            and words[2].startswith("experiments."):
          if not os.path.exists(os.path.join(REPO, *words[2].split(".")) + ".py"):
            problems.append(f"{where}: no such script")
            continue
          commands.append({"script": words[2], "argv": words[3:], "where": where})
        elif words[0] == "bash" and len(words) > 1:
          if not os.path.exists(os.path.join(REPO, words[1])):
            problems.append(f"{where}: no such file {words[1]}")
          elif words[1] == "experiments/run_quick.sh":
            commands.append(run_quick_command(words[2:], where))
  return commands, problems


def run_quick_command(args: list[str], where: str) -> dict:
  """The experiments.search command that run_quick.sh runs for ``args``."""
  variant = "quick_solver"
  if args and args[0] in RUN_QUICK:
    variant, args = RUN_QUICK[args[0]], args[1:]
  if args and args[0] == "--retrain":
    args = ["--config.model_dir=workdirs/cpu_resnet18/model", *args[1:]]
  return {"script": "experiments.search", "where": where,
          "argv": [f"--config=experiments/configs/search.py:{variant}",
                   "--workdir=workdirs/search", *args]}


def parse_errors(commands: list[dict]) -> list[dict]:
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "doc_commands.py")],
                        input=json.dumps(commands), capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


def test_every_experiment_command_in_the_readme_and_docs_parses_with_its_flags():
  """Each command goes through its script's absl flags and ml_collections config (the file,
  the variant, every ``--config.field`` override), as ``app.run`` would parse it. Three
  planted commands (an unknown flag, an unknown variant, a misspelt override) must be the
  only ones refused, so the check itself is shown to refuse what the scripts refuse."""
  commands, problems = experiment_commands(PAGES)
  assert not problems, "\n".join(problems)
  assert len(commands) >= 20, f"only {len(commands)} experiment commands found"
  planted = [
      {"script": "experiments.search", "where": "planted: flag",
       "argv": ["--config=experiments/configs/search.py:quick", "--workdir=w", "--wrkdir=w"]},
      {"script": "experiments.search", "where": "planted: variant",
       "argv": ["--config=experiments/configs/search.py:quik", "--workdir=w"]},
      {"script": "experiments.train", "where": "planted: override",
       "argv": ["--config=experiments/configs/train.py:smoke", "--workdir=w",
                "--config.num_epoch=2"]}]
  errors = parse_errors(commands + planted)
  refused = {e["where"]: e["error"] for e in errors}
  assert {p["where"] for p in planted} <= set(refused), errors
  wrong = [f"{where}\n    {error}" for where, error in refused.items()
           if not where.startswith("planted")]
  assert not wrong, "commands the scripts would refuse:\n" + "\n".join(wrong)


def test_the_command_reader_splits_shell_lines_as_bash_does():
  """Continuations, pipes, redirections, loops, env prefixes and wrappers (hand-read)."""
  block = ("export A=1\n"
           "taskset -c 0 .venv/bin/python -m experiments.search --config=c.py:quick \\\n"
           "    --config.search.solver.margins='()' > log 2>&1 &  # a comment\n"
           "for isa in X Y; do XLA_FLAGS=--f=$isa python -m pytest -q; done\n"
           "time nohup python3 -m experiments.train --workdir=\"a b\" | tail -1\n")
  assert simple_commands(block) == [
      ["export", "A=1"],
      [".venv/bin/python", "-m", "experiments.search", "--config=c.py:quick",
       "--config.search.solver.margins=()"],
      ["for", "isa", "in", "X", "Y"],
      ["python", "-m", "pytest", "-q"], ["done"],
      ["python3", "-m", "experiments.train", "--workdir=a b"], ["tail", "-1"]]


def test_every_relative_link_in_the_readme_and_docs_resolves():
  missing = []
  for page in PAGES:
    for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", read(page)):
      target = m.group(1).split("#")[0]
      if not target or re.match(r"^[a-z]+:", target):
        continue
      if not os.path.exists(os.path.join(REPO, os.path.dirname(page), target)):
        missing.append(f"{page}: {m.group(0)}")
  assert not missing, "links to nothing:\n" + "\n".join(missing)


def test_the_readme_is_a_front_page_with_the_two_commands_at_the_top():
  """At most 300 lines; the main job and the test command each on a line of their own in
  the first 100 lines, the test command exactly what CI runs."""
  readme = read("README.md").splitlines()
  assert len(readme) <= 300, f"README.md has {len(readme)} lines"
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = f.read().strip().splitlines()[-1]
  top = [line.strip() for line in readme[:100]]
  assert "bash experiments/run_quick.sh" in top
  assert ci in top, f"the README's first 100 lines lack CI's command {ci!r}"
