"""``examples/monitoring.py``: progress bar, figure and TensorBoard scalars."""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import numpy as np

import _ecosystem

monitoring = _ecosystem.import_example("monitoring")
STEPS, LOG_EVERY = 24, 5  # refreshes at steps 0, 4, ..., 20; last log is partial


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` from the TensorBoard event files in ``logdir``."""
  from tensorboardX.proto import event_pb2

  scalars = defaultdict(list)
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length, crc, payload, crc
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      payload = data[offset + 12 : offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars[value.tag].append((event.step, value.simple_value))
  return dict(scalars)


def test_progress_bar_history_figure_and_tensorboard_scalars(tmp_path, capsys):
  argv = ["--steps", str(STEPS), "--log-every", str(LOG_EVERY), "--out", str(tmp_path),
          "--tensorboard", str(tmp_path / "tb")]
  result = monitoring.main(argv)
  bar = capsys.readouterr().err
  history = result["history"]
  refreshes = np.arange(0, STEPS, 4)

  assert history["loss"].shape == (STEPS,)
  assert history["loss"][-5:].mean() < 0.7 * history["loss"][0]
  assert set(history["rates"]) == {"head", "layer_0", "layer_1"}
  np.testing.assert_array_equal(monitoring.refresh_steps(history), refreshes)
  for fit in history["fits"].values():
    r2 = fit["r_squared"][refreshes]
    assert np.all((r2 > 0.5) & (r2 <= 1.0))

  assert f"{STEPS}/{STEPS}" in bar and "loss=" in bar
  for label in history["rates"]:
    assert f"lr_{label}=" in bar

  assert result["figure"] == tmp_path / "monitoring.png"
  assert result["figure"].stat().st_size > 10_000

  scalars = read_scalars(tmp_path / "tb")
  assert [s for s, _ in scalars["loss"]] == list(range(STEPS))
  np.testing.assert_allclose([v for _, v in scalars["loss"]], history["loss"], rtol=1e-6)
  for label, rates in history["rates"].items():
    np.testing.assert_allclose([v for _, v in scalars[f"learning_rate/{label}"]], rates, rtol=1e-6)
    r2 = scalars[f"fit/r_squared/{label}"]
    assert [s for s, _ in r2] == list(refreshes)  # fits are logged at refreshes only
