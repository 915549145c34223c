"""What drives Hi-DLR's rates up when the probes use the gradient's own batch.

Two problems, each trained with :func:`hidlr_optax.make_train_step` with
probes on an independently drawn batch (``probe="batch"``) and on the
gradient's own batch (``probe="same"``, `value=loss`, the way optax's line
searches are called):

* letter recognition (the real 26-class task of
  ``examples/letter_recognition.py``: MLP 16-256-256-26, AdamW direction,
  4 groups, batch 128, 3 epochs), one seed, with the fit diagnostics of
  every refresh;
* noisy least squares (exact: ``y = x.w + 2 eps``, 32 features in two
  groups, batch 32), whose noise floor 2.0 and stability limit
  ``2 / lambda_max`` are known, over SGD and Adam directions.

Each run is made with the paper's rule (``probe_direction="current"``) and
with fits of the previous step (``probe_direction="previous"``, unbiased on
the gradient's own batch).

For each run it reports, per group and per third of the run, the median
rate, the share of refreshes whose fit was accepted, the share that the
one-step fit cut (a predicted increase), and the joint check's median
factor. Writes ``benchmarks/results/same_batch.md``::

  python -m benchmarks.same_batch
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hidlr_optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import letter_recognition as letters  # noqa: E402
from _common import markdown_table, mlp_apply, mlp_init  # noqa: E402
from _methods import direction  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
UPDATE_EVERY = 8


def train(loss_fn: Callable, params: Any, tx, batches: Callable[[int], tuple], steps: int,
          probe: str, full_loss: Callable[[Any], float]) -> dict:
  """Trains with probes on the gradient's batch (``"same"``) or another one
  (``"batch"``: batch ``steps + t`` at step ``t``).

  Returns the per-refresh records (rates, accepted, cut, joint factor) and
  the final full-data loss.
  """
  step = hidlr_optax.make_train_step(loss_fn, tx, probe=probe)
  state = tx.init(params)
  records = []
  for t in range(steps):
    before = hidlr_optax.learning_rates(state)
    probe_batch = [] if probe == "same" else [batches(steps + t)]
    params, state, _ = step(params, state, batches(t), *probe_batch)
    inner = hidlr_optax.find_states(state)[0]
    if t % UPDATE_EVERY == 0:
      fits = inner.fits.stacked
      old = np.asarray([before[k] for k in inner.learning_rates])
      new = np.asarray(inner.learning_rates.stacked)
      records.append(dict(
          rates=new, accepted=np.asarray(fits.accepted),
          cut=np.asarray(fits.accepted) & (new < old * 0.999),
          joint=float(inner.joint_factor),
      ))
  return dict(records=records, labels=list(hidlr_optax.learning_rates(state)),
              final=full_loss(params))




def phases_table(run: dict) -> str:
  """Per group and third of the run: median rate, accepted, cut; joint factor."""
  records = run["records"]
  thirds = np.array_split(np.arange(len(records)), 3)
  rows = []
  for k, label in enumerate(run["labels"]):
    for i, part in enumerate(thirds):
      chosen = [records[j] for j in part]
      rows.append([
          str(label), ("first", "second", "last")[i],
          f"{np.median([r['rates'][k] for r in chosen]):.3g}",
          f"{np.mean([r['accepted'][k] for r in chosen]):.2f}",
          f"{np.mean([r['cut'][k] for r in chosen]):.2f}",
          f"{np.median([r['joint'] for r in chosen]):.2f}",
      ])
  return markdown_table(
      ["group", "third", "median rate", "accepted", "cut", "median joint factor"], rows)


#: The rules compared: name -> scale_by_hidlr options.
RULES = {"paper rule": {}, "previous step": {"probe_direction": "previous"}}
#: The probe modes compared (:func:`hidlr_optax.make_train_step`'s ``probe``).
PROBES = ("batch", "same")


def letter_runs(data_file: Path) -> list[tuple[str, dict]]:
  x, y, _, classes = letters.load_letters(data_file)
  (xtr, ytr), _ = letters.split_rows(x, y, letters.TRAIN_ROWS)
  sizes = letters.layer_sizes(len(classes))
  loss_fn = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      mlp_apply(p, b[0]), b[1]).mean()
  full = jax.jit(lambda p: loss_fn(p, (xtr, ytr)))
  batch = 128
  per_epoch = len(xtr) // batch
  steps = 3 * per_epoch
  rng = np.random.default_rng(0)
  orders = [rng.permutation(len(xtr)) for _ in range(6)]

  def batches(t):
    epoch, i = divmod(t, per_epoch)
    idx = orders[epoch][i * batch:(i + 1) * batch]
    return xtr[idx], ytr[idx]

  out = []
  for (rule, options), probe in itertools.product(RULES.items(), PROBES):
    tx = hidlr_optax.hidlr(direction("adamw", 1e-2), 1e-3, letters.GROUPS,
                           update_every=UPDATE_EVERY, **options)
    params = mlp_init(jax.random.key(0), sizes)
    out.append((f"letters, {rule}, probe={probe!r}",
                train(loss_fn, params, tx, batches, steps, probe, lambda p: float(full(p)))))
  return out


#: The noisy least-squares problem: rows, features (two groups of half), noise scale.
ROWS, FEATURES, NOISE = 4096, 32, 2.0


def noisy_least_squares(seed: int = 0):
  """``y = x.w + NOISE eps``, its loss on rows ``i`` of ``{"a", "b"}`` halves of ``w``.

  Returns:
    ``(loss_fn(params, rows), full_loss(params) -> float, x, rng)``, with
    ``rng`` the generator that drew the data, for the batches that follow.
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(ROWS, FEATURES)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=FEATURES), jnp.float32) + NOISE * jnp.asarray(
      rng.normal(size=ROWS), jnp.float32)
  joined = lambda p: jnp.concatenate([p["a"], p["b"]])
  loss_fn = lambda p, i: jnp.mean((x[i] @ joined(p) - y[i]) ** 2) / 2
  full = lambda p: float(jnp.mean((x @ joined(p) - y) ** 2) / 2)
  return loss_fn, full, x, rng


