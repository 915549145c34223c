"""Tests of the letter-recognition benchmark on small synthetic stand-ins.

Besides the shipped copy of the data set (``data/LetterRecognition.rda``, from
Debian's r-cran-mlbench), the tests write R data files of the same layout (a
data frame with the factor ``lettr`` and 16 numeric columns) in a temporary
folder.
"""

import gzip
import hashlib
import lzma
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHIPPED = EXAMPLES.parent / "data" / "LetterRecognition.rda"
sys.path.insert(0, str(EXAMPLES))
import _methods as M  # noqa: E402
import _training as T  # noqa: E402
import _realdata_common as rc  # noqa: E402
import california_mlp  # noqa: E402
import letter_recognition as lr  # noqa: E402

FEATURES = ["x.box", "y.box", "width", "high", "onpix", "x.bar", "y.bar", "x2bar",
            "y2bar", "xybar", "x2ybr", "xy2br", "x.ege", "xegvy", "y.ege", "yegvx"]
LETTERS = [chr(ord("A") + i) for i in range(26)]


class _RWriter:
  """Writes R's XDR serialisation (version 2), a symbol's second use as a reference."""

  def __init__(self):
    self.out, self.symbols = bytearray(), {}

  def int(self, i: int) -> None:
    self.out += struct.pack(">i", i)

  def flags(self, kind: int, attributes: bool = False, tag: bool = False, obj: bool = False):
    self.int(kind | obj << 8 | attributes << 9 | tag << 10)

  def char(self, s: str) -> None:
    self.flags(9)
    self.int(len(s.encode()))
    self.out += s.encode()

  def symbol(self, name: str) -> None:
    if name in self.symbols:
      self.int(self.symbols[name] << 8 | 255)
      return
    self.symbols[name] = len(self.symbols) + 1
    self.flags(1)
    self.char(name)

  def strings(self, values) -> None:
    self.flags(16)
    self.int(len(values))
    for s in values:
      self.char(s)

  def pairlist(self, items: dict) -> None:
    for name, write in items.items():
      self.flags(2, tag=True)
      self.symbol(name)
      write()
    self.flags(254)

  def vector(self, kind: int, values: np.ndarray, attributes: dict = None, obj=False):
    self.flags(kind, attributes=bool(attributes), obj=obj)
    self.int(len(values))
    self.out += np.asarray(values).astype(">i4" if kind == 13 else ">f8").tobytes()
    if attributes:
      self.pairlist(attributes)

  def data_frame(self, columns: dict, n: int) -> None:
    """``n`` rows; ``columns``: name -> floats, or ``(codes from 1, levels)`` for a factor."""
    self.flags(19, attributes=True, obj=True)
    self.int(len(columns))
    for col in columns.values():
      if isinstance(col, tuple):
        codes, levels = col
        self.vector(13, codes, {"levels": lambda lv=levels: self.strings(lv),
                                "class": lambda: self.strings(["factor"])}, obj=True)
      else:
        self.vector(14, col)
    self.pairlist({
        "names": lambda: self.strings(list(columns)),
        "class": lambda: self.strings(["data.frame"]),
        "row.names": lambda: self.vector(13, np.asarray([-(2**31), -n])),
    })


def write_letters_rda(path: Path, x: np.ndarray, y: np.ndarray, compress=lzma.compress):
  """An mlbench-style ``LetterRecognition.rda``: ``lettr`` first, then 16 columns."""
  w = _RWriter()
  w.out += b"RDX2\nX\n"
  for word in (2, 0x40003, 0x20300):  # format 2, written by R 4.0.3, readable by R 2.3.0
    w.int(word)
  columns = {"lettr": (y + 1, LETTERS), **{f: x[:, i] for i, f in enumerate(FEATURES)}}
  w.pairlist({"LetterRecognition": lambda: w.data_frame(columns, len(y))})
  path.write_bytes(compress(bytes(w.out)))


