"""Presentation, the top layer: the command line and the renderers of every document format."""

from opaudit.cli.main import main

__all__ = ["main"]
