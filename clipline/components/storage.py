"""Object storage as clipline reads it (any fsspec URL: ``s3://``, ``gs://``, ``az://`` ...): one
place that turns a storage client's failures into one-line errors that name the URL and what to
set, instead of a bare "Forbidden" or a connection traceback.

Credentials, endpoint and retries come the usual way for each store, never from clipline's
config: for S3 and S3-compatible stores (MinIO) ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
or ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for a store other than AWS, and the client's own retry
settings (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``), which retry transient errors before any of
these messages. Messages never include a credential.

:class:`StorageError` is neither a ValueError nor an OSError on purpose: a list that cannot be
read *because storage is unreachable* is not a bad list, so the refresh inbox does not set it aside
as unreadable; the command stops instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: what to set, per protocol family
_CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a key that may read it",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file that may read it",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN",
}
_ENDPOINT = {
    "s3": "set AWS_ENDPOINT_URL to the store's address (for the compose stack's MinIO: http://127.0.0.1:9000), "
    "or unset it for AWS",
    "gs": "check the network path to storage.googleapis.com",
    "az": "check AZURE_STORAGE_ACCOUNT_NAME and the network path to the account",
}
_FAMILY = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
#: the class names of the clients' "cannot connect" errors (botocore, aiohttp), matched by name so
#: that this module imports no client
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ConnectionError",
    "TimeoutError",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}


class StorageError(RuntimeError):
    """Object storage refused or could not be reached; the message names the URL and what to set."""


def protocol(url: str) -> str | None:
    """The URL's protocol family (``s3``, ``gs``, ``az``), or None for a local path or another kind."""
    if "://" not in url:
        return None
    return _FAMILY.get(url.split("://", 1)[0].lower())


def snapshot_location(snapshots_dir: Any, snapshot: str) -> tuple[str, str, bool]:
    """Where a snapshot is: ``(base, snapshot_id, in_store)``, its directory being ``base/snapshot_id``.
    ``snapshot`` is an id under ``snapshots_dir`` (a local path or a URL), or the URL of a snapshot
    directory in object storage (then ``snapshots_dir`` is not used)."""
    if protocol(str(snapshot)) is not None:
        base, snapshot_id = str(snapshot).rstrip("/").rsplit("/", 1)
        return base, snapshot_id, True
    in_store = protocol(str(snapshots_dir)) is not None
    return (str(snapshots_dir).rstrip("/") if in_store else str(Path(snapshots_dir))), snapshot, in_store


def endpoint(url: str) -> str:
    """Where requests for ``url`` go, for messages."""
    if protocol(url) == "s3":
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    return url.split("://", 1)[0] + "://"


def bucket_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


@contextmanager
def storage_errors(what: str, url: str) -> Iterator[None]:
    """Run the body; a storage failure on ``url`` becomes a :class:`StorageError` that says which
    ``what`` (e.g. "URL list", "inbox") failed and what to set. Not-found errors pass unchanged."""
    family = protocol(url)
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised as it is
        if family is None:
            raise
        for err in _chain(e):
            names = _names(err)
            if names & _NO_CREDENTIALS:
                raise StorageError(f"{what} {url}: no credentials for {endpoint(url)}: {_CREDENTIALS[family]}") from e
            if isinstance(err, PermissionError) or "AccessDenied" in str(err) or "Forbidden" in str(err):
                raise StorageError(
                    f"{what} {url}: access denied by {endpoint(url)} ({_first_line(err)}): {_CREDENTIALS[family]}"
                ) from e
            if names & _UNREACHABLE:
                raise StorageError(
                    f"{what} {url}: cannot reach {endpoint(url)} ({_first_line(err)}): {_ENDPOINT[family]}"
                ) from e
        raise


def check_bucket(fs: Any, what: str, url: str) -> None:
    """Raise :class:`StorageError` when the bucket (container) of ``url`` does not exist."""
    family = protocol(url)
    if family is None:
        return
    bucket = bucket_of(url)
    with storage_errors(what, url):
        exists = fs.exists(bucket)
    if not exists:
        where = f" at {endpoint(url)}" if family == "s3" else ""
        hint = " and AWS_ENDPOINT_URL" if family == "s3" else ""
        raise StorageError(
            f"{what} {url}: bucket {bucket!r} does not exist{where}: create it, or fix the bucket name{hint}"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
