r"""Hi-DLR at several git revisions of the core, on the same tasks and seeds.

A change to the core has to be measured before and after, and one seed of
these small models is not enough: their runs are chaotic (a different rate
at one refresh changes every later batch's loss). This script trains the
Hi-DLR methods of a few benchmark tasks for several seeds with each
revision's ``hidlr_optax`` and prints, per method, each revision's mean,
median and spread of the final test loss, and the per-seed (paired)
difference from the first revision.

Each revision runs in a child process whose ``PYTHONPATH`` starts with a copy
of that revision's ``hidlr_optax/`` (``git archive``); the models, data and
training loops are this checkout's ``examples/``, so only the core differs.
A revision may also be a directory holding a ``hidlr_optax/`` (``.`` is this
working tree, uncommitted changes included): a variant of the core is
measured against ``HEAD`` before it is committed, and the results file
carries its diff from ``HEAD``, so that it can be reproduced (copy
``hidlr_optax/`` into a new directory, ``patch -p1`` the diff there, and pass
that directory). Seeds are ``0 .. n-1``, as in the examples (the seed sets the
initialisation and the batch order, and for the synthetic task the data).

The ``compile`` task compares compile times instead: each repetition
compiles the base step and Hi-DLR's in turn in the revision's child process
and keeps their ratio, so that every value is measured side by side. The
``step`` task does the same for step times (interleaved repetitions) and
adds the peak memory of the donated step.

Usage (files that record a change go to ``benchmarks/results/history/``)::

  python -m benchmarks.compare_revisions --revisions 2e169ca HEAD \
      --tasks california-mlp additive-synthetic --seeds 8 \
      --out benchmarks/results/history/revisions_<name>.md
  python -m benchmarks.compare_revisions --revisions HEAD . --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _common as C  # noqa: E402
WORKING_TREE = "."

PerSeed = dict[str, list[float]]  # method -> final test loss per seed


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark task reduced to its Hi-DLR methods.

  Attributes:
    describe: what is trained, for the results file.
    metric: the compared value (lower is better).
    run: ``(num_seeds, quick) -> {method: value per seed}``; runs in the
      child process, with ``examples/`` importable.
    repeat: what one value is: a ``"seed"`` of a training run, or a
      ``"repetition"`` of a measurement.
  """

  describe: str
  metric: str
  run: Callable[[int, bool], PerSeed]
  repeat: str = "seed"


def _california(model: str, methods: Sequence[str]) -> Callable[[int, bool], PerSeed]:
  def run(num_seeds: int, quick: bool) -> PerSeed:
    import california_mlp

    with tempfile.TemporaryDirectory() as out:
      argv = ["--model", model, "--methods", *methods, "--out", out]
      argv += ["--quick"] if quick else ["--seeds", str(num_seeds)]
      runs = california_mlp.main(argv)
    return {name: [m["test_mse"] for m in r.metrics] for name, r in runs.items()}

  return run


def _additive(task: str) -> Callable[[int, bool], PerSeed]:
  def run(num_seeds: int, quick: bool) -> PerSeed:
    import additive_model

    values: PerSeed = {}
    for seed in range(1 if quick else num_seeds):
      results, _ = additive_model.run_task(
          task, seed, quick, only=lambda name: name.startswith("Hi-DLR"))
      for name, record in results.items():
        values.setdefault(name, []).append(float(record["test_loss"][-1]))
    return values

  return run


def _compile_ratios(models: Sequence[str], num_groups: int) -> Callable[[int, bool], PerSeed]:
  def run(num_reps: int, quick: bool) -> PerSeed:
    from benchmarks import _models, overhead

    values: PerSeed = {}
    for model in models:
      bench = overhead.Bench.create(_models.build(model, quick))
      variants = {"base": overhead.BASE, "Hi-DLR": overhead.Variant(k=num_groups)}
      times, _ = overhead.compile_times(bench, variants, 1 if quick else num_reps)
      ratio = times["Hi-DLR"].sum(axis=1) / times["base"].sum(axis=1)
      values[f"{model}: Hi-DLR / base"] = ratio.tolist()
    return values

  return run


def _step_costs(models: Sequence[str], num_groups: int) -> Callable[[int, bool], PerSeed]:
  def run(num_reps: int, quick: bool) -> PerSeed:
    from benchmarks import _models, overhead

    values: PerSeed = {}
    for model in models:
      bench = overhead.Bench.create(_models.build(model, quick))
      v = overhead.Variant(k=num_groups)
      thunks = {"base": bench.step_call(overhead.BASE),
                "step that does not refresh": bench.step_call(v, count=1),
                "refresh step": bench.step_call(v, count=0)}
      peak = (overhead.peak_bytes(bench.compile(v, donate=True)[0])
              / overhead.peak_bytes(bench.compile(overhead.BASE, donate=True)[0]))
      for _ in range(num_reps):
        times = overhead.interleaved(thunks, 3 if quick else 15)
        for name in ("step that does not refresh", "refresh step"):
          ratio = float(np.median(times[name] / times["base"]))
          values.setdefault(f"{model}: Hi-DLR {name} / base", []).append(ratio)
        values.setdefault(f"{model}: peak memory / base (donated)", []).append(peak)
    return values

  return run


