"""Full training of a small CNN on Fashion-MNIST with two-group Hi-DLR.

The paper's Table 2 (ViT full fine-tuning, groups (head), (bias), (norm);
AdamW; Phi = 4; initial rate 1e-4) in miniature: a two-convolution network
with group/layer normalisation trained from scratch on Fashion-MNIST (Xiao,
Rasul & Vollgraf, 2017; 60,000 / 10,000 images). Compared: Hi-DLR with the
three groupings, Hi-ULR (GeN), Prodigy, D-Adaptation, and AdamW with constant,
linear-decay and cosine-decay schedules (peak rate from a grid).

Data: the Debian package ``dataset-fashion-mnist`` (IDX files in
``/usr/share/datasets/fashion-mnist``), or ``--data-dir``. Run from the
repository root::

  python examples/fashion_mnist.py            # the benchmark (3 seeds; a GPU's work)
  python examples/fashion_mnist.py --cpu      # sized for 2 CPU cores (see CPU_SIZING)
  python examples/fashion_mnist.py --quick    # a smoke run on a subset
"""

from __future__ import annotations

import argparse
import gzip
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, write_results  # noqa: E402
from _methods import learning_rate_free  # noqa: E402
import _realdata_common as rc  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

# The full benchmark's Adam step (32/64 channels, batch 500) took 0.58 s on 2 CPU
# cores, so its 48 runs of 360 steps need about 2.8 hours before any probe. This
# sizing keeps the task (all 10,000 test images, 3 epochs, 300 steps, the same
# methods) with a narrower network on the first 10,000 training images.
CPU_SIZING = dict(train_size=10_000, widths=[8, 16], batch_size=100)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = rc.benchmark_parser(
      __doc__.splitlines()[0], quick_help="2,000 images, 1 seed, 1 epoch", epochs=3,
      batch_size=500, lr=1e-4, peaks=[3e-4, 1e-3, 3e-3], update_every=4, weight_decay=1e-2,
  )
  p.add_argument("--data-dir", type=Path, default=DATA_DIR)
  p.add_argument("--train-size", type=int, default=None, help="the first N training images")
  p.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="channels per conv")
  p.add_argument(
      "--cpu", action="store_true",
      help=f"2-core CPU sizing {CPU_SIZING} (flags given override it); writes fashion_mnist_cpu",
  )
  if p.parse_known_args(argv)[0].cpu:
    p.set_defaults(**CPU_SIZING)
  return p.parse_args(argv)


def read_idx(path: Path) -> np.ndarray:
  """Reads a gzipped IDX file (big-endian header: magic, then dimensions)."""
  raw = gzip.open(path, "rb").read()
  ndim = raw[3]
  dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4").astype(int)
  return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def load_fashion_mnist(
    data_dir: Path, train_size: Optional[int] = None, test_size: Optional[int] = None
):
  """``(x_train, y_train), (x_test, y_test)``: standardised images (n, 28, 28, 1).

  ``train_size`` / ``test_size`` keep the first images of each split (all by
  default); the standardisation uses the kept training images.
  """
  if not (data_dir / "train-images-idx3-ubyte.gz").exists():
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {data_dir}: `apt-get install dataset-fashion-mnist`"
        " or pass --data-dir"
    )
  split = lambda s: (read_idx(data_dir / f"{s}-images-idx3-ubyte.gz"),
                     read_idx(data_dir / f"{s}-labels-idx1-ubyte.gz"))
  (xtr, ytr), (xte, yte) = split("train"), split("t10k")
  xtr, ytr, xte, yte = xtr[:train_size], ytr[:train_size], xte[:test_size], yte[:test_size]
  mean, std = xtr.mean() / 255, xtr.std() / 255
  prep = lambda x: ((x[..., None] / 255 - mean) / std).astype(np.float32)
  return (prep(xtr), ytr.astype(np.int32)), (prep(xte), yte.astype(np.int32))


class CNN(nn.Module):
  """conv-GroupNorm-ReLU-pool twice, dense-LayerNorm-ReLU, linear head."""

  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in self.widths:
      x = nn.Conv(width, (3, 3))(x)
      x = jax.nn.relu(nn.GroupNorm(num_groups=8)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(nn.LayerNorm()(nn.Dense(128)(x)))
    return nn.Dense(self.num_classes, name="head")(x)


def groupings(params: Any) -> dict[str, Any]:
  """The paper's two-group splits: (head), (bias) and (norm)."""

  def by(rule):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: rule([getattr(k, "key", str(k)) for k in path]), params
    )

  return {
      "head": by(lambda names: "head" if "head" in names else "body"),
      "bias": by(lambda names: "bias" if names[-1] == "bias" else "weight"),
      "norm": by(lambda names: "norm" if "Norm" in names[0] else "rest"),
  }


