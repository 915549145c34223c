"""The README's and the docs' code run as written, every docstring example
runs, the documentation builds without a warning, and every public name is in
its API reference."""

import doctest
import importlib
import importlib.util
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

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
  quickstart = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
  callers = re.search(r"can also be the caller's.*?```python\n(.*?)```", text, re.S).group(1)
  made = next(b for b in blocks if "hidlr_optax.make_train_step(" in b)
  assert blocks[0] == quickstart and callers in blocks
  namespace = {}
  refreshes = None
  for i, block in enumerate(blocks):
    exec(compile(block, f"README python block {i}", "exec"), namespace)
    if block == quickstart:
      rates = hidlr_optax.learning_rates(namespace["opt_state"])
      assert set(rates) == {"body", "head"}
      assert float(namespace["loss"]) < 0.5
      refreshes = int(hidlr_optax.find_states(namespace["opt_state"])[0].num_refreshes)
    elif block == callers:  # the caller's refresh schedule, continuing from the quickstart
      state = hidlr_optax.find_states(namespace["opt_state"])[0]
      assert int(state.num_refreshes) == refreshes + 13  # steps 0, 8, ..., 96
      assert float(namespace["loss"]) < 0.5
    elif block == made:  # make_train_step with a schedule, check_direction quiet
      state = hidlr_optax.find_states(namespace["opt_state"])[0]
      assert int(state.count) == namespace["total_steps"]
      assert int(state.num_refreshes) == 13  # Hi-DLR's own schedule: steps 0, 8, ..., 96
      assert float(namespace["loss"]) < 0.5


def test_readme_says_the_base_is_a_direction():
  """Right after the quickstart, one bold line: a direction, not a full optimizer."""
  text = (ROOT / "README.md").read_text()
  after = re.search(r"## Quickstart\s+```python\n.*?```\n\n(.*?)\n", text, re.S).group(1)
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
  """The runnable pages' ```python blocks (the quickstart, then diagnostics)."""
  namespace = {}
  for page in RUNNABLE_PAGES:
    blocks = python_blocks(DOCS / page)
    assert blocks, page
    for i, block in enumerate(blocks):
      exec(compile(block, f"docs/{page} python block {i}", "exec"), namespace)
  assert set(hidlr_optax.learning_rates(namespace["opt_state"])) == {"body", "head"}
  hidlr_optax.check_direction(namespace["opt_state"])  # the quickstart's base is a direction
  with pytest.raises(ValueError, match="pointed uphill"):  # the diagnostics page's mistake
    hidlr_optax.check_direction(namespace["state"])


def test_readme_links_resolve():
  """Every relative link of the README names a file or folder of the checkout."""
  text = (ROOT / "README.md").read_text()
  missing = [link for link in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text)
             if "://" not in link and not (ROOT / link).exists()]
  assert not missing, f"README links to missing paths: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0


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
