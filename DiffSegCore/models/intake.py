"""What a model bundle from outside may hold: the one place that bounds and checks it before use.

A bundle (a folder, or a .zip from a download or from a user) is listed here before anything of it
is read, copied or unpacked. The listing refuses what could hurt the machine: symbolic links (a
link to `.` makes a copy endless, one to an outside folder would copy it in), special files,
member names that would leave the bundle (`..`, absolute, drive letters), duplicate names, too
many members, members or totals beyond the size limits, and zip members compressed so well that
they are bombs. macOS debris (`__MACOSX/`, `.DS_Store`) is ignored. Reads and copies are then
bounded by the listed sizes, so a file that grows, or a zip header that lies, cannot take more.
Standard library only: the Slicer GUI process reads model.json through it.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from DiffSegCore.errors import ModelError

MAX_MEMBERS = 64  # a bundle is model.json, two weight files and a few notes
MAX_MEMBER_BYTES = 4 << 30
MAX_TOTAL_BYTES = 8 << 30
MAX_META_BYTES = 1 << 20  # model.json is read into memory whole
MAX_RATIO = 100  # uncompressed / compressed; weights barely compress, bombs compress thousands of times
RATIO_FLOOR = 1 << 20  # smaller members may compress as well as they like
IGNORED_FOLDERS = ("__MACOSX",)
IGNORED_FILES = (".DS_Store",)
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Member:
    """A file of a bundle: its '/'-separated name below the bundle root, its size, and how to open it."""

    name: str
    size: int
    open: Callable[[], IO[bytes]]


def _ignored(parts: tuple[str, ...]) -> bool:
    return parts[0] in IGNORED_FOLDERS or parts[-1] in IGNORED_FILES


def _check_name(name: str, shown_as: str) -> tuple[str, ...]:
    """The parts of a member name; refused (not skipped) if it could point outside the bundle."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and (":" in parts[0] or ".." in parts)) or not parts:
        raise ModelError(
            f"{shown_as} holds a file named '{name[:80]}' that points outside the bundle; "
            "it is refused, rebuild the bundle with plain relative names"
        )
    return parts


def _check_totals(members: list[Member], shown_as: str) -> None:
    if len(members) > MAX_MEMBERS:
        raise ModelError(f"{shown_as} holds more than {MAX_MEMBERS} files; a bundle is model.json and its weights")
    total = 0
    for member in members:
        if member.size > MAX_MEMBER_BYTES:
            raise ModelError(
                f"{member.name} in {shown_as} is {member.size / 2**30:.1f} GiB, more than the "
                f"{MAX_MEMBER_BYTES / 2**30:g} GiB a bundle file may have; it is refused"
            )
        total += member.size
    if total > MAX_TOTAL_BYTES:
        raise ModelError(
            f"{shown_as} unpacks to {total / 2**30:.1f} GiB, more than the {MAX_TOTAL_BYTES / 2**30:g} GiB "
            "a bundle may have; it is refused"
        )


def zip_members(archive: zipfile.ZipFile, shown_as: str) -> list[Member]:
    """The files of a zip, checked (names, links, counts, sizes, compression ratios) before any is read."""
    members, seen = [], set()
    for info in archive.infolist():
        if len(seen) > MAX_MEMBERS:
            break  # _check_totals reports it; do not walk a million-entry directory first
        parts = _check_name(info.filename, shown_as)
        if info.is_dir() or _ignored(parts):
            continue
        name = "/".join(parts)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ModelError(f"{name} in {shown_as} is a symbolic link; a bundle may hold plain files only")
        if name in seen:
            raise ModelError(f"{shown_as} holds {name} twice; rebuild the bundle")
        seen.add(name)
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ModelError(
                f"{name} in {shown_as} would unpack from {info.compress_size} bytes to {info.file_size} "
                f"(more than {MAX_RATIO} times); a model's weights never compress that well, it is refused"
            )
        members.append(Member(name, info.file_size, partial(archive.open, info)))
    _check_totals(members, shown_as)
    return members


