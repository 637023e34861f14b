"""Node-side reader of Slurm job output files: bytes from given offsets, exactly.

Runs on a Slurm login host as ``python3 - CAP PATH OFFSET [PATH OFFSET ...]`` with its own
source fed on stdin (nothing to deploy). For each file it reads at most CAP bytes from
OFFSET and reports the file's size, so the coordinator appends each byte to its local copy
exactly once and knows when it has drained a finished job's output. A file that does not
exist yet (the job has not started) has size null. Standard library only, Python 3.8+.

Prints one JSON document between the two marker strings::

    {"files": [{"size": N|null, "data": BASE64, "error": null|"..."}]}
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

BEGIN = "@@INFRA-JSON-BEGIN@@"
END = "@@INFRA-JSON-END@@"


def read_one(path: str, offset: int, cap: int) -> dict[str, Any]:
    """Up to ``cap`` bytes of ``path`` from ``offset``, and the file's size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return {"size": None, "data": "", "error": None}
    except OSError as exc:
        return {"size": None, "data": "", "error": exc.strerror or str(exc)}
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, offset), os.SEEK_SET)
        chunks: list[bytes] = []
        left = cap
        while left > 0:
            piece = os.read(fd, min(left, 1 << 20))
            if not piece:
                break
            chunks.append(piece)
            left -= len(piece)
        data = b"".join(chunks)
        return {"size": max(size, offset + len(data)),
                "data": base64.b64encode(data).decode("ascii"), "error": None}
    except OSError as exc:
        return {"size": None, "data": "", "error": exc.strerror or str(exc)}
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    cap = int(argv[0])
    pairs = argv[1:]
    files = [read_one(pairs[i], int(pairs[i + 1]), cap) for i in range(0, len(pairs) - 1, 2)]
    sys.stdout.write(BEGIN + json.dumps({"files": files}) + END + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
