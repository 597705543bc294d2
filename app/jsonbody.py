"""JSON request bodies, parsed with bounds: the one parser behind REST bodies and the Open Inference Protocol.

``json.loads`` alone let a body of a million keys, a 100,000-deep nesting or a 5,000-digit number through to
a 500 or to an error body that echoed the whole input. Here each is a 4xx that says what to change, and the
same rules hold everywhere: a key given twice in one object is refused, as an option given in both the
query and the body is.
"""

from __future__ import annotations

import json
from typing import Any

LARGE_BODY = 64 * 1024  # parsed off the event loop above this
MAX_KEYS = 256  # per JSON object: no request of ours has more than a few dozen fields or parameters
# Per body, counted before parsing (two byte scans, milliseconds for 32 MB): json.loads holds the GIL for the
# whole parse, so a body of a million keys stalled every other request for a second even off the event loop,
# and MAX_KEYS is only checked once an object is whole. A request of ours is a few dozen strings; a list of
# texts or a BYTES tensor one per item.
MAX_STRINGS = 10_000
# Values in arrays and objects, counted as commas (strings' commas too, give or take): a JSON tensor of 4M values
# parses in ~0.3 s on 2 cores, the longest the GIL is held in one go; the binary tensor extension of the Open
# Inference Protocol carries larger tensors as raw bytes, with no parse at all.
MAX_VALUES = 4 * 1024 * 1024


class JsonBodyError(ValueError):
    """What is wrong with a body, in words for the client (each front end raises its own error kind)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_KEYS:
        raise JsonBodyError(f"an object has {len(pairs)} keys; at most {MAX_KEYS} are accepted")
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise JsonBodyError(f"key {_short(key)} is given more than once in one object; give it once")
        found[key] = value
    return found


def _short(key: str, limit: int = 64) -> str:
    return repr(key) if len(key) <= limit else f"{key[:limit]!r}... ({len(key)} characters)"


def parse_json(body: bytes | str) -> Any:
    """The body's value; JsonBodyError (a ValueError) saying why it cannot be taken."""
    raw = body.encode() if isinstance(body, str) else body
    if not raw.strip():  # json.loads would say "Expecting value at line 1, column 1"
        raise JsonBodyError("the body is empty; send a JSON object")
    strings = (raw.count(b'"') - raw.count(b'\\"')) // 2  # keys and string values, give or take a few
    if strings > MAX_STRINGS:
        raise JsonBodyError(f"the body holds about {strings} strings and keys; at most {MAX_STRINGS} are accepted")
    values = raw.count(b",") + 1
    if values > MAX_VALUES:
        raise JsonBodyError(
            f"the body holds about {values} values; at most {MAX_VALUES} are accepted in JSON "
            "(send larger tensors as binary data: the binary tensor data extension of /v2)"
        )
    try:
        return json.loads(body, object_pairs_hook=_object)
    except JsonBodyError:
        raise
    except UnicodeDecodeError:
        raise JsonBodyError("the body is not UTF-8 encoded JSON") from None
    except json.JSONDecodeError as exc:
        raise JsonBodyError(f"the body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise JsonBodyError("the body's JSON is nested too deeply") from None
    except ValueError as exc:  # Python's limit on an integer's digits (4,300)
        raise JsonBodyError(f"a number in the body is too long: {str(exc)[:120]}") from None