def folder_members(root: Path, shown_as: str, file_links: bool = False) -> list[Member]:
    """The files below `root`, checked (no links or special files, counts, sizes).

    Links to folders are never followed (a link to `.` never ends). Links to files are refused too,
    unless `file_links`: a bundle used where it lies may keep its weights elsewhere (git-annex, DVC),
    one copied into the cache may not take in files from outside it.
    """
    members: list[Member] = []
    pending, entries = [root], 0
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as listing:
            for entry in sorted(listing, key=lambda e: e.name):
                entries += 1
                if entries > MAX_MEMBERS:  # folders count too, so a deep or wide tree stops early
                    raise ModelError(
                        f"{shown_as} holds more than {MAX_MEMBERS} files and folders; a bundle is model.json and its weights"
                    )
                path = Path(entry.path)
                name = path.relative_to(root).as_posix()
                if _ignored(PurePosixPath(name).parts):
                    continue
                if entry.is_symlink() and file_links and entry.is_file():
                    members.append(Member(name, entry.stat().st_size, partial(path.open, "rb")))
                    continue
                if entry.is_symlink():
                    raise ModelError(
                        f"{name} in {shown_as} is a symbolic link; a bundle may hold plain files only, "
                        "replace the link by a copy of its file"
                    )
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    members.append(Member(name, entry.stat(follow_symlinks=False).st_size, partial(path.open, "rb")))
                else:
                    raise ModelError(f"{name} in {shown_as} is not a plain file; a bundle may hold plain files only")
    members.sort(key=lambda m: m.name)
    _check_totals(members, shown_as)
    return members


def bundle_root(members: list[Member], marker: str) -> list[Member]:
    """Members named from the bundle root: a zip or folder holding one top-level folder with `marker` in it
    (a zipped bundle folder) is read as that folder."""
    if any(m.name == marker for m in members):
        return members
    roots = {m.name.split("/")[0] for m in members}
    if len(roots) == 1 and "/" in members[0].name:
        prefix = f"{roots.pop()}/"
        return [Member(m.name[len(prefix) :], m.size, m.open) for m in members]
    return members


def read_member(member: Member, shown_as: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
    """A member's bytes, at most `limit` and never more than its listed size."""
    if member.size > limit:
        raise ModelError(
            f"{member.name} in {shown_as} is {member.size} bytes, more than the {limit} it may have; it is refused"
        )
    with _corrupt_as_model_error(member, shown_as), member.open() as stream:
        data = stream.read(member.size + 1)
    if len(data) != member.size:
        raise ModelError(f"{member.name} in {shown_as} changed size while it was read; try again")
    return data


def copy_members(members: list[Member], dest: Path, shown_as: str) -> None:
    """Copy checked members below the new folder `dest`, each bounded by its listed size."""
    dest.mkdir()
    for member in members:
        target = dest.joinpath(*member.name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with _corrupt_as_model_error(member, shown_as), member.open() as source, open(target, "xb") as out:
            shutil.copyfileobj(_Bounded(source, member.size), out, CHUNK_BYTES)
            if out.tell() != member.size or source.read(1):
                raise ModelError(f"{member.name} in {shown_as} changed size while it was copied; try again")


@contextmanager
def _corrupt_as_model_error(member: Member, shown_as: str) -> Iterator[None]:
    """A zip member whose data does not match its header (CRC, size, deflate stream) is a one-line error."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ModelError(f"{member.name} in {shown_as} is corrupt or truncated ({exc}); get a fresh copy of the bundle") from None


class _Bounded:
    """A reader that yields at most `left` bytes of `stream` (copyfileobj has no limit of its own)."""

    def __init__(self, stream: IO[bytes], left: int):
        self.stream, self.left = stream, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.stream.read(n) if n else b""
        self.left -= len(data)
        return data
