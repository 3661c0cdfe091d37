"""Library parts of the `refresh` flow: the inbox of URL lists."""

from clipline.components.refresh.inbox import Inbox, InboxError, unreadable_lists

__all__ = ["Inbox", "InboxError", "unreadable_lists"]
