"""The ``lookwhen`` command (parsing and printing only; the work is done by
the library it calls)."""
from lookwhen.cli.main import main

__all__ = ["main"]
