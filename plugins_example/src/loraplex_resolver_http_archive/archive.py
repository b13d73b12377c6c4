"""Safe extraction of an adapter archive (.tar.gz / .tgz / .tar).

Only regular files and directories are extracted; a member that is a link, a device or a FIFO,
or whose name is absolute, has `..` components or would land outside the target, refuses the
whole archive. The sum of the members' sizes and their number are bounded, so a small archive
cannot fill the disk.
"""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path

__all__ = ["UnsafeArchiveError", "extract_adapter_archive"]

MAX_MEMBERS = 1000


class UnsafeArchiveError(ValueError):
    """The archive holds something that must not be extracted."""


def extract_adapter_archive(archive: Path, target: Path, max_bytes: int | None = None) -> None:
    """Extract `archive` into the existing, empty directory `target`; UnsafeArchiveError if it is unsafe."""
    target = target.resolve()
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            _check(members, target, max_bytes)
            for member in members:
                if member.isdir():
                    (target / member.name).mkdir(parents=True, exist_ok=True)
                    continue
                dest = target / member.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise UnsafeArchiveError(f"member {member.name!r} cannot be read")
                with source, open(dest, "wb") as out:
                    _copy(source, out, member.size, member.name)
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"{archive.name} is not a readable tar archive ({exc})") from exc


def _check(members: list[tarfile.TarInfo], target: Path, max_bytes: int | None) -> None:
    if len(members) > MAX_MEMBERS:
        raise UnsafeArchiveError(f"it has {len(members)} members (at most {MAX_MEMBERS})")
    total = 0
    for member in members:
        name = member.name
        if not (member.isfile() or member.isdir()):
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise UnsafeArchiveError(f"member {name!r} is a {kind}; only files and directories are allowed")
        if name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/", 1)[0]:
            raise UnsafeArchiveError(f"member {name!r} has an absolute or non-POSIX path")
        parts = posixpath.normpath(name).split("/")
        if ".." in name.split("/") or ".." in parts:
            raise UnsafeArchiveError(f"member {name!r} has a '..' component")
        if not (target / name).resolve().is_relative_to(target):
            raise UnsafeArchiveError(f"member {name!r} would be extracted outside the target")
        total += max(member.size, 0)
        if max_bytes is not None and total > max_bytes:
            raise UnsafeArchiveError(f"its members add up to more than {max_bytes} bytes")


def _copy(source, out, size: int, name: str) -> None:
    left = size
    while left > 0:
        chunk = source.read(min(left, 1 << 20))
        if not chunk:
            raise UnsafeArchiveError(f"member {name!r} is truncated")
        out.write(chunk)
        left -= len(chunk)
