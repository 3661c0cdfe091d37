"""Library parts of the `refresh` flow: the inbox of URL lists and the one-run-at-a-time lock."""

from clipline.components.refresh.inbox import Inbox, InboxError, unreadable_lists
from clipline.components.refresh.lock import RUN_LOCK, RunBusy, exclusive_run

__all__ = ["Inbox", "InboxError", "unreadable_lists", "RUN_LOCK", "RunBusy", "exclusive_run"]
