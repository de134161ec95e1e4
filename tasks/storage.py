"""Object stores: one interface over a local folder and an S3 prefix.

Keys are always relative, '/'-separated and confined to the store's root; the
conditional put (`if_match` / `if_none_match`) is the primitive the catalogue
commit is built on. Another backend (GCS, say) is one more `ObjectStore`
here, with its URL scheme in `open_store` and `_root_parts`.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import io
import logging
import os
import random
import re
import stat
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ResponseStreamingError,
)

from models.errors import UserError
from tasks.records import ObjectInfo

log = logging.getLogger(__name__)


# bytes, or a buffer such as a memoryview over a numpy array (written without a copy)
Buffer = Union[bytes, bytearray, memoryview]


class StorageError(UserError, RuntimeError):
    """A store cannot be reached or used as asked; the message says what to do."""


class PreconditionFailed(StorageError):
    """A conditional put lost: the object changed (or appeared) since it was read."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "object not found"


def normalize_key(key: str) -> str:
    """Return `key` as a clean relative key, refusing anything that escapes the root."""
    if not key or "\x00" in key:
        raise StorageError(f"invalid object key {key!r}")
    if key.startswith("/"):
        raise StorageError(f"object key {key!r} must be relative")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"object key {key!r} has an empty, '.' or '..' segment; refusing it")
    return key


_LOCAL_ESCAPE = re.compile(r"\\(?:(\\)|x([89a-f][0-9a-f]))?")


def key_for_local_name(name: str) -> str:
    """The key of a file's relative path. A name is bytes on disk; bytes that are
    not UTF-8 reach Python as lone surrogates (surrogateescape), which Parquet,
    JSON and terminals refuse. Such a byte becomes the text `\\xHH` and a
    backslash `\\\\`, so every key is valid text naming exactly one file; every
    other name (valid UTF-8, no backslash) is its own key."""
    if "\\" not in name and name.isascii():
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def local_name_for_key(key: str) -> str:
    """The inverse of `key_for_local_name`."""
    if "\\" not in key:
        return key

    def unescape(m: re.Match[str]) -> str:
        if m.group(1):
            return "\\"
        if m.group(2):
            return chr(0xDC00 + int(m.group(2), 16))
        raise StorageError(f"object key {key!r} has a backslash that is not an escape; in a local folder's keys "
                           "a backslash is written \\\\ and a byte that is not UTF-8 \\xhh, as listed")

    return _LOCAL_ESCAPE.sub(unescape, key)


class ObjectStore(ABC):
    """A flat key space under one root (a local folder or `s3://bucket/prefix`)."""

    url: str
    # GETs worth running at once for one reader: S3 waits on the network; a folder
    # reads fastest one file after another in the caller's thread (no thread handoffs)
    concurrent_gets: int = 4

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object under `prefix`, all pages, in key order."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise `ObjectNotFound` when absent."""

    @abstractmethod
    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """Return the object's bytes and the ETag a conditional put compares against."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Return the object's info, or None when absent."""

    @abstractmethod
    def put(self, key: str, data: Buffer, *, if_match: str | None = None,
            if_none_match: bool = False) -> str:
        """Write `data` (any bytes-like object) and return its ETag.

        `if_match=ETAG` writes only if the current object has that ETag;
        `if_none_match=True` writes only if no object exists. A lost condition
        raises `PreconditionFailed`.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if it exists."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def describe(self, key: str) -> str:
        """The full address of `key`, for messages."""
        return f"{self.url.rstrip('/')}/{key}"


_LOCK_NAME = ".batchsight-lock"  # at the root, for conditional puts
_TMP_PREFIX = ".batchsight-tmp-"  # a put in progress, renamed into place when whole


class LocalStore(ObjectStore):
    """A folder on disk.

    Listings use `mtime-size` as the ETag (cheap, and it changes whenever the
    bytes do); conditional puts compare the md5 of content, as S3 does for
    single-part objects, under an flock so two processes cannot interleave. A
    plain put returns the listing's ETag, a conditional one the md5.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StorageError(f"folder {self.root} does not exist; check the path")
        self.url = str(self.root)
        self._lock = threading.Lock()
        self.concurrent_gets = 1

    def _path(self, key: str) -> Path:
        path = (self.root / normalize_key(local_name_for_key(key))).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"object key {key!r} resolves outside {self.root}; refusing it")
        return path

    @staticmethod
    def _stat_etag(st: os.stat_result) -> str:
        return f"{st.st_mtime_ns:x}-{st.st_size:x}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX) or (name == _LOCK_NAME and rel_dir == "."):
                    continue  # this store's own lock and half-written files; any other name is an object
                key = key_for_local_name(name if rel_dir == "." else f"{rel_dir}/{name}")
                if not key.startswith(prefix):
                    continue
                st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):  # links and special files are not objects
                    continue
                found.append(ObjectInfo(key, self._stat_etag(st), st.st_size, st.st_mtime))
        yield from sorted(found, key=lambda o: o.key)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.describe(key)} does not exist") from None

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, hashlib.md5(data).hexdigest()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, self._stat_etag(st), st.st_size, st.st_mtime)

    def _content_etag(self, key: str) -> str:
        return hashlib.md5(self._path(key).read_bytes()).hexdigest()

    def put(self, key: str, data: Buffer, *, if_match: str | None = None,
            if_none_match: bool = False) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        conditional = if_match is not None or if_none_match
        # flock is released by the kernel if the process dies, so a crash never
        # leaves a stale lock behind.
        lock_fd = os.open(self.root / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644) if conditional else None
        try:
            if lock_fd is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                current = self._content_etag(key) if path.exists() else None
                if if_none_match and current is not None:
                    raise PreconditionFailed(f"{self.describe(key)} already exists")
                if if_match is not None and current != if_match:
                    raise PreconditionFailed(
                        f"{self.describe(key)} changed since it was read (expected ETag {if_match}, found {current})")
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException as exc:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageError(
                        f"no space left on the disk of {self.root} while writing {key} ({exc.strerror}); free "
                        "some space or point --output at a bigger disk. Nothing of this run is live, and the "
                        "last committed version is intact") from None
                raise
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        # what the next conditional put compares against (an md5 of the bytes), or for
        # a plain put what `head` and `list` say (an md5 of a 65 MB part is 0.1 s here)
        return hashlib.md5(data).hexdigest() if conditional else self._stat_etag(path.stat())

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class _BufferReader(io.RawIOBase):
    """A read-only, seekable file over a bytes-like object, without copying it."""

    def __init__(self, data: Buffer) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


