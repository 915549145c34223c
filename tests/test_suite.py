"""The benchmark suite (``benchmarks/suite.py``) on a tiny configuration."""

import json
import re
import shlex

import numpy as np
import pytest

from benchmarks import suite

METHODS = ["Hi-DLR, own batch + linear decay", "Prodigy + warm-up, linear decay",
           "Schedule-free AdamW (grid)", "AdamW linear"]


def test_a_quick_task_writes_every_requested_method(tmp_path, capsys):
  argv = ["--tasks", "California MLP", "--seeds", "1", "--quick", "--out", str(tmp_path),
          "--name", "tiny", "--methods", *METHODS]
  results = suite.main(argv)
  text = (tmp_path / "tiny.md").read_text()
  assert text.startswith("Command: `python -m benchmarks.suite --tasks 'California MLP'")
  assert "## California MLP" in text and "Not run yet" not in text
  assert (tmp_path / "tiny.png").stat().st_size > 10_000
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[0].startswith("| method | schedule | grid pick | final test MSE")
  for name in METHODS:
    (row,) = [r for r in rows if r.startswith(f"| {name} |")]
    cells = row.split(" | ")
    assert np.isfinite(float(cells[3])), row  # the first metric, one seed
    assert cells[-3] == "0 / 1", row  # no seed diverged
  assert "linear warm-up, linear 1 -> 0" in text  # the schedule of Prodigy's row
  assert list(results["California MLP"]["methods"]) == METHODS
  assert results["California MLP"]["methods"]["AdamW linear"]["grid pick"].startswith("peak")
  # The README's table, regenerated from the JSON file.
  stored = json.loads((tmp_path / "tiny.json").read_text())
  assert stored["results"] == json.loads(json.dumps(results))
  capsys.readouterr()
  suite.main(["--out", str(tmp_path), "--name", "tiny", "--readme-table"])
  table = capsys.readouterr().out
  (line,) = [r for r in table.splitlines() if r.startswith("| California MLP |")]
  assert "MSE ↓" in line and line.count(" | ") == len(table.splitlines()[0].split(" | ")) - 1
  # the best tuned row, named: the better of the two grid methods run
  assert ("| AdamW linear: " in line) != ("| Schedule-free AdamW (grid): " in line)
  assert "Prodigy + warm-up, linear decay: " in line  # the scheduled peer, named
  assert "| Hi-DLR, own batch + linear decay |" not in line  # a header, not a cell
  cells = line.split(" | ")
  column = 2 + suite.README_HIDLR.index("Hi-DLR, own batch + linear decay")
  assert np.isfinite(float(cells[column].split(" ")[0]))  # the own batch + decay row's mean
  assert cells[column - 1] == ""  # the secant recipe: not run here
  # Rows of another run with the same seeds fill the columns this one lacks.
  other = {"results": json.loads(json.dumps(results))}
  extra = other["results"]["California MLP"]["methods"]
  extra[suite.README_HIDLR[2]] = extra.pop("AdamW linear")
  (tmp_path / "other.json").write_text(json.dumps(other))
  suite.main(["--out", str(tmp_path), "--name", "tiny", "--readme-table", "--merge", "other"])
  (line,) = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| California MLP |")]
  assert np.isfinite(float(line.split(" | ")[column - 1].split(" ")[0]))
  # and the tasks it lacks, after its own.
  other["results"]["a task run apart"] = other["results"].pop("California MLP")
  (tmp_path / "other.json").write_text(json.dumps(other))
  suite.main(["--out", str(tmp_path), "--name", "tiny", "--readme-table", "--merge", "other"])
  lines = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")][1:]
  assert [r.split(" | ")[0] for r in lines] == ["| California MLP", "| a task run apart"]
  other["results"]["California MLP"] = other["results"].pop("a task run apart")
  # A row both runs hold must agree: else they ran different code.
  extra["Prodigy + warm-up, linear decay"]["metrics"][0]["test_mse"] += 1.0
  (tmp_path / "other.json").write_text(json.dumps(other))
  with pytest.raises(ValueError, match="differs between the merged runs"):
    suite.main(["--out", str(tmp_path), "--name", "tiny", "--readme-table", "--merge", "other"])


