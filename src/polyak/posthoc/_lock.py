"""One run per snapshot folder: the claim a :class:`PostHocEMA` holds on its folder while it writes there.

The claim is an exclusive ``flock`` on the folder itself (an open descriptor of the directory: no lock file
appears among the snapshots). The operating system releases it when the descriptor is closed, so a process
that is killed leaves no stale lock behind. ``flock`` locks belong to an open file description, so two claims
in one process conflict too; within a process, a registry keyed by the folder's device and inode says which
claim holds it, so that a resumed run of the same id can take the folder over from the object it replaces.
Where ``flock`` is missing (Windows) or refused by the file system (some network mounts), only the claims of
this process are seen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import weakref
from pathlib import Path

from polyak._warn import warn

try:
    import fcntl
except ImportError:  # Windows: claims are seen within the process only
    fcntl = None  # type: ignore[assignment]

_Key = tuple[int, int]
_held: dict[_Key, weakref.ref[FolderClaim]] = {}
_registry = threading.Lock()


class FolderInUse(ValueError):
    """The snapshot folder is claimed by another run (another :class:`PostHocEMA`, here or in another process)."""


class FolderClaim:
    """An exclusive claim on one snapshot folder; released by :meth:`release`, garbage collection or exit."""

    def __init__(self, directory: Path, key: _Key, fd: int | None, run_id: str) -> None:
        self.directory = directory
        self.key = key
        self.fd = fd
        self.run_id = run_id
        self.pid = os.getpid()
        self.revoked: str | None = None  # why this claim was handed to a resumed run (its writes are refused)

    def release(self) -> None:
        with _registry:
            ref = _held.get(self.key)
            if ref is not None and ref() is self:
                del _held[self.key]
            fd, self.fd = self.fd, None
        if fd is not None:
            if fcntl is not None and os.getpid() == self.pid:
                # a forked child shares the open file description: only its owner unlocks it
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # a copy of a PostHocEMA (deepcopy, pickle) holds no claim: it claims the folder at its own first write
    def __copy__(self) -> None:
        return None

    def __deepcopy__(self, memo: object) -> None:
        return None

    def __reduce__(self) -> tuple[type[None], tuple[()]]:
        return (type(None), ())

    def __del__(self) -> None:
        try:  # noqa: SIM105 (at interpreter shutdown, contextlib may be gone already)
            self.release()
        except Exception:  # interpreter shutdown: the OS releases the lock anyway
            pass


def _folder_key(fd: int) -> _Key:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def current_key(directory: Path) -> _Key | None:
    """The (device, inode) of ``directory`` now, or None if it is gone."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def claim(
    directory: Path, run_id: str, *, take_over: bool = False, mine: FolderClaim | None = None
) -> tuple[FolderClaim, FolderClaim | None]:
    """Claim ``directory`` for the run ``run_id``; returns the claim and the claim it took over (or None).

    ``mine``, the caller's own current claim, is always taken over. With ``take_over``, so is a claim of
    another object of this process for the same ``run_id`` (a resumed run replaces the object whose timeline
    it abandons); the old claim is marked revoked and keeps its descriptor off (:func:`give_back` undoes it).

    Raises:
        FolderInUse: another object of this process, or another process, holds the folder.
        OSError: the folder cannot be opened.
    """
    if fcntl is None:  # directories cannot be opened on Windows: the registry alone
        fd = -1
        key = current_key(directory)
        if key is None:
            raise FileNotFoundError(errno.ENOENT, "no such folder", str(directory))
    else:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if fd >= 0:
            key = _folder_key(fd)
        with _registry:
            ref = _held.get(key)
            holder = ref() if ref is not None else None
            if holder is not None and holder.revoked is None:
                if holder is not mine and not (take_over and holder.run_id == run_id):
                    raise FolderInUse(
                        f"directory {str(directory)!r} is in use by another PostHocEMA of this process (run "
                        f"{holder.run_id}): one run writes into a folder at a time; close() the other one "
                        "(or delete it), or give this run its own folder"
                    )
                if fd >= 0:
                    os.close(fd)
                fd = -1
                new = FolderClaim(directory, key, holder.fd, run_id)
                holder.fd = None
                holder.revoked = (
                    f"directory {str(directory)!r} was taken over by another PostHocEMA of run {run_id} (a run "
                    "resumed from a checkpoint): this object's timeline is abandoned and it writes no more "
                    "snapshots; load a state (load_state_dict) to continue with it"
                )
                _held[key] = weakref.ref(new)
                return new, holder
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        warn(
                            f"directory {str(directory)!r} cannot be locked ({e}): another process writing "
                            "into it would not be stopped"
                        )
                    else:
                        raise FolderInUse(
                            f"directory {str(directory)!r} is in use by another process (a PostHocEMA run holds "
                            "its lock): one run writes into a folder at a time; wait for it to end, or give "
                            "this run its own folder"
                        ) from None
            new = FolderClaim(directory, key, fd if fd >= 0 else None, run_id)
            fd = -1
            _held[key] = weakref.ref(new)
            return new, None
    finally:
        if fd >= 0:
            os.close(fd)


def give_back(new: FolderClaim, previous: FolderClaim | None) -> None:
    """Undo :func:`claim`: release ``new``, or return the folder to the claim it took over."""
    if previous is None:
        new.release()
        return
    with _registry:
        previous.fd, new.fd = new.fd, None
        previous.revoked = None
        _held[new.key] = weakref.ref(previous)
