"""Images under an fsspec URL (s3://bucket/photos, gs://..., file:///..., memory://...).

The store stays a local folder; only the images are remote. Rows keep each image's full URL
as their `path`, so search results, failures and the server name the object itself. A run
lists the prefix once (on S3 the paged LIST requests `fs.find` sends, nothing per object,
taken a page at a time), and an object whose size and version stamp (the listing's
modification time and ETag) match its row is not read at all: an unchanged bucket costs its
listing and nothing else.

Credentials and endpoints come from each filesystem's own configuration (AWS_* variables or
~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs) or fsspec's
FSSPEC_<PROTOCOL>_<OPTION> variables (FSSPEC_S3_ENDPOINT_URL=...): the indexer, the Ray
actors and `vqret serve` all read the same environment, and no secret lands in the store.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from .content_hash import stream_hash
from .images import IMAGE_EXTENSIONS
from .one_line import first_line
from .store import StoreError
from .urls import is_url, was_url
from .walk import SKIPPED_DIRS, FileEntry


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; StoreError when its package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # "Install s3fs to access S3", unknown protocol
        raise StoreError(f"{url}: {first_line(e)}") from None


def open_url(url: str) -> BinaryIO:
    """A seekable binary file for the object at `url` (the caller closes it)."""
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def url_hash(url: str) -> str:
    """The content hash of the object at `url` (what a Ray worker computes for it)."""
    fs, path = filesystem(url)
    return _hash_object(fs, path)


@contextmanager
def _failures_as_os_errors() -> Iterator[None]:
    """Any failure reading an object as an OSError with a one-line cause: the Indexer and
    the Ray workers report those per file."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - botocore's errors, ...
        raise OSError(f"{type(e).__name__}: {e}".splitlines()[0]) from e


def _hash_object(fs: Any, path: str) -> str:
    with _failures_as_os_errors(), fs.open(path, "rb") as f:
        return stream_hash(f)


def read_bytes(url: str) -> bytes:
    """The object's content; any failure is an OSError with a one-line cause."""
    with _failures_as_os_errors(), open_url(url) as f:
        return f.read()


def normalise(url: str) -> str:
    """The URL a store records: no trailing slash, so `s3://b/p` and `s3://b/p/` are one."""
    return url.rstrip("/") if not url.endswith("://") else url


