"""One JSON object on a line of a process's output: how a training run reports progress
(:mod:`sss_lib.runs.progress`) and how the service says it is listening (:mod:`sss_lib.service.protocol`).

Standard library only and Python 3.9 compatible: the client side inside Slicer imports it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional


def parse_json_object(line: str) -> Optional[Dict[str, Any]]:
    """The JSON object written on ``line`` (surrounding whitespace ignored), or None when the line
    holds anything else (plain log text, a damaged or partial line, a JSON value that is not an object)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
