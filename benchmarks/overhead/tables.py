"""Markdown tables of the overhead report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; floats to 3 significant digits, the rest as ``str``."""
  fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)

