"""Range overrides as users write them: ``--range NAME=RANGE`` pairs and ``--space`` JSON files.

``LOW:HIGH[:log]`` is a float or int range, ``VALUE`` a fixed value and ``A,B,C`` categorical
choices; :func:`load_overrides` turns them into the specs :class:`autoft.searching.space.SearchSpace`
reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from autoft.errors import AutoftError

def parse_range(text: str) -> dict[str, Any]:
    """``LOW:HIGH[:log]``, ``VALUE`` (fixed) or ``A,B,C`` (choices) -> a range spec."""
    text = text.strip()
    if "," in text:
        return {"choices": [_scalar(c) for c in text.split(",") if c.strip()]}
    parts = text.split(":")
    if len(parts) == 1:
        value = _scalar(parts[0])
        if isinstance(value, str):
            return {"choices": [value]}
        return {"low": value, "high": value, "log": False}
    log = len(parts) == 3 and parts[2].strip().lower() == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise ValueError(f"expected LOW:HIGH[:log], VALUE or A,B,C, got {text!r}")
    low, high = _number(parts[0]), _number(parts[1])
    return {"low": low, "high": high, "log": log}


def _scalar(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _number(text: str) -> float | int:
    value = _scalar(text)
    if isinstance(value, str):
        raise ValueError(f"not a number: {text!r}")
    return value


def check_range(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    if "choices" in spec:
        if not spec["choices"]:
            raise AutoftError(f"range for {name}: no choices given")
        return spec
    low, high = spec["low"], spec["high"]
    if low > high:
        raise AutoftError(f"range for {name}: low {low} is above high {high}")
    if spec.get("log") and low <= 0:
        raise AutoftError(f"range for {name}: a log range must start above 0, got {low}")
    return spec


def load_overrides(pairs: Sequence[str] = (), file: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Overrides from a JSON file, then ``NAME=RANGE`` pairs (which win)."""
    overrides: dict[str, dict[str, Any]] = {}
    if file is not None:
        path = Path(file).expanduser()
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AutoftError(f"search space file not found: {file}") from None
        except json.JSONDecodeError as exc:
            raise AutoftError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise AutoftError(f"{file}: expected a JSON object mapping parameter names to ranges")
        for name, value in loaded.items():
            overrides[name] = _spec_from_json(name, value, file)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise AutoftError(f"--range expects NAME=LOW:HIGH[:log], NAME=VALUE or NAME=A,B,C; got {pair!r}")
        try:
            overrides[name.strip()] = parse_range(value)
        except ValueError as exc:
            raise AutoftError(f"--range {pair}: {exc}") from None
    return {name: check_range(name, spec) for name, spec in overrides.items()}


def _spec_from_json(name: str, value: Any, file) -> dict[str, Any]:
    try:
        if isinstance(value, str):
            return parse_range(value)
        if isinstance(value, list):
            return {"choices": value}
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"low": value, "high": value, "log": False}
        if isinstance(value, dict) and {"low", "high"} <= set(value):
            return {"low": value["low"], "high": value["high"], "log": bool(value.get("log", False))}
    except ValueError as exc:
        raise AutoftError(f"{file}: {name}: {exc}") from None
    raise AutoftError(f"{file}: {name}: expected \"LOW:HIGH[:log]\", a number, a list of choices or {{\"low\", \"high\", \"log\"}}")
