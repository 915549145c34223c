"""Sweep of scale_by_hidlr's defaults ``accept``, ``smoothing``, ``max_growth``, ``joint_check``.

One setting changes at a time from the core's defaults; every variant trains
Hi-DLR on four mini-batch tasks of ``examples/`` at a reduced size (mixture of
experts, the synthetic and the California neural additive models, multi-task
head), probing on a fresh batch. Defaults are judged on the final *training* loss (never on test data);
the test loss is shown for information. Writes ``benchmarks/results/defaults.md``.

Run ``python benchmarks/defaults.py`` (``--quick`` for a small run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _common as C  # noqa: E402
import _methods as M  # noqa: E402
import _training as T  # noqa: E402
import additive_model  # noqa: E402
import mixture_of_experts as moe  # noqa: E402
import multitask  # noqa: E402

#: name -> keyword arguments changed from the core's defaults.
VARIANTS = {
    "defaults": {},
    "accept='all'": {"accept": "all"},
    "smoothing=0.5": {"smoothing": 0.5},
    "smoothing=0.0": {"smoothing": 0.0},
    "max_growth=None": {"max_growth": None},
    "max_growth=2": {"max_growth": 2.0},
    "joint_check=False": {"joint_check": False},
}


def tasks(seed: int, quick: bool) -> dict:
  """name -> (loss, metrics, params, train, test, base, labels, rate, update_every, epochs, batch)."""
  scale = 0.2 if quick else 1.0
  moe_train, moe_test = moe.make_data(seed)
  nam_train, nam_test, names, _ = additive_model.load("synthetic", seed, quick)
  cal_train, cal_test, cal_names, _ = additive_model.load("california", seed, quick)
  mt_train, mt_test = multitask.load(seed)
  return {
      "mixture of experts": (
          moe.loss_fn, moe.metrics_fn, moe.init_params(jax.random.key(seed)), moe_train, moe_test,
          "adam", moe.LABELS, moe.INITIAL_RATE, 8, int(40 * scale), 128,
      ),
      "additive model (synthetic)": (
          additive_model.loss_fn, additive_model.metrics_fn,
          additive_model.init_params(jax.random.key(seed), len(names)), nam_train, nam_test,
          "sgd", additive_model.labels(names), 1e-3, 2, int(40 * scale), 256,
      ),
      "additive model (California)": (
          additive_model.loss_fn, additive_model.metrics_fn,
          additive_model.init_params(jax.random.key(seed), len(cal_names)), cal_train, cal_test,
          "adam", additive_model.labels(cal_names), 1e-5, 8, int(40 * scale), 256,
      ),
      "multi-task head": (
          multitask.loss_fn, multitask.metrics_fn, multitask.init_params(jax.random.key(seed)),
          mt_train, mt_test, "adamw", multitask.LABELS, multitask.INITIAL_RATE, multitask.EVERY,
          int(20 * scale), 128,
      ),
  }


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = C.parse_args(__doc__.splitlines()[0], argv)
  results = {}
  rows = []
  with C.Timer() as timer:
    for task, spec in tqdm(tasks(args.seed, args.quick).items(), desc="tasks"):
      loss, metrics, params, train, test, base, labels, rate, every, epochs, batch = spec
      for variant, kw in VARIANTS.items():
        method = M.hidlr_method(variant, base, rate, labels, update_every=every, **kw)
        rec = T.train_minibatch(
            loss, metrics, params, method, train, test,
            epochs=epochs, batch_size=batch, seed=args.seed,
        )
        results[task, variant] = rec
        rows.append([
            task, variant, epochs, float(rec["train_loss"][-1]), float(rec["test_loss"][-1]),
            "yes" if T.diverged(rec["train_loss"]) else "",
        ])
  table = C.markdown_table(
      ["task", "variant", "epochs", "final train loss", "final test loss", "diverged"], rows
  )
  print(table)
  final = {key: float(rec["train_loss"][-1]) for key, rec in results.items()}
  blew_up = {key: T.diverged(rec["train_loss"]) for key, rec in results.items()}
  task_names = list(dict.fromkeys(task for task, _ in results))
  ranks = []
  for variant in VARIANTS:
    ratios = [
        final[task, variant] / final[task, "defaults"]
        for task in task_names
        if not (blew_up[task, variant] or blew_up[task, "defaults"])
    ]
    diverged = sum(blew_up[task, variant] for task in task_names)
    gmean = float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan")
    worst = float(np.max(ratios)) if ratios else float("nan")
    ranks.append([variant, gmean, worst, len(ratios), diverged])
  summary = C.markdown_table(
      [
          "variant", "geometric mean of train loss / defaults'", "worst ratio",
          "tasks compared (neither diverged)", "tasks diverged",
      ],
      ranks,
  )
  print(summary)
  better_everywhere = [
      r[0] for r in ranks[1:] if r[3] > 0 and r[2] < 1 and r[4] <= ranks[0][4]
  ]
  verdict = (
      f"Better than the defaults on every compared task: {', '.join(better_everywhere)}."
      if better_everywhere
      else "No variant beats the defaults on every compared task without diverging more"
      " often, so the defaults stay."
  )
  print(verdict)
  body = f"""
Hi-DLR with the core's defaults (`{M.hidlr_defaults()}`) against one change at a time, on four mini-batch tasks
of `examples/` (fresh-batch probes; each task's base, groups, initial rate
and `update_every` as in its script; fewer epochs). Judged on the final
training loss. Wall time {timer.seconds:.0f} s.

{table}

Summary (below 1 = better than the defaults on training loss):

{summary}

{verdict} A run diverged when its final training loss is not finite or
is above its initial one. A variant must beat the defaults on every task
where neither diverged, and diverge no more often, to replace them: a default has to be
safe on tasks nobody tuned it for, so a gain on one task does not outweigh a
loss on another.
"""
  C.write_results(
      args.out, "defaults", C.command_line(__file__, argv), "Sweep of scale_by_hidlr defaults", body, None
  )
  return results


if __name__ == "__main__":
  main()
