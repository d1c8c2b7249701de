"""Byte-reproducible tar shards, published atomically, with done-markers for resuming.

Every member header is fixed (mtime 0, uid/gid 0, no owner names, mode 0644, USTAR), so the
same members in the same order give the same bytes on every run and machine. A shard is
written through :func:`mocha.io.storage.atomic_writer` (never visible half-written) while its
SHA-256 is computed, and then a small done-marker ``_progress/<shard>.json`` records its
count, size, digest and the digest of the *plan* it was built from. The manifest of a finished
build lists the same for every shard, and the markers are then removed (a finished output holds
shards, manifest and quarantine only). A rerun skips a shard only when its marker, or else the
finished manifest, names the new plan's digest and the file on storage still has the recorded
size and SHA-256; anything else is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import BinaryIO

import pyarrow.fs as pafs

from mocha.io import storage
from mocha.io.layout import MANIFEST_NAME, PROGRESS_DIR

_HASH_CHUNK = 1 << 20  # 1 MiB: hashing streams, the buffer is the memory it costs


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    """A published shard as the manifest lists it."""

    name: str
    count: int
    size: int
    sha256: str
    plan_sha256: str = ""  #: digest of the plan it was built from ("" in manifests before it was recorded)


_BLOCK = tarfile.BLOCKSIZE  # 512: headers and member data are padded to it
_RECORD = tarfile.RECORDSIZE  # 10240: the archive's length is padded to it, as tarfile does
_NAME_BYTES = 100  # a USTAR name field; longer names go through tarfile (prefix split)
_MAX_OCTAL_SIZE = 8**11  # the size field holds 11 octal digits
_ZEROS = bytes(_BLOCK)


def _ustar_header(name: str, size: int) -> bytes:
    """The USTAR header tarfile writes for a regular file with our fixed fields (mode 0644,
    uid/gid 0, no owner names, mtime 0), built in one step instead of through a ``TarInfo``
    (which costs more than checking and copying a small image). Names that do not fit the
    100-byte field in ASCII, and sizes past 8 GiB, take tarfile's own path; a unit test checks
    both paths give tarfile's bytes."""
    encoded = name.encode("ascii", "ignore")
    if len(encoded) != len(name) or len(encoded) > _NAME_BYTES or size >= _MAX_OCTAL_SIZE:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(_BLOCK)
    header[0:len(encoded)] = encoded
    header[100:124] = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
    header[124:136] = b"%011o\x00" % size
    header[136:157] = b"00000000000\x00        0"  # mtime, checksum placeholder, typeflag '0' (regular)
    header[257:265] = b"ustar\x0000"  # devmajor/devminor stay NUL for a regular file, as tarfile writes them
    header[148:155] = b"%06o\x00" % sum(header)
    return bytes(header)


