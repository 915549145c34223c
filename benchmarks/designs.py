"""Rule designs side by side on the real tasks, with the learning-rate-free peers.

Each design is a set of :func:`hidlr_optax.scale_by_hidlr` options (the
paper's one-step rule is the first); each task runs one of the real-data
example scripts with ``--hidlr-kwargs`` set to the design, on the same seeds,
and the peers (Prodigy, D-Adaptation) once per task. Writes
``benchmarks/results/designs.md`` (or ``--name``). Run from the repository root::

  python -m benchmarks.designs                 # 5 seeds, every design and task
  python -m benchmarks.designs --seeds 1 --tasks letters --designs "paper rule (default)"
  python -m benchmarks.designs --seeds 3 --tasks "reviews (LoRA on MiniLM)" \
      "Fashion-MNIST, CPU sizing" --designs "paper rule (default)" "linear decay" \
      --name designs_large
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import _realdata_common as rc  # noqa: E402
import california_mlp  # noqa: E402
import fashion_mnist  # noqa: E402
import finetune_reviews  # noqa: E402
import letter_recognition  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: name -> (scale_by_hidlr options as --hidlr-kwargs, extra script flags).
DESIGNS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "paper rule (default)": ({}, []),
    "no joint check": ({"joint_check": False}, []),
    "cross-group check": ({"joint_check": "cross"}, []),
    "period fit": ({"horizon": "period"}, []),
    "linear decay": ({"schedule": "linear"}, []),
    "noise-aware fits": ({"per_example": True}, []),
    "Prodigy scale, Hi-DLR ratios": (
        {"direction": "prodigy", "ratios_only": True}, ["--lr", "1.0"]),
    "previous step": ({"probe_direction": "previous"}, []),
}


@dataclasses.dataclass(frozen=True)
class Task:
  """One real task: a script, its Hi-DLR rows, and the metrics to report.

  Attributes:
    main: the script's ``main(argv) -> {method: SeedRuns}``.
    flags: flags that pick the task (e.g. ``--model nam``).
    rows: the Hi-DLR rows of the script that every design runs.
    metrics: ``(key, column title, larger is better)``, the first decides.
  """

  main: Callable[[Sequence[str]], Mapping[str, Any]]
  flags: tuple[str, ...]
  rows: tuple[str, ...]
  metrics: tuple[tuple[str, str, bool], ...]


TASKS: dict[str, Task] = {
    "letters": Task(
        letter_recognition.main, (),
        ("Hi-DLR, fresh-batch probes", "Hi-DLR, same-batch probes"),
        (("test_accuracy", "test accuracy", True), ("train_loss", "train loss", False)),
    ),
    "California MLP": Task(
        california_mlp.main, (),
        ("Hi-DLR (head)", "Hi-DLR (layer)", "Hi-DLR (head), own-batch probes"),
        (("test_mse", "final test MSE", False), ("train_mse", "final train MSE", False)),
    ),
    "California additive model": Task(
        california_mlp.main, ("--model", "nam"),
        ("Hi-DLR (feature)", "Hi-DLR (feature), own-batch probes"),
        (("test_mse", "final test MSE", False), ("train_mse", "final train MSE", False)),
    ),
    # The two below cost minutes a run on two CPU cores (3 seeds in their files).
    "reviews (LoRA on MiniLM)": Task(
        finetune_reviews.main, (),
        ("Hi-DLR A/B/head", "Hi-DLR A/B/head, own-batch probes"),
        (("test_accuracy", "test accuracy", True), ("train_loss", "train loss", False)),
    ),
    "Fashion-MNIST, CPU sizing": Task(
        fashion_mnist.main, ("--cpu",),
        ("Hi-DLR (head)", "Hi-DLR (head), own-batch probes"),
        (("test_accuracy", "test accuracy", True), ("train_loss", "train loss", False)),
    ),
}

#: The tasks run by default (the others by ``--tasks``).
DEFAULT_TASKS = ("letters", "California MLP", "California additive model")

PEERS = ("Prodigy", "D-Adaptation")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS))
  p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
  p.add_argument("--out", type=Path, default=RESULTS)
  p.add_argument("--name", default="designs", help="the results file's name, without .md")
  return p.parse_args(argv)


def run_task(task: Task, methods: Sequence[str], seeds: int, kwargs: Mapping[str, Any],
             flags: Sequence[str]) -> Mapping[str, Any]:
  """Runs the task's script on ``methods``; its own results file goes to a tmp dir."""
  with tempfile.TemporaryDirectory() as out:
    argv = [*task.flags, "--seeds", str(seeds), "--out", out, "--methods", *methods,
            "--hidlr-kwargs", json.dumps(dict(kwargs)), *flags]
    return task.main(argv)


