"""The README's and the docs' code run as written, every docstring example
runs, the documentation builds without a warning, and every public name is in
its API reference."""

import ast
import doctest
import functools
import importlib
import importlib.util
import inspect
import io
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import tokenize

import pytest

import hidlr_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(hidlr_optax.__path__, "hidlr_optax.")
)
#: Public modules whose names the API reference must document.
PUBLIC_MODULES = ["hidlr_optax"] + [m for m in MODULES if not m.rsplit(".", 1)[1].startswith("_")]
#: Docs pages whose ```python blocks run, in this order, in one namespace.
RUNNABLE_PAGES = ("getting_started.md", "diagnostics.md")


def python_blocks(path: pathlib.Path) -> list[str]:
  """The ```python blocks of a Markdown file, in order."""
  return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def test_readme_code_blocks_run():
  """Every ```python block of the README, in order, in one namespace."""
  text = (ROOT / "README.md").read_text()
  blocks = python_blocks(ROOT / "README.md")
  recipe = re.search(r"## Quickstart: the recipe.*?```python\n(.*?)```", text, re.S).group(1)
  quickstart = re.search(r"## The paper.s rule.*?```python\n(.*?)```", text, re.S).group(1)
  assert blocks[:2] == [recipe, quickstart]
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"README python block {i}", "exec"), namespace)
    if block == recipe:  # own-batch probes, the decay and the guard, from total_steps
      state = hidlr_optax.find_states(namespace["opt_state"])[0]
      assert set(hidlr_optax.learning_rates(namespace["opt_state"])) == {"body", "head"}
      assert isinstance(state.guard, hidlr_optax.LossGuard)
      assert int(state.count) == namespace["total_steps"]
      assert float(namespace["loss"]) < 0.2 * float(namespace["first_loss"])
      namespace.clear()  # the quickstart starts afresh
    elif block == quickstart:
      rates = hidlr_optax.learning_rates(namespace["opt_state"])
      assert set(rates) == {"body", "head"}
      assert float(namespace["loss"]) < 0.5


def test_readme_says_the_base_is_a_direction():
  """Right after the quickstart, one bold line: a direction, not a full optimizer."""
  text = (ROOT / "README.md").read_text()
  after = re.search(r"## Quickstart[^\n]*\s+```python\n.*?```\n\n(.*?)\n", text, re.S).group(1)
  assert after.startswith("**") and after.endswith("**")
  for name in ("optax.scale_by_adam()", "optax.adam(1e-3)", "check_direction"):
    assert name in after


def test_nnx_snippet_does_what_make_nnx_train_step_does():
  """The Flax page's hand-written NNX step merges the rest as arrays (BatchNorm
  works in value_fn), as `make_nnx_train_step` does."""
  snippet = python_blocks(DOCS / "flax.md")[0]
  source = inspect.getsource(hidlr_optax.make_nnx_train_step)
  for line in ("rest = nnx.as_pure(rest)", "nnx.merge(graphdef, params, rest)"):
    assert line in snippet and line in source, line


def test_readme_keeps_the_setup_commands_first():
  """The title, then the demo and test commands (`.ci/run` runs the second)."""
  lines = (ROOT / "README.md").read_text().splitlines()
  assert lines[0] == "# hidlr-optax" and lines[2] == "```bash" and lines[5] == "```"
  assert lines[3].endswith(".venv/bin/python examples/demo.py")
  assert lines[4].endswith(".venv/bin/python -m pytest -q -n 2")
  assert lines[4].split("&& ", 1)[1] in (ROOT / ".ci" / "run").read_text()


