"""The refresh inbox: a folder (local path or any fsspec URL) where new URL lists are dropped.

Rules a user can rely on:
- Pending lists are the files directly inside the inbox whose extension is a URL-list format
  (csv, tsv, parquet, jsonl, txt, optionally compressed), sorted by name. Sub-folders, and
  names starting with ``.`` or ``_`` (files still being written, by convention), are ignored.
- A list that cannot be read as a URL list (no URL column, not parseable, ...) does not block the
  others or later refreshes: it is moved to ``<inbox>/failed/`` with ``<name>.error.txt`` beside
  it saying why; fix it and drop it in the inbox again.
- After a refresh has ingested a list (every URL in it is recorded in the catalog, fetched or
  failed), the list is moved to ``<inbox>/done/`` (``refresh.archive = "move"``, the default) so
  the inbox shows what is still to do. A name already in ``done/`` gets a time-stamp suffix,
  so nothing is overwritten. With ``refresh.archive = "keep"`` (for read-only sources such as a
  bucket owned by someone else) lists stay where they are: ingest is incremental by URL, so a list
  read again costs a read and fetches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath

import fsspec

from clipline.components.config import Config
from clipline.components.ingest.sources import _format_of  # the URL-list readers' own extension rules
from clipline.components.storage import check_bucket, storage_errors

DONE = "done"
FAILED = "failed"


class InboxError(ValueError):
    """The inbox cannot be read or written; the message names it and what to do."""


def inbox_location(cfg: Config) -> str:
    """``refresh.inbox`` as a full location: an fsspec URL as given, a relative path under the
    data dir, an absolute path as given."""
    loc = cfg.refresh.inbox
    if "://" in loc:
        return loc.rstrip("/")
    p = PurePosixPath(loc)
    return str(p if p.is_absolute() else cfg.data_dir / loc)


@dataclass
class Inbox:
    """One inbox location (see the module docstring)."""

    location: str

    @classmethod
    def from_config(cls, cfg: Config, create: bool = True) -> "Inbox":
        inbox = cls(inbox_location(cfg))
        if create and "://" not in inbox.location:
            try:
                inbox.fs.makedirs(inbox.root, exist_ok=True)
            except OSError as e:
                raise InboxError(
                    f"cannot create the inbox {inbox.location}: {e}; set refresh.inbox to a writable folder"
                ) from e
        return inbox

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.location)[0]

    @property
    def root(self) -> str:
        return fsspec.core.url_to_fs(self.location)[1]

    def _url(self, inner: str) -> str:
        """A path inside the inbox's filesystem as a location ``read_url_lists`` accepts."""
        if "://" not in self.location:
            return inner
        protocol = self.location.split("://", 1)[0]
        return f"{protocol}://{inner.split('://', 1)[-1]}"

    def pending(self) -> list[str]:
        """The URL lists waiting in the inbox (locations, sorted by name)."""
        fs, root = self.fs, self.root
        try:
            with storage_errors("inbox", self.location):
                if not fs.exists(root):
                    check_bucket(fs, "inbox", self.location)  # a missing bucket is an error, not an empty inbox
                    return []
                entries = fs.ls(root, detail=True)
        except OSError as e:
            raise InboxError(f"cannot list the inbox {self.location}: {e}") from e
        out = []
        for e in entries:
            name = PurePosixPath(e["name"]).name
            if e.get("type") != "file" or name.startswith((".", "_")) or _format_of(name) is None:
                continue
            out.append(e["name"])
        return [self._url(p) for p in sorted(out, key=lambda p: PurePosixPath(p).name)]

    def archive(self, lists: list[str], folder: str = DONE) -> list[str]:
        """Move lists into ``<inbox>/<folder>/`` (``done`` by default); returns their new locations."""
        fs, root = self.fs, self.root
        done = f"{root.rstrip('/')}/{folder}"
        fs.makedirs(done, exist_ok=True)
        moved = []
        for loc in lists:
            src = fsspec.core.url_to_fs(loc)[1]
            name = PurePosixPath(src).name
            dst = f"{done}/{name}"
            if fs.exists(dst):
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
                dst = f"{done}/{stamp}-{name}"
            try:
                fs.mv(src, dst)
            except OSError as e:
                raise InboxError(
                    f"ingested {loc} but cannot move it to {done}: {e}; make the inbox writable "
                    'or set refresh.archive = "keep"'
                ) from e
            moved.append(self._url(dst))
        return moved

    def quarantine(self, loc: str, reason: str) -> str:
        """Move an unreadable list to ``<inbox>/failed/`` and write ``<name>.error.txt`` beside it."""
        dst = self.archive([loc], FAILED)[0]
        fs, inner = fsspec.core.url_to_fs(dst)
        fs.pipe(inner + ".error.txt", (reason.rstrip() + "\n").encode())
        return dst


def unreadable_lists(cfg: Config, lists: list[str]) -> dict[str, str]:
    """The lists of ``lists`` that ingest cannot read (with the reader's reason), each read alone."""
    from clipline.components.ingest.sources import read_url_lists

    ic = cfg.ingest
    bad = {}
    for loc in lists:
        try:
            read_url_lists(
                [loc],
                url_col=ic.url_col,
                caption_col=ic.caption_col,
                input_format=ic.input_format,
                save_additional_columns=ic.save_additional_columns,
            )
        except (ValueError, OSError) as e:  # UrlListError is a ValueError; pyarrow's errors are too
            bad[loc] = f"{type(e).__name__}: {e}"
    return bad
