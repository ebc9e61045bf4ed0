"""The paths the model gives, confined to the workspace.

Invariant: a path is accepted only if it resolves, symlinks included, to a
place inside the workspace root. `..` escapes, absolute paths elsewhere and
symlinks pointing out (final or in a parent, dangling or not) are refused with
`PathRefused`, whose message tells the model what to do instead. Nothing here
reads or writes a file; the tools open what these functions return.
(A shell command can still read what the container lets it read: the container
itself is the outer fence, see knative/.)
"""

from __future__ import annotations

import os
from pathlib import Path


class PathRefused(Exception):
    """A path the tools will not touch; the message is for the model."""


class Workspace:
    """The workspace root, resolved once, and the checks every path goes through."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    def display(self, path: Path) -> str:
        """How a path is shown to the model: relative to the root when inside it."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return str(path)
        return str(rel) if str(rel) != "." else "."

    def outside(self, path: str) -> PathRefused:
        return PathRefused(
            f"path {path!r} is outside the workspace {self.root}: "
            f"use a path relative to the workspace root (symlinks may not point outside either)"
        )

    def resolve(self, path: str) -> Path:
        """Resolve `path` (relative to the workspace, or absolute) and refuse anything outside."""
        candidate = self._candidate(path)
        try:
            resolved = candidate.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # symlink loops
            raise PathRefused(f"cannot resolve path {path!r}: {exc}") from None
        if not resolved.is_relative_to(self.root):
            raise self.outside(path)
        return resolved

    def resolve_for_write(self, path: str) -> Path:
        """The file `path` names, to be written: its parent must resolve inside, and a final
        symlink is written through only if it points inside."""
        candidate = self._candidate(path)
        try:
            parent = candidate.parent.resolve(strict=False)
        except (OSError, RuntimeError) as exc:
            raise PathRefused(f"cannot resolve path {path!r}: {exc}") from None
        if not parent.is_relative_to(self.root):
            raise self.outside(path)
        name = candidate.name
        if name in ("", ".", ".."):
            raise PathRefused(f"path {path!r} does not name a file")
        target = parent / name
        if target.is_symlink():
            # Never follow a final symlink out; one pointing inside is written through.
            try:
                target = target.resolve(strict=False)
            except (OSError, RuntimeError) as exc:
                raise PathRefused(f"cannot resolve path {path!r}: {exc}") from None
            if not target.is_relative_to(self.root):
                raise self.outside(path)
        if target == self.root:
            raise PathRefused(f"path {path!r} is a directory")
        return target

    def still_inside(self, directory: Path) -> bool:
        """Check again right before writing: a directory may have been swapped for a symlink."""
        return directory.resolve(strict=False).is_relative_to(self.root)

    def _candidate(self, path: str) -> Path:
        if "\x00" in path:
            raise PathRefused(f"path {path!r} contains a NUL byte")
        return Path(path) if os.path.isabs(path) else self.root / path
