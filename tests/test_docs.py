"""The README quickstart and every docstring example run as written."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import hidlr_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(hidlr_optax.__path__, "hidlr_optax.")
)


def test_readme_quickstart_runs():
  text = (ROOT / "README.md").read_text()
  block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(block, "README quickstart", "exec"), namespace)
  rates = hidlr_optax.learning_rates(namespace["opt_state"])
  assert set(rates) == {"body", "head"}
  assert float(namespace["loss"]) < 0.5
  refreshes = int(hidlr_optax.find_states(namespace["opt_state"])[0].num_refreshes)

  # The caller's refresh schedule, continuing from the quickstart's state.
  block = re.search(r"can also be the caller's.*?```python\n(.*?)```", text, re.S).group(1)
  exec(compile(block, "README caller's schedule", "exec"), namespace)
  state = hidlr_optax.find_states(namespace["opt_state"])[0]
  assert int(state.num_refreshes) == refreshes + 13  # steps 0, 8, ..., 96
  assert float(namespace["loss"]) < 0.5


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
