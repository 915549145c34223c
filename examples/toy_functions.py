"""Toy functions (Hi-DLR paper, Figure 2 / Appendix A.1).

Two 2-D problems, 100 full-batch iterations each, with the plain gradient as
the base direction:

* ellipse ``x^2 + 100 y^2`` from ``(50, 1)``: with one group per coordinate,
  Hi-DLR's ``eta_k = b_k / A_kk`` is Newton's method, one step to the minimum;
* ``Beale(x, 0.5) + Rosenbrock(1, y)`` from ``(4, 3)``, minimum 0 at ``(3, 1)``.

Baselines: the best constant rate of the grid ``1e-5 * 10^(k/2), k = 0..11``
(by the loss after 100 iterations, as in the paper), Hi-ULR (GeN) and optax's
learning-rate-free optimizers.

Run ``python examples/toy_functions.py`` (``--quick`` for a shorter run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import _common as C
import _methods as M
import _training as T

PAPER_GRID = [1e-5 * 10 ** (k / 2) for k in range(12)]
#: Hi-DLR / Hi-ULR settings: a full-batch deterministic problem needs no
#: smoothing (it is for noisy estimates), one refresh per step, and, as in the
#: paper's Algorithm 1, no bound on the growth of a rate per refresh.
HIDLR_KW = dict(update_every=1, smoothing=0.0, max_growth=None)
INITIAL_RATE = 1e-3


def ellipse(p: dict) -> jnp.ndarray:
  """``x^2 + 100 y^2``."""
  return p["x"] ** 2 + 100.0 * p["y"] ** 2


def beale(x, y):
  return (
      (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2
  )


def rosenbrock(x, y):
  return 100.0 * (y - x**2) ** 2 + (1.0 - x) ** 2


def beale_rosenbrock(p: dict) -> jnp.ndarray:
  """``Beale(x, 0.5) + Rosenbrock(1, y)``; minimum 0 at ``(3, 1)``."""
  return beale(p["x"], 0.5) + rosenbrock(1.0, p["y"])


#: name -> (loss, start, plot window (xmin, xmax, ymin, ymax))
PROBLEMS: dict[str, tuple[Callable, tuple[float, float], tuple[float, ...]]] = {
    "ellipse": (ellipse, (50.0, 1.0), (-5.0, 55.0, -1.5, 1.5)),
    "Beale(x,0.5)+Rosenbrock(1,y)": (beale_rosenbrock, (4.0, 3.0), (0.0, 6.0, -0.5, 3.5)),
}


def methods() -> list[M.Method]:
  """Hi-DLR, Hi-ULR, the paper's uniform grid and the learning-rate-free baselines."""
  return [
      M.hidlr_method("Hi-DLR (x, y)", "sgd", INITIAL_RATE, {"x": "x", "y": "y"}, **HIDLR_KW),
      M.hidlr_method("Hi-DLR secant (x, y)", "sgd", INITIAL_RATE, {"x": "x", "y": "y"},
                     estimator="secant", **HIDLR_KW),
      M.hidlr_method("Hi-ULR (GeN)", "sgd", INITIAL_RATE, None, **HIDLR_KW),
      M.uniform_grid("sgd", PAPER_GRID),
      *M.learning_rate_free("sgd"),
  ]


def run_problem(name: str, num_steps: int) -> dict[str, dict]:
  """Trains every method on one problem; grid methods reduced to their best point.

  Returns:
    ``{method name: record}`` (see ``_training.full_batch_run``), each with an
    extra ``"setting"`` string.
  """
  loss, start, _ = PROBLEMS[name]
  params = {"x": jnp.asarray(start[0]), "y": jnp.asarray(start[1])}
  out = {}
  for m in methods():
    rec = T.train_full_batch(loss, params, m, num_steps, record_params=True)
    setting = ""
    if m.grid is not None:
      i = T.pick_best(rec, "loss")
      rec, setting = T.select(rec, i), m.describe(M.grid_point(m.grid, i))
    rec["setting"] = setting
    out[m.name] = rec
  return out


def run_all(num_steps: int = 100) -> dict[str, dict[str, dict]]:
  """``{problem: {method: record}}`` for both problems."""
  return {name: run_problem(name, num_steps) for name in tqdm(PROBLEMS, desc="problems")}


def table_rows(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list]]:
  """Header and rows: final loss of every method on every problem."""
  names = list(next(iter(results.values())))
  header = ["method", *[f"{p}: final loss" for p in results], "setting"]
  rows = []
  for name in names:
    losses = [float(results[p][name]["loss"][-1]) for p in results]
    settings = {results[p][name]["setting"] for p in results} - {""}
    rows.append([name, *losses, "; ".join(sorted(settings))])
  return header, rows


def results_table(num_steps: int = 100) -> str:
  """Runs both toy problems and returns the final losses as a markdown table."""
  return C.markdown_table(*table_rows(run_all(num_steps)))


def plot(results: dict[str, dict[str, dict]], out_dir, name: str):
  """Contours with trajectories, losses, and Hi-DLR / Hi-ULR learning rates."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(results), 3, figsize=(15, 4.2 * len(results)))
  for row, (problem, recs) in zip(np.atleast_2d(axes), results.items()):
    loss, _, (x0, x1, y0, y1) = PROBLEMS[problem]
    gx, gy = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    z = np.asarray(loss({"x": jnp.asarray(gx), "y": jnp.asarray(gy)}))
    row[0].contour(gx, gy, np.log10(z + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    colors = C.method_colors(list(recs))
    for method, rec in recs.items():
      px, py = np.asarray(rec["params"]["x"]), np.asarray(rec["params"]["y"])
      row[0].plot(px, py, ".-", ms=3, lw=1, color=colors[method], label=method)
    row[0].set_xlim(x0, x1)
    row[0].set_ylim(y0, y1)
    row[0].set_title(f"{problem}: trajectories")
    C.plot_curves(
        row[1], {m: np.maximum(r["loss"], 1e-16) for m, r in recs.items()},
        f"{problem}: loss", "iteration",
    )
    rates = {
        f"{m}: {label}": v for m, r in recs.items() for label, v in r["lr"].items()
    }
    C.plot_rates(row[2], rates, f"{problem}: Hi-DLR / Hi-ULR learning rates", "iteration")
  np.atleast_2d(axes)[0, 1].legend(fontsize=7)
  return C.save_figure(fig, out_dir, name)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = C.parse_args(__doc__.splitlines()[0], argv)
  num_steps = 30 if args.quick else 100
  with C.Timer() as timer:
    results = run_all(num_steps)
  header, rows = table_rows(results)
  table = C.markdown_table(header, rows)
  print(table)
  name = "toy_functions"
  figure = plot(results, args.out, name)
  body = f"""
{num_steps} full-batch iterations from the paper's starting points; base
direction = the gradient (SGD). Hi-DLR and Hi-ULR start at rate
{INITIAL_RATE:g} and use `{HIDLR_KW}` (deterministic problems: no noise to
smooth; the core's defaults are `{M.hidlr_defaults()}`). The uniform learning rate is the best of the paper's grid
`1e-5 * 10^(k/2), k = 0..11` by the final loss; the learning-rate-free
optimizers run at optax's defaults. Wall time {timer.seconds:.1f} s.

{table}

The contour plots show every method's trajectory; the last column shows
Hi-DLR's rate per coordinate and Hi-ULR's single rate.
"""
  C.write_results(args.out, name, C.command_line(__file__, argv), "Toy functions (Figure 2)", body, figure)
  return results


if __name__ == "__main__":
  main()
