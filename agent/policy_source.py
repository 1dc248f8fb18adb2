"""Policy sources: where the agent's policy documents come from, and the directory watcher.

A source is anything that can say what the policy documents are now and when that may have
changed (`PolicySource`): this issue's directory, later the fleet store (etcd) and the Kubernetes
watcher.  All feed the same engine (`agent.policy_store.PolicyStore`), which only ever asks for
the whole set: events never carry content, they only say "read again", so a lost or merged event
costs nothing but a reread (reconcile whole desired state; events only mark it dirty).

    source.start()                  # on the agent's loop, before the first read
    loaded = source.read()          # blocking (run it in a thread): every document, validated
    await source.changed()          # returns when the documents may have changed
    source.close()

`read` answers `agent.policy.documents.Loaded`: the valid documents and every error (file, field
path, reason); whether a set with errors is applied is the engine's decision, not the source's.

`DirectorySource` reads `policy.directory` (`*.yaml`, `*.yml`, `*.json`, names starting with "."
skipped, symlinks followed, not recursive: `documents.load_files`).  A directory that does not
exist means "no policy" (the default path on a node without policies); a path that is not a
directory is an error.  It is watched with inotify (`agent.linux.Inotify`):

- the directory itself, for every change of an entry (create, delete, modify, close_write,
  moved_from, moved_to, attrib) and for its own deletion or move;
- its nearest existing ancestor (the parent, or further up while it does not exist), for the
  entry on the way to it being created, deleted, renamed or replaced, and for its own deletion.

A mounted Kubernetes ConfigMap is such a directory: its files are symlinks through `..data`,
which the kubelet swaps atomically by renaming a new symlink over it, an IN_MOVED_TO in the
directory.  When the directory (or the symlink naming it) is deleted, moved or replaced, when an
ancestor event concerns the next path component, or when the kernel's queue overflowed, the
watches are placed again on what the path names now.  Events are debounced: `changed` returns
`DEBOUNCE` seconds after the last event of a burst (an editor's write, rename and chmod are one
change), and at most `MAX_DEBOUNCE` after the first, well inside the 1 s budget from file to
proxies.  Every `RESCAN_INTERVAL` seconds `changed` returns anyway (a full rescan, the safety
net: edits through a symlink to a file outside the directory, or a mount over it, make no event
here), and the watches are placed again if the path now names another directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Protocol

from agent.linux import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyEvent,
)
from agent.policy.documents import Loaded, PolicyError, load_files

log = logging.getLogger("ferry.agent")

DEBOUNCE = 0.1
MAX_DEBOUNCE = 0.4
RESCAN_INTERVAL = 10.0
SELF_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
DIRECTORY_EVENTS = (
    IN_CREATE
    | IN_DELETE
    | IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
ANCESTOR_EVENTS = (
    IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)


class PolicySource(Protocol):
    """Where policy documents come from (see the module doc)."""

    def describe(self) -> str:
        """How status and logs name it: `directory /etc/ferry/policies`."""
        ...

    def start(self) -> None:
        """Begin watching (on the running loop), before the first `read`."""
        ...

    def read(self) -> Loaded:
        """Every document now, validated (blocking: call it from a thread)."""
        ...

    async def changed(self) -> None:
        """Return when the documents may have changed (at the latest after a rescan interval)."""
        ...

    def close(self) -> None: ...


def _identity(path: Path) -> tuple[int, int] | None:
    """The (device, inode) `path` names now (symlinks followed), None when there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DirectorySource:
    """`policy.directory`, watched with inotify (see the module doc)."""

    def __init__(
        self,
        directory: Path,
        *,
        debounce: float = DEBOUNCE,
        max_debounce: float = MAX_DEBOUNCE,
        rescan: float = RESCAN_INTERVAL,
    ) -> None:
        self.directory = Path(os.path.abspath(directory))
        self.debounce = debounce
        self.max_debounce = max_debounce
        self.rescan = rescan
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._directory_wd: int | None = None
        self._ancestor_wd: int | None = None
        self._next_name = ""  # the entry of the watched ancestor on the way to the directory
        self._armed_on: tuple[int, int] | None = None  # the directory watched (dev, inode)
        self._dirty = asyncio.Event()
        self._first_event: float | None = None
        self._last_event = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def describe(self) -> str:
        return f"directory {self.directory}"

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inotify = Inotify()
        self._loop.add_reader(self._inotify.fileno(), self._on_readable)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def read(self) -> Loaded:
        if not self.directory.exists():
            return Loaded((), ())  # no directory (or a dangling symlink to one): no policy
        if not self.directory.is_dir():
            reason = "policy.directory is not a directory"
            return Loaded((), (PolicyError(str(self.directory), "", "", reason),))
        return load_files([self.directory])

    async def changed(self) -> None:
        # a timer rather than `asyncio.wait_for`, which in Python 3.11 may swallow a cancellation
        # that coincides with the event (the caller's task would then never stop)
        assert self._loop is not None, "start() the source first"
        rescan = self._loop.call_later(self.rescan, self._rescan)
        try:
            await self._dirty.wait()
        finally:
            rescan.cancel()
        self._dirty.clear()

    def _rescan(self) -> None:
        """The rescan interval passed: report a change, and watch the directory afresh if the
        path names another one now (a mount or a swap that made no event here)."""
        if _identity(self.directory) != self._armed_on:
            self._arm()
        self._dirty.set()

    # ---------------------------------------------------------------- watches
    def _arm(self) -> None:
        """Watch the directory (if it exists) and its nearest existing ancestor, afresh."""
        inotify = self._inotify
        if inotify is None:
            return
        for wd in (self._directory_wd, self._ancestor_wd):
            if wd is not None:
                inotify.rm_watch(wd)
        self._directory_wd = self._ancestor_wd = None
        self._armed_on = _identity(self.directory)
        try:
            self._directory_wd = inotify.add_watch(self.directory, DIRECTORY_EVENTS)
        except OSError as exc:  # missing (no policy) or not a directory: wait for it
            log.debug("policy: not watching %s itself: %s", self.directory, exc.strerror)
            self._armed_on = None
        below, ancestor = self.directory, self.directory.parent
        while True:
            try:
                self._ancestor_wd = inotify.add_watch(ancestor, ANCESTOR_EVENTS)
            except OSError:
                if ancestor == ancestor.parent:
                    log.warning("policy: cannot watch any ancestor of %s", self.directory)
                    return
                below, ancestor = ancestor, ancestor.parent
                continue
            self._next_name = below.name
            return

    def _on_readable(self) -> None:
        if self._inotify is None:
            return
        try:
            events = self._inotify.read()
        except OSError as exc:
            log.warning("policy: reading inotify events failed: %s", exc)
            events = []
        rearm, relevant = self._sort(events)
        if rearm:
            self._arm()
        if relevant:
            self._poke()

    def _sort(self, events: list[InotifyEvent]) -> tuple[bool, bool]:
        """(watches must be placed again, the documents may have changed)."""
        rearm = relevant = False
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                rearm = relevant = True
            elif event.wd == self._directory_wd:
                relevant = True
                rearm = rearm or bool(event.mask & SELF_GONE)
            elif event.wd == self._ancestor_wd and (
                event.mask & SELF_GONE or event.name == self._next_name
            ):
                rearm = relevant = True
        return rearm, relevant

    def _poke(self) -> None:
        """Debounce: mark dirty once events have been quiet for `debounce` seconds (or
        `max_debounce` after the first of a burst)."""
        assert self._loop is not None
        now = self._loop.time()
        self._last_event = now
        if self._first_event is None:
            self._first_event = now
        if self._timer is None:
            self._timer = self._loop.call_later(self.debounce, self._settle)

    def _settle(self) -> None:
        assert self._loop is not None and self._first_event is not None
        now = self._loop.time()
        quiet = now - self._last_event
        if quiet >= self.debounce or now - self._first_event >= self.max_debounce:
            self._timer = None
            self._first_event = None
            self._dirty.set()
        else:
            wait = min(self.debounce - quiet, self._first_event + self.max_debounce - now)
            self._timer = self._loop.call_later(wait, self._settle)
