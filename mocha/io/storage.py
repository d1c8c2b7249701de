"""One view of local folders and ``s3://`` buckets: resolve, read, list, and write atomically.

Every URL is either a local path (``/data/x``, ``file:///data/x``) or ``s3://bucket/key``.
S3 goes through ``pyarrow.fs.S3FileSystem`` (what Ray Data takes as ``filesystem=``) with the
standard AWS credential chain; the endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` variables (MinIO, a local moto server) and the region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. Nothing here reads, stores or logs credentials.

Atomic writes: a reader never sees a half-written file. Locally the bytes go to a temporary
file in the destination folder and are renamed into place; on S3 they are spooled to a local
temporary file and uploaded in one request only once complete (an S3 object appears only when
its upload completes), so a crash mid-write leaves nothing behind.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import shutil
import stat
import tempfile
import threading
import uuid
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Iterable, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

_COPY_CHUNK = 8 << 20
_TMP_MARK = ".tmp-"
#: Reads a :class:`RootReader` on S3 keeps in flight once given the paths ahead (S3 answers
#: each GET after tens of milliseconds, so one at a time would leave a task waiting).
READ_AHEAD = 16


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join_url(base: str, *parts: str) -> str:
    """Join path components onto a local path or URL with ``/``."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    # S3 (and S3-compatible stores under load) answer some requests with transient errors, some
    # embedded in a 200 response; retry those a few more times than the SDK default.
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for the current environment (endpoint and region variables)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _s3_filesystem(endpoint, region)


_CLIENT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    with _CLIENT_LOCK:  # a boto3 session is not thread-safe while it builds a client; the client is
        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=region,
            config=Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=2 * READ_AHEAD))


def s3_client() -> Any:
    """A boto3 S3 client for the current environment (same endpoint and region variables as
    :func:`s3_filesystem`, the standard credential chain). Reads of whole objects and ranges go
    through it: one GET each, where pyarrow's input files first send a HEAD for the size."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _s3_client(endpoint, region)


def _get_object(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    """An S3 object's bytes (or ``[start, end)`` of them) in one GET; a missing object is a
    ``FileNotFoundError``, a refused one a ``PermissionError``, both naming the URL."""
    from botocore.exceptions import ClientError

    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"not a valid S3 object URL (want s3://bucket/key): {url!r}")
    kwargs = {"Bucket": bucket, "Key": key}
    if byte_range is not None:
        if byte_range[1] <= byte_range[0]:
            return b""
        kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
    try:
        response = s3_client().get_object(**kwargs)
        with contextlib.closing(response["Body"]) as body:
            return body.read()
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise FileNotFoundError(f"no such file: {url}") from None
        if code in ("AccessDenied", "403"):
            raise PermissionError(f"access denied: {url}") from None
        if code == "InvalidRange":
            return b""
        raise OSError(f"cannot read {url}: {e}") from e


def resolve_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """Map a local path or ``s3://`` URL to ``(filesystem, path inside it)``."""
    if is_s3(url):
        path = url[len("s3://"):].rstrip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"not a valid S3 URL (want s3://bucket/key): {url!r}")
        return s3_filesystem(), path
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise ValueError(f"unsupported URL scheme in {url!r}: use a local path or s3://bucket/key")
    return pafs.LocalFileSystem(), str(Path(url).expanduser().resolve())


class OutsideRootError(OSError):
    """A path under a root resolves (through symbolic links) to a file outside that root."""


class RootReader:
    """Reads files by path relative to one root folder (local or ``s3://``), never a file outside
    it: local symbolic links -- to a file or a folder, anywhere on the path -- are resolved and
    a target outside the root's real path raises :class:`OutsideRootError`. S3 has no links.

    Fast path: the real path of each folder is resolved once per reader (keep a reader for one
    batch of work, not for the life of a process), and the file itself is opened with
    ``O_NOFOLLOW``, so a link in the last component fails the open and takes the slow path
    (full resolution). ``O_NONBLOCK`` keeps a FIFO among the files from hanging the reader.

    :meth:`read` raises ``FileNotFoundError``, ``IsADirectoryError`` (a folder, FIFO, device),
    ``PermissionError``, ``ValueError`` (a NUL byte) or another ``OSError`` (a name too long,
    a link loop) for the caller to classify."""

    def __init__(self, root: str):
        self.root = root
        self.s3 = is_s3(root)
        if not self.s3:
            local = root[len("file://"):] if root.startswith("file://") else root
            self.real_root = os.path.realpath(str(Path(local).expanduser()))
        self._dirs: dict[str, str] = {}
        self._ahead: collections.deque[tuple[str, Future]] = collections.deque()
        self._upcoming: Iterator[str] = iter(())
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "RootReader":
        return self

    def read_ahead(self, relatives: Iterable[str]) -> None:
        """Announce the paths the next :meth:`read` calls will ask for, in that order. On S3 up to
        :data:`READ_AHEAD` of them are then fetched in the background (memory: that many files);
        a read of an announced path takes its result, with the same exceptions a plain read
        raises (announced paths before it that were skipped are dropped). Locally (reads are
        fast) and for paths not announced, a read is a plain read."""
        if not self.s3:
            return
        self.cancel_read_ahead()  # a new announcement replaces the last one
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="mocha-read-ahead")
        self._upcoming = iter(relatives)
        self._top_up()

    def _top_up(self) -> None:
        while len(self._ahead) < READ_AHEAD:
            relative = next(self._upcoming, None)
            if relative is None:
                return
            self._ahead.append((relative, self._pool.submit(self._read_now, relative)))

    def cancel_read_ahead(self) -> None:
        """Stop reading ahead (reads in flight finish; their bytes are dropped). The reader stays
        usable; :meth:`read_ahead` starts again."""
        self._upcoming = iter(())
        for _, future in self._ahead:
            future.cancel()
        self._ahead.clear()

    def __exit__(self, *exc: object) -> None:
        self.cancel_read_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _inside(self, real: str, relative: str) -> str:
        if real != self.real_root and not real.startswith(self.real_root.rstrip("/") + "/"):
            raise OutsideRootError(f"{relative!r} resolves to {real}, outside the root {self.real_root}")
        return real

    def _real_dir(self, folder: str, relative: str) -> str:
        real = self._dirs.get(folder)
        if real is None:
            real = self._inside(os.path.realpath(os.path.join(self.real_root, folder)), relative)
            self._dirs[folder] = real
        return real

    def read(self, relative: str) -> bytes:
        for position, (announced, _) in enumerate(self._ahead):
            if announced == relative:  # announced paths before it were not asked for: drop them
                for _ in range(position):
                    self._ahead.popleft()[1].cancel()
                future = self._ahead.popleft()[1]
                self._top_up()
                return future.result()
        return self._read_now(relative)

    def _read_now(self, relative: str) -> bytes:
        if self.s3:
            url = join_url(self.root, relative)
            try:
                return read_bytes(url)
            except OSError:
                fs, path = resolve_filesystem(url)
                if fs.get_file_info(path).type == pafs.FileType.Directory:
                    raise IsADirectoryError(f"{url} is a folder (a key prefix)") from None
                raise
        if "\x00" in relative:
            raise ValueError("embedded null byte")
        folder, _, name = relative.replace("\\", "/").rpartition("/")
        path = os.path.join(self._real_dir(folder, relative), name)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            # The last component is a link: follow it, then it must still land inside the root.
            path = self._inside(os.path.realpath(path), relative)
            fd = os.open(path, flags)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(f"{relative} is a folder")
            if not stat.S_ISREG(info.st_mode):
                raise IsADirectoryError(f"{relative} is not a regular file (device, FIFO or socket)")
            data = os.read(fd, info.st_size + 1)  # the usual file: one system call
            if len(data) == info.st_size:
                return data
            chunks = [data]  # a short read (a file past 2 GiB) or a file that changed size: read to its end
            while chunk := os.read(fd, 1 << 24):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)


