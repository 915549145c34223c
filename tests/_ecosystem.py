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

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"


def import_example(name: str) -> ModuleType:
  """Imports ``examples/<name>.py`` (its ``_common`` import resolves too)."""
  if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))
  return importlib.import_module(name)


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
  full_env = {**os.environ, **(env or {})}
  proc = subprocess.run(
      [sys.executable, str(script), *args],
      cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
  )
  assert proc.returncode == 0, (
      f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n"
      f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
  )
  return proc