_COMPILE_METRIC = ("compile time of the Hi-DLR step / the base step's, both compiled in turn"
                   " in one process (benchmarks.overhead.compile_times)")

TASKS = {
    "california-mlp": Task(
        "California housing, MLP 8-64-64-1, 50 epochs (examples/california_mlp.py)",
        "final test MSE",
        _california("mlp", ["Hi-DLR (head)", "Hi-DLR (bias)", "Hi-DLR (layer)"]),
    ),
    "california-nam": Task(
        "California housing, additive model, 50 epochs (examples/california_mlp.py --model nam)",
        "final test MSE",
        _california("nam", ["Hi-DLR (feature)", "Hi-DLR (feature), own-batch probes"]),
    ),
    "additive-synthetic": Task(
        "additive model, synthetic data, SGD, 100 epochs (examples/additive_model.py)",
        "final test loss",
        _additive("synthetic"),
    ),
    "additive-california": Task(
        "additive model, California housing, Adam, 200 epochs (examples/additive_model.py)",
        "final test loss",
        _additive("california"),
    ),
    "compile": Task(
        "compile time (trace + lower + XLA compile) of the jitted train step, Hi-DLR over"
        " Adam at its default settings (K = 2, Phi = 8) against Adam alone, on the MLP and"
        " LoRA models of benchmarks/overhead/",
        _COMPILE_METRIC,
        _compile_ratios(["mlp", "lora"], 2),
        repeat="repetition",
    ),
    "step": Task(
        "step time of the jitted train step, Hi-DLR over Adam at its default settings"
        " (K = 2, Phi = 8) against Adam alone, on the MLP of benchmarks/overhead/, and"
        " peak memory by XLA's buffer assignment with params and state donated",
        "Hi-DLR / base: each step time the median over 15 interleaved repetitions of the"
        " paired ratio (benchmarks.overhead.interleaved); the memory ratio is deterministic",
        _step_costs(["mlp"], 2),
        repeat="repetition",
    ),
    "compile-k8": Task(
        "compile time as for `compile`, with K = 8 groups (on the MLP, whose 3 layers are"
        " fewer than 8, every leaf's last axis dealt round-robin over the groups)",
        _COMPILE_METRIC,
        _compile_ratios(["mlp"], 8),
        repeat="repetition",
    ),
}


# --------------------------------------------------------------------------
# The child: one revision, one task.


def child(task: str, num_seeds: int, quick: bool, out: Path) -> None:
  """Runs ``task`` with whatever ``hidlr_optax`` comes first on the path."""
  import hidlr_optax

  values = TASKS[task].run(num_seeds, quick)
  out.write_text(json.dumps({"core": hidlr_optax.__file__, "values": values}))


# --------------------------------------------------------------------------
# The parent: a copy of each revision's core, one child per revision and task.


def git(*args: str) -> str:
  return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                        text=True).stdout.strip()


def is_directory(revision: str) -> bool:
  return (Path(revision) / "hidlr_optax").is_dir()


def check_revision(revision: str) -> None:
  """Raises ``SystemExit`` unless ``revision`` is a commit or a directory
  holding a ``hidlr_optax/``."""
  commit = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                          cwd=ROOT, capture_output=True).returncode == 0
  if not (commit or is_directory(revision)):
    raise SystemExit(f"compare_revisions: {revision!r} is neither a commit of this repository"
                     " nor a directory holding a hidlr_optax/")