def read_under_root(root: str, relative: str) -> bytes:
    """``RootReader(root).read(relative)``: one file, never from outside ``root``."""
    return RootReader(root).read(relative)


def exists(url: str) -> bool:
    fs, path = resolve_filesystem(url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_size(url: str) -> int | None:
    """Size in bytes of a file, or ``None`` when it does not exist."""
    fs, path = resolve_filesystem(url)
    info = fs.get_file_info(path)
    return None if info.type == pafs.FileType.NotFound else info.size


def read_bytes(url: str) -> bytes:
    """The whole file (one GET on S3); raises ``FileNotFoundError`` naming the URL when it is missing."""
    if is_s3(url):
        return _get_object(url)
    fs, path = resolve_filesystem(url)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None
    except OSError as e:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file: {url}") from None
        raise OSError(f"cannot read {url}: {e}") from e


@contextlib.contextmanager
def open_input(url: str) -> Iterator[BinaryIO]:
    """A sequential binary reader (for streaming large files such as tar shards)."""
    fs, path = resolve_filesystem(url)
    with fs.open_input_stream(path) as f:
        yield f


def list_files(url: str, suffix: str = "") -> list[str]:
    """Sorted URLs of the files directly inside folder ``url`` whose names end with ``suffix``;
    an empty list when the folder does not exist."""
    fs, path = resolve_filesystem(url)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = sorted(basename(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [join_url(url, n) for n in names]


def delete(url: str) -> None:
    """Remove a file; a missing file is not an error."""
    fs, path = resolve_filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_writer`'s temporaries (left by a crash)."""
    return name.startswith(".") and _TMP_MARK in name


@contextlib.contextmanager
def atomic_writer(url: str) -> Iterator[BinaryIO]:
    """Write ``url`` so that it appears only complete: yields a binary file; on a clean exit the
    bytes are published in one step, on an exception nothing is published."""
    fs, path = resolve_filesystem(url)
    if isinstance(fs, pafs.LocalFileSystem):
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with tempfile.TemporaryFile() as spool:
        yield spool
        spool.seek(0)
        with fs.open_output_stream(path) as out:
            shutil.copyfileobj(spool, out, _COPY_CHUNK)


def write_bytes(url: str, data: bytes) -> None:
    """Atomically write ``data`` to ``url``."""
    with atomic_writer(url) as f:
        f.write(data)


def upload_file(local_path: str | Path, url: str) -> None:
    """Atomically copy a local file to ``url`` (local or S3)."""
    with open(local_path, "rb") as src, atomic_writer(url) as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


def read_range(url: str, offset: int, length: int) -> bytes:
    """``length`` bytes of ``url`` from ``offset`` (one ranged GET on S3, a seek locally)."""
    if is_s3(url):
        data = _get_object(url, (offset, offset + length))
    else:
        fs, path = resolve_filesystem(url)
        try:
            with fs.open_input_file(path) as f:
                data = f.read_at(length, offset)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {url}") from None
    if len(data) != length:
        raise OSError(f"{url}: wanted {length} bytes at {offset}, the file holds {len(data)} there (truncated?)")
    return data


def list_dirs(url: str) -> list[str]:
    """Sorted URLs of the folders directly inside ``url`` (S3: common prefixes); [] if none."""
    fs, path = resolve_filesystem(url)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return [join_url(url, n) for n in sorted(basename(i.path) for i in infos if i.type == pafs.FileType.Directory)]


def delete_tree(url: str) -> None:
    """Remove a folder and everything in it; a missing folder is not an error."""
    fs, path = resolve_filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)