def cells(runs: Any, metrics: Sequence[tuple[str, str, bool]]) -> list[str]:
  values = [rc.mean_std([m[key] for m in runs.metrics]) for key, _, _ in metrics]
  diverged = sum(not np.isfinite(m[metrics[0][0]]) or m.get("diverged", 0) for m in runs.metrics)
  return [*values, f"{int(diverged)} / {len(runs.metrics)}"]


def mean_of(runs: Any, key: str) -> float:
  return float(np.mean([m[key] for m in runs.metrics]))


def task_section(name: str, task: Task, results: Mapping[str, Mapping[str, Any]],
                 peers: Mapping[str, Any]) -> tuple[str, dict[str, list[bool]]]:
  """The task's table, and per design whether each row is at least the best peer's."""
  key, _, larger = task.metrics[0]
  best_peer = max if larger else min
  target = best_peer(mean_of(peers[p], key) for p in PEERS)
  header = ["design", "row", *(t for _, t, _ in task.metrics), "diverged", "vs best peer"]
  rows, wins = [], {}
  for peer in PEERS:
    rows.append([peer, "-", *cells(peers[peer], task.metrics), "-"])
  for design, runs in results.items():
    wins[design] = []
    for row in task.rows:
      value = mean_of(runs[row], key)
      ok = value >= target if larger else value <= target
      wins[design].append(ok)
      rows.append([design, row, *cells(runs[row], task.metrics), "at or better" if ok else "behind"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return f"### {name}\n\n" + "\n".join(lines) + "\n", wins


def summary(wins: Mapping[str, Mapping[str, list[bool]]], designs: Sequence[str]) -> str:
  """Per design: how many task rows reach the best peer's mean."""
  lines = ["| design | rows at or better than the best peer |", "|---|---|"]
  for design in designs:
    hits = [w for task in wins.values() for w in task.get(design, [])]
    lines.append(f"| {design} | {sum(hits)} / {len(hits)} |")
  return "\n".join(lines) + "\n"


def render(args: argparse.Namespace, argv: Sequence[str], sections: Sequence[str],
           wins: Mapping[str, Mapping[str, list[bool]]], minutes: float) -> str:
  """The results file: command, setting, designs, summary, one section per task."""
  designs = "\n".join(
      f"- **{d}**: `{json.dumps(DESIGNS[d][0])}`" + (f" with `{' '.join(DESIGNS[d][1])}`"
                                                     if DESIGNS[d][1] else "")
      for d in args.designs
  )
  command = shlex.join(["python", "-m", "benchmarks.designs", *argv])
  done = "" if len(sections) == len(args.tasks) else (
      f" (partial: {len(sections)} of {len(args.tasks)} tasks so far)")
  return f"""Command: `{command}`

# Rule designs on the real tasks

Each design is a set of `scale_by_hidlr` options given to every Hi-DLR row of the
task's example script (`--hidlr-kwargs`), on the AdamW direction at the script's
untuned initial rate, {args.seeds} seed(s) each (the same seeds, batches and
initialisations for every design and peer); mean ± std over seeds. "vs best peer":
whether the row's mean of the first metric is at or better than the better of
Prodigy and D-Adaptation (run in the same invocation). Diverged: seeds whose first
metric is not finite or that the script counts as diverged. {minutes:.1f} minutes in all{done}.

{designs}

{summary(wins, args.designs)}
{chr(10).join(sections)}"""


def main(argv: Optional[Sequence[str]] = None) -> str:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  start = time.perf_counter()
  sections, wins = [], {}
  args.out.mkdir(parents=True, exist_ok=True)
  for name in args.tasks:
    task = TASKS[name]
    peers = run_task(task, PEERS, args.seeds, {}, [])
    results = {
        design: run_task(task, task.rows, args.seeds, *DESIGNS[design])
        for design in args.designs
    }
    text, wins[name] = task_section(name, task, results, peers)
    sections.append(text)
    print(text, flush=True)
    # Written after every task, so that a long run's finished tasks are kept.
    text = render(args, argv, sections, wins, (time.perf_counter() - start) / 60)
    (args.out / f"{args.name}.md").write_text(text)
  return text


if __name__ == "__main__":
  main()
