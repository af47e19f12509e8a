"""Queue and store URLs -> implementations: the one place a new kind (sqs://, redis://, s3://,
swift://) plugs in; the supervisor and the commands only see the protocols."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from cloudbuild.errors import UsageError
from cloudbuild.worker.dirqueue import DirQueue
from cloudbuild.worker.dirstore import DirStore
from cloudbuild.worker.protocols import Queue, Store


def _dir_path(option: str, url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/"):
        raise UsageError(
            f"{option} {url}: a dir:// URL names an absolute folder (dir:///srv/cloudbuild/queue)"
        )
    path = Path(parts.path)
    path.mkdir(parents=True, exist_ok=True)
    return path


QUEUES: dict[str, Callable[[str, str], Queue]] = {
    "dir": lambda option, url: DirQueue(_dir_path(option, url)),
}
STORES: dict[str, Callable[[str, str], Store]] = {
    "dir": lambda option, url: DirStore(_dir_path(option, url)),
}


def open_queue(url: str) -> Queue:
    scheme = urlsplit(url).scheme
    if scheme not in QUEUES:
        raise UsageError(
            f"--queue {url}: unknown kind '{scheme}://' (supported: {', '.join(f'{k}://' for k in QUEUES)})"
        )
    return QUEUES[scheme]("--queue", url)


def open_store(url: str) -> Store:
    scheme = urlsplit(url).scheme
    if scheme not in STORES:
        raise UsageError(
            f"--store {url}: unknown kind '{scheme}://' (supported: {', '.join(f'{k}://' for k in STORES)})"
        )
    return STORES[scheme]("--store", url)
