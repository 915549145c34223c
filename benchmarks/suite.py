"""The benchmark suite: every real task, every method as its own docs configure it.

One command runs the real-data tasks of ``examples/`` (letters, California
MLP and additive model, LoRA on MiniLM, Fashion-MNIST at the CPU sizing, the
MovieLens recommender) with the same seeds, batches and initialisations for
every method:

* Prodigy and D-Adaptation AdamW at their default rate 1: without a schedule,
  with ``optax.linear_schedule(1.0, 0.0, total_steps)`` (their docstrings'
  recommendation) and with a 5% linear warm-up then a linear decay to 0;
* schedule-free AdamW at its default rate and over the task's grid of peak
  rates, evaluated at its averaged point ``x``;
* AdamW over the task's grid of peak rates, constant, linear and cosine
  decay (with the task script's warm-up), the grid point picked by the mean
  test score over seeds;
* GeN and Hi-DLR as named configurations (:data:`HIDLR_CONFIGS`).

Every weight decay is the task's AdamW one. Writes ``<name>.md`` (command,
setting, per task a table of mean ± std over seeds, diverged seeds, wall time
and schedule of every method), ``<name>.json`` (every seed's numbers) and
``<name>.png`` (per task, every method's first metric with error bars) to
``benchmarks/results/``, after every task. ``--readme-table`` prints the
README's results table from ``<name>.json``. Run from the repository root::

  python -m benchmarks.suite                                  # everything, 5 seeds
  python -m benchmarks.suite --tasks letters "California MLP" --seeds 3
  python -m benchmarks.suite --readme-table                   # from suite.json
  python -m benchmarks.suite --readme-table --merge other     # and other.json's tasks, rows
  python -m benchmarks.suite --tasks letters --methods "Hi-DLR, own batch + guard" --update
                                    # rerun rows into suite.json, keeping the others
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from optax import contrib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import _realdata_common as rc  # noqa: E402
from _common import markdown_table, save_figure  # noqa: E402
from _methods import Method, schedule, schedule_free_eval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: A keyword value of :data:`HIDLR_CONFIGS` replaced by the run's number of steps.
TOTAL_STEPS = "<total steps>"

#: The GeN / Hi-DLR rows: name -> (keyword arguments of
#: :func:`hidlr_optax.hidlr`, probe mode of :func:`hidlr_optax.make_train_step`).
#: The task's groups, initial rate, weight decay and ``update_every`` are the
#: defaults the keywords override (``param_labels=None``: one group, GeN);
#: ``"schedule"`` may name a decay of the applied step (``"linear"``,
#: ``"cosine"``) and any value :data:`TOTAL_STEPS`. Any other keyword goes to
#: :func:`hidlr_optax.hidlr` as it is. One line adds a row.
HIDLR_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "GeN, separate batch": ({"param_labels": None}, "batch"),
    "Hi-DLR, separate batch": ({}, "batch"),
    "Hi-DLR, own batch": ({}, "same"),
    "Hi-DLR, separate batch + linear decay": ({"schedule": "linear"}, "batch"),
    "Hi-DLR, own batch + linear decay": ({"schedule": "linear"}, "same"),
    "Hi-DLR, own batch + guard": ({"loss_guard": 0.5}, "same"),
    "Hi-DLR recipe (total_steps: own batch, linear decay, guard)": (
        {"total_steps": TOTAL_STEPS}, "same"),
    "Hi-DLR secant, separate batch": ({"estimator": "secant"}, "batch"),
    "Hi-DLR secant, separate batch + linear decay": (
        {"estimator": "secant", "schedule": "linear"}, "batch"),
    "Hi-DLR secant, own batch + linear decay": (
        {"estimator": "secant", "schedule": "linear"}, "same"),
    "Hi-DLR secant recipe (total_steps)": (
        {"estimator": "secant", "total_steps": TOTAL_STEPS}, "same"),
    "Hi-DLR secant, previous step, own batch": (
        {"estimator": "secant", "probe_direction": "previous"}, "same"),
    "Hi-DLR secant, previous step, own batch + linear decay": (
        {"estimator": "secant", "probe_direction": "previous", "schedule": "linear"}, "same"),
}

#: The warm-up of the "5% warm-up" rows of Prodigy and D-Adaptation.
PEER_WARMUP = 0.05


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A real task: an example script and the flags that pick it.

  Attributes:
    script: the module in ``examples/`` (with ``parse_args`` and
      ``make_task``).
    flags: its flags for this task (e.g. ``--model nam``).
    adamw_warmup: the warm-up fraction of the script's AdamW rows.
  """

  script: str
  flags: tuple[str, ...] = ()
  adamw_warmup: float = 0.0

  def load(self, quick: bool) -> tuple[argparse.Namespace, rc.Task]:
    """The script's defaults (``--quick``: its smoke size) and its task."""
    module = importlib.import_module(self.script)
    args = module.parse_args([*self.flags, *(["--quick"] if quick else [])])
    return args, module.make_task(args)


