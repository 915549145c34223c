"""Hi-DLR on many devices with ``jax.sharding``: data parallel and FSDP.

One jitted training step serves every layout; only the shardings of its
inputs differ:

* ``single``: everything on one device;
* ``data``: the batch is split over the mesh axis ``data``, the parameters
  and optimizer state are replicated;
* ``fsdp``: the batch is split as above and every parameter (and with it the
  Adam moments) is split along its largest axis that the device count
  divides; small leaves stay replicated.

The probe losses inside Hi-DLR's ``value_fn`` are means over the *global*
probe batch, so the learning rates and the trajectory are those of the
single-device run, up to float rounding in the reductions. Like any
training run, a long one amplifies rounding differences in unstable phases
(a loss spike, a fit whose slope ``b`` is a small difference of large
terms) until the runs follow different, equally valid trajectories. The
script trains all three, prints how far apart they end and the first step
whose losses differ by more than ``SEPARATION``, and measures (from the
compiled step) the per-device temporary memory of the probes, evaluated all
at once (``probe_batch_size=None``) or one at a time
(``probe_batch_size=1``).

``--estimator secant`` runs the same with the secant estimator (two
gradients per refresh instead of the probes).

On a CPU, ask XLA for virtual devices:
``python examples/sharded_training.py --host-devices 8`` (it restarts itself
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``); ``--quick``
for a short run.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import _common as C
import hidlr_optax

MODES = ("single", "data", "fsdp")
ESTIMATORS = ("probe", "secant")
#: Relative loss difference at which two runs count as separate trajectories.
SEPARATION = 1e-3
HIDDEN = 256


def init_params(seed: int, sizes: Sequence[int] = (64, HIDDEN, HIDDEN, 10)) -> dict:
  """An MLP ``{'layer_i': {'kernel', 'bias'}}``, the last layer named ``head``."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  params = {}
  for i, (key, din, dout) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    name = "head" if i == len(sizes) - 2 else f"layer_{i}"
    params[name] = {
        "kernel": jax.random.normal(key, (din, dout)) / np.sqrt(din),
        "bias": jnp.zeros(dout),
    }
  return params


def forward(params: dict, x: jax.Array) -> jax.Array:
  names = sorted(k for k in params if k != "head")
  for name in names:
    x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean cross-entropy over the (global) batch."""
  return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def make_tx(
    param_labels: Any, probe_batch_size: Union[int, str, None], estimator: str = "probe"
) -> optax.GradientTransformation:
  """Hi-DLR over Adam directions, refreshing every 4 steps: the paper's
  probes in batches of ``probe_batch_size`` (:class:`hidlr_optax.ProbeEstimator`)
  or, with ``estimator="secant"``, two gradients per refresh."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  return hidlr_optax.hidlr(
      optax.scale_by_adam(), 1e-3, param_labels, update_every=4,
      estimator=hidlr_optax.ProbeEstimator(batch_size=probe_batch_size)
      if estimator == "probe" else estimator,
  )


@functools.cache
def step_of(tx: optax.GradientTransformation):
  """:func:`hidlr_optax.make_train_step`'s step for ``tx``, built once per ``tx``."""
  return hidlr_optax.make_train_step(lambda p, batch: loss_fn(p, *batch), tx)


def train_step(tx, params, opt_state, batch, probe_batch):
  """A plain training step; sharding comes from its inputs alone."""
  return step_of(tx)(params, opt_state, batch, probe_batch)


def fsdp_spec(shape: Sequence[int], num_devices: int, axis_name: str = "data") -> P:
  """Splits the largest axis that ``num_devices`` divides; else replicates."""
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % num_devices == 0 and shape[i] >= num_devices:
      spec = [None] * len(shape)
      spec[i] = axis_name
      return P(*spec)
  return P()


def layout(mode: str, params: Any, mesh: Optional[Mesh]) -> tuple[Any, Any]:
  """``(parameter shardings, batch sharding)`` of a mode."""
  if mode == "single":
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, params), device
  batch = NamedSharding(mesh, P("data"))
  if mode == "data":
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), params), batch
  n = mesh.shape["data"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n)), params), batch


