"""Deterministic tar writing and safe tar reading for shards.

Every member gets the same header fields (mtime 0, uid/gid 0, no user or group names, mode
0644, ustar format), so the same members in the same order give byte-identical tars whoever
writes them: the shard stage, ``redact`` rewriting a shard without some samples, or a test.
Member names are checked: a name with a folder, a leading dot or ``..`` is refused on writing
and reported on reading, so no member can leave the shard's folder.

Reading streams (``mode="r|"``): members come in tar order with their bytes; samples are the
runs of consecutive members sharing a key (WebDataset's convention: the key is the name up to
its first dot).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a multiple of this


def split_name(member: str) -> tuple[str, str]:
    """(key, suffix) of a member name: ``"ab12.face.jpg"`` -> ``("ab12", "face.jpg")``."""
    key, _, suffix = member.partition(".")
    return key, suffix


def is_safe_name(member: str) -> bool:
    return not ("/" in member or "\\" in member or member.startswith(".") or ".." in member)


def member_header(member: str, size: int) -> tarfile.TarInfo:
    """The fixed header of a shard member (see the module docstring)."""
    if not is_safe_name(member):
        raise ValueError(f"tar member name {member!r} could leave the shard's folder")
    info = tarfile.TarInfo(member)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def member_tar_bytes(size: int) -> int:
    """Bytes one member of ``size`` content bytes takes in a tar: its header block plus its
    content padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def tar_size(members_bytes: int) -> int:
    """Size of a tar whose members take ``members_bytes`` (see member_tar_bytes): the two
    end-of-archive blocks added and the whole padded to a record."""
    return -(-(members_bytes + 2 * BLOCK) // RECORD) * RECORD


@dataclass
class Written:
    name: str
    bytes: int
    sha256: str


class TarWriter:
    """Writes members with fixed headers, in the order given::

        with TarWriter(path) as tar:
            tar.write("KEY.jpg", data)
    """

    def __init__(self, target: str | Path | BinaryIO):
        if isinstance(target, (str, Path)):
            self.tar = tarfile.open(target, "w", format=tarfile.USTAR_FORMAT)
        else:
            self.tar = tarfile.open(fileobj=target, mode="w", format=tarfile.USTAR_FORMAT)
        self.written: list[Written] = []

    def write(self, member: str, data: bytes) -> Written:
        self.tar.addfile(member_header(member, len(data)), io.BytesIO(data))
        row = Written(member, len(data), hashlib.sha256(data).hexdigest())
        self.written.append(row)
        return row

    def write_sample(self, key: str, members: dict[str, bytes]) -> list[Written]:
        """``members`` maps suffix -> bytes, written as ``KEY.suffix`` in the dict's order."""
        return [self.write(f"{key}.{suffix}", data) for suffix, data in members.items()]

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_tar(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> list[Written]:
    """A tar of ``(key, {suffix: bytes})`` samples in order; returns every member written."""
    with TarWriter(path) as tar:
        for key, members in samples:
            tar.write_sample(key, members)
    return tar.written


@dataclass
class Member:
    name: str
    data: bytes | None  # None for anything that is not a plain file
    safe: bool  # a plain file whose name stays in the folder

    @property
    def key(self) -> str:
        return split_name(self.name)[0]

    @property
    def suffix(self) -> str:
        return split_name(self.name)[1]


def read_members(source: str | Path | BinaryIO) -> Iterator[Member]:
    """Every member in tar order, read in one forward pass (a pipe or a hashing reader works).
    Raises tarfile.TarError, OSError or EOFError where the tar stops being readable."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            yield from read_members(f)
        return
    with tarfile.open(fileobj=source, mode="r|") as tar:
        for info in tar:
            if info.isfile():
                data = tar.extractfile(info).read()
                yield Member(info.name, data, is_safe_name(info.name))
            else:
                yield Member(info.name, None, False)


def read_samples(members: Iterable[Member]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each run of consecutive plain-file members sharing a key."""
    key, sample = None, {}
    for member in members:
        if member.data is None:
            continue
        if sample and member.key != key:
            yield key, sample
            sample = {}
        key = member.key
        sample[member.suffix] = member.data
    if sample:
        yield key, sample
