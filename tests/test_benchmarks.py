"""Smoke test of benchmarks/overhead.py at tiny sizes (no timing assertions)."""

import math
import pathlib
import re
import subprocess
import sys

import numpy as np

from benchmarks import _models, overhead

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _numbers(line: str) -> list[float]:
  cells = [c.strip() for c in line.strip().strip("|").split("|")]
  out = []
  for c in cells:
    try:
      out.append(float(c))
    except ValueError:
      pass
  return out


def test_overhead_quick_writes_tables_of_finite_positive_numbers(tmp_path):
  out = tmp_path / "overhead.md"
  argv = ["--quick", "--models", "mlp", "--out", str(out)]
  subprocess.run([sys.executable, "-m", "benchmarks.overhead", *argv],
                 cwd=ROOT, check=True, timeout=900)
  text = out.read_text()
  assert text.splitlines()[0].startswith(
      "Command: `python -m benchmarks.overhead --quick --models mlp")
  assert "# Hi-DLR overhead" in text
  for section in ("## mlp", "### Minor page faults", "### Compile time", "### Peak memory",
                  "### Probe batching", "### K x estimator", "## Targets"):
    assert section in text, section
  # Page faults may be 0; every other figure is a positive time, ratio or size.
  before, rest = text.split("### Minor page faults")
  faults, after = rest.split("### Compile time")
  table_numbers = lambda t: [
      x for l in t.splitlines() if l.startswith("| ") and not l.startswith("| what")
      for x in _numbers(l)
  ]
  fault_numbers = table_numbers(faults)
  assert len(fault_numbers) == 6 * 2
  assert all(math.isfinite(x) and x >= 0 for x in fault_numbers)
  numbers = table_numbers(before + after)
  assert len(numbers) > 40
  assert all(math.isfinite(x) and x > 0 for x in numbers)
  # Every K x estimator row carries an amortised ratio and the paper's bound.
  grid_cells = re.findall(r"(\d+\.\d+) \((\d+\.\d+)\)", text)
  assert len(grid_cells) == 4 * 2  # K = 2 x 2 estimators x 2 batchings, 2 Phis
  assert all(float(a) > 0 and 0 < float(b) < 1 for a, b in grid_cells)


def test_cost_model_formulas():
  # Paper, Appendix C: K = 2, Phi = 8 gives 75% (full) and 66.7% (PEFT).
  assert np.isclose(overhead.bound_full(2, 8), 0.75)
  assert np.isclose(overhead.bound_peft(2, 8), 2 / 3)
  # Equal step costs amortise to themselves; one refresh in Phi steps of
  # cost 1 + x gives Phi / (Phi + x).
  assert np.isclose(overhead.amortised(0.5, 0.5, 8), 0.5)
  assert np.isclose(overhead.amortised(1.0, 1 / 3, 8), 8 / 10)


def test_group_labels_give_k_groups():
  import hidlr_optax
  model = _models.build("mlp", quick=True)
  for k, grouping in [(1, "layers"), (2, "layers"), (4, "layers"), (2, "interleaved")]:
    tx = hidlr_optax.scale_by_hidlr(1e-3, _models.group_labels(model, k, grouping))
    rates = hidlr_optax.learning_rates(tx.init(model.params))
    assert len(rates) == k