def least_squares_runs() -> tuple[list[tuple[str, dict]], float]:
  """The least-squares runs (per rule, direction and probe batch), and
  gradient descent's stability limit."""
  loss_fn, full, x, rng = noisy_least_squares()
  n, dim, batch = ROWS, FEATURES, 32
  index = rng.integers(0, n, size=(1600, batch))
  directions = (("SGD", optax.identity()), ("Adam", optax.scale_by_adam()))
  out = []
  for (rule, options), (name, base), probe in itertools.product(
      RULES.items(), directions, PROBES):
    tx = hidlr_optax.hidlr(base, 1e-3, {"a": "a", "b": "b"}, update_every=UPDATE_EVERY, **options)
    params = {"a": jnp.zeros(dim // 2), "b": jnp.zeros(dim // 2)}
    out.append((f"least squares, {rule}, {name}, probe={probe!r}",
                train(loss_fn, params, tx, lambda t: jnp.asarray(index[t]), 800, probe, full)))
  lam = float(jnp.linalg.eigvalsh(x.T @ x / n).max())
  return out, 2 / lam


def main(argv: Optional[Sequence[str]] = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-file", type=Path, default=letters.DATA_FILE)
  p.add_argument("--out", type=Path, default=RESULTS)
  args = p.parse_args(argv)
  runs = letter_runs(args.data_file)
  squares, limit = least_squares_runs()
  sections, finals = [], []
  for name, run in [*runs, *squares]:
    finals.append([name, f"{run['final']:.4f}"])
    sections.append(f"### {name}\n\nfinal full-data loss {run['final']:.4f}\n\n{phases_table(run)}")
    print(sections[-1], flush=True)
  command = "python -m benchmarks.same_batch" + ("" if argv is None else " " + " ".join(argv))
  text = f"""Command: `{command}`

# Same-batch probes: what drives the rates up

Untuned Hi-DLR (defaults, Phi = {UPDATE_EVERY}, initial rate 1e-3), one seed, with the paper's
rule and with `probe_direction="previous"` (fits of the previous step, at the point it
started from: unbiased on the gradient's own batch). "accepted":
share of refreshes whose fit set the group's rate; "cut": share that lowered it
(a predicted increase, or the joint check); "median joint factor": the joint check's
factor (1: no correction). Least squares: noise floor 2.0 (the full-data loss of the
true weights is about that), stability limit of gradient descent 2 / lambda_max =
{limit:.3f}.

{markdown_table(["run", "final full-data loss"], finals)}

{chr(10).join(sections)}
"""
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "same_batch.md").write_text(text)
  return text


if __name__ == "__main__":
  main()