TASKS: dict[str, TaskSpec] = {
    "letters": TaskSpec(
        "letter_recognition", ("--data-file", str(ROOT / "data" / "LetterRecognition.rda"))
    ),
    "California MLP": TaskSpec("california_mlp"),
    "California additive model": TaskSpec("california_mlp", ("--model", "nam")),
    "reviews (LoRA on MiniLM)": TaskSpec("finetune_reviews", adamw_warmup=0.03),
    "Fashion-MNIST, CPU sizing": TaskSpec("fashion_mnist", ("--cpu",)),
    "MovieLens recommender": TaskSpec("recommender"),
}


@dataclasses.dataclass(frozen=True)
class Row:
  """A method of the suite: how it trains, and its schedule in words."""

  entry: rc.Entry
  schedule: str


def peer_rows(weight_decay: float, steps: int) -> dict[str, Row]:
  """Prodigy and D-Adaptation: no schedule, linear decay, 5% warm-up + decay.

  The warm-up starts one step in (at ``1 / warm-up steps`` of the peak, and
  the decay ends one step after the run): at rate 0 both peers' estimates of
  the distance are 0 / 0. Prodigy's warm-up row also sets
  ``safeguard_warmup=True``, as its docstring advises for a warm-up.
  """
  warmup = schedule("linear", 1.0, steps + 1, PEER_WARMUP)
  schedules = {
      "": (1.0, {}, "none (rate 1)"),
      " + linear decay": (schedule("linear", 1.0, steps), {}, "linear 1 -> 0"),
      " + warm-up, linear decay": (
          lambda count: warmup(count + 1), {"safeguard_warmup": True},
          f"{PEER_WARMUP:.0%} linear warm-up, linear 1 -> 0",
      ),
  }
  peers = {"Prodigy": contrib.prodigy, "D-Adaptation": contrib.dadapt_adamw}
  rows = {}
  for peer, make in peers.items():
    for suffix, (rate, options, words) in schedules.items():
      options = options if peer == "Prodigy" else {}
      build = lambda _, make=make, rate=rate, options=options: make(
          learning_rate=rate, weight_decay=weight_decay, **options
      )
      rows[peer + suffix] = Row(rc.Entry(Method(peer + suffix, build)), words)
  return rows


def schedule_free_rows(weight_decay: float, peaks: Sequence[float]) -> dict[str, Row]:
  """Schedule-free AdamW at optax's default rate, and over the grid of peaks."""
  make = lambda lr: contrib.schedule_free_adamw(learning_rate=lr, weight_decay=weight_decay)
  default = Method(
      "Schedule-free AdamW", lambda _: contrib.schedule_free_adamw(weight_decay=weight_decay),
      eval_params=schedule_free_eval,
  )
  grid = Method(
      "Schedule-free AdamW (grid)", make, grid=jnp.asarray(peaks, jnp.float32),
      eval_params=schedule_free_eval, describe=lambda lr: f"lr {float(lr):.2g}",
  )
  return {
      default.name: Row(rc.Entry(default), "none (schedule-free, rate 0.0025)"),
      grid.name: Row(rc.Entry(grid), "none (schedule-free)"),
  }


def adamw_rows(
    weight_decay: float, peaks: Sequence[float], steps: int, warmup: float
) -> dict[str, Row]:
  """AdamW over the grid of peaks: constant, linear and cosine decay."""
  lead = f"{warmup:.0%} linear warm-up, " if warmup else ""
  return {
      f"AdamW {kind}": Row(
          rc.scheduled_adamw(
              f"AdamW {kind}", kind, peaks, steps, weight_decay=weight_decay,
              warmup_fraction=warmup,
          ),
          f"{lead}{kind}" + ("" if kind == "constant" else " peak -> 0"),
      )
      for kind in ("constant", "linear", "cosine")
  }


