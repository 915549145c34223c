"""Sphinx configuration of the hidlr-optax documentation.

Build (offline, warnings as errors; `tests/test_docs.py` runs the same)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

The results files in ``benchmarks/`` and the quickstart notebook live outside
``docs/``. Sphinx only renders documents inside its source folder, so this file
mirrors them into ``docs/benchmarks/`` and ``docs/notebooks/`` (ignored by git)
when Sphinx loads it (``setup``), before it looks for documents: their relative
links and figures keep working, and every results file becomes a page. The API reference is generated from ``__all__``
(the ``hidlr-api`` directive below), so a name added there is documented
without editing the docs, and one without a docstring fails the build.

Intersphinx links to JAX, optax, Flax and NumPy need their inventories from the
network; they are used only with ``HIDLR_DOCS_INTERSPHINX=1`` (CI is offline).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import re
import shutil
import sys
import tempfile

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "hidlr-optax"
author = "hidlr-optax contributors"
copyright = "the hidlr-optax contributors"  # noqa: A001 (Sphinx's name)
release = version = importlib.import_module("hidlr_optax").__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "**/__pycache__"]
# The mirrored results pages use `Command:` lines, tables and raw diffs; some
# begin at a level-2 heading or skip a level, which is no error in a record.
suppress_warnings = ["myst.header"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The stored notebook is rendered as committed (its outputs were saved by a run;
# `tests/test_examples.py` executes it). Nothing here needs the network.
nb_execution_mode = "off"

html_theme = "furo"
html_title = "hidlr-optax"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False

_INVENTORIES = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "jax": ("https://docs.jax.dev/en/latest/", None),
    "optax": ("https://optax.readthedocs.io/en/latest/", None),
    "flax": ("https://flax.readthedocs.io/en/latest/", None),
}
intersphinx_mapping = _INVENTORIES if os.environ.get("HIDLR_DOCS_INTERSPHINX") == "1" else {}
intersphinx_timeout = 10


# -- Mirrored sources -----------------------------------------------------------

#: Folders and files outside ``docs/`` rendered as pages: (source, target).
MIRRORS = (
    (ROOT / "benchmarks" / "results", DOCS / "benchmarks" / "results"),
    (ROOT / "benchmarks" / "core_changes.md", DOCS / "benchmarks" / "core_changes.md"),
    (ROOT / "benchmarks" / "overhead_changes.md", DOCS / "benchmarks" / "overhead_changes.md"),
    (ROOT / "notebooks" / "quickstart.ipynb", DOCS / "notebooks" / "quickstart.ipynb"),
)
_MIRROR_SUFFIXES = {".md", ".png", ".log", ".ipynb"}


def _mirrored_bytes(source: pathlib.Path) -> bytes:
  """A file's content as mirrored: links into ``docs/`` are made relative to
  the mirror, and a Markdown file without a ``# `` title gets its file name as
  one (Sphinx links pages by their titles)."""
  data = source.read_bytes()
  if source.suffix == ".md":
    # The mirror maps the checkout's root to docs/: a link from a results file
    # up to docs/X.md is ../X.md there.
    data = re.sub(rb"\]\(((?:\.\./)+)docs/", rb"](\1", data)
  if source.suffix == ".md" and not any(
      line.startswith(b"# ") for line in data.splitlines()):
    data = b"# " + source.name.encode() + b"\n\n" + data
  return data


def _copy_if_changed(source: pathlib.Path, target: pathlib.Path) -> None:
  """Mirrors one file unless the same content is there (atomic: parallel builds)."""
  data = _mirrored_bytes(source)
  if target.exists() and target.read_bytes() == data:
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".mirror-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, target)


def mirror_sources() -> None:
  """Mirrors `MIRRORS` into ``docs/``, removing files whose source is gone."""
  for source, target in MIRRORS:
    if source.is_file():
      _copy_if_changed(source, target)
      continue
    wanted = set()
    for path in sorted(source.rglob("*")):
      if path.is_file() and path.suffix in _MIRROR_SUFFIXES:
        relative = path.relative_to(source)
        wanted.add(relative)
        _copy_if_changed(path, target / relative)
    for path in sorted(target.rglob("*")) if target.exists() else ():
      if (path.is_file() and not path.name.startswith(".mirror-")
          and path.relative_to(target) not in wanted):
        path.unlink(missing_ok=True)



# -- The API reference, from __all__ ---------------------------------------------

def public_names(module) -> list[str]:
  """The public names of a module: its ``__all__``, else names without ``_``."""
  names = getattr(module, "__all__", None)
  if names is None:
    names = [n for n in vars(module) if not n.startswith("_")
             and getattr(vars(module)[n], "__module__", module.__name__) == module.__name__]
  return list(names)


#: Documentation of public constants whose source has no ``#:`` comment of their
#: own (a comment above a group of assignments documents only the first).
EXTRA_DOCS = {
    "hidlr_optax.labels.LORA_B_PATTERN":
        "Default regex of :func:`lora` for the B factors, as :data:`LORA_A_PATTERN` is for A.",
}


def attribute_comment(module, name: str) -> str:
  """The ``#:`` comment of a module attribute, looked up where it is defined.

  A constant re-exported by a package is documented by the comment above its
  assignment in the private module that defines it.
  """
  package = module.__name__.split(".")[0]
  candidates = [module.__name__] + sorted(
      m for m in sys.modules if m.startswith(package + ".") and m != module.__name__)
  for modname in candidates:
    mod = sys.modules.get(modname)
    if mod is None or name not in vars(mod) or vars(mod)[name] is not vars(module).get(name):
      continue
    try:
      docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # noqa: BLE001 (no source: nothing to read)
      continue
    if ("", name) in docs:
      return "\n".join(docs[("", name)]).strip()
  return ""


def _own_docstring(obj) -> str:
  """A callable's or class's own docstring ('' if it has none of its own)."""
  doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
  return inspect.cleandoc(doc) if doc else ""


def _first_sentence(text: str) -> str:
  """The first paragraph of a docstring, on one line."""
  return " ".join(text.strip().split("\n\n", 1)[0].split())


def describe(module, name: str) -> tuple[str, str]:
  """(autodoc directive, documentation text) of one public name; text '' = none."""
  obj = getattr(module, name)
  if inspect.ismodule(obj):
    return "module", _own_docstring(obj)
  if inspect.isclass(obj):
    return "autoclass", _own_docstring(obj)
  if callable(obj) and not isinstance(obj, (str, tuple)) and getattr(obj, "__module__", None) \
      and not getattr(obj, "__origin__", None):
    return "autofunction", _own_docstring(obj)
  return "data", (attribute_comment(module, name)
                  or EXTRA_DOCS.get(f"{module.__name__}.{name}", ""))


class HiDLRApi(SphinxDirective):
  """``.. hidlr-api:: module``: a summary table and an entry per public name.

  Functions and classes are documented by autodoc from their docstrings,
  constants by their ``#:`` comments. A public name with no documentation is a
  build warning (an error under ``-W``) that names it.
  """

  required_arguments = 1
  has_content = False

  def run(self) -> list[nodes.Node]:
    modname = self.arguments[0]
    module = importlib.import_module(modname)
    names = public_names(module)
    lines = [f".. py:currentmodule:: {modname}", ""]
    entries: list[str] = []
    summary: list[str] = []
    for name in names:
      kind, text = describe(module, name)
      if kind == "module":
        summary += [f"   * - :py:mod:`~{modname}.{name}`", f"     - {_first_sentence(text)}"]
        continue
      if not text:
        self.state.document.reporter.warning(
            f"{modname}.{name} is public (in __all__) but has no documentation: give it a "
            "docstring (functions, classes) or a `#:` comment above its assignment (constants)",
            line=self.lineno)
      role = {"data": "data", "autoclass": "class", "autofunction": "func"}[kind]
      summary += [f"   * - :py:{role}:`{name}`", f"     - {_first_sentence(text) or '(undocumented)'}"]
      if kind == "data":
        value = getattr(module, name)
        shown = repr(value) if len(repr(value)) < 90 else f"{type(value).__name__}(...)"
        entries += [f".. py:data:: {name}", f"   :value: {shown}", ""]
        entries += ["   " + line if line else "" for line in text.splitlines()] + [""]
      elif kind == "autoclass":
        entries += [f".. autoclass:: {modname}.{name}", "   :members:", "   :show-inheritance:", ""]
      else:
        entries += [f".. autofunction:: {modname}.{name}", ""]
    lines += [".. list-table::", "   :widths: 30 70", ""] + summary + [""] + entries
    container = nodes.container()
    self.state.nested_parse(StringList(lines, source=f"<hidlr-api {modname}>"),
                            self.content_offset, container)
    return container.children


def _skip_member(app, what, name, obj, skip, options):
  """Leaves out NamedTuple fields (the class docstring's Attributes cover them)."""
  if what == "class" and (getattr(obj, "__doc__", "") or "").startswith("Alias for field number"):
    return True
  return None


def setup(app):
  mirror_sources()  # before Sphinx looks for documents
  app.add_directive("hidlr-api", HiDLRApi)
  app.connect("autodoc-skip-member", _skip_member)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
