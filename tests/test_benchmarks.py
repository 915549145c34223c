"""Smoke tests of the overhead benchmark (benchmarks/overhead/; tiny sizes, no
timing assertions: speed targets belong to the benchmark's report) and of
benchmarks/compare_revisions.py."""

import dataclasses
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _models, overhead

import _jaxprs

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
  # The compile table's last column (a difference of two noisy times over a
  # count) is positive only up to that noise.
  compiling, later = after.split("### Peak memory")
  without_last = re.sub(r"\| [^|]* \|$", "|", compiling, flags=re.M)
  numbers = table_numbers(before + without_last + later)
  assert len(numbers) > 40
  assert all(math.isfinite(x) and x > 0 for x in numbers)
  # Every K x estimator row carries an amortised ratio and the paper's bound.
  grid_cells = re.findall(r"(\d+\.\d+) \((\d+\.\d+)\)", text)
  # K = 2: probe x 2 batchings, jvp, secant x 2 feeds (separate batch, grad=); 2 Phis.
  assert len(grid_cells) == 5 * 2
  assert "| 2 | secant | own batch, grad= |" in text
  assert all(float(a) > 0 and 0 < float(b) < 1 for a, b in grid_cells)
  # The compile table takes Hi-DLR apart: each row holds less of the
  # refresh's work than the one before it, so it compiles fewer kernels,
  # and fewer distinct ones.
  compile_rows = [[c.strip() for c in l.strip().strip("|").split("|")]
                  for l in compiling.splitlines()
                  if l.startswith("| ") and not l.startswith("| step")]
  kernels = {r[0]: (int(r[5]), int(r[6])) for r in compile_rows}
  assert len(kernels) == 7, kernels
  chain = ["Hi-DLR chunk1", "the same, joint_check=False",
           next(n for n in kernels if "a refresh's forwards only" in n),
           next(n for n in kernels if "holding one forward" in n), "base (adam)"]
  for column in (0, 1):
    counts = [kernels[n][column] for n in chain]
    assert all(a > b for a, b in zip(counts, counts[1:])), kernels
  assert all(distinct <= fusions for fusions, distinct in kernels.values())


def test_distinct_fusions_counts_identical_bodies_once():
  xs = [jnp.ones(7)] * 4
  hlo = lambda f: jax.jit(f).lower(*xs).compile().as_text()
  same = hlo(lambda *xs: tuple(2 * x + 1.0 for x in xs))
  different = hlo(lambda *xs: tuple(2 * x + 1.0 + i for i, x in enumerate(xs)))
  assert same.count(" fusion(") == different.count(" fusion(") == 4
  assert overhead.distinct_fusions(same) == 1
  assert overhead.distinct_fusions(different) == 4
  # A reduction's body is part of what a fusion computes.
  reduce = hlo(lambda *xs: (jnp.sum(jnp.exp(xs[0])), jnp.max(jnp.exp(xs[1]))))
  assert overhead.distinct_fusions(reduce) == reduce.count(" fusion(")


def test_bare_conditional_recomputing_its_direction_updates_as_the_plain_one_in_place():
  bench = overhead.Bench.create(_models.build("mlp", quick=True))
  plain = overhead.Variant(k=2, bare_cond=True, update_every=2)
  recomputing = overhead.Variant(k=2, bare_cond=True, bare_recompute=True, update_every=2)
  params = {}
  for v in (plain, recomputing):
    step, tx = bench.compile(v)
    p, state = bench.model.params, tx.init(bench.model.params)
    for _ in range(3):  # fires at steps 0 and 2
      p, state, _ = step(p, state, bench.model.frozen, bench.batch, bench.probe_batch)
    params[v] = p
  np.testing.assert_allclose(
      jax.flatten_util.ravel_pytree(params[plain])[0],
      jax.flatten_util.ravel_pytree(params[recomputing])[0], rtol=1e-6, atol=1e-7)
  # Adam's update is ordered after the branch that reads its old state, so
  # the donated state is updated in place, not copied (a copy of Adam's two
  # moments would add twice the parameters' bytes).
  peaks = {v: overhead.peak_bytes(bench.compile(v, donate=True)[0])
           for v in (plain, recomputing)}
  param_bytes = overhead.tree_bytes(bench.model.params)
  assert peaks[recomputing] - peaks[plain] < 0.25 * param_bytes, (peaks, param_bytes)


def test_interleaved_rotates_the_order_and_times_with_the_given_clock():
  calls, ticks = [], iter(range(100))
  thunks = {n: (lambda n=n: calls.append(n)) for n in "abc"}
  times = overhead.interleaved(thunks, 3, clock=lambda: float(next(ticks)) ** 2)
  # 2 untimed warm-up calls each, then each repetition starts one name later.
  assert calls == list("aabbcc") + list("abc") + list("bca") + list("cab")
  # t0 = (2i)^2, t1 = (2i + 1)^2 for the i-th timed call: t1 - t0 = 4i + 1.
  order = "abcbcacab"
  expected = {n: [4 * i + 1 for i, m in enumerate(order) if m == n] for n in "abc"}
  assert {n: t.tolist() for n, t in times.items()} == expected


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


