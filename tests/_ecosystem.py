"""Shared helpers of the ecosystem tests (Flax, checkpoints, sharding, examples)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"


def import_example(name: str) -> ModuleType:
  """Imports ``examples/<name>.py`` (its ``_common`` import resolves too)."""
  if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))
  return importlib.import_module(name)


def relative_difference(a, b) -> float:
  """``max |a - b| / max |b|``: a difference relative to ``b``'s scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def virtual_cpu_devices(count: int) -> dict[str, str]:
  """The environment of a fresh process whose CPU backend has ``count`` devices
  (``XLA_FLAGS`` is read once, when jax starts)."""
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
  return {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}


def start_python(
    script: Path, args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None
) -> subprocess.Popen:
  """Starts ``python script *args`` from the repository root; ``env`` entries are
  added to the current environment."""
  return subprocess.Popen(
      [sys.executable, str(script), *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
  """Waits for a process of :func:`start_python` (killed after ``timeout``).

  Raises ``AssertionError`` with the process's output if it fails.
  """
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    stdout, stderr = proc.communicate()
  name = " ".join(map(str, proc.args[1:]))
  assert proc.returncode == 0, (
      f"{name} failed ({proc.returncode}):\n"
      f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}"
  )
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_python(
    script: Path,
    args: Sequence[str] = (),
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
  """Runs ``python script *args`` in a fresh process from the repository root.

  ``env`` entries are added to the current environment. Raises
  ``AssertionError`` with the process's output if it fails.
  """
  return finish(start_python(script, args, env), timeout)