def test_an_update_reruns_its_rows_and_keeps_the_others(tmp_path):
  first = ["Hi-DLR, own batch + linear decay", "Prodigy + linear decay"]
  base = ["--tasks", "California MLP", "--seeds", "1", "--quick", "--out", str(tmp_path),
          "--name", "tiny"]
  before = suite.main([*base, "--methods", *first])["California MLP"]["methods"]
  # Prodigy's row rerun (same code, same numbers) and a row added.
  rerun = ["Prodigy + linear decay", "AdamW linear"]
  suite.main([*base, "--update", "--methods", *rerun])
  stored = json.loads((tmp_path / "tiny.json").read_text())
  methods = stored["results"]["California MLP"]["methods"]
  assert list(methods) == [*first, "AdamW linear"]
  assert methods[first[0]] == json.loads(json.dumps(before[first[0]]))
  assert methods[first[1]]["metrics"] == json.loads(json.dumps(before[first[1]]["metrics"]))
  text = (tmp_path / "tiny.md").read_text()
  assert text.startswith("Command: `python -m benchmarks.suite --tasks 'California MLP'")
  assert "Rows rerun by: `python -m benchmarks.suite" in text and "--update" in text
  assert "| AdamW linear |" in text and f"| {first[0]} |" in text
  assert stored["minutes"] > 0 and len(stored["updates"]) == 1
  with pytest.raises(ValueError, match="has 1 seeds, this run 2"):
    suite.main([*base[:3], "2", *base[4:], "--update", "--methods", "AdamW linear"])


def test_unknown_methods_are_refused():
  with pytest.raises(ValueError, match="unknown methods"):
    suite.main(["--tasks", "California MLP", "--seeds", "1", "--quick", "--methods", "Adam"])


def test_hidlr_configs_pass_their_options_through(monkeypatch):
  """A row's keywords reach hidlr_optax.hidlr as given, TOTAL_STEPS resolved."""
  monkeypatch.setattr(suite, "HIDLR_CONFIGS", {
      "new": ({"estimator_option": 3, "total_steps": suite.TOTAL_STEPS}, "same"),
      "GeN": ({"param_labels": None, "schedule": "linear"}, "batch"),
  })
  seen = []
  monkeypatch.setattr(suite.rc.hidlr_optax, "hidlr", lambda *a, **kw: seen.append((a, kw)))
  args, task = suite.TASKS["California MLP"].load(quick=True)
  rows = suite.hidlr_rows(args, task)
  for row in rows.values():
    row.entry.method.make_tx(None)
  (new_args, new), (gen_args, gen) = seen
  assert new["estimator_option"] == 3 and new["total_steps"] == task.steps
  assert new_args[2] is task.labels and gen_args[2] is None
  assert float(gen["schedule"](task.steps // 2)) == pytest.approx(0.5, abs=0.02)
  assert rows["new"].entry.probe == "same" and rows["GeN"].entry.probe == "batch"
  assert rows["GeN"].schedule == "applied step x linear 1 -> 0"
  assert rows["new"].schedule == "applied step x linear 1 -> 0"  # set by total_steps


def test_every_task_has_the_same_methods_with_their_schedules():
  args, task = suite.TASKS["California MLP"].load(quick=True)
  rows = suite.all_rows(args, task, suite.TASKS["California MLP"])
  peers = [f"{p}{s}" for p in ("Prodigy", "D-Adaptation")
           for s in ("", " + linear decay", " + warm-up, linear decay")]
  assert list(rows) == [
      *suite.HIDLR_CONFIGS, *peers, "Schedule-free AdamW", "Schedule-free AdamW (grid)",
      "AdamW constant", "AdamW linear", "AdamW cosine",
  ]
  assert rows["Prodigy"].schedule == "none (rate 1)"
  assert rows["Schedule-free AdamW"].entry.method.eval_params is suite.schedule_free_eval
  assert len(rows["Schedule-free AdamW (grid)"].entry.method.grid) == len(args.peaks)


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_the_pages_results_table_is_what_the_suite_prints(page, capsys):
  """The results table a page shows is the one its named command prints from
  the committed results files, not numbers typed in."""
  text = (suite.ROOT / page).read_text()
  command = re.search(r"`python -m benchmarks\.suite (--readme-table[^`]*)`", text).group(1)
  capsys.readouterr()
  suite.main(shlex.split(command))
  table = capsys.readouterr().out.strip()
  assert table.count("\n") >= 5 and table in text
