"""Node-side batched harvest: many ended instances' logs and results in one supervisor call.

Standard library only, Python 3.8+. Installed next to ``supervisor.py`` (same versioned
directory) and run through ``supervisor.py harvest --root ROOT`` with one JSON document on
stdin::

    {"run_id": "r-...", "anchor": "~/work",          # the node's work dir (the lister's)
     "log_max": N, "log_total": N,                   # log bytes per item / in all
     "inline_max": N, "inline_total": N,             # inline file bytes per file / in all
     "list_limit": N, "doc_budget": N,               # files per listing / answer size
     "items": [{"instance": ID, "offset": N, "results": bool,
                "cwd": "~/work" | null, "patterns": ["out/*.json"]}]}

The answer has one entry per item, in order::

    {"instance": ID, "error": "no instance ..." | absent, "deferred": bool,
     "state": <describe() document>,
     "log": {"data_b64", "offset", "size", "eof", "ended"},
     "results_dir": <lister document> | null, "declared": <lister document> | null}

Listings are exactly the lister's documents (``results_list.py``, the same safety rules);
a listed file small enough is sent inline as ``inline_b64`` in its entry, read through a
non-blocking, non-following open that must find the same regular file (device, inode, size)
the listing saw, so a file swapped or grown meanwhile is left to the ordinary copy. Items
past ``doc_budget`` are answered ``deferred`` (asked again in a later batch).
"""

from __future__ import annotations

import base64
import json
import os
import stat
from typing import Any

if __package__:
    from . import results_list as rl
    from . import supervisor as sup
else:  # installed side by side on the node: supervisor.py registered itself as "supervisor"
    import results_list as rl  # type: ignore[no-redef]
    import supervisor as sup  # type: ignore[no-redef]

DEFAULTS = {"log_max": 1 << 20, "log_total": 4 << 20, "inline_max": 64 << 10,
            "inline_total": 4 << 20, "list_limit": 10_000, "doc_budget": 8 << 20}
MAX_ITEMS = 1000


class StatListing(rl.Listing):
    """The lister's listing, remembering each listed file's device and inode."""

    def __init__(self, base: str, limit: int) -> None:
        super().__init__(base, limit)
        self.ids: dict[str, tuple[int, int]] = {}

    def add_file(self, path: str) -> bool:
        before = len(self.files)
        more = super().add_file(path)
        if len(self.files) > before:
            entry = self.files[-1]
            self.ids[entry["source"]] = file_id(entry["source"], int(entry["size"]))
        return more


def file_id(source: str, size: int) -> tuple[int, int]:
    """(device, inode) of the regular file at ``source`` with no link on its path, as the
    listing saw it; (-1, -1) (never inlined) when that cannot be made sure of."""
    try:
        first = os.lstat(source)
        if os.path.realpath(source) != source:
            return (-1, -1)  # a directory on its path became a link since the listing
        again = os.lstat(source)
    except OSError:
        return (-1, -1)
    if not stat.S_ISREG(first.st_mode) or first.st_size != size or \
            (first.st_dev, first.st_ino) != (again.st_dev, again.st_ino):
        return (-1, -1)
    return (first.st_dev, first.st_ino)


def list_under(anchor: str, base: str, limit: int,
               patterns: list[str]) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """``results_list.list_results`` with the listed files' identities kept aside."""
    listing = StatListing(os.path.expanduser(base), limit)
    real_anchor = os.path.realpath(os.path.expanduser(anchor))
    if not rl.inside(listing.real_base, real_anchor):
        listing.skipped.append({"path": ".", "reason": f"{listing.base} resolves to "
                                f"{listing.real_base}, outside the work dir {anchor}"})
        return listing.document([]), {}
    missing = [p for p in patterns if not listing.add_pattern(p)]
    return listing.document(missing), listing.ids


def read_inline(source: str, size: int, ident: tuple[int, int]) -> bytes | None:
    """The file's bytes when it is still the regular file listed (same id, same size)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | \
        getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(source, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != ident \
                or st.st_size != size:
            return None
        chunks = []
        left = size + 1  # one byte more: a file that grew since the listing is not sent
        while left > 0:
            data = os.read(fd, min(left, 1 << 16))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        data = b"".join(chunks)
        return data if len(data) == size else None
    except OSError:
        return None
    finally:
        os.close(fd)


class Budget:
    """What is left of the answer's byte budgets."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.limits = {k: req_int(req, k) for k in DEFAULTS}
        self.log_left = self.limits["log_total"]
        self.inline_left = self.limits["inline_total"]
        self.doc_used = 0


