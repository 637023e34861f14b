"""Find the JSON document a node-side script printed between markers.

Shell noise (motd, profile echoes, warnings) around the document cannot break parsing.
The node-side scripts in ``infra.remote`` print the same two marker strings.
"""

from __future__ import annotations

import json
from typing import Any

BEGIN = "@@INFRA-JSON-BEGIN@@"
END = "@@INFRA-JSON-END@@"


def wrap(document: Any) -> str:
    """Render a document the way node-side scripts print it (used by tests and local code)."""
    return f"{BEGIN}{json.dumps(document, sort_keys=True)}{END}"


def extract_json(text: str) -> Any:
    """Return the last marked JSON document in ``text``; ``ValueError`` when there is none."""
    end = text.rfind(END)
    start = text.rfind(BEGIN, 0, end if end >= 0 else None)
    if start < 0 or end < 0 or end < start:
        raise ValueError("no marked JSON document in the output")
    return json.loads(text[start + len(BEGIN):end])
