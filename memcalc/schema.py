"""The JSON contract as a JSON Schema, and validation of a report document against it (pydantic, lazily).

The report itself is plain dataclasses (see report.py on start-up cost); pydantic reads their annotations
here, so the schema cannot drift from the code that writes the JSON.
"""

from __future__ import annotations

from typing import Any

from memcalc.report import SCHEMA_VERSION, Report


def _adapter():
    from pydantic import TypeAdapter  # ~80 ms: only for `memcalc schema` and validation

    return TypeAdapter(Report)


def report_json_schema() -> dict[str, Any]:
    schema = _adapter().json_schema(mode="serialization")
    schema["title"] = f"memcalc report, schema_version {SCHEMA_VERSION}"
    return schema


def validate_report_json(text: str) -> Report:
    """Parse a ``memcalc --json`` document back into a Report; raises pydantic.ValidationError if it drifts."""
    return _adapter().validate_json(text)