def test_revision_table_pairs_the_seeds():
  from benchmarks import compare_revisions as cr
  values = [{"m": [1.0, 2.0, 3.0]}, {"m": [0.5, 2.5, 2.0]}]
  text = cr.task_section("california-mlp", ["old", "new"], values)
  row = next(l for l in text.splitlines() if l.startswith("| m | 2.0000"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  # old: mean 2 ± 0.8165, median 2; new: mean 5/3, median 2; paired
  # differences (-0.5, 0.5, -1): mean -1/3, lower on 2 of 3 seeds.
  assert cells == ["m", "2.0000 ± 0.8165", "2.0000", "1.6667 ± 0.8498", "2.0000",
                   "-0.3333", "2 / 3"]
  assert "| m | `new` | 0.5000 | 2.5000 | 2.0000 |" in text


def test_compare_revisions_runs_each_revision_and_same_code_gives_same_losses(tmp_path):
  out = tmp_path / "revisions.md"
  argv = ["--revisions", "HEAD", "HEAD", "--tasks", "additive-synthetic", "--quick",
          "--out", str(out)]
  subprocess.run([sys.executable, "-m", "benchmarks.compare_revisions", *argv],
                 cwd=ROOT, check=True, timeout=900)
  text = out.read_text()
  assert text.startswith("Command: `python -m benchmarks.compare_revisions --revisions HEAD HEAD")
  row = next(l for l in text.splitlines() if l.startswith("| Hi-DLR (10 features + bias) | "))
  cells = [c.strip() for c in row.strip("|").split("|")]
  first, second = float(cells[1].split("±")[0]), float(cells[3].split("±")[0])
  assert math.isfinite(first) and first > 0
  # The same core, seed and data: the runs are identical, so is the loss.
  assert first == second and cells[5] == "+0.0000" and cells[6] == "0 / 1"


def test_compare_revisions_rejects_an_unknown_revision():
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.compare_revisions", "--revisions", "HEAD",
       "no-such-revision"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "'no-such-revision' is neither a commit" in proc.stderr


def test_revision_table_counts_seeds_that_did_not_finish():
  from benchmarks import compare_revisions as cr
  text = cr.task_section("california-mlp", ["old", "new"],
                         [{"m": [1.0, 2.0]}, {"m": [float("nan"), 1.5]}])
  assert "| m | 1.5000 ± 0.5000 | 1.5000 | not finite in 1 / 2 seeds | - |" in text


def test_a_directory_revision_carries_its_diff_from_head(tmp_path):
  from benchmarks import compare_revisions as cr
  cr.copy_core("HEAD", tmp_path)
  assert cr.diff_from_head(str(tmp_path)) == ""
  assert cr.describe_revision(str(tmp_path), "").endswith("the same as HEAD's")
  rule = tmp_path / "hidlr_optax" / "_rule.py"
  rule.write_text(rule.read_text().replace("JOINT_CHECK_ULPS = 256", "JOINT_CHECK_ULPS = 32"))
  diff = cr.diff_from_head(str(tmp_path))
  assert diff.startswith("--- a/hidlr_optax/_rule.py\n+++ b/hidlr_optax/_rule.py\n")
  assert "-JOINT_CHECK_ULPS = 256\n+JOINT_CHECK_ULPS = 32\n" in diff
  # The diff rebuilds the variant from HEAD's core.
  rebuilt = tmp_path / "rebuilt"
  cr.copy_core("HEAD", rebuilt)
  subprocess.run(["patch", "-p1", "-s"], input=diff, text=True, cwd=rebuilt, check=True)
  assert (rebuilt / "hidlr_optax" / "_rule.py").read_text() == rule.read_text()


def test_the_step_task_measures_step_time_and_memory_ratios():
  from benchmarks import compare_revisions as cr
  values = cr.TASKS["step"].run(2, True)
  assert sorted(values) == ["mlp: Hi-DLR refresh step / base",
                            "mlp: Hi-DLR step that does not refresh / base",
                            "mlp: peak memory / base (donated)"]
  assert all(len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v)
             for v in values.values())
  memory = values["mlp: peak memory / base (donated)"]
  assert memory[0] == memory[1] >= 1  # deterministic: XLA's buffer assignment


def test_defaults_sweep_counts_what_diverged(tmp_path):
  """benchmarks/defaults.py --quick: one row per task and variant, and the
  summary's diverged counts and compared tasks agree with the rows."""
  from benchmarks import defaults

  results = defaults.main(["--quick", "--out", str(tmp_path)])
  text = (tmp_path / "defaults.md").read_text()
  assert text.startswith("Command: `python benchmarks/defaults.py --quick --out")
  tasks = {task for task, _ in results}
  assert len(results) == len(tasks) * len(defaults.VARIANTS)
  for variant in defaults.VARIANTS:
    row = next(l for l in text.splitlines() if l.startswith(f"| {variant} |") and l.count("|") == 6)
    compared, num_diverged = (int(c.strip()) for c in row.strip("|").split("|")[3:5])
    blew_up = {t for t in tasks if defaults.T.diverged(results[t, variant]["train_loss"])}
    assert num_diverged == len(blew_up)
    base_blew_up = {t for t in tasks if defaults.T.diverged(results[t, "defaults"]["train_loss"])}
    assert compared == len(tasks - blew_up - base_blew_up)


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_chunked_probes_hold_no_more_than_one_probe_forward_needs(name):
  # The step's peak is either the base step's (plus the probe batch, an
  # argument) or a probe's: the base's arguments, the probe batch, the
  # direction and one forward at a moved point. Hi-DLR's fit, rule and state
  # add only scalars and per-group vectors to it.
  bench = overhead.Bench.create(_models.build(name, quick=True))
  sizes = overhead.memory_sizes(
      bench, ["base (adam)", "Hi-DLR vmap", "Hi-DLR chunk1 (probe_batch_size=1)"])
  base_peak = sizes["base (adam)"][2]
  needed = max(overhead.memory_floor(bench, sizes),
               base_peak + overhead.tree_bytes(bench.probe_batch))
  chunk1 = sizes["Hi-DLR chunk1 (probe_batch_size=1)"][2]
  assert chunk1 <= needed + 0.05 * overhead.tree_bytes(bench.model.params), (chunk1, needed)
  assert sizes["Hi-DLR vmap"][2] > chunk1


def test_bare_conditional_follows_the_callers_schedule_without_a_conditional():
  # The measured floor of a probe refresh: Adam plus forwards on the steps
  # the caller marks, and on the others exactly Adam, with no lax.cond.
  bench = overhead.Bench.create(_models.build("mlp", quick=True))
  v = overhead.Variant(k=2, bare_cond=True, bare_probes=3)
  primitives = {}
  for refresh in (None, True, False):
    variant = dataclasses.replace(v, refresh=refresh)
    tx = overhead.optimizer(bench.model, variant)
    step = overhead.train_step(bench.model, tx, variant)
    jaxpr = jax.make_jaxpr(step)(*bench.args(tx.init(bench.model.params)))
    primitives[refresh] = _jaxprs.primitives(jaxpr.jaxpr)
  loops = {"while", "scan"}
  assert "cond" in primitives[None]
  assert "cond" not in primitives[True] and loops & primitives[True]
  assert not ({"cond"} | loops) & primitives[False]
  base_tx = overhead.optimizer(bench.model, overhead.BASE)
  plain, _, _ = jax.jit(overhead.train_step(bench.model, base_tx, overhead.BASE))(
      *bench.args(base_tx.init(bench.model.params)))
  variant = dataclasses.replace(v, refresh=False)
  tx = overhead.optimizer(bench.model, variant)
  skipped, _, _ = jax.jit(overhead.train_step(bench.model, tx, variant))(
      *bench.args(tx.init(bench.model.params)))
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(skipped)[0],
                             jax.flatten_util.ravel_pytree(plain)[0], rtol=1e-6, atol=1e-7)


