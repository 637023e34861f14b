"""Node-side results lister: expand result globs under a base directory into files safe to copy.

Runs on the node as ``python3 - ANCHOR BASE LIMIT [PATTERN...]`` with its own source fed on
stdin, so nothing has to be deployed first. Standard library only, Python 3.8+.

Rules, so one odd entry never costs the others and never hangs or leaks the fetch:
- BASE must resolve inside ANCHOR (the node's work dir); a base linked elsewhere is skipped;
- nothing is followed out of BASE: an entry whose real path lies outside it is skipped, and
  links to directories are never descended into (``os.walk(followlinks=False)``); one whose
  target lies in the same walked tree is passed over quietly (its files come anyway);
- only regular files are listed; FIFOs, sockets and devices are skipped without being opened
  (opening a FIFO blocks until a writer comes, which may be never);
- a file this user cannot open for reading is skipped (the open is non-blocking);
- at most LIMIT files are listed, and the document says when it stopped early.

Prints one JSON document between the two marker strings::

    {"base": ..., "files": [{"path": REL, "source": REAL, "size": N}],
     "skipped": [{"path": REL, "reason": ...}], "skipped_more": N,
     "missing_patterns": [...], "truncated": bool}

``missing_patterns`` are the patterns that matched nothing at all.
"""

from __future__ import annotations

import glob
import json
import os
import stat
import sys
from typing import Any

BEGIN = "@@INFRA-JSON-BEGIN@@"
END = "@@INFRA-JSON-END@@"

MAX_SKIPPED = 200  # entries named in the document; the rest are only counted

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"))


def inside(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


class Listing:
    """The files found under one base, and what was left out and why."""

    def __init__(self, base: str, limit: int) -> None:
        self.base = os.path.abspath(base)
        self.real_base = os.path.realpath(self.base)
        self.limit = limit
        self.files: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.skipped_more = 0
        self.seen: set[str] = set()
        self.truncated = False

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.base)

    def skip(self, path: str, reason: str) -> None:
        """Record one entry left out; past MAX_SKIPPED only count them."""
        rel = self.rel(path)
        if rel in self.seen:
            return
        self.seen.add(rel)
        if len(self.skipped) < MAX_SKIPPED:
            self.skipped.append({"path": rel, "reason": reason})
        else:
            self.skipped_more += 1

    def escapes(self, path: str) -> str | None:
        """Why ``path`` leads out of the base (through a link or '..'), or None."""
        real = os.path.realpath(path)
        if inside(real, self.real_base) and not self.rel(path).startswith(".."):
            return None
        how = "links to" if os.path.islink(path) else "resolves to"
        return f"{how} {real}, outside {self.base}"

    def add_file(self, path: str) -> bool:
        """List one non-directory entry if it is safe to copy; False once the limit is hit."""
        rel = self.rel(path)
        if rel in self.seen:
            return True
        why = self.escapes(path)
        if why is not None:
            self.skip(path, why)
            return True
        real = os.path.realpath(path)
        try:
            st = os.lstat(real)  # realpath resolved every link: this is the thing itself
        except OSError as exc:
            broken = os.path.islink(path)
            self.skip(path, "broken symbolic link" if broken else
                      f"cannot stat: {exc.strerror}")
            return True
        if not stat.S_ISREG(st.st_mode):
            self.skip(path, f"{kind_of(st.st_mode)}, not a regular file (never opened)")
            return True
        why = self.unreadable(real)
        if why is not None:
            self.skip(path, why)
            return True
        if len(self.files) >= self.limit:
            self.truncated = True
            return False
        self.seen.add(rel)
        self.files.append({"path": rel, "source": real, "size": st.st_size})
        return True

    @staticmethod
    def unreadable(real: str) -> str | None:
        """Why this user cannot read the file, or None; the open never blocks or follows."""
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | \
            getattr(os, "O_NOCTTY", 0)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            return f"unreadable: {exc.strerror}"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # changed under us since the lstat
                return "not a regular file (never read)"
        finally:
            os.close(fd)
        return None

    def add_dir(self, top: str) -> bool:
        """List a directory's files, never descending through links; False at the limit."""
        why = self.escapes(top)
        if why is not None:
            self.skip(top, f"directory {why}")
            return True

        def unreadable_dir(exc: OSError) -> None:
            self.skip(exc.filename or top, f"cannot read directory: {exc.strerror}")

        real_top = os.path.realpath(top)
        for root, dirs, names in os.walk(top, followlinks=False, onerror=unreadable_dir):
            dirs.sort()
            for d in list(dirs):
                path = os.path.join(root, d)
                if not os.path.islink(path):
                    continue
                dirs.remove(d)
                why = self.escapes(path)
                if why is not None:
                    self.skip(path, why)
                elif not inside(os.path.realpath(path), real_top):
                    # a link within the walked tree needs no report: its target comes anyway
                    self.skip(path, "link to a directory outside this pattern's tree "
                              "(not followed; name its target instead)")
            for name in sorted(names):
                if not self.add_file(os.path.join(root, name)):
                    return False
        return True

    def add_pattern(self, pattern: str) -> bool:
        """Expand one glob under the base; True when it matched anything at all."""
        hits = sorted(glob.glob(os.path.join(self.base, pattern)))
        for hit in hits:
            if self.truncated:
                break
            if os.path.isdir(hit):
                self.add_dir(hit)
            else:
                self.add_file(hit)
        return bool(hits)

    def document(self, missing: list[str]) -> dict[str, Any]:
        return {"base": self.base, "files": self.files, "skipped": self.skipped,
                "skipped_more": self.skipped_more, "missing_patterns": missing,
                "truncated": self.truncated}


def list_results(anchor: str, base: str, limit: int, patterns: list[str]) -> dict[str, Any]:
    """The listing document for ``patterns`` under ``base``, which must lie in ``anchor``."""
    listing = Listing(os.path.expanduser(base), limit)
    real_anchor = os.path.realpath(os.path.expanduser(anchor))
    if not inside(listing.real_base, real_anchor):
        listing.skipped.append({"path": ".", "reason": f"{listing.base} resolves to "
                                f"{listing.real_base}, outside the work dir {anchor}"})
        return listing.document([])
    missing = [p for p in patterns if not listing.add_pattern(p)]
    return listing.document(missing)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[2].isdigit():
        sys.stderr.write("usage: results_list.py ANCHOR BASE LIMIT [PATTERN...]\n")
        return 2
    doc = list_results(argv[0], argv[1], int(argv[2]), argv[3:])
    sys.stdout.write(BEGIN + json.dumps(doc) + END + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
