"""The paper's reproductions in ``examples/`` at their ``--quick`` size.

Each script runs in-process; the tests check the results files (command line
first, figure written) and facts of the method that the quick runs must show.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import _common as C  # noqa: E402
import _methods as M  # noqa: E402
import _training as T  # noqa: E402


def _check_outputs(out: Path, name: str, script: str) -> str:
  text = (out / f"{name}.md").read_text()
  first = text.splitlines()[0]
  assert first == f"Command: `python examples/{script} --quick --out {out}`"
  assert (out / f"{name}.png").stat().st_size > 10_000
  return text


def test_uniform_grid_is_vmapped_single_runs():
  """Grid points trained together equal the same rates trained one by one."""
  loss = lambda p: jnp.sum((p - jnp.arange(3.0)) ** 2 * jnp.array([1.0, 4.0, 9.0]))
  params = jnp.zeros(3)
  grid = M.uniform_grid("sgd", [1e-3, 3e-2])
  together = T.train_full_batch(loss, params, grid, 20, chunk=2)
  for i, lr in enumerate([1e-3, 3e-2]):
    alone = T.train_full_batch(loss, params, M.uniform_grid("sgd", [lr]), 20)
    np.testing.assert_allclose(together["loss"][i], alone["loss"][0], rtol=1e-5)
  # 21 records: steps 0..20, the loss falls for both rates.
  assert together["loss"].shape == (2, 21)
  assert np.all(together["loss"][:, -1] < together["loss"][:, 0])


def test_diverged_means_not_finite_or_above_the_initial_loss():
  """A loss that ends above where it started diverged, even when finite."""
  assert not T.diverged(np.array([1.0, 0.5, 0.2]))
  assert T.diverged(np.array([1.0, 0.5, 1e34]))
  assert T.diverged(np.array([1.0, 0.5, np.nan]))
  assert T.diverged(np.array([1.0, np.inf]))


def test_california_loads_the_shipped_copy_first():
  """The examples train on the shipped rows whether or not scikit-learn can fetch."""
  x, y, source = C.load_california_housing()
  assert source.startswith("shipped CSV") and x.shape == (20640, 8)


def test_california_csv_matches_scikit_learn_features():
  """The shipped CSV gives scikit-learn's 8 features (data/README.md row 0)."""
  x, y = C._california_from_csv(C.california_housing_files()[0])
  assert x.shape == (20640, 8) and y.shape == (20640,)
  assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))
  np.testing.assert_allclose(
      x[0], [8.3252, 41, 6.984127, 1.02381, 322, 2.555556, 37.88, -122.23], rtol=1e-5
  )
  assert y[0] == pytest.approx(4.526)


def test_toy_functions(tmp_path):
  import toy_functions

  results = toy_functions.main(["--quick", "--out", str(tmp_path)])
  _check_outputs(tmp_path, "toy_functions", "toy_functions.py")
  ellipse = results["ellipse"]["Hi-DLR (x, y)"]
  # One group per coordinate is Newton's method: eta = 1 / (2 a) per axis.
  assert float(ellipse["lr"]["x"][-1]) == pytest.approx(0.5, rel=1e-2)
  assert float(ellipse["lr"]["y"][-1]) == pytest.approx(0.005, rel=1e-2)
  # The first step is Newton's (the paper, Section 2.2, footnote 1) up to float32
  # cancellation in the probes (eta_x = 0.4995), the second lands on the minimum.
  assert float(ellipse["loss"][1]) < 1e-5 * float(ellipse["loss"][0])
  assert float(ellipse["loss"][2]) < 1e-10
  for problem, recs in results.items():
    best_other = min(float(r["loss"][-1]) for m, r in recs.items() if not m.startswith("Hi-DLR"))
    assert float(recs["Hi-DLR (x, y)"]["loss"][-1]) <= best_other, problem
  header, rows = toy_functions.table_rows(results)
  assert [r[0] for r in rows] == list(results["ellipse"])


