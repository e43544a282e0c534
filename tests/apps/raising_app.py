"""A test app module that fails while it is imported, as a bug in user code would."""

from __future__ import annotations

from asyncstreams import App

app = App()

raise RuntimeError("raising_app fails on import, on purpose")