@dataclass
class FsspecSource:
    """The three things the Indexer does with a folder, over fsspec: list the images with
    size and version stamp (`walk`), hash an object's content (`hash`) and name it for
    the embedder (`path`). Listed entries are named by their full URL."""

    url: str

    def __post_init__(self) -> None:
        self.url = normalise(self.url)
        self.fs, root = filesystem(self.url)
        self.root = root.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]

    def _url_of(self, full: str) -> str:
        # fsspec strips the protocol (s3fs: "bucket/key"; memory: "/key"); put it back on
        return f"{self.protocol}://{full}" if not is_url(full) else full

    def walk(self, on_error: Callable[[str, str], None] | None = None) -> Iterator[FileEntry]:
        """Image objects under the URL in name order (the order one sorted listing of their
        full paths gives), skipped like `walk_images` skips.

        Streamed: S3 a page of ListObjectsV2 at a time, other filesystems a folder at a time,
        so the listing of 100M objects is never held at once (benchmarks/README.md, "what
        the driver holds per row"). A listing that fails, at its first page or its last,
        raises StoreError before anything is compared (the Indexer builds its whole listing
        table before it plans), so an outage never reads as "every image was deleted".
        """
        listed = False
        for info in self._listing():
            listed = True
            full = info["name"]
            rel = full[len(self.root) :].lstrip("/")
            names = rel.split("/")
            if any(_skipped(n) for n in names):
                continue
            if PurePosixPath(rel).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            url = f"{self.url}/{rel}"
            try:
                entry = FileEntry(url, int(info["size"]), version_ns(info))
            except (KeyError, TypeError, ValueError) as e:
                if on_error is not None:
                    on_error(url, f"unreadable listing entry ({e})")
                continue
            yield entry
        if not listed and not self._guarded(lambda: self.fs.isdir(self.root)):
            raise StoreError(f"{self.url}: no such folder or prefix")

    def _guarded(self, step: Callable[[], Any]) -> Any:
        """step(), with any failure of the filesystem as StoreError "can't list"."""
        try:
            return step()
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError, botocore's NoCredentialsError, ...
            raise StoreError(f"{self.url}: can't list ({first_line(e)})") from None

    def _listing(self) -> Iterator[dict[str, Any]]:
        """The fsspec info of every object under the root (folders aside), in full-path
        order, one page or folder held at a time."""
        if _lists_in_name_order(self.fs, self.root):
            infos = self._s3_pages()
        else:
            infos = self._folders()
        while (info := self._guarded(lambda: next(infos, None))) is not None:
            yield info

    def _s3_pages(self) -> Iterator[dict[str, Any]]:
        """One ListObjectsV2 without a delimiter, as `find` sends it (the same requests:
        one per 1000 objects), taken a page at a time instead of gathered and sorted.
        S3 returns keys in UTF-8 byte order, which is Python's order of the decoded
        names: the order `sorted()` gave when the whole listing was held."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.root)
        prefix = key.lstrip("/") + "/" if key else ""  # the objects *under* root/, as find
        objects = self.fs._iterdir(bucket, delimiter="", prefix=prefix)
        previous = ""
        try:
            while page := sync(self.fs.loop, _take, objects, LIST_PAGE):
                for info in page:
                    # the Indexer's ids follow the listing order: never let it drift unseen
                    if info["name"] < previous:
                        raise StoreError(
                            f"{self.url}: the listing is not in name order ({info['name']} "
                            f"after {previous}); this S3 endpoint doesn't sort its keys"
                        )
                    previous = info["name"]
                    yield info
        finally:
            sync(self.fs.loop, objects.aclose)  # a run that stops early ends the listing

    def _folders(self) -> Iterator[dict[str, Any]]:
        """Depth-first, each folder's entries sorted as their full paths sort (a folder as
        its name + "/", which everything in it starts with): the order of one sorted
        listing, holding one folder's listing per level. Hidden and skipped folders are
        not listed at all."""
        stack = [self._folder(self.root)]
        while stack:
            info = next(stack[-1], None)
            if info is None:
                stack.pop()
            elif info["type"] != "directory":
                yield info
            elif not _skipped(info["name"].rstrip("/").rsplit("/", 1)[-1]):
                stack.append(self._folder(info["name"]))

    def _folder(self, path: str) -> Iterator[dict[str, Any]]:
        # Around the ls: a listing cached by an earlier call may be stale, and one kept by
        # this call would hold the whole tree in the filesystem's cache by the end.
        self.fs.invalidate_cache(path)
        try:
            infos = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return iter(())  # gone since its parent was listed; a missing root: walk says so
        finally:
            self.fs.invalidate_cache(path)
        here = path.rstrip("/")
        # some stores list a folder itself (S3's "folder/" marker): not an entry of it
        infos = [i for i in infos if i["name"].rstrip("/") != here]
        infos.sort(key=_listing_order)
        return iter(infos)

    def _inside(self, name: str) -> str:
        """The filesystem path of a listed URL (or of a path relative to the source)."""
        if is_url(name):
            if not name.startswith(self.url + "/"):
                raise OSError(f"{name} is not under {self.url}")
            name = name[len(self.url) + 1 :]
        return f"{self.root}/{name}"

    def hash(self, name: str) -> str:
        """blake2b-128 of the content, streamed: the same digest `file_hash` gives locally."""
        return _hash_object(self.fs, self._inside(name))

    def path(self, name: str) -> str:
        """The URL the embedder (or a Ray actor) opens for a listed entry."""
        return name if is_url(name) else f"{self.url}/{name}"


LIST_PAGE = 1000  # objects taken from an S3 listing at a time: one ListObjectsV2 page


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower() in SKIPPED_DIRS


def _listing_order(info: dict[str, Any]) -> str:
    name = info["name"].rstrip("/")
    return name + "/" if info["type"] == "directory" else name


def _lists_in_name_order(fs: Any, root: str) -> bool:
    """S3 lists a whole prefix in name order, 1000 keys a request: no folder-by-folder walk
    needed. Not S3 Express directory buckets (names ending --x-s3), which list unsorted."""
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return False
    bucket = root.lstrip("/").split("/", 1)[0]
    return isinstance(fs, S3FileSystem) and not bucket.endswith("--x-s3")


async def _take(items: AsyncIterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The next n items of an async listing (fewer at its end): one trip to fsspec's event
    loop per page, not per object."""
    page = []
    async for item in items:
        page.append(item)
        if len(page) == n:
            break
    return page


def version_ns(info: dict[str, Any]) -> int:
    """A stamp from an fsspec listing entry that changes whenever the object does.

    Object stores name the time differently (s3fs LastModified, gcsfs updated, adlfs
    last_modified, local mtime). S3's has whole seconds only, so an object rewritten within
    the same second at the same size would look unchanged: where the listing also has an
    ETag / checksum, a digest of it fills the sub-second digits. With an ETag and no time,
    the digest alone; with neither, the time of this run (never "unchanged" by stamp, so the
    content hash decides: every object is read each run, but no change is missed).
    """

    def as_ns(value: Any) -> int | None:
        if isinstance(value, int | float):
            return int(value * 1e9)
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        return None

    tag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "crc32c", "content_md5")
                if info.get(k)), None)
    tag_digest = None
    if tag is not None:
        digest = hashlib.blake2b(tag.encode(), digest_size=8).digest()
        tag_digest = int.from_bytes(digest, "big") >> 1  # int64, like a real mtime_ns
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        if info.get(key) is not None and (ns := as_ns(info[key])) is not None:
            if tag_digest is not None:
                ns = ns - ns % 1_000_000_000 + tag_digest % 1_000_000_000
            return ns
    if tag_digest is not None:
        return tag_digest
    if info.get("created") is not None and (ns := as_ns(info["created"])) is not None:
        return ns  # an object store's overwrite is a new object, with a new creation time
    return time.time_ns()


def check_local_store(store: str | os.PathLike | None) -> None:
    """The store is a local folder: a URL there gets one line, not a folder named 's3:'."""
    if store is not None and was_url(store):  # typer's Path folded "s3://b" into "s3:/b"
        raise StoreError(
            f"--store {os.fspath(store)}: the store must be a local folder (the images may be "
            "remote; the Parquet rows, manifest and index are written locally)"
        )