def req_int(req: dict[str, Any], key: str) -> int:
    """A non-negative integer field of the request (its default when absent)."""
    value = req.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise sup.Bad(f"harvest: {key} must be a non-negative integer")
    return value


def inline_files(doc: dict[str, Any], ids: dict[str, tuple[int, int]], budget: Budget) -> None:
    """Attach the content of the listing's small files (within the budgets) to their entries."""
    for entry in doc["files"]:
        size = int(entry["size"])
        if size > budget.limits["inline_max"] or size > budget.inline_left:
            continue
        data = read_inline(entry["source"], size, ids.get(entry["source"], (-1, -1)))
        if data is None:
            continue
        entry["inline_b64"] = base64.b64encode(data).decode("ascii")
        budget.inline_left -= size


def check_item(item: Any, index: int) -> dict[str, Any]:
    """Refuse a malformed item with one line naming it."""
    where = f"harvest: items[{index}]"
    if not isinstance(item, dict):
        raise sup.Bad(f"{where} must be a JSON object")
    sup.check_id(item.get("instance"), f"{where}.instance")
    offset = item.get("offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise sup.Bad(f"{where}.offset must be a non-negative integer")
    patterns = item.get("patterns") or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise sup.Bad(f"{where}.patterns must be a list of strings")
    cwd = item.get("cwd")
    if patterns and not isinstance(cwd, str):
        raise sup.Bad(f"{where}.cwd must be a string when patterns are given")
    return item


def harvest_item(root: str, run_id: str, anchor: str, item: dict[str, Any],
                 budget: Budget) -> dict[str, Any]:
    """One instance's state, log chunk and (when asked) results listings with inline files."""
    instance = item["instance"]
    idir = sup.instance_dir(root, run_id, instance)
    if not os.path.isdir(idir):
        return {"instance": instance, "error": f"no instance {run_id}/{instance} on this node"}
    state = sup.describe(idir)
    ended = state.get("state") in sup.FINAL_STATES  # before reading: see "eof"
    most = min(budget.limits["log_max"], budget.log_left)
    log = sup.log_chunk(idir, int(item.get("offset", 0)), most, ended)
    budget.log_left -= log["offset"] - int(item.get("offset", 0))
    out: dict[str, Any] = {"instance": instance, "state": state, "log": log,
                           "results_dir": None, "declared": None}
    if item.get("results"):
        limit = budget.limits["list_limit"]
        patterns = list(item.get("patterns") or [])
        if patterns:
            doc, ids = list_under(anchor, str(item["cwd"]), limit, patterns)
            inline_files(doc, ids, budget)
            out["declared"] = doc
        if state.get("results_dir"):
            doc, ids = list_under(anchor, str(state["results_dir"]), limit, ["*"])
            inline_files(doc, ids, budget)
            out["results_dir"] = doc
    return out


def harvest(root: str, text: str) -> list[dict[str, Any]]:
    """Answer a harvest request (see the module docstring)."""
    try:
        req = json.loads(text)
    except ValueError as exc:
        raise sup.Bad(f"the harvest request is not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise sup.Bad("the harvest request must be a JSON object")
    run_id = sup.check_id(req.get("run_id"), "run_id")
    anchor = req.get("anchor")
    if not isinstance(anchor, str) or not anchor:
        raise sup.Bad("harvest: anchor (the node's work dir) must be a non-empty string")
    items = req.get("items")
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise sup.Bad(f"harvest: items must be a list of at most {MAX_ITEMS}")
    checked = [check_item(item, i) for i, item in enumerate(items)]
    budget = Budget(req)
    answers = []
    for item in checked:
        if budget.doc_used > budget.limits["doc_budget"]:
            answers.append({"instance": item["instance"], "deferred": True})
            continue
        answer = harvest_item(root, run_id, anchor, item, budget)
        budget.doc_used += len(json.dumps(answer))
        answers.append(answer)
    return answers
