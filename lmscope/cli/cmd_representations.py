"""Command-line commands for reading representations: Patchscopes, probes, steering, projections."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this family's commands to `app`."""
