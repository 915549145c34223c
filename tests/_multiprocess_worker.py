"""One process of a data-parallel Hi-DLR run over every process's CPU devices.

Started by ``tests/test_multiprocess.py`` with ``XLA_FLAGS`` asking for virtual
CPU devices, either alone (all devices in one process) or as one of several
processes joined by ``jax.distributed.initialize`` on localhost::

  python tests/_multiprocess_worker.py OUT.npz [--port P --num-processes N --process-id I]
                                              [--estimator secant]

Every process runs the same program: the MLP of ``examples/sharded_training.py``
with its Hi-DLR (``hidlr(optax.scale_by_adam(), 1e-3, head_vs_body())``,
refreshing every 4 steps; the paper's probes or, with ``--estimator secant``,
the secant estimator), parameters and optimizer state replicated over a mesh
of all processes' devices, batch and probe batch sharded over it. Each process
feeds only its rows of the global batches
(``jax.make_array_from_process_local_data``). Process 0 writes the final
parameters, learning rates, losses and refresh count to ``OUT.npz``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import _ecosystem
import hidlr_optax

STEPS = 9  # update_every=4: refreshes at steps 0, 4 and 8
BATCH_SIZE = 256


def local_rows(sharding: NamedSharding, rows: int) -> slice:
  """The rows of a ``rows``-long global batch that this process's devices hold."""
  indices = sharding.addressable_devices_indices_map((rows,)).values()
  return slice(min(i[0].indices(rows)[0] for i in indices),
               max(i[0].indices(rows)[1] for i in indices))


def global_batch(sharding: NamedSharding, batch: Sequence[np.ndarray]) -> tuple:
  """A global batch from this process's rows of ``batch`` (every process has the
  same ``batch`` here; a real input pipeline loads only its rows)."""
  rows = local_rows(sharding, len(batch[0]))
  return tuple(jax.make_array_from_process_local_data(sharding, a[rows], a.shape)
               for a in batch)


def replicated(sharding: NamedSharding, tree: Any) -> Any:
  """``tree``'s arrays (the same on every process) as global replicated arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: np.asarray(x)[i]),
      tree)


def host_value(tree: Any) -> Any:
  """A replicated global tree as NumPy arrays (this process's copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def train(steps: int = STEPS, seed: int = 0, estimator: str = "probe") -> dict[str, Any]:
  """The data-parallel run over ``jax.devices()`` (all processes' devices)."""
  S = _ecosystem.import_example("sharded_training")
  C = _ecosystem.import_example("_common")
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  same, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  tx = S.make_tx(hidlr_optax.labels.head_vs_body(), probe_batch_size=1, estimator=estimator)
  params = replicated(same, S.init_params(seed))
  opt_state = jax.jit(tx.init, out_shardings=same)(params)
  data = C.load_digits(seed)[0]
  losses = []
  for step in range(steps):
    batch = global_batch(split, C.batch_at(data, step, BATCH_SIZE, seed))
    probe = global_batch(split, C.batch_at(data, step + 1, BATCH_SIZE, seed))
    params, opt_state, loss = S.train_step(tx, params, opt_state, batch, probe)
    losses.append(loss)
  return {
      "params": host_value(params),
      "rates": host_value(hidlr_optax.learning_rates(opt_state)),
      "losses": np.asarray(host_value(losses)),
      "refreshes": int(host_value(hidlr_optax.find_states(opt_state)[0].num_refreshes)),
      "devices": jax.device_count(),
      "local_devices": jax.local_device_count(),
  }


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out", help="the .npz file process 0 writes")
  p.add_argument("--port", type=int, default=None, help="the coordinator's port on localhost")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--estimator", default="probe", help="sharded_training.make_tx's estimator")
  args = p.parse_args(argv)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.num_processes > 1:
    jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
  result = train(estimator=args.estimator)
  if args.process_id == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(result.pop("params"))[0]}
    rates = {f"rate/{k}": v for k, v in result.pop("rates").items()}
    np.savez(args.out, **{f"param/{k}": v for k, v in flat.items()}, **rates, **result)


if __name__ == "__main__":
  main()