def copy_core(revision: str, into: Path) -> None:
  """Writes ``revision``'s ``hidlr_optax/`` under ``into`` (created if need be)."""
  into.mkdir(parents=True, exist_ok=True)
  if is_directory(revision):
    shutil.copytree(Path(revision) / "hidlr_optax", into / "hidlr_optax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return
  archive = subprocess.run(["git", "archive", revision, "hidlr_optax"], cwd=ROOT,
                           check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def diff_from_head(directory: str) -> str:
  """The unified diff of ``directory``'s core from ``HEAD``'s (empty if none)."""
  with tempfile.TemporaryDirectory() as tmp:
    copy_core("HEAD", Path(tmp))
    old, new = Path(tmp) / "hidlr_optax", Path(directory) / "hidlr_optax"
    names = sorted({p.relative_to(d).as_posix() for d in (old, new) for p in d.rglob("*.py")})
    read = lambda path: path.read_text().splitlines(keepends=True) if path.exists() else []
    return "".join(
        "".join(difflib.unified_diff(read(old / n), read(new / n),
                                     f"a/hidlr_optax/{n}", f"b/hidlr_optax/{n}"))
        for n in names
    )


def describe_revision(revision: str, diff: str) -> str:
  """``abc1234 subject`` for a commit; for a directory, whether its core
  differs from ``HEAD``'s (``diff``, from :func:`diff_from_head`)."""
  if is_directory(revision):
    return f"the core in directory {revision}" + (", changed from HEAD's (diff below)" if diff
                                                  else ", the same as HEAD's")
  return git("log", "-1", "--format=%h %s", revision)


def run_revision(revision: str, task: str, num_seeds: int, quick: bool) -> PerSeed:
  """The task's per-seed values with ``revision``'s core, in a child process.

  The child starts in the directory of the copied core, so that neither the
  working directory nor the checkout's own package comes first on its path;
  the values are kept only if it imported that copy.
  """
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    copy_core(revision, tmp)
    out = tmp / "values.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(ROOT)]))
    argv = [sys.executable, "-m", "benchmarks.compare_revisions", "--child", task,
            "--seeds", str(num_seeds), "--json", str(out)] + (["--quick"] if quick else [])
    subprocess.run(argv, cwd=tmp, env=env, check=True)
    result = json.loads(out.read_text())
    core = Path(result["core"]).resolve()
    if tmp.resolve() not in core.parents:
      raise RuntimeError(f"the child for {revision} imported {core}, not its copy under {tmp}")
    return result["values"]


def _stats(v: np.ndarray) -> list[str]:
  """``[mean ± std, median]``, or how many seeds ended non-finite."""
  bad = int((~np.isfinite(v)).sum())
  if bad:
    return [f"not finite in {bad} / {v.size} seeds", "-"]
  return [f"{v.mean():.4f} ± {v.std():.4f}", f"{np.median(v):.4f}"]


def task_section(name: str, revisions: Sequence[str], values: Sequence[PerSeed]) -> str:
  """Markdown: per method, each revision's statistics and the paired
  differences from the first revision (negative: lower loss than it)."""
  task = TASKS[name]
  first = revisions[0]
  header = ["method"]
  for r in revisions:
    header += [f"`{r}` mean ± std", f"`{r}` median"]
  for r in revisions[1:]:
    header += [f"`{r}` − `{first}` (paired mean)", f"`{r}` lower ({task.repeat}s)"]
  rows, per_seed = [], []
  for method in values[0]:
    runs = [np.asarray(v[method], float) for v in values]
    row = [method, *(cell for v in runs for cell in _stats(v))]
    for v in runs[1:]:
      diff = v - runs[0]
      row += [f"{diff.mean():+.4f}", f"{int((diff < 0).sum())} / {diff.size}"]
    rows.append(row)
    for r, v in zip(revisions, runs):
      per_seed.append([method, f"`{r}`", *(f"{x:.4f}" for x in v)])
  num_seeds = len(per_seed[0]) - 2
  seeds_header = ["method", "revision", *(f"{task.repeat} {s}" for s in range(num_seeds))]
  return "\n".join([
      f"## {name}: {task.describe}",
      "",
      f"{task.metric}, {num_seeds} {task.repeat}(s); std with ddof 0.",
      "",
      C.markdown_table(header, rows),
      "",
      f"Per {task.repeat}:",
      "",
      C.markdown_table(seeds_header, per_seed),
  ])


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--revisions", nargs="+", default=["HEAD", WORKING_TREE],
                 help="git commits, or directories holding a hidlr_optax/ ('.': this"
                      " working tree); the first is the reference")
  p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=["california-mlp"])
  p.add_argument("--seeds", type=int, default=3,
                 help="seeds 0 .. n-1 (for the compile task: repetitions)")
  p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, small data")
  p.add_argument("--out", type=Path, default=None, help="markdown file to write")
  p.add_argument("--child", choices=tuple(TASKS), help=argparse.SUPPRESS)
  p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: Sequence[str] = tuple(sys.argv[1:])) -> str:
  args = parse(list(argv))
  if args.child:
    child(args.child, args.seeds, args.quick, args.json)
    return ""
  if len(args.revisions) < 2:
    raise SystemExit("compare_revisions: give at least two --revisions")
  for r in args.revisions:
    check_revision(r)
  command = " ".join(["python -m benchmarks.compare_revisions", *map(shlex.quote, argv)])
  lines = [f"Command: `{command}`", "", "# Hi-DLR's core at several revisions", ""]
  diffs = {r: diff_from_head(r) if is_directory(r) else "" for r in args.revisions}
  lines += [f"- `{r}`: {describe_revision(r, diffs[r])}" for r in args.revisions]
  head = git("rev-parse", "--short", "HEAD")
  for r, diff in diffs.items():
    if diff:
      lines += ["", f"The core in `{r}` differs from HEAD's ({head}) by:", "", "```diff",
                diff.rstrip(), "```"]
  for task in args.tasks:
    values = [run_revision(r, task, args.seeds, args.quick) for r in args.revisions]
    lines += ["", task_section(task, args.revisions, values)]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
  return text


if __name__ == "__main__":
  main()