MULTIPART_THRESHOLD = 64 * 1024 * 1024
GET_ATTEMPTS = 5  # whole-object attempts for a body cut short (botocore retries the rest)


class S3Store(ObjectStore):
    """An S3 (or S3-compatible) prefix, through one cached boto3 client.

    Unconditional puts from `multipart_threshold` bytes go up in parts, straight
    from the caller's buffer: one PUT is capped at 5 GB, and a large index must
    not be copied to be sent."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, check_bucket: bool = True, max_pool: int = 32,
                 list_page_size: int = 1000, multipart_threshold: int = MULTIPART_THRESHOLD,
                 get_attempts: int = GET_ATTEMPTS) -> None:
        self.bucket = bucket
        self.get_attempts = get_attempts
        self.list_page_size = list_page_size
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=max(multipart_threshold // 4, 5 * 1024 * 1024))
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = resolved_endpoint(endpoint_url)
        session = boto3.session.Session()
        self.client = session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region or session.region_name or "us-east-1",
            config=Config(max_pool_connections=max_pool, retries={"max_attempts": 10, "mode": "standard"}),
        )
        if check_bucket:
            self._check_bucket()

    def _check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}; "
                    "check the s3:// URL, or pass --endpoint-url / set AWS_ENDPOINT_URL for an S3-compatible store"
                ) from None
            if code in ("403", "AccessDenied"):
                raise StorageError(f"access to bucket {self.bucket!r} is denied; check your AWS credentials") from None
            raise StorageError(f"cannot reach bucket {self.bucket!r}: {exc}") from None
        except (EndpointConnectionError, NoCredentialsError) as exc:
            raise StorageError(f"cannot reach bucket {self.bucket!r}: {exc}; check --endpoint-url and credentials") from None

    def _full(self, key: str) -> str:
        key = normalize_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=full_prefix,
                                   PaginationConfig={"PageSize": self.list_page_size})
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                yield ObjectInfo(self._rel(obj["Key"]), obj["ETag"].strip('"'), int(obj["Size"]),
                                 obj["LastModified"].timestamp())

    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """One whole object. botocore retries failed requests, but not a body cut
        short after a good status line; those are retried here as whole GETs (the
        length is checked against Content-Length, and a checksum where S3 sends one)."""
        full = self._full(key)
        for attempt in range(1, self.get_attempts + 1):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise ObjectNotFound(f"{self.describe(key)} does not exist") from None
                raise
            try:
                body = resp["Body"].read()
            except (BotoCoreError, ResponseStreamingError) as exc:  # cut short, or a checksum mismatch
                problem = f"{type(exc).__name__}: {exc}"
            else:
                expected = resp.get("ContentLength")
                if expected is None or len(body) == expected:
                    return body, resp["ETag"].strip('"')
                problem = f"got {len(body)} of {expected} bytes"
            if attempt == self.get_attempts:
                raise StorageError(f"reading {self.describe(key)} failed {attempt} times, the last: {problem}")
            log.info("GET %s came back incomplete (%s); fetching it again", self.describe(key), problem)
            time.sleep(random.uniform(0, min(2.0, 0.05 * 2 ** attempt)))
        raise AssertionError("unreachable")

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return ObjectInfo(key, resp["ETag"].strip('"'), int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def put(self, key: str, data: Buffer, *, if_match: str | None = None,
            if_none_match: bool = False) -> str:
        conditional = if_match is not None or if_none_match
        if not conditional and memoryview(data).nbytes >= self.transfer.multipart_threshold:
            self.client.upload_fileobj(_BufferReader(data), self.bucket, self._full(key), Config=self.transfer)
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key))["ETag"].strip('"')
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)  # botocore takes bytes or files, not arbitrary buffers
        kwargs: dict[str, str] = {}
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # If-Match on a key that vanished answers 404: the condition lost all the same.
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412):
                raise PreconditionFailed(f"{self.describe(key)} changed since it was read ({code or status})") from None
            raise
        return resp["ETag"].strip('"')

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))


ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def resolved_endpoint(endpoint_url: str | None) -> str | None:
    """The S3 endpoint to use: the one given, else `AWS_ENDPOINT_URL` (read here only), else AWS's own."""
    return endpoint_url or os.environ.get(ENDPOINT_ENV) or None


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URL: {url!r}; expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/")


