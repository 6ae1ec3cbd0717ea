"""Experiments files for tests, written from their arms instead of pasted TOML.

`experiments_toml` renders one `[[experiment]]` with its `[[experiment.arm]]` tables (and an
optional `[experiment.canary]`), one `key = value` a line in the order given, so a test can
still edit the text (`.replace(...)`) as it would a hand-written file.
"""

from __future__ import annotations

import json
from typing import Any

Table = dict[str, Any]

# the two arms: control on version 1, treatment on version 2, half the users each
CONTROL: Table = {"name": "control", "share": 0.5, "model_version": 1}
TREATMENT: Table = {"name": "treatment", "share": 0.5, "model_version": 2}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def _table(header: str, keys: Table) -> str:
    return f"{header}\n" + "".join(f"{k} = {_value(v)}\n" for k, v in keys.items())


def experiments_toml(name: str, salt: str, arms: list[Table] | None = None,
                     canary: Table | None = None, **experiment: Any) -> str:
    """One experiment; `arms` defaults to the issue's two-arm example (`CONTROL`, `TREATMENT`)."""
    arms = arms if arms is not None else [CONTROL, TREATMENT]
    text = "\n" + _table("[[experiment]]", {"name": name, "salt": salt, **experiment})
    text += "".join(_table("[[experiment.arm]]", arm) for arm in arms)
    if canary is not None:
        text += _table("[experiment.canary]", canary)
    return text


def canary_toml(name: str, salt: str, steps: list[float], max_error_ratio: float) -> str:
    """A canary arm on version 2 starting at share 0 beside a stable arm on the default model."""
    return experiments_toml(
        name, salt,
        [{"name": "canary", "share": 0.0, "model_version": 2}, {"name": "stable", "share": 1.0}],
        canary={"arm": "canary", "steps": steps, "step_s": 3600,
                "max_error_ratio": max_error_ratio, "max_p99_ms": 5000})