def test_lora_synthetic(tmp_path):
  import lora_synthetic

  results = lora_synthetic.main(["--quick", "--out", str(tmp_path)])
  _check_outputs(tmp_path, "lora_synthetic", "lora_synthetic.py")
  dlr = results["DLR (best of grid)"]
  search = dlr["search"]["test_loss"][:, -1]
  assert np.nanmin(search) == pytest.approx(float(dlr["test_loss"][30]), rel=1e-4)
  hidlr = results["Hi-DLR (A, B)"]
  assert float(hidlr["loss"][-1]) < 0.2 * float(hidlr["loss"][0])
  # LoRA+'s point: B wants a larger rate than A, and Hi-DLR finds it.
  assert float(hidlr["lr"]["B"][-1]) > 2 * float(hidlr["lr"]["A"][-1])
  per_rank = results["Hi-DLR (A, B per rank: 8 groups)"]
  assert sorted(per_rank["lr"]) == [f"{f}{i}" for f in "AB" for i in range(4)]
  assert float(per_rank["loss"][-1]) < 0.2 * float(per_rank["loss"][0])


def test_mixture_of_experts(tmp_path):
  import mixture_of_experts

  results = mixture_of_experts.main(["--quick", "--out", str(tmp_path)])
  _check_outputs(tmp_path, "mixture_of_experts", "mixture_of_experts.py")
  hidlr = results["Hi-DLR (gate, experts)"]
  assert set(hidlr["lr"]) == {"experts", "gate"}
  assert float(hidlr["test_accuracy"][-1]) > 0.58  # above the majority class
  assert float(hidlr["train_loss"][-1]) < float(hidlr["train_loss"][0])


def test_additive_model(tmp_path):
  import additive_model

  results = additive_model.main(["--quick", "--out", str(tmp_path)])
  for task in ("synthetic", "california"):
    _check_outputs(tmp_path, f"additive_model_{task}", "additive_model.py")
  synthetic, _ = results["synthetic"]
  california, info = results["california"]
  # K + 1 groups with readable labels: one per feature network plus the bias.
  assert set(synthetic["Hi-DLR (10 features + bias)"]["lr"]) == {
      *(f"x{i:02d}" for i in range(1, 11)), "bias"
  }
  assert set(california["Hi-DLR (8 features + bias)"]["lr"]) == {
      *additive_model.CALIFORNIA_FEATURES, "bias"
  }
  for name in ("Hi-ULR (GeN)", "ULR (best of grid)"):
    assert float(synthetic[name]["train_loss"][-1]) < float(synthetic[name]["train_loss"][0]), name
  assert info["n_train"] + info["n_test"] == 1200  # the quick subset of California housing


def test_multitask(tmp_path):
  import multitask

  results = multitask.main(["--quick", "--out", str(tmp_path)])
  _check_outputs(tmp_path, "multitask", "multitask.py")
  rates = results["Hi-DLR (10 tasks)"]["lr"]
  assert set(rates) == set(multitask.TASKS)
  final = np.array([float(r[-1]) for r in rates.values()])
  assert np.all(final > 0) and np.unique(final).size > 1  # the tasks got their own rates
  assert float(results["Hi-DLR (10 tasks)"]["test_accuracy"][-1]) > 0.9


def test_quickstart_notebook_runs(monkeypatch):
  """The notebook executes end to end at its quick size (HIDLR_QUICK=1)."""
  import nbclient
  import nbformat

  monkeypatch.setenv("HIDLR_QUICK", "1")
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(REPO / "notebooks")}},
  ).execute()
  printed = "".join(
      o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
  )
  losses = [float(line.split("loss ")[1].split(",")[0]) for line in printed.splitlines() if line.startswith("step ")]
  assert len(losses) == 3 and losses[1] < 1e-10  # Newton: at the minimum after two steps
  assert "Hi-DLR (A, B)" in printed