def test_docs_code_blocks_run():
  """The runnable pages' ```python blocks (the quickstart, then diagnostics);
  on getting_started, the caller's refresh schedule and make_train_step with
  a schedule do what the page says."""
  text = (DOCS / "getting_started.md").read_text()
  callers = re.search(r"can also be the caller's.*?```python\n(.*?)```", text, re.S).group(1)
  made = re.search(r"Warm-up and decay go to.*?```python\n(.*?)```", text, re.S).group(1)
  assert "make_train_step(" in made and "schedule=" in made
  namespace, refreshes, seen = {}, None, set()
  for page in RUNNABLE_PAGES:
    blocks = python_blocks(DOCS / page)
    assert blocks, page
    for i, block in enumerate(blocks):
      exec(compile(block, f"docs/{page} python block {i}", "exec"), namespace)
      if page != "getting_started.md":
        continue
      state = hidlr_optax.find_states(namespace["opt_state"])[0]
      if i == 0:  # the quickstart, Hi-DLR's own schedule
        refreshes = int(state.num_refreshes)
      elif block == callers:  # the caller's refresh schedule, continuing from the quickstart
        assert int(state.num_refreshes) == refreshes + 13  # steps 0, 8, ..., 96
        assert float(namespace["loss"]) < 0.5
        seen.add("callers")
      elif block == made:  # make_train_step with a schedule, check_direction quiet
        assert int(state.count) == namespace["total_steps"]
        assert int(state.num_refreshes) == 13  # Hi-DLR's own schedule: steps 0, 8, ..., 96
        assert float(namespace["loss"]) < 0.5
        seen.add("made")
  assert seen == {"callers", "made"}
  assert set(hidlr_optax.learning_rates(namespace["opt_state"])) == {"body", "head"}
  hidlr_optax.check_direction(namespace["opt_state"])  # the quickstart's base is a direction
  with pytest.raises(ValueError, match="pointed uphill"):  # the diagnostics page's mistake
    hidlr_optax.check_direction(namespace["state"])


#: A repository path in backticks: one of the checkout's top-level folders, then more.
_REPO_PATH = re.compile(
    r"`+((?:\.ci|benchmarks|data|docs|examples|hidlr_optax|notebooks|tests)/[^`\s]*)`+")
#: A markdown link's target: ``[text](target)``, up to an anchor or a title.
_LINK = re.compile(r"\]\(<?([^)#\s>]+)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
#: Characters of a path template (``revisions_<name>.md``, ``{backend}``, globs).
_TEMPLATE = re.compile(r"[<>{}*?$]")


def _tracked_sources(*patterns: str) -> list[pathlib.Path]:
  """The checkout's files matching ``patterns`` that git does not ignore."""
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                        *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
  return [ROOT / name for name in out.stdout.splitlines() if (ROOT / name).exists()]


def _generated(path: pathlib.Path, folder: bool) -> bool:
  """Whether git ignores ``path`` (a ``folder`` if so cited): a build output, the
  docs' mirrors, ..."""
  name = str(path) + ("/" if folder else "")
  proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=ROOT)
  return proc.returncode == 0


@functools.cache
def _mirrors() -> tuple:
  return _docs_conf().MIRRORS


def _unmirrored(path: pathlib.Path) -> pathlib.Path:
  """A path into the docs' mirrors (``docs/benchmarks/...``) as its source's."""
  for source, target in _mirrors():
    if path == target or target in path.parents:
      return source / path.relative_to(target)
  return path


def _comments_and_docstrings(path: pathlib.Path) -> list[str]:
  """A Python file's comments and docstrings, or a shell script's comments."""
  text = path.read_text()
  if path.suffix != ".py":
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]
  tokens = tokenize.generate_tokens(io.StringIO(text).readline)
  comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
  nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  docstrings = [ast.get_docstring(node, clean=False) for node in ast.walk(ast.parse(text))
                if isinstance(node, nodes)]
  return comments + [d for d in docstrings if d]


def _missing(cited: list[tuple[pathlib.Path, str, pathlib.Path]]) -> list[str]:
  """``where: what`` for each cited path that is neither there nor generated."""
  out = []
  for where, what, path in cited:
    path = _unmirrored(path.resolve())
    if not (path.exists() or _TEMPLATE.search(what) or _generated(path, what.endswith("/"))):
      out.append(f"{where.relative_to(ROOT)}: {what}")
  return out