def hidlr_rows(args: argparse.Namespace, task: rc.Task) -> dict[str, Row]:
  """The rows of :data:`HIDLR_CONFIGS` on the task's groups and initial rate."""
  rows = {}
  for name, (config, probe) in HIDLR_CONFIGS.items():
    config = {
        k: task.steps if isinstance(v, str) and v == TOTAL_STEPS else v
        for k, v in config.items()
    }
    labels = config.pop("param_labels", task.labels)
    # The script's options (weight decay, Phi, ...), then the row's.
    options = rc.hidlr_options(argparse.Namespace(**{**vars(args), "hidlr_kwargs": config}),
                               task.steps)
    decay = "linear" if "total_steps" in config else config.get("schedule")
    words = f"applied step x {decay} 1 -> 0" if isinstance(decay, str) else "none"
    rows[name] = Row(rc.hidlr_entry(name, args.lr, labels, probe=probe, **options), words)
  return rows


def all_rows(args: argparse.Namespace, task: rc.Task, spec: TaskSpec) -> dict[str, Row]:
  """Every method of the suite on one task, by name."""
  wd, steps = args.weight_decay, task.steps
  return {
      **hidlr_rows(args, task),
      **peer_rows(wd, steps),
      **schedule_free_rows(wd, args.peaks),
      **adamw_rows(wd, args.peaks, steps, spec.adamw_warmup),
  }


