"""A test app module that exists but imports a module that does not.

The CLI must show this import's traceback, not claim that the app module itself is missing.
"""

from __future__ import annotations

import asyncstreams_test_no_such_dependency  # type: ignore[import-not-found]  # noqa: F401

from asyncstreams import App

app = App()