def open_store(url: str, *, endpoint_url: str | None = None, create: bool = False) -> ObjectStore:
    """Open `url` (a local folder or `s3://bucket/prefix`).

    `create=True` is for output roots: a missing local folder is created (a
    missing bucket is still an error; batchsight never creates buckets).
    """
    if is_s3_url(url):
        bucket, prefix = parse_s3_url(url)
        return S3Store(bucket, prefix, endpoint_url=endpoint_url)
    if "://" in url:
        raise StorageError(f"unsupported URL scheme in {url!r}; use a local folder or s3://bucket/prefix")
    return LocalStore(url, create=create)


@dataclass(frozen=True)
class StoreSpec:
    """Where a store is, as plain data: its URL (a folder or `s3://bucket/prefix`)
    and, for S3, the endpoint. It travels to decode processes and Dask workers;
    `open` builds the store where it is used, once per process (`cached_store`)."""

    url: str
    endpoint_url: str | None = None

    def open(self, *, create: bool = False) -> ObjectStore:
        return cached_store(self.url, self.endpoint_url, create=create)


def url_reader(endpoint_url: str | None = None) -> Callable[[str], bytes]:
    """A function that reads one object by its full URL (`s3://bucket/key`, or a
    local path): how model weights at a URL reach `models/`, which knows nothing
    of stores."""

    def read(url: str) -> bytes:
        if not is_s3_url(url):
            return Path(url).expanduser().read_bytes()
        bucket, key = parse_s3_url(url)
        return cached_store(f"s3://{bucket}", endpoint_url).get(key)

    return read


@functools.lru_cache(maxsize=16)
def cached_store(url: str, endpoint_url: str | None = None, *, create: bool = False) -> ObjectStore:
    """One store (and so one boto3 client and connection pool) per root per process."""
    return open_store(url, endpoint_url=endpoint_url, create=create)


def _root_parts(url: str) -> tuple[str, tuple[str, ...]]:
    """(namespace, path segments) of a root: a bucket or the local filesystem."""
    if is_s3_url(url):
        bucket, prefix = parse_s3_url(url)
        return f"s3://{bucket}", tuple(p for p in prefix.split("/") if p)
    return "file://", Path(url).expanduser().resolve().parts


def check_roots_apart(source: str, output: str) -> None:
    """Refuse a source and an output root that are the same or nested either way:
    the catalogue would list its own files as images, and gc, which deletes what
    no version references under the output root, could reach the source."""
    (space_a, a), (space_b, b) = _root_parts(source), _root_parts(output)
    if space_a == space_b and (a[:len(b)] == b or b[:len(a)] == a):
        raise StorageError(
            f"--source {source} and --output {output} overlap (one is inside the other); the catalogue must live "
            "outside the images it catalogues: pick an output in another folder, bucket or prefix, e.g. "
            f"{'s3://BUCKET/catalog' if space_b.startswith('s3') else 'a sibling folder'}")