def diverged(history: Mapping[str, Any], score: str) -> bool:
  """A run diverged when its final test score is not finite, or when its
  mini-batch loss over the last tenth of the run is above the first step's."""
  losses = np.asarray(history["step_loss"], dtype=float)
  tail = losses[-max(1, len(losses) // 10):]
  final = float(np.asarray(history[score])[-1])
  return bool(not np.isfinite(final) or not np.all(np.isfinite(tail))
              or tail.mean() > losses[0])


def run_task(
    spec: TaskSpec, names: Optional[Sequence[str]], seeds: Sequence[int], quick: bool
) -> dict[str, Any]:
  """Trains the chosen methods on one task.

  Returns:
    ``{"setting": ..., "columns": ..., "larger_is_better": ..., "methods":
    {name: {"schedule", "grid pick", "seconds", "metrics"}}}``, JSON-ready,
    ``metrics`` being one ``{metric: value}`` per seed.
  """
  args, task = spec.load(quick)
  rows = all_rows(args, task, spec)
  unknown = set(names or ()) - set(rows)
  if unknown:
    raise ValueError(f"unknown methods {sorted(unknown)}; known: {list(rows)}")
  chosen = [row for name, row in rows.items() if not names or name in names]
  score = task.score[len("test_"):]  # the history's key of the score
  summarise = lambda h: {
      **task.summarise(h), "diverged": float(diverged(h, f"test_{score}"))
  }
  runs = rc.run_seeds(
      [row.entry for row in chosen], seeds, task.run, summarise, task.score,
      task.larger_is_better,
  )
  setting = (
      f"{task.epochs} epoch(s) of batch {task.batch_size} ({task.steps} steps); AdamW weight"
      f" decay {args.weight_decay} for every method; Hi-DLR initial rate {args.lr}, Phi ="
      f" {args.update_every}; peak grid {list(args.peaks)}"
  )
  return {
      "setting": setting,
      "columns": [list(c) for c in task.columns],
      "larger_is_better": task.larger_is_better,
      "methods": {
          row.entry.name: {
              "schedule": row.schedule,
              "grid pick": runs[row.entry.name].setting,
              "seconds": runs[row.entry.name].seconds,
              "metrics": runs[row.entry.name].metrics,
          }
          for row in chosen
      },
  }


def task_table(result: Mapping[str, Any]) -> str:
  """Markdown table of one task: mean ± std per metric, diverged seeds, time."""
  header = ["method", "schedule", "grid pick", *(t for _, t in result["columns"]),
            "diverged", "s / run", "s in all"]
  rows = []
  for name, m in result["methods"].items():
    per_seed = m["metrics"]
    cells = [rc.mean_std([s[key] for s in per_seed]) for key, _ in result["columns"]]
    rows.append([
        name, m["schedule"], m["grid pick"] or "-", *cells,
        f"{int(sum(s['diverged'] for s in per_seed))} / {len(per_seed)}",
        f"{np.mean(m['seconds']):.1f}", f"{np.sum(m['seconds']):.1f}",
    ])
  return markdown_table(header, rows)


def figure(results: Mapping[str, Mapping[str, Any]], out: Path, name: str) -> Path:
  """Per task, each method's first metric: mean with a ± std error bar."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
      1, len(results), figsize=(5.5 * len(results), 0.35 * max(
          len(r["methods"]) for r in results.values()) + 1.5), squeeze=False,
  )
  for ax, (task, result) in zip(axes[0], results.items()):
    key, title = result["columns"][0]
    names = list(result["methods"])
    values = [[s[key] for s in result["methods"][n]["metrics"]] for n in names]
    y = np.arange(len(names))
    colors = ["tab:red" if n.startswith(("Hi-DLR", "GeN")) else "tab:gray" for n in names]
    for i, (v, color) in enumerate(zip(values, colors)):
      ax.errorbar(np.mean(v), i, xerr=np.std(v), fmt="o", color=color, capsize=3)
    ax.grid(axis="x", alpha=0.3)
    finite = [x for v in values for x in v if np.isfinite(x)]
    if finite:
      low, high = min(finite), max(finite)
      pad = 0.1 * (high - low) + 1e-3 * abs(high)
      ax.set_xlim(low - pad, high + pad)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    better = "higher" if result["larger_is_better"] else "lower"
    ax.set_title(f"{task}\n{title} ({better} is better)", fontsize=9)
  return save_figure(fig, out, name)


def render(command: str, seeds: Sequence[int], results: Mapping[str, Any],
           minutes: float, pending: Sequence[str], picture: Optional[Path],
           updates: Sequence[str] = ()) -> str:
  """The results file: command (and the updates that reran some of its rows),
  setting, one section per task, the figure."""
  configs = "\n".join(
      f"- **{name}**: `{json.dumps(config)}`, probe `{probe!r}`"
      for name, (config, probe) in HIDLR_CONFIGS.items()
  )
  done = f" Not run yet: {', '.join(pending)}." if pending else ""
  sections = "\n\n".join(
      f"## {task}\n\n{r['setting']}.\n\n{task_table(r)}" for task, r in results.items()
  )
  image = f"![suite]({picture.name})\n" if picture is not None else ""
  reruns = "".join(f"\nRows rerun by: {update}\n" for update in updates)
  return f"""Command: `{command}`
{reruns}
# The benchmark suite

{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); a seed fixes the initialisation and the
batch order, the same for every method. Mean ± std over seeds (ddof 0). "grid pick": the
grid point with the best mean test score over seeds (picked on test data, which favours
the grid methods). "diverged": seeds whose final test score is not finite or whose
mini-batch loss over the last tenth of the run is above the first step's. "s / run": wall
time of one seed (all grid points together), compilation included, on
{jax.devices()[0].device_kind}. {minutes:.1f} minutes in all.{done}

Every method uses the task's AdamW weight decay. Prodigy and D-Adaptation (AdamW) at their
default rate 1, without a schedule, with `optax.linear_schedule(1.0, 0.0, total_steps)` (the
schedule their optax docstrings recommend) and with {PEER_WARMUP:.0%} linear warm-up then linear
decay to 0 (starting one step in, at 1 / warm-up steps of the rate, since rate 0 makes their
distance estimates 0 / 0; Prodigy with `safeguard_warmup=True`, as its docstring advises for a
warm-up). Schedule-free AdamW (`optax.contrib.schedule_free_adamw`) at its default rate
0.0025 and over the task's peak grid, evaluated at its averaged point x. AdamW over the
task's peak grid, constant, linear or cosine decay to 0 (with the example script's
warm-up). GeN / Hi-DLR on the AdamW direction at the script's initial rate and groups, with
these `hidlr_optax.hidlr` options and `hidlr_optax.make_train_step` probe modes:

{configs}

{sections}

{image}"""


#: The README's Hi-DLR columns (rows of :data:`HIDLR_CONFIGS`).
README_HIDLR = (
    "Hi-DLR, separate batch", "Hi-DLR recipe (total_steps: own batch, linear decay, guard)",
    "Hi-DLR secant recipe (total_steps)", "Hi-DLR, own batch + linear decay",
    "Hi-DLR secant, separate batch",
)
#: Peers on the schedules their docs recommend (the README's best-peer column).
SCHEDULED_PEERS = tuple(
    f"{peer}{schedule}" for peer in ("Prodigy", "D-Adaptation")
    for schedule in (" + linear decay", " + warm-up, linear decay")
)


def readme_table(results: Mapping[str, Mapping[str, Any]],
                 methods: Sequence[str] = README_HIDLR) -> str:
  """The README's results table from a suite's results: per task, the first
  metric (mean ± std, with the diverged seeds) of each of ``methods``, of
  the better learning-rate-free peer on its recommended schedule, of
  schedule-free AdamW at its default rate, and of the best tuned method
  (AdamW schedules and schedule-free AdamW over the grid, picked by mean)."""
  header = ["task", "metric", *methods, "best learning-rate-free peer, scheduled",
            "schedule-free AdamW, default rate", "best tuned (grid picked on test)"]
  rows = []
  for task, r in results.items():
    key, title = r["columns"][0]
    values = lambda m: [s[key] for s in r["methods"][m]["metrics"]]
    mean = lambda m: float(np.mean(values(m)))

    def cell(m: str) -> str:
      if m not in r["methods"]:
        return ""
      runs = r["methods"][m]["metrics"]
      diverged = int(sum(s.get("diverged", 0) for s in runs))
      return rc.mean_std(values(m)) + (f" ({diverged}/{len(runs)} diverged)" if diverged else "")

    best = lambda names: (max if r["larger_is_better"] else min)(
        [m for m in names if m in r["methods"]], key=mean, default=None)
    named = lambda m: "" if m is None else f"{m}: {cell(m)}"
    tuned = [m for m in r["methods"] if m.startswith("AdamW") or m.endswith("(grid)")]
    arrow = "↑" if r["larger_is_better"] else "↓"
    rows.append([task, f"{title} {arrow}", *(cell(m) for m in methods),
                 named(best(SCHEDULED_PEERS)), cell("Schedule-free AdamW"),
                 named(best(tuned))])
  return markdown_table(header, rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--methods", nargs="+", default=None,
                 help="only these methods (their names in the tables)")
  p.add_argument("--name", default="suite", help="the results files' name, without suffix")
  p.add_argument("--out", type=Path, default=RESULTS)
  p.add_argument("--quick", action="store_true", help="every task at its script's --quick size")
  p.add_argument("--readme-table", action="store_true",
                 help="print the README's results table from <out>/<name>.json and exit")
  p.add_argument("--update", action="store_true",
                 help="run --methods on --tasks into the existing <name>.json: those rows are"
                      " replaced, the others kept (after a change that moves only them)")
  p.add_argument("--merge", nargs="+", default=(), metavar="NAME",
                 help="with --readme-table: also the tasks and rows of <out>/<NAME>.json (a"
                      " run of other tasks or methods with the same seeds) that <name>.json lacks")
  return p.parse_args(argv)


def merged(results: dict[str, Any], others: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """``results`` with the tasks and every task's methods of ``others`` that it lacks.

  Every method the runs share must have the same numbers in both (the runs
  are deterministic per seed): otherwise they ran different code, and
  merging them would compare across revisions.
  """
  out = json.loads(json.dumps(results))
  for other in others:
    for task, r in other.items():
      # A task this run lacks is one with no methods yet.
      mine = out.setdefault(task, {**r, "methods": {}})["methods"]
      for name, m in r["methods"].items():
        if name not in mine:
          mine[name] = m
        elif mine[name]["metrics"] != m["metrics"]:
          raise ValueError(f"{task}: {name!r} differs between the merged runs")
  return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  stored = args.out / f"{args.name}.json"
  if args.readme_table:
    results = merged(json.loads(stored.read_text())["results"], [
        json.loads((args.out / f"{name}.json").read_text())["results"] for name in args.merge])
    print(readme_table(results))
    return results
  command = shlex.join(["python", "-m", "benchmarks.suite", *argv])
  seeds = list(range(args.seeds))
  start = time.perf_counter()
  run = {"command": command, "results": {}, "minutes": 0.0, "updates": []}
  if args.update:
    kept = json.loads(stored.read_text())
    if "minutes" not in kept:  # a file from before the time was stored: its page has it
      md = (args.out / f"{args.name}.md").read_text()
      kept["minutes"] = float(re.search(r"([\d.]+) minutes in all", md).group(1))
    for task, r in kept["results"].items():
      for name, m in r["methods"].items():
        if len(m["metrics"]) != args.seeds:
          raise ValueError(f"--update: {task}: {name!r} has {len(m['metrics'])} seeds,"
                           f" this run {args.seeds}")
    run = {**run, **kept}
  results, updates = run["results"], list(run["updates"])
  args.out.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(args.tasks):
    rows = run_task(TASKS[name], args.methods, seeds, args.quick)
    results.setdefault(name, {**rows, "methods": {}})["methods"].update(rows["methods"])
    print(f"## {name}\n\n{task_table(rows)}\n", flush=True)
    # Written after every task, so that a long run's finished tasks are kept.
    picture = figure(results, args.out, args.name)
    minutes = (time.perf_counter() - start) / 60
    if args.update:
      run["updates"] = [*updates, f"`{command}` ({minutes:.1f} minutes)"]
    else:
      run["minutes"] = minutes
    pending = () if args.update else args.tasks[i + 1:]
    text = render(run["command"], seeds, results, run["minutes"], pending, picture,
                  run["updates"])
    (args.out / f"{args.name}.md").write_text(text)
    stored.write_text(json.dumps(run, indent=1))
  return results


if __name__ == "__main__":
  main()
