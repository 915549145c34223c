"""Neural additive model (Hi-DLR paper, Section 4.4 / Appendix B.3, Figure 5).

``y = beta + sum_k f_k(x_k)``: one small MLP per feature (1 -> 32 -> 32 -> 1,
ReLU; all K stacked in one array per layer and vmapped) plus a bias. Hi-DLR
has K + 1 groups, one per feature network plus the bias: the feature networks
are split with :func:`hidlr_optax.per_slice` along their stacking axis.

* Synthetic: ``X`` (3000 x 10) with i.i.d. ``Uniform(-2, 2)`` entries (the
  paper does not say how ``X`` is drawn), ``y = sum_i f_i(X_i) + N(0, 1)``
  with the paper's ten ``f_i``; 80% train / 20% test; SGD, 100 epochs, batch
  256, ``Phi = 2``; uniform grid ``[5e-4, 7e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2]``.
* California housing (scikit-learn's 8 features, standardised with the
  training split's statistics; target in units of $100,000); 80% / 20%;
  Adam, 200 epochs, batch 256, ``Phi = 8``; uniform grid
  ``[5e-6, 7e-6, 1e-5, 3e-5, 5e-5, 7e-5, 1e-4]``.

The uniform rate is picked by the final test loss (the paper's protocol for
its baselines); Hi-DLR and Hi-ULR start at the middle of that grid and probe
on a fresh batch (also on the gradient's batch, to measure the difference).

Run ``python examples/additive_model.py`` (``--quick`` for a small run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import hidlr_optax

import _common as C
import _methods as M
import _training as T

HIDDEN = (32, 32)
CALIFORNIA_FEATURES = (
    "MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude", "Longitude",
)
#: task -> (base, epochs, update_every, uniform grid, initial Hi-DLR rate)
SETTINGS = {
    "synthetic": ("sgd", 100, 2, [5e-4, 7e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2], 1e-3),
    "california": ("adam", 200, 8, [5e-6, 7e-6, 1e-5, 3e-5, 5e-5, 7e-5, 1e-4], 1e-5),
}


def synthetic_targets(x: np.ndarray) -> np.ndarray:
  """``sum_i f_i(x_i)`` with the paper's ``f_1..f_10`` (``f_7..f_10 = 0``)."""
  f = [
      lambda v: 2 * v**2 * np.tanh(v),
      lambda v: np.sin(v) * np.cos(v) + v**2,
      lambda v: 20 / (1 + np.exp(-5 * np.sin(v))),
      lambda v: 20 * np.sin(2 * v) ** 3 - 6 * np.cos(v) + v**2,
      lambda v: v**3,
      lambda v: v,
  ]
  return sum(fi(x[:, i]) for i, fi in enumerate(f))


def load(task: str, seed: int, quick: bool):
  """Returns ``(train, test, feature names, source)``."""
  if task == "synthetic":
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(3000, 10))
    y = synthetic_targets(x) + rng.normal(size=3000)
    names = tuple(f"x{i:02d}" for i in range(1, 11))
    source = "synthetic, X ~ Uniform(-2, 2)"
  else:
    x, y, source = C.load_california_housing()
    names = CALIFORNIA_FEATURES
  if quick:
    x, y = x[:1200], y[:1200]
  train, test = C.train_test_split(x, y, 0.2, seed)
  xtr, xte = C.standardize(train[0], test[0]) if task == "california" else (train[0], test[0])
  cast = lambda a: np.asarray(a, np.float32)
  return (cast(xtr), cast(train[1])), (cast(xte), cast(test[1])), names, source


def init_params(key: jax.Array, num_features: int) -> dict:
  keys = jax.random.split(key, num_features)
  nets = jax.vmap(lambda k: C.mlp_init(k, [1, *HIDDEN, 1]))(keys)
  return {"features": nets, "bias": jnp.zeros(())}


def labels(names: Sequence[str]) -> dict:
  """K + 1 groups: every feature network (sliced on axis 0) and the bias."""
  return {"features": hidlr_optax.per_slice(0, names), "bias": "bias"}


def predict(params: dict, x: jax.Array) -> jax.Array:
  # x: (n, K) -> per-feature inputs (K, n, 1) -> contributions (K, n).
  contrib = jax.vmap(C.mlp_apply)(params["features"], x.T[..., None])[..., 0]
  return params["bias"] + contrib.sum(axis=0)


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((predict(params, x) - y) ** 2)


def metrics_fn(params: dict, x: jax.Array, y: jax.Array) -> dict:
  return {"loss": loss_fn(params, x, y)}


