"""The ``cai`` command line: thin commands over the library."""

from cai_async.cli.app import app, main

__all__ = ["app", "main"]
