"""Tests of benchmarks/designs.py and benchmarks/same_batch.py on small stand-ins."""

import types

import jax.numpy as jnp
import numpy as np
import optax

import hidlr_optax
from benchmarks import designs, same_batch


def _runs(values, key="test_mse"):
  return types.SimpleNamespace(metrics=[{key: v, "train_mse": v} for v in values])


def test_task_section_marks_rows_against_the_best_peer_and_counts_them():
  task = designs.TASKS["California MLP"]
  peers = {"Prodigy": _runs([0.30, 0.32]), "D-Adaptation": _runs([0.28, 0.30])}
  results = {
      "a": {row: _runs([0.25, 0.27]) for row in task.rows},  # better than 0.29
      "b": {row: _runs([0.40, np.nan]) for row in task.rows},
  }
  text, wins = designs.task_section("California MLP", task, results, peers)
  assert wins == {"a": [True] * 3, "b": [False] * 3}
  assert text.count("at or better") == 3 and text.count("behind") == 3
  assert "1 / 2" in text  # the NaN seed counts as diverged
  table = designs.summary({"California MLP": wins}, ["a", "b"])
  assert "| a | 3 / 3 |" in table and "| b | 0 / 3 |" in table


def test_designs_are_valid_options_of_every_task_script():
  for options, flags in designs.DESIGNS.values():
    kwargs = {k: v for k, v in options.items() if k not in ("direction", "per_example")}
    if isinstance(kwargs.get("schedule"), str):
      kwargs["schedule"] = optax.linear_schedule(1.0, 0.0, 10)
    hidlr_optax.scale_by_hidlr(**kwargs)  # raises on an unknown or bad option
    assert all(f.startswith("--") for f in flags[::2])


def test_same_batch_records_refreshes_and_summarises_them_by_thirds():
  loss = lambda p, i: 0.5 * jnp.sum((p["a"] - i) ** 2) + 0.5 * jnp.sum((p["b"] + i) ** 2)
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  tx = hidlr_optax.hidlr(optax.identity(), 0.1, {"a": "a", "b": "b"},
                         update_every=same_batch.UPDATE_EVERY)
  run = same_batch.train(loss, params, tx, lambda t: jnp.asarray(1.0), 48, "same",
                         lambda p: float(loss(p, 1.0)))
  assert len(run["records"]) == 48 // same_batch.UPDATE_EVERY
  assert run["labels"] == ["a", "b"] and run["final"] < 1e-3
  table = same_batch.phases_table(run)
  assert table.count("\n") == 2 + 2 * 3 - 1  # header, rule, 2 groups x 3 thirds


def test_main_writes_the_command_and_every_task_section(tmp_path, monkeypatch):
  calls = []

  def fake_main(argv):
    calls.append(argv)
    methods = argv[argv.index("--methods") + 1:argv.index("--hidlr-kwargs")]
    return {m: _runs([0.3, 0.31]) for m in methods}

  fake = designs.Task(fake_main, ("--model", "x"), ("row a",),
                      (("test_mse", "MSE", False), ("train_mse", "train", False)))
  monkeypatch.setattr(designs, "TASKS", {"fake": fake, "other": fake})
  argv = ["--seeds", "2", "--tasks", "fake", "other", "--designs", "linear decay",
          "--out", str(tmp_path), "--name", "d"]
  designs.main(argv)
  text = (tmp_path / "d.md").read_text()
  assert text.startswith("Command: `python -m benchmarks.designs --seeds 2 --tasks fake other")
  assert text.count("### ") == 2 and "| linear decay | 2 / 2 |" in text  # ties count
  assert len(calls) == 4 and all(c[:2] == ["--model", "x"] for c in calls)
  assert '"schedule": "linear"' in calls[1][calls[1].index("--hidlr-kwargs") + 1]