def synthetic_letters(n: int, seed: int = 0):
  """Integer features 0..15 around a centre per class (learnable in an epoch)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 26, n)
  centres = rng.integers(2, 14, (26, 16))
  x = np.clip(centres[y] + rng.integers(-1, 2, (n, 16)), 0, 15).astype(float)
  return x, y


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress, lambda b: b])
def test_load_letters_reads_an_r_data_file(tmp_path, compress):
  x, y = synthetic_letters(50)
  path = tmp_path / "LetterRecognition.rda"
  write_letters_rda(path, x, y, compress)
  xs, ys, features, classes = lr.load_letters(path)
  np.testing.assert_array_equal(xs, x)
  np.testing.assert_array_equal(ys, y)
  assert features == FEATURES and classes == LETTERS


def test_load_letters_reads_mlbench_as_the_former_hand_written_reader():
  """The shipped copy of mlbench's file: the values the XDR reader this example
  carried before ``rdata`` replaced it measured (SHA-256 of the arrays' bytes)."""
  x, y, features, classes = lr.load_letters(SHIPPED)
  assert x.shape == (20_000, 16) and x.dtype == np.float64 and y.dtype == np.int64
  assert features == FEATURES and classes == LETTERS
  assert hashlib.sha256(x.tobytes()).hexdigest() == (
      "692f7bb7abde2df4d93a3251c561b91d3e6a76a1110ac657679550e1d35921d0")
  assert hashlib.sha256(y.tobytes()).hexdigest() == (
      "eb9c4c80b6d54cb76943c357a3e179e3bb0b716763de8224633daae8de57fcb3")
  assert x.sum() == 1_896_149 and y.sum() == 250_335
  np.testing.assert_array_equal(x[0], [2, 8, 3, 5, 1, 8, 13, 0, 6, 6, 10, 8, 0, 8, 0, 8])
  np.testing.assert_array_equal(x[-1], [4, 9, 6, 6, 2, 9, 5, 3, 1, 8, 1, 8, 2, 7, 2, 8])
  assert (y[0], y[12_345], y[-1]) == (19, 19, 0)  # T, T, A


def test_load_letters_names_the_package_of_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="r-cran-mlbench"):
    lr.load_letters(tmp_path / "missing.rda")


def test_split_rows_standardises_on_the_training_rows():
  x, y = synthetic_letters(40)
  (xtr, ytr), (xte, yte) = lr.split_rows(x, y, 30)
  assert xtr.shape == (30, 16) and xte.shape == (10, 16) and xtr.dtype == np.float32
  np.testing.assert_allclose(xtr.mean(0), 0, atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([ytr, yte]), y)


def _probing_method():
  """A "Hi-DLR" whose step is ``grad + value_fn(0)``: it adds up what it sees."""

  def update(grads, state, params, *, value_fn, **given):
    del given  # value= (and grad=) that the step passes with probe="same"
    return grads + value_fn(jnp.zeros_like(params)), state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  return M.Method("probing", lambda _: tx, hidlr=True)


@pytest.mark.parametrize("probe, rows", [("split", 2), ("same", 4), ("batch", 4)])
def test_split_probes_look_at_the_other_half_of_the_batch(probe, rows):
  """"split": the gradient and the probes each see half of the batch, disjoint."""
  data = (np.arange(40, dtype=np.float32)[:, None], np.zeros(40, np.float32))
  run = lambda loss: T.train_minibatch(
      loss, lambda p, x, y: {"p": p}, np.float32(0), _probing_method(), data, data,
      epochs=1, batch_size=4, seed=0, probe=probe,
  )
  grad_rows = 2 if probe == "split" else 4
  # the step: the gradient's rows (the derivative) + 1000 x the probe's rows
  counted = run(lambda p, x, y: (p + 1000) * x.shape[0])
  assert counted["train_p"][-1] == 10 * (grad_rows + 1000 * rows)  # 10 steps
  assert counted["step_loss"][0] == 1000 * grad_rows  # the gradient's batch loss at p = 0
  if probe == "split":  # the halves make up every batch: the epoch sums every row once
    summed = run(lambda p, x, y: (p + 1) * jnp.sum(x))
    assert summed["train_p"][-1] == pytest.approx(data[0].sum())


def test_unknown_probe_mode_is_refused():
  data = (np.zeros((8, 1), np.float32), np.zeros(8, np.float32))
  with pytest.raises(ValueError, match="probe must be one of"):
    T.minibatch_epoch(
        lambda p, x, y: p, _probing_method().make_tx(None), np.float32(0), optax.EmptyState(), data,
        np.zeros((2, 8), np.int32), 4, "other",
    )


def _recorded_hidlr_kwargs(monkeypatch, entries):
  seen = []
  monkeypatch.setattr(rc.hidlr_optax, "hidlr", lambda *a, **kw: seen.append(kw))
  for entry in entries:
    if entry.method.hidlr:
      entry.method.make_tx(None)
  return seen