def test_table4_measures_both_estimators_at_every_phi():
  from benchmarks import table4

  text = table4.main(["--quick", "--reps", "2"])
  rows = {line.split("|")[1].strip(): line for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("| estimator")}
  assert set(rows) == {"probe", "secant", "paper's bound, full training"}
  for name in ("probe", "secant"):
    cells = [c.strip() for c in rows[name].split("|")[2:-1]]
    assert len(cells) == 3 + len(table4.PHIS)
    speeds = [float(c) for c in cells[3:]]
    assert all(0 < s < 2 for s in speeds)
    # From the same two step ratios, the amortised speed moves monotonically
    # with Phi (from the refresh step's ratio at Phi = 1 towards the other's).
    assert speeds in (sorted(speeds), sorted(speeds, reverse=True))


def test_rates_trace_compares_every_group_with_the_tuned_schedule(tmp_path):
  from benchmarks import rates

  traces = rates.main(["--tasks", "letters", "--seeds", "2", "--quick", "--out", str(tmp_path)])
  trace = traces["letters"]
  steps, tuned = trace["steps"], trace["tuned"]["rates"]
  # AdamW's linear schedule from its picked peak, and the recipe's decay on Hi-DLR's rates.
  assert tuned[0] > 0 and np.allclose(tuned / tuned[0], rates.decay(steps), atol=1e-6)
  assert set(trace["methods"]) == set(rates.RECIPES)
  for method in trace["methods"].values():
    assert set(method["rates"]) == {"w1", "w2", "w3", "bias"}
    for applied in method["rates"].values():
      assert applied.shape == (2, steps)
      assert np.all(np.isfinite(applied)) and np.all(applied[:, :-1] > 0)
      # The first step's rate: the script's 1e-3 after one refresh (growth <= 4x).
      assert 1e-3 <= applied[0, 0] <= 4e-3
  text = (tmp_path / "rates.md").read_text()
  assert text.count("| recipe (probes) |") == text.count("| recipe (secant) |") == 4
  assert "| AdamW linear (peak " in text and (tmp_path / "rates.png").exists()