def test_paths_cited_by_the_docs_exist():
  """Every relative markdown link of the README and the docs, and every repository
  path they give in backticks, names a file or folder of the checkout (links into
  the docs' mirrors of ``benchmarks/`` and ``notebooks/`` count as their sources)."""
  cited = []
  for page in _tracked_sources("README.md", "docs/*.md"):
    text = _FENCE.sub("", page.read_text())
    cited += [(page, link, page.parent / link) for link in _LINK.findall(text)
              if "://" not in link and not link.startswith("mailto:")]
    cited += [(page, p, ROOT / p.split("::")[0]) for p in _REPO_PATH.findall(text)]
  assert len(cited) > 100  # the scan sees the links
  missing = _missing(cited)
  assert not missing, f"the docs cite paths that do not exist: {missing}"


def test_paths_cited_by_code_comments_and_docstrings_exist():
  """Every repository path in backticks in the comments and docstrings of the
  code (the package, examples, benchmarks, tests, docs' configuration, scripts)."""
  cited = [
      (source, p, ROOT / p.split("::")[0])
      for source in _tracked_sources("*.py", "*.sh", ".ci/run")
      for text in _comments_and_docstrings(source)
      for p in _REPO_PATH.findall(text)
  ]
  assert len(cited) > 10
  missing = _missing(cited)
  assert not missing, f"comments and docstrings cite paths that do not exist: {missing}"


def test_the_path_checks_catch_a_missing_path_and_pass_generated_ones():
  page = ROOT / "README.md"
  assert _missing([(page, "docs/no_such_page.md", ROOT / "docs" / "no_such_page.md")])
  assert not _missing([
      (page, "docs/_build/html", ROOT / "docs" / "_build" / "html"),  # ignored: generated
      (page, "revisions_<name>.md", ROOT / "revisions_<name>.md"),  # a template
      (page, "overhead_cpu.md", DOCS / "benchmarks" / "results" / "overhead_cpu.md"),  # mirrored
  ])
  assert _missing([(page, "x.md", DOCS / "benchmarks" / "results" / "no_such_result.md")])
  assert _REPO_PATH.findall("see ``docs/method.md`` and `tests/test_docs.py::test_x`") == [
      "docs/method.md", "tests/test_docs.py::test_x"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  # Every example in the module ran (a collection problem would run none).
  assert result.attempted >= inspect.getsource(module).count(">>> "), result


def _docs_conf():
  """docs/conf.py as a module (its helpers decide what the API page shows)."""
  spec = importlib.util.spec_from_file_location("hidlr_docs_conf", DOCS / "conf.py")
  conf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(conf)
  return conf


def _public(modname: str) -> list[str]:
  module = importlib.import_module(modname)
  return list(getattr(module, "__all__", []))


@pytest.mark.parametrize("modname", PUBLIC_MODULES)
def test_every_public_name_has_documentation(modname):
  """A docstring of its own for each public function and class, and a `#:`
  comment (or the docs' EXTRA_DOCS entry) for each constant."""
  conf = _docs_conf()
  module = importlib.import_module(modname)
  undocumented = [f"{modname}.{name}" for name in conf.public_names(module)
                  if not conf.describe(module, name)[1]]
  assert not undocumented, (
      f"public names without documentation (the API reference would show them bare): "
      f"{undocumented}; give each a docstring, or a `#:` comment above a constant")


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
  """`sphinx-build -W` passes offline, and the API reference holds every public
  name of every public module (`__all__`), each under its own anchor."""
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       "-d", str(tmp_path / ".doctrees"), str(DOCS), str(tmp_path / "html")],
      capture_output=True, text=True, cwd=ROOT,
      env={**os.environ, "HIDLR_DOCS_INTERSPHINX": "0"}, timeout=900)
  assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout}\n{result.stderr}"
  out = tmp_path / "html"
  assert (out / "index.html").exists() and (out / "notebooks" / "quickstart.html").exists()
  html = (out / "api.html").read_text()
  missing = []
  for modname in PUBLIC_MODULES:
    if f'id="module-{modname}"' not in html:
      missing.append(f"{modname} (the module: add a section to docs/api.md)")
    for name in _public(modname):
      obj = getattr(importlib.import_module(modname), name)
      anchor = f"module-{modname}.{name}" if inspect.ismodule(obj) else f"{modname}.{name}"
      if f'id="{anchor}"' not in html:
        missing.append(f"{modname}.{name}")
  assert not missing, f"not in the API reference (docs/api.md): {missing}"
