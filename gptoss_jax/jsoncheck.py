"""Type checks for JSON inputs (config.json, indexes, metadata, generation_config, tokenizer configs).

Every user-supplied JSON file is read with :func:`read_json_object` and each field it uses with :func:`field`, so a
wrong type gives one line naming the file and the field (``config.json: field 'layer_types' must be a list of
strings, got 5``) instead of a TypeError from deep inside.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from gptoss_jax.errors import GptOssError

_MISSING = object()
KINDS = {
    "int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
    "object": "an object", "list": "a list", "int_list": "a list of integers", "str_list": "a list of strings",
    "int_or_int_list": "an integer or a list of integers",
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "number":
        return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, Mapping)
    if kind == "list":
        return isinstance(value, list)
    if kind == "int_list":
        return isinstance(value, list) and all(_is_int(v) for v in value)
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "int_or_int_list":
        return _is_int(value) or is_kind(value, "int_list")
    raise ValueError(f"unknown kind {kind!r}")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field(d: Mapping, key: str, where: str, kind: str, *, default: Any = _MISSING, nullable: bool = False,
          minimum: float | None = None, maximum: float | None = None, error=GptOssError, prefix: str = "") -> Any:
    """d[key] checked to be of `kind` (see KINDS) and within [minimum, maximum]; `default` if absent (required when
    no default). `where` names the file; `prefix` the enclosing object ("quantization_config.")."""
    name = f"{prefix}{key}"
    if key not in d:
        if default is _MISSING:
            raise error(f"{where}: field {name} is missing")
        return default
    value = d[key]
    if value is None and nullable:
        return None
    desc = KINDS[kind]
    if kind in ("int", "int_list", "int_or_int_list") and minimum in (0, 1):
        desc = desc.replace("an integer", "a positive integer" if minimum == 1 else "a non-negative integer")
    if not is_kind(value, kind):
        raise error(f"{where}: {name} must be {desc}{' or null' if nullable else ''}, got {_show(value)}")
    for v in (value if isinstance(value, list) else [value]):
        if isinstance(v, (int, float)) and ((minimum is not None and v < minimum) or
                                            (maximum is not None and v > maximum)):
            bounds = f" in [{minimum}, {maximum}]" if minimum not in (0, 1) and maximum is not None else (
                f" <= {maximum}" if maximum is not None else "")
            if minimum not in (0, 1) and maximum is None:
                bounds = f" >= {minimum}"
            raise error(f"{where}: {name} must be {desc}{bounds}, got {_show(value)}")
    return value


def refuse_duplicate_keys(make_error):
    """A json ``object_pairs_hook`` that raises ``make_error(key)`` on a repeated key (two readers of such a file
    could see different values) and otherwise builds the dict."""
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise make_error(k)
            seen[k] = v
        return seen
    return hook


def read_json_object(path: str | os.PathLike, *, error=GptOssError, what: str = "") -> dict:
    """The JSON object in `path`; `error` naming the file if it is missing, unreadable, not UTF-8 / JSON, not an
    object, or has duplicate keys (ambiguous: two readers could see different values)."""
    path = Path(path)
    no_duplicates = refuse_duplicate_keys(lambda k: error(f"{path}: duplicate key {k!r}"))

    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file{(' (' + what + ')') if what else ''}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        d = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:
        if isinstance(e, error):
            raise
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise error(f"{path}: must hold a JSON object, got {type(d).__name__}")
    return d


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


__all__ = ["field", "read_json_object", "is_kind", "KINDS"]
