"""Command-line commands of the circuits family (registered on the main app by register())."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this family's commands to `app`."""
