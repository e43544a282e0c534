"""A test app whose `App(url)` is $URL_APP_URL, to test which URL the CLI uses.

The stream and group come from $URL_APP_STREAM and $URL_APP_GROUP. Its handler does
nothing: a test sees what it consumed from the group's state in Redis.
"""

from __future__ import annotations

import os

from asyncstreams import App

app = App(url=os.environ["URL_APP_URL"])


@app.consumer(
    os.environ.get("URL_APP_STREAM", "url-app"),
    group=os.environ.get("URL_APP_GROUP", "url-app-group"),
)
async def handle(fields: dict[str, str]) -> None:
    pass
