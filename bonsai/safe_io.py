"""Writing inside a folder that others can edit (the store, its cache): never through a link.

Whoever can write the store can plant a symbolic link where Bonsai will write next (a temp file
with a guessable name, a record, an evaluator's folder) and have Bonsai overwrite a file outside
the store. So every write here
- goes to a temp file made with `mkstemp` (O_CREAT|O_EXCL|O_NOFOLLOW, a random name) in the
  target's own folder, then renamed into place (a rename replaces a link, never follows it);
- makes sure every folder between the store's root and the target is a real folder: a link (or a
  file) where a folder belongs is removed or moved aside, and the user is told once;
- treats an entry of the wrong type (a folder where a record belongs, a link loop) as damaged:
  moved aside, so the stage is rebuilt instead of failing on every rerun.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger("bonsai")


def _what(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a link"
    return "a folder" if stat.S_ISDIR(st.st_mode) else "a file"


def move_aside(path: Path, belongs: str) -> None:
    """Get a damaged entry out of `path`'s way: a link is removed (not what it points to),
    anything else is renamed to `.damaged-<name>-<ms>` beside it. Says so once."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        os.unlink(path)
        done = "removed the link (Bonsai never writes through one)"
    else:
        aside = path.with_name(f".damaged-{path.name}-{int(time.time() * 1000)}")
        os.replace(path, aside)
        done = f"moved it aside to {aside.name}"
    log.warning(f"{path} was {_what(st)} where the store keeps {belongs}; {done}")


def real_dir(root: Path, path: Path) -> Path:
    """Make `path` (at or below `root`) a real folder, every folder between them too: a link or a
    file in the way is moved aside (`move_aside`). `root` itself is the user's choice."""
    root, path = Path(root), Path(path)
    root.mkdir(parents=True, exist_ok=True)  # a new store: created where the user pointed
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            current.mkdir(exist_ok=True)
            continue
        if not stat.S_ISDIR(st.st_mode):  # lstat: a link to a folder is not a folder
            move_aside(current, "a folder")
            current.mkdir(exist_ok=True)
    return path


def clear_for(path: Path, kind: str, belongs: str) -> None:
    """Before writing `path`: if something of another kind ("file" or "folder"), or a link, is
    there, move it aside."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    ok = stat.S_ISREG(st.st_mode) if kind == "file" else stat.S_ISDIR(st.st_mode)
    if not ok:
        move_aside(path, belongs)


def is_damaged(path: Path, kind: str) -> bool:
    """Whether something is at `path` that is not a real `kind` ("file" or "folder")."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return not (stat.S_ISREG(st.st_mode) if kind == "file" else stat.S_ISDIR(st.st_mode))


def temp_beside(path: Path, suffix: str = "") -> Path:
    """A new, empty temp file in `path`'s folder, created exclusively under a random name that
    keeps the writer's pid (`remove_stale_temp` reads it): `.tmp-<name>-<pid>-<random>`."""
    fd, tmp = tempfile.mkstemp(
        prefix=f".tmp-{Path(path).name}-{os.getpid()}-", suffix=suffix, dir=Path(path).parent
    )
    os.close(fd)
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], belongs: str) -> None:
    """Write `path` whole or not at all: `write(f)` fills a temp file (exclusive, random name, in
    the same folder), which is synced and renamed over `path`. `path`'s folder must be real
    (`real_dir`)."""
    path = Path(path)
    clear_for(path, "file", belongs)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_lock_file(path: Path) -> int:
    """A file descriptor on lock file `path`, created if missing, never through a link: a link or
    a folder planted there is moved aside first."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
            raise
    move_aside(path, "a lock file")
    return os.open(path, flags, 0o644)
