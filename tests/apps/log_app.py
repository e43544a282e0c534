"""A test app for `--log-format`: its handler logs a line of its own with the entry's
context given as `extra=`, and fails (on purpose, raising an exception whose message spans
two lines) on an entry that has a `fail` field, which is then dead-lettered at once.

The stream and group come from $LOG_APP_STREAM and $LOG_APP_GROUP.
"""

from __future__ import annotations

import logging
import os

from asyncstreams import App, Message

log = logging.getLogger("tests.log_app")

app = App()


@app.consumer(os.environ["LOG_APP_STREAM"], group=os.environ["LOG_APP_GROUP"], max_deliveries=1)
async def handle(fields: dict[str, str], msg: Message) -> None:
    context = {"stream": msg.stream, "group": msg.group, "consumer": msg.consumer}
    log.info("handling entry %s", msg.id, extra={**context, "entry_id": msg.id})
    if "fail" in fields:
        raise RuntimeError("log_app fails on purpose,\nin two lines")
