"""Each tool call's full output, kept in the workspace at `.dockyard/outputs/<call-id>.log`.

The model sees the head and tail of a long output (agent.execute caps it in memory);
a person wants all of it, the end above all, where build and test errors are.

Invariants
- An output is written while it is read, one chunk at a time: never a second copy in memory.
- All files of a task together hold at most `max_bytes` bytes of output
  (DOCKYARD_OUTPUTS_MAX_BYTES): before a chunk would pass the bound, the oldest
  other files are dropped; an output larger than the whole bound keeps its first
  `max_bytes` bytes, then one line saying it was cut (`OutputFile.cut`).
- The folder is in the workspace (the PVC): a restarted agent finds the files and
  counts them against the bound; a call run again after a crash replaces its file.
- `.dockyard/` is left out of the change set (agent.changes).
- Keeping an output never fails a tool call: a write error drops the file and the
  call goes on (`OutputFile.kept` is then False).
"""

from __future__ import annotations

import os
from pathlib import Path

from agent import contract


class OutputStore:
    """The outputs folder of one workspace and its byte bound; oldest files first."""

    def __init__(self, workspace: Path, max_bytes: int = contract.OUTPUTS_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"outputs max bytes must be 0 or more, got {max_bytes}")
        self.workspace = Path(workspace)
        self.dir = self.workspace / contract.OUTPUTS_DIR
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] = {}  # file name -> size, oldest first (dicts keep insertion order)
        self._scan()

    def _scan(self) -> None:
        """What an earlier run of the agent left, oldest first, so the bound covers it too."""
        try:
            entries = [e for e in os.scandir(self.dir) if e.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return
        entries.sort(key=lambda e: (e.stat(follow_symlinks=False).st_mtime_ns, e.name))
        self._sizes = {e.name: e.stat(follow_symlinks=False).st_size for e in entries}

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    def files(self) -> list[str]:
        """The kept files' names, oldest first."""
        return list(self._sizes)

    def open(self, call_id: str) -> OutputFile:
        """A new file for `call_id`'s output, replacing one an earlier try of the same call left."""
        relative = contract.output_file(call_id)
        name = relative.rsplit("/", 1)[-1]
        self._drop(name)
        return OutputFile(self, relative, name)

    def save(self, call_id: str, text: str) -> OutputFile:
        """Keep an output that is in memory already (the file tools' answers)."""
        out = self.open(call_id)
        out.write(text.encode("utf-8", errors="replace"))
        out.close()
        return out

    def _room(self, name: str, wanted: int) -> int:
        """Make room for `wanted` more bytes of file `name` by dropping the oldest others; the room there is."""
        others = [n for n in self._sizes if n != name]
        while others and self.total + wanted > self.max_bytes:
            self._drop(others.pop(0))
        return max(self.max_bytes - self.total, 0)

    def _drop(self, name: str) -> None:
        self._sizes.pop(name, None)
        try:
            (self.dir / name).unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # counted out all the same: a file that cannot be removed is not ours to bound


class OutputFile:
    """One output being written: `write(chunk)` as it is read, then `close()`."""

    def __init__(self, store: OutputStore, relative: str, name: str):
        self.store = store
        self.relative = relative  # ".dockyard/outputs/<name>", as the tool event names it
        self.name = name
        self.written = 0  # bytes of output in the file
        self.total = 0  # bytes of output seen
        self.cut = False
        self.kept = True
        self._fh = None
        try:
            store.dir.mkdir(parents=True, exist_ok=True)
            # Unbuffered: what was read is on disk at once (a killed agent loses none; a reader sees it).
            self._fh = open(store.dir / name, "wb", buffering=0)  # noqa: SIM115 - held open while the command runs
            store._sizes[name] = 0
        except OSError:
            self.kept = False

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self._fh is None or self.cut:
            return
        room = self.store._room(self.name, len(chunk))
        if len(chunk) > room:
            chunk, self.cut = chunk[:room], True
        try:
            view = memoryview(chunk)
            while view:  # an unbuffered write may take part of it
                view = view[self._fh.write(view) :]
        except OSError:
            self._abandon()
            return
        self.written += len(chunk)
        self.store._sizes[self.name] = self.written

    def close(self) -> None:
        if self._fh is None:
            return
        try:
            if self.cut:  # said in the file itself: a download of it must not look whole
                self._fh.write(
                    f"\n[dockyard: output cut here: {self.written} of {self.total} bytes kept; "
                    f"a task keeps at most {self.store.max_bytes} bytes of outputs (DOCKYARD_OUTPUTS_MAX_BYTES)]\n".encode()
                )
            self._fh.close()
        except OSError:
            self._abandon()
            return
        self._fh = None
        try:
            self.store._sizes[self.name] = (self.store.dir / self.name).stat().st_size
        except OSError:
            pass

    def _abandon(self) -> None:
        """A write failed (a full disk): no file rather than a wrong one."""
        try:
            self._fh.close()
        except OSError:
            pass
        self._fh = None
        self.kept = False
        self.store._drop(self.name)