def train(
    mode: str,
    steps: int,
    *,
    batch_size: int = 256,
    param_labels: Any = None,
    probe_batch_size: Union[int, str, None] = "auto",
    estimator: str = "probe",
    seed: int = 0,
) -> dict:
  """Trains the MLP on digits in one layout.

  Returns:
    ``params``, ``opt_state`` (on their devices), ``losses`` (NumPy),
    ``accepted`` (every group's count of accepted refreshes after each step,
    ``(steps, K)``) and ``param_shardings`` (the parameters' placement).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} is not divisible by {mesh.size} devices")
  data = C.load_digits(seed)[0]
  tx = make_tx(param_labels or hidlr_optax.labels.head_vs_body(), probe_batch_size, estimator)
  param_shardings, batch_sharding = layout(mode, init_params(seed), mesh)
  params = jax.device_put(init_params(seed), param_shardings)
  opt_state = jax.jit(tx.init)(params)
  losses, accepted = [], []
  for step in range(steps):
    batch = jax.device_put(C.batch_at(data, step, batch_size, seed), batch_sharding)
    probe = jax.device_put(C.batch_at(data, step + 1, batch_size, seed), batch_sharding)
    params, opt_state, loss = train_step(tx, params, opt_state, batch, probe)
    losses.append(loss)
    accepted.append(hidlr_optax.find_states(opt_state)[0].num_accepted)
  accepted = jax.device_get(accepted)
  return dict(
      params=params, opt_state=opt_state, losses=np.asarray(jax.device_get(losses)),
      accepted=np.asarray([list(a.values()) for a in accepted]),
      param_shardings=param_shardings,
  )


def probe_memory(
    mode: str, probe_batch_size: Union[int, None], num_groups: int, batch_size: int = 256,
    estimator: str = "probe",
) -> int:
  """Per-device temporary bytes of the compiled training step.

  ``num_groups`` groups: the body, plus the head split into
  ``num_groups - 1`` column blocks (:func:`hidlr_optax.per_slice`).
  """
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  params = init_params(0)
  width = params["head"]["kernel"].shape[-1]
  blocks = tuple(f"head_{i * (num_groups - 1) // width}" for i in range(width))
  labels = hidlr_optax.labels.by_regex(
      [(r"^head/", hidlr_optax.per_slice(-1, blocks))], default="body"
  )
  tx = make_tx(labels, probe_batch_size, estimator)
  param_shardings, batch_sharding = layout(mode, params, mesh)
  shaped = lambda tree, sharding: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
  )
  abstract_params = shaped(params, param_shardings)
  abstract_state = jax.eval_shape(tx.init, params)
  batch = (
      jax.ShapeDtypeStruct((batch_size, 64), jnp.float32, sharding=batch_sharding),
      jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding),
  )
  compiled = step_of(tx).lower(abstract_params, abstract_state, batch, batch).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def max_relative_difference(a: Any, b: Any) -> float:
  """``max |a - b| / max |b|`` over all leaves."""
  def relative(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))

  return max(jax.tree.leaves(jax.tree.map(relative, a, b)))


def first_separation(losses: np.ndarray, reference: np.ndarray) -> Optional[int]:
  """First step whose loss differs from the reference by > ``SEPARATION`` (rel.)."""
  apart = np.flatnonzero(np.abs(losses - reference) > SEPARATION * np.abs(reference))
  return int(apart[0]) if apart.size else None


def _restart_with_host_devices(count: int) -> None:
  """Re-executes this script with ``count`` virtual CPU devices."""
  flag = f"--xla_force_host_platform_device_count={count}"
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
  print(f"restarting with XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Trains in every layout and prints the differences and probe memory.

  Returns:
    ``runs`` (:func:`train`'s output per mode), ``difference`` (max relative
    difference of the final parameters to the single-device run, per mode),
    ``separation`` (:func:`first_separation` from the single-device run, or
    ``None``) and ``memory`` (``{(mode, probe_batch_size, groups): bytes}``).
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="12 steps instead of 100")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument(
      "--host-devices", type=int, default=0,
      help="on CPU, restart with this many virtual devices if fewer are visible",
  )
  parser.add_argument("--estimator", choices=ESTIMATORS, default="probe",
                      help="the paper's probes, or two gradients per refresh")
  args = parser.parse_args(argv)
  if args.host_devices > jax.device_count() and jax.default_backend() == "cpu":
    _restart_with_host_devices(args.host_devices)
  steps = args.steps or (12 if args.quick else 100)
  print(f"{jax.device_count()} {jax.default_backend()} devices, {steps} steps")

  runs = {mode: train(mode, steps, estimator=args.estimator) for mode in MODES}
  reference = runs["single"]
  difference, separation = {}, {}
  for mode, run in runs.items():
    difference[mode] = max_relative_difference(run["params"], reference["params"])
    separation[mode] = first_separation(run["losses"], reference["losses"])
    rates = {k: f"{float(v):.4g}" for k, v in hidlr_optax.learning_rates(run["opt_state"]).items()}
    print(
        f"{mode:>6}: loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}, rates {rates},"
        f" final params differ from single by {difference[mode]:.2e} (max rel.),"
        f" losses differ by > {SEPARATION:g} (rel.) from step {separation[mode]}"
    )
  # The secant's refresh holds no probes: one measurement per mode and K.
  chunks = (None, 1) if args.estimator == "probe" else (None,)
  memory = {}
  for mode in ("data", "fsdp"):
    for groups in (2, 11):
      for chunk in chunks:
        memory[(mode, chunk, groups)] = probe_memory(mode, chunk, groups,
                                                     estimator=args.estimator)
        print(
            f"step memory ({args.estimator}) {mode:>4}, {groups:>2} groups"
            + (f", probe_batch_size={chunk!s:>4}" if args.estimator == "probe" else "") + ":"
            f" {memory[(mode, chunk, groups)] / 2**20:.2f} MiB temporary per device"
        )
  return dict(runs=runs, difference=difference, separation=separation, memory=memory)


if __name__ == "__main__":
  main()