def build_entries(args, steps: int, params) -> list[rc.Entry]:
  wd, lr = args.weight_decay, args.lr
  common = rc.hidlr_options(args, steps)
  schedules = [
      rc.scheduled_adamw(f"AdamW {kind}", kind, args.peaks, steps, weight_decay=wd)
      for kind in ("constant", "linear", "cosine")
  ]
  groups = groupings(params)
  hidlr = [
      rc.hidlr_entry(f"Hi-DLR ({name})", lr, labels, **common) for name, labels in groups.items()
  ]
  hiulr = rc.hidlr_entry("Hi-ULR (GeN)", lr, None, **common)
  own = rc.hidlr_entry(
      "Hi-DLR (head), own-batch probes", lr, groups["head"], **common, probe="same"
  )
  larger = rc.hidlr_entry(
      f"Hi-DLR (head), {rc.LARGE_PROBE_BATCHES}x probe batch", lr, groups["head"],
      **common, probe_batches=rc.LARGE_PROBE_BATCHES,
  )
  peers = [rc.Entry(m) for m in learning_rate_free(weight_decay=wd, names=rc.PEERS)]
  return [*hidlr, own, larger, hiulr, *peers, *schedules]


def make_task(args: argparse.Namespace) -> rc.Task:
  """The task of ``args`` (``--quick``: 2,000 images, 1 epoch of batch 100)."""
  train, test = load_fashion_mnist(
      args.data_dir, *((2000, 1000) if args.quick else (args.train_size, None))
  )
  model = CNN(widths=tuple(args.widths))
  init = lambda seed: model.init(jax.random.key(seed), train[0][:1])["params"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  def metrics_fn(p, x, y):
    chunks = (x.reshape(-1, 500, *x.shape[1:]), y.reshape(-1, 500))

    def one(c):
      logits = model.apply({"params": p}, c[0])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, c[1]).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == c[1])

    losses, accs = jax.lax.map(one, chunks)
    return {"loss": losses.mean(), "accuracy": accs.mean()}

  return rc.Task(
      loss_fn, metrics_fn, init, train, test, epochs=1 if args.quick else args.epochs,
      batch_size=100 if args.quick else args.batch_size,
      labels=groupings(init(0))["head"], columns=rc.CLASSIFICATION_COLUMNS,
      larger_is_better=True, summarise=rc.classification_summary,
  )


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  seeds = [0] if args.quick else list(range(args.seeds))
  task = make_task(args)
  train, test, epochs, batch, steps = task.train, task.test, task.epochs, task.batch_size, task.steps
  entries = build_entries(args, steps, task.init(0))
  entries = rc.only_methods(entries, args.methods)
  runs = rc.run_seeds(entries, seeds, task.run, task.summarise, task.score)
  table = rc.classification_table(runs)
  print(table)
  name = "fashion_mnist" + ("_quick" if args.quick else "_cpu" if args.cpu else "")
  figure = rc.rate_figure(entries, runs, args.out, name)
  convs = ", ".join(f"conv {w} - GroupNorm - ReLU - maxpool" for w in args.widths)
  body = f"""
A CNN ({convs}, dense 128 - LayerNorm - ReLU, linear head) trained from scratch on
Fashion-MNIST ({len(train[0])} train / {len(test[0])} test images), {epochs} epoch(s) of batch {batch}
({steps} steps). {len(seeds)} seed(s) (initialisation and batch order); mean ± std over seeds;
time per run (all grid points together) on {jax.devices()[0].device_kind}, compilation
included.

Hi-DLR groups, two each (paper Table 2): (head) = head vs rest, (bias) = all biases vs
the rest, (norm) = normalisation scales and offsets vs the rest. Hi-DLR / Hi-ULR: AdamW
direction (weight decay {args.weight_decay}), initial rate {args.lr} (the paper's recipe,
untuned), Phi = {args.update_every}, probes on an independently drawn mini-batch unless
marked "own-batch" ("{rc.LARGE_PROBE_BATCHES}x probe batch": on {rc.LARGE_PROBE_BATCHES} such mini-batches joined). AdamW schedules (no warm-up; linear and cosine decay to 0): peak
rate from the grid {args.peaks}, picked by mean test accuracy over seeds (favours the
baselines). Prodigy and D-Adaptation: rate 1, same weight decay.

{table}

{rc.fit_section(runs)}
"""
  write_results(
      args.out, name, command_line(__file__, argv),
      "Two-group Hi-DLR on Fashion-MNIST (a small CNN)", body, figure,
  )
  return runs


if __name__ == "__main__":
  main()