def methods(task: str, names: Sequence[str], quick: bool) -> list[M.Method]:
  base, _, every, grid, rate = SETTINGS[task]
  groups = labels(names)
  same_batch = [] if quick else [
      M.hidlr_method("Hi-DLR, same-batch probes", base, rate, groups, update_every=every)
  ]
  return [
      M.hidlr_method(f"Hi-DLR ({len(names)} features + bias)", base, rate, groups, update_every=every),
      M.hidlr_method(f"Hi-DLR secant ({len(names)} features + bias)", base, rate, groups,
                     update_every=every, estimator="secant"),
      *same_batch,
      M.hidlr_method("Hi-ULR (GeN)", base, rate, update_every=every),
      M.uniform_grid(base, grid),
      *M.learning_rate_free(base, names=M.PEERS[:1] if quick else M.PEERS),
  ]


def run_task(
    task: str, seed: int, quick: bool, epochs: int = 0,
    only: Optional[Callable[[str], bool]] = None,
) -> tuple[dict, dict]:
  """Trains the task's methods (those whose name ``only`` accepts, if given)."""
  train, test, names, source = load(task, seed, quick)
  base, paper_epochs, every, grid, rate = SETTINGS[task]
  epochs = 2 if quick else (epochs or paper_epochs)
  chosen = [m for m in methods(task, names, quick) if only is None or only(m.name)]
  same = {m.name: "same" for m in chosen if "same-batch" in m.name}
  with C.Timer() as timer:
    results = T.run_minibatch_methods(
        chosen, loss_fn, metrics_fn, init_params(jax.random.key(seed), len(names)), train, test,
        epochs=epochs, batch_size=256, seed=seed, probes=same,
    )
  info = dict(
      source=source, n_train=len(train[0]), n_test=len(test[0]), epochs=epochs, base=base,
      every=every, rate=rate, seconds=timer.seconds,
  )
  return results, info


def plot(all_results: dict, out_dir, name: str):
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(all_results), 3, figsize=(16, 4.2 * len(all_results)), squeeze=False)
  for row, (task, (results, info)) in zip(axes, all_results.items()):
    skip = 5 if task == "synthetic" else 50
    skip = min(skip, info["epochs"] // 2)
    for ax, key in zip(row[:2], ["train_loss", "test_loss"]):
      C.plot_curves(ax, {m: r[key] for m, r in results.items()}, f"{task}: {key.replace('_', ' ')}", "epoch", skip=skip)
    row[0].legend(fontsize=6)
    hidlr_name = next(m for m in results if m.startswith("Hi-DLR ("))
    rates = {str(k): v for k, v in results[hidlr_name]["lr"].items()}
    rates["Hi-ULR"] = results["Hi-ULR (GeN)"]["lr"]["all"]
    C.plot_rates(row[2], rates, f"{task}: Hi-DLR rates per group (and Hi-ULR)")
  return C.save_figure(fig, out_dir, name)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = C.parse_args(
      __doc__.splitlines()[0], argv,
      task=("both", "synthetic, california or both (both: one results file each)"),
      epochs=(0, "epochs, overriding the paper's (0: the paper's: 100 synthetic, 200 California)"),
  )
  tasks = list(SETTINGS) if args.task == "both" else [args.task]
  all_results = {task: run_task(task, args.seed, args.quick, args.epochs) for task in tasks}
  for task in tasks:
    write_task(task, *all_results[task], args.out, C.command_line(__file__, argv))
  return all_results


def write_task(task: str, results: dict, info: dict, out_dir, command: str) -> None:
  """Prints the task's table and writes ``additive_model_<task>.md`` / ``.png``."""
  table = C.markdown_table(*C.minibatch_rows(results, ["loss"]))
  grid = C.markdown_table(["grid", "setting", "final test loss"], C.grid_rows(results, "test_loss"))
  print(f"\n{task}\n{table}")
  hidlr_name = next(m for m in results if m.startswith("Hi-DLR ("))
  final = {k: float(v[-1]) for k, v in results[hidlr_name]["lr"].items()}
  diverged = [m for m, r in results.items() if T.diverged(r["train_loss"])]
  body = f"""
Data: {info['source']}; {info['n_train']} train / {info['n_test']} test rows.
Base {info['base']}, {info['epochs']} epochs, batch 256, Hi-DLR / Hi-ULR with
`update_every={info['every']}`, initial rate {info['rate']:g}, other settings
the core's defaults (`{M.hidlr_defaults()}`). Wall time {info['seconds']:.0f} s.

{table}

Diverged (final train loss non-finite or above the initial one): {', '.join(diverged) or 'none'}.

Uniform grid (final test loss):

{grid}

Hi-DLR's final rate per group: {', '.join(f'{k} {v:.3g}' for k, v in final.items())}.
"""
  name = f"additive_model_{task}"
  figure = plot({task: (results, info)}, out_dir, name)
  C.write_results(out_dir, name, command, f"Neural additive model, {task} (Figure 5)", body, figure)


if __name__ == "__main__":
  main()
