"""Atomic file and folder writes: write under a temporary name beside the target, then rename into place.

A rename within one folder is atomic, so a reader sees the old file or the new one, never half of
one, and an interrupted or failed write leaves no partial target behind (the temporary is removed).
Temporary names start with `.<target name>.`, so a process killed mid-write leaves only hidden
files that `stale_temporaries` finds. Standard library only: the torch-free layers use it too.
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9.]", "_", platform.node())[:40] or "host"


def owned_prefix(prefix: str) -> str:
    """`prefix` followed by this host and process: a staging folder named so says whose it is."""
    return f"{prefix}{HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_orphans(folder: Path, prefix_pattern: str) -> None:
    """Remove the staging folders `folder`/<prefix_pattern><host>-<pid>-* of processes on this host that are gone
    (killed with -9, they could not clean up); those of live processes are theirs. `prefix_pattern` is a glob
    pattern: `glob.escape` a literal prefix; ".*." sweeps every case's staging in an output folder at once."""
    for staging in Path(folder).glob(f"{prefix_pattern}{HOST}-*-*"):
        pid = staging.name.rpartition(f"{HOST}-")[2].split("-")[0]
        if staging.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def temporary_prefix(path: Path) -> str:
    """How the names of `path`'s temporaries start: hidden, and named after it."""
    return f".{path.name}."


def _create_file(name: Path) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _fresh(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new, unused name beside `path`, created by `create` (which fails if the name exists).

    Not tempfile's mkstemp/mkdtemp: those create 0600/0700, and fixing that afterwards needs the
    process-wide umask, which other threads could create files under meanwhile; creating with
    0666/0777 lets the kernel apply the umask, as a plain open() or mkdir does.
    """
    for _ in range(100):
        name = path.with_name(f"{temporary_prefix(path)}{secrets.token_hex(6)}{suffix}")
        try:
            create(name)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporaries of `path` left by a process killed while writing it."""
    path = Path(path)
    return sorted(path.parent.glob(f"{temporary_prefix(path)}*"))


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; on a clean exit it is renamed onto `path`.

    Write the file to the yielded path inside the `with` block. On any exception (also Ctrl-C)
    the temporary is deleted and the exception propagates; `path` is untouched. `suffix` ends
    the temporary's name (default: `path`'s last suffix), for writers that pick the format from
    it (".nii.gz" for SimpleITK, ".png" for matplotlib, ".npz" for numpy). The published file
    gets the permissions a plain open() gives (0666 less the umask).
    """
    path = Path(path)
    tmp = _fresh(path, path.suffix if suffix is None else suffix, _create_file)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside `path`; on a clean exit it is renamed to `path`.

    `path` must not exist yet (or be an empty folder). On any exception the temporary folder
    and everything written into it are deleted. The folder gets 0777 less the umask, as mkdir gives.
    """
    path = Path(path)
    staging = _fresh(path, "", partial(os.mkdir, mode=0o777))
    try:
        yield staging
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
