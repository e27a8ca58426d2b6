"""Helpers the fleet tests share: a scenario from a base dict with dotted-path changes, and run records
compared without what depends on the wall clock."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

from fleet.runs import finite_json
from fleet.scenario import Scenario, parse_scenario

WALL_CLOCK_KEYS = ("duration_s", "timings", "started_at", "ended_at", "wall_s")


def scenario_with(base: Mapping[str, Any], **changes: Any) -> Scenario:
    """``base`` with each ``"section.key"`` (digits index lists) set to its value."""
    raw = copy.deepcopy(dict(base))
    for path, value in changes.items():
        node = raw
        *keys, last = path.split(".")
        for key in keys:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    return parse_scenario(raw, source="test")


def comparable(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Run records without wall-clock values; NaN as null (NaN != NaN)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}
        if "telemetry" in r:
            r["telemetry"] = {k: v for k, v in r["telemetry"].items() if k != "wall_s"}
        if "server_metrics" in r:
            r["server_metrics"] = {k: v for k, v in r["server_metrics"].items() if "wall-s" not in k}
        out.append(finite_json(r))
    return out