def test_hidlr_kwargs_reach_every_hidlr_row(monkeypatch):
  flag = ["--hidlr-kwargs", '{"joint_check": false, "min_r2": 0.9}']
  entries = lr.build_entries(lr.parse_args(flag), 10)
  seen = _recorded_hidlr_kwargs(monkeypatch, entries)
  assert len(seen) == 5
  assert all(kw["joint_check"] is False and kw["min_r2"] == 0.9 for kw in seen)
  assert all(kw["update_every"] == 8 for kw in seen)
  # the other real-data scripts share the flag
  args = california_mlp.parse_args(["--hidlr-kwargs", '{"min_r2": 0.5}'])
  seen = _recorded_hidlr_kwargs(monkeypatch, california_mlp.build_entries(args, 10, {"a": None}))
  assert seen and all(kw["min_r2"] == 0.5 and kw["joint_check"] for kw in seen)
  with pytest.raises(SystemExit):
    lr.parse_args(["--hidlr-kwargs", "[1, 2]"])


def test_defaults_are_the_benchmark_shape():
  args = lr.parse_args([])
  assert (args.seeds, args.epochs, args.batch_size, args.lr, args.update_every) == (5, 3, 128, 1e-3, 8)
  assert args.train_rows == 16_000 and list(args.peaks) == [3e-4, 1e-3, 3e-3, 1e-2]
  assert len(lr.GROUPS) == len(lr.SIZES) - 1 and all(set(g) == {"w", "b"} for g in lr.GROUPS)
  assert sorted(set(jax.tree.leaves(lr.GROUPS))) == ["bias", "w1", "w2", "w3"]


def test_quick_run_writes_the_results(tmp_path):
  x, y = synthetic_letters(400)
  data = tmp_path / "LetterRecognition.rda"
  write_letters_rda(data, x, y)
  methods = ["Hi-DLR, split batch"]
  runs = lr.main([
      "--quick", "--data-file", str(data), "--train-rows", "320", "--batch-size", "32",
      "--out", str(tmp_path), "--suffix", "_test", "--methods", *methods,
      "--hidlr-kwargs", '{"joint_check": false}',
  ])
  text = (tmp_path / "letter_recognition_test_quick.md").read_text()
  assert text.startswith("Command: `python examples/letter_recognition.py --quick")
  assert "{'joint_check': False}" in text and (tmp_path / "letter_recognition_test_quick.png").exists()
  assert "| Hi-DLR, split batch | - |" in text and "| Hi-DLR, split batch | w1 |" in text
  hidlr = runs["Hi-DLR, split batch"]
  assert set(hidlr.history["lr"]) == {"w1", "w2", "w3", "bias"}
  # The synthetic classes are separable: one quick epoch learns most of them
  # (0.86 measured; chance is 1/26, and a run whose rule failed stays near it).
  assert hidlr.metrics[0]["diverged"] == 0.0 and hidlr.metrics[0]["test_accuracy"] > 0.6


def test_tables_count_divergence_and_list_every_grid_point():
  entry = rc.scheduled_adamw("AdamW constant", "constant", [0.1, 0.2], 10, weight_decay=0.0)
  # grid point 1 diverges on seed 1 (its loss ends above where it began)
  losses = {0: [[2.0, 1.0], [2.0, 0.5]], 1: [[2.0, 1.0], [2.0, 3.0]]}
  train = lambda e, seed: {
      "train_loss": np.asarray(losses[seed]), "test_loss": np.ones((2, 2)),
      "test_accuracy": np.asarray([[0.5, 0.6], [0.5, 0.7]]), "step_loss": np.zeros((2, 10)),
  }
  runs = rc.run_seeds([entry], [0, 1], train, lr.summarise, "test_accuracy")
  run = runs["AdamW constant"]
  assert run.setting == "peak 0.2" and [s for s, _ in run.grid_points] == ["peak 0.1", "peak 0.2"]
  assert "| AdamW constant | peak 0.2 | 1.7500 ± 1.2500 | 1.0000 ± 0.0000 | 0.7000 ± 0.0000 | 1 / 2 |" in lr.results_table(runs)
  grid = lr.grid_table(runs)
  assert "| AdamW constant | peak 0.1 | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 | 0.6000 ± 0.0000 | 0 / 2 |" in grid