class TarShard:
    """The shard being written: ``add(name, data)`` appends a member; ``info`` is set once
    the shard is published (see :func:`write_tar_shard`). Bytes equal what ``tarfile`` writes
    in USTAR format for the same members with our fixed header fields."""

    def __init__(self, out: BinaryIO, name: str):
        self._out, self.name = out, name
        self._sha256, self.size = hashlib.sha256(), 0
        self._keys: set[str] = set()
        self.info: ShardInfo | None = None

    @property
    def count(self) -> int:
        """Samples so far (distinct keys; a key is a member name up to its first dot)."""
        return len(self._keys)

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._sha256.update(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        self.add_members(((name, data),))

    def add_members(self, members: Iterable[tuple[str, bytes]]) -> None:
        """Append several members (a sample's json and image) in one write."""
        parts = []
        for name, data in members:
            parts += (_ustar_header(name, len(data)), data, _ZEROS[:-len(data) % _BLOCK])
            self._keys.add(name.split(".", 1)[0])
        self._write(b"".join(parts))

    def close(self) -> ShardInfo:
        """End the archive (two zero blocks, then zeros up to a whole record, as tarfile does)."""
        end = self.size + 2 * _BLOCK
        self._write(bytes(2 * _BLOCK + (-end % _RECORD)))
        return ShardInfo(name=self.name, count=self.count, size=self.size, sha256=self._sha256.hexdigest())


@contextlib.contextmanager
def write_tar_shard(url: str) -> Iterator[TarShard]:
    """Write a tar shard to ``url``, published atomically when the block exits cleanly (an
    exception publishes nothing). After the block, ``shard.info`` holds its size and SHA-256."""
    with storage.atomic_writer(url) as out:
        shard = TarShard(out, storage.basename(url))
        yield shard
        info = shard.close()
    shard.info = info


def iter_tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """Stream ``(member name, bytes)`` from a tar on local disk or S3 without loading it whole."""
    with storage.open_input(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                yield member.name, f.read() if f is not None else b""


def iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key: ``(key, {extension: bytes})`` in tar order."""
    key, sample = None, {}
    for name, data in iter_tar_members(url):
        k, _, ext = name.partition(".")
        if k != key and sample:
            yield key, sample
            sample = {}
        key = k
        sample[ext] = data
    if sample:
        yield key, sample


def sha256_of(url: str) -> str:
    digest = hashlib.sha256()
    with storage.open_input(url) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def marker_url(output: str, name: str) -> str:
    return storage.join_url(output, PROGRESS_DIR, f"{name}.json")


def write_marker(output: str, info: ShardInfo, plan_sha256: str) -> ShardInfo:
    """Record that ``info``'s shard is complete for the plan with digest ``plan_sha256``;
    returns ``info`` carrying that digest (what the manifest lists)."""
    info = replace(info, plan_sha256=plan_sha256)
    storage.write_bytes(marker_url(output, info.name), json.dumps(asdict(info), sort_keys=True).encode())
    return info


def _marker(output: str, name: str) -> ShardInfo | None:
    marker = marker_url(output, name)
    if not storage.exists(marker):
        return None
    try:
        return ShardInfo(**json.loads(storage.read_bytes(marker)))
    except (ValueError, KeyError, TypeError):
        return None


def finished_shards(output: str) -> dict[str, ShardInfo]:
    """The shards the manifest of a finished build lists (with their plan digests), by name;
    empty without a readable manifest."""
    url = storage.join_url(output, MANIFEST_NAME)
    if not storage.exists(url):
        return {}
    try:
        return {s["name"]: ShardInfo(**s) for s in json.loads(storage.read_bytes(url))["shards"]}
    except (ValueError, KeyError, TypeError):
        return {}


def completed_shard(output: str, name: str, plan_sha256: str,
                    finished: Mapping[str, ShardInfo] | None = None) -> ShardInfo | None:
    """The shard's info if it is complete for this plan: its marker, or else its entry in the
    finished build's manifest (``finished``, see :func:`finished_shards`), names this plan, and
    the file's size and SHA-256 are as recorded."""
    info = _marker(output, name) or (finished or {}).get(name)
    if info is None or info.plan_sha256 != plan_sha256 or info.name != name:
        return None
    url = storage.join_url(output, name)
    if storage.file_size(url) != info.size:
        return None
    return info if sha256_of(url) == info.sha256 else None


def remove_markers(output: str) -> None:
    """Delete the ``_progress/`` folder once the manifest records the finished build."""
    fs, path = storage.resolve_filesystem(storage.join_url(output, PROGRESS_DIR))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def is_shard_name(name: str) -> bool:
    stem = name[len("shard-"):-len(".tar")]
    return name.startswith("shard-") and name.endswith(".tar") and stem.isdigit()


def remove_stale_shards(output: str, keep: int | Collection[str]) -> list[str]:
    """Delete ``shard-NNNNNN.tar`` files (and markers) that are not kept -- numbered ``>= keep``
    when ``keep`` is a count, not named in it when it is a collection of names -- left by an
    earlier run, and temporary files of writes a crash interrupted; returns the names removed."""
    removed = []
    for url in storage.list_files(output):
        name = storage.basename(url)
        if isinstance(keep, int):
            stale = is_shard_name(name) and int(name[len("shard-"):-len(".tar")]) >= keep
        else:
            stale = is_shard_name(name) and name not in keep
        if stale or storage.is_temporary(name):
            storage.delete(url)
            storage.delete(marker_url(output, name))
            removed.append(name)
    return removed
