"""Reading the JSON files edgeact's folders hold (manifests, configs), with errors that name the file and the fix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeact.runtime.errors import EdgeactError


def read_json_object(path: Path, error: type[EdgeactError], what: str, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file, `what` it should be and `fix`, where it is not valid JSON
    (a damaged or binary file) or its top level is not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the top level is a JSON {type(data).__name__}, not {what}; {fix}")
    return data
