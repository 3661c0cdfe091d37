"""The `clipline` process's console: one line per failure.

When a flow or task fails, Prefect logs the failure, with its traceback, through
``prefect.flow_runs`` / ``prefect.task_runs`` (and ``prefect.engine``), and those records reach
the console through the root logger's console handler. The command then prints its own one-line
reason, so a user saw a traceback first. :class:`OneLineConsoleHandler` is Prefect's console
handler less those failure reports; the CLI selects it with Prefect's documented logging
override (``PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS``), so nothing else about the console
changes, and the API handler, attached to the run loggers themselves, still sends every record,
tracebacks included, to the Prefect API: the failed state and its logs are in the UI as before.
``CLIPLINE_DEBUG=1`` shows everything.
"""

from __future__ import annotations

import logging
import os
import re

from prefect.logging.handlers import PrefectConsoleHandler

#: loggers whose failure reports duplicate the command's one-line reason
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine", "prefect.flow_engine", "prefect.task_engine")
#: "Finished in state X" for an X that is not a success (logged at INFO for flow runs)
_UNSUCCESSFUL_END = re.compile(r"Finished in state (?!Completed|Cached|RolledBack)")


def is_failure_report(record: logging.LogRecord) -> bool:
    """A Prefect record that reports a failed/crashed flow or task run (with or without traceback)."""
    if not record.name.startswith(RUN_LOGGERS):
        return False
    if record.levelno >= logging.ERROR or record.exc_info:
        return True
    try:
        return bool(_UNSUCCESSFUL_END.match(record.getMessage()))
    except Exception:  # noqa: BLE001 - a record whose message cannot be formatted is not ours to judge
        return False


class OneLineConsoleHandler(PrefectConsoleHandler):
    """Prefect's console handler without the failure reports of flow and task runs (unless
    ``CLIPLINE_DEBUG`` is set); see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.addFilter(lambda record: bool(os.environ.get("CLIPLINE_DEBUG")) or not is_failure_report(record))
