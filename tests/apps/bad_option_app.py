"""A test app module whose consumer option is invalid: the mistake is a ConfigurationError
raised while the module is imported, by the `@app.consumer(...)` line."""

from __future__ import annotations

from asyncstreams import App

app = App()


@app.consumer("bad-option-app", group="bad-option-app", concurrency=0)
async def handle(fields: dict[str, str]) -> None:
    pass
