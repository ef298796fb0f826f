"""docs/configuration.md, rendered from the settings classes so it cannot drift.

`make docs` writes it (`python -m service.settings_doc docs/configuration.md`);
tests/unit/test_docs.py fails when the committed page differs from what this
renders. Every public `BaseSettings` class in service.settings gets a table, in
the order the module defines them; a setting without a `description=` stops
the rendering. Nothing on the request path imports this module.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from service import settings

PAGE = Path("docs/configuration.md")

INTRODUCTION = """\
# Configuration

<!-- Generated from service/settings.py by `make docs`: edit the settings, not this page. -->

Every setting is an environment variable (names are case-insensitive), read
in one place: the settings classes in `service/settings.py`. This page is
generated from them by `make docs`, and a unit test fails when it falls behind.

The proxy's rate limits (`PROXY_*`) belong to nginx, not to the Python
service: see [the proxy](operations.md#the-proxy).
"""

_TYPE_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
}


def settings_classes() -> list[type[BaseSettings]]:
    """The public settings classes of service.settings, in definition order."""
    return [
        value
        for name, value in vars(settings).items()
        if inspect.isclass(value)
        and issubclass(value, BaseSettings)
        and value.__module__ == settings.__name__
        and not name.startswith("_")
    ]


def environment_variable(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    if field.alias is not None:
        return field.alias
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def _code(value: object) -> str:
    return f"`{value}`"


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(_code(choice) for choice in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(annotation) if arg is not type(None))
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "JSON object"
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> list[str]:
    symbols = {
        annotated_types.Ge: ("≥", "ge"),
        annotated_types.Gt: (">", "gt"),
        annotated_types.Le: ("≤", "le"),
        annotated_types.Lt: ("<", "lt"),
    }
    found = []
    for constraint in field.metadata:
        for kind, (symbol, attribute) in symbols.items():
            if isinstance(constraint, kind):
                found.append(f"{symbol} {getattr(constraint, attribute)}")
    return found


def type_text(field: FieldInfo) -> str:
    return ", ".join([_type_name(field.annotation), *_bounds(field)])


def default_text(qualified_name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        extra = field.json_schema_extra
        documented = extra.get("documented_default") if isinstance(extra, dict) else None
        if not isinstance(documented, str):
            raise ValueError(
                f"{qualified_name} has a default_factory: say what it computes with "
                'json_schema_extra={"documented_default": "..."}'
            )
        return documented
    value = field.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return _code(str(value).lower())
    return _code(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _first_paragraph(cls: type[BaseSettings]) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def render_class(cls: type[BaseSettings]) -> str:
    lines = [f"## {cls.__name__}", ""]
    summary = _first_paragraph(cls)
    if summary:
        lines += [summary, ""]
    lines += ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        qualified_name = f"{cls.__name__}.{name}"
        if not field.description:
            raise ValueError(f"{qualified_name} has no description=: add one")
        cells = (
            _code(environment_variable(cls, name, field)),
            type_text(field),
            default_text(qualified_name, field),
            field.description,
        )
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def render() -> str:
    return "\n".join([INTRODUCTION, *(render_class(cls) for cls in settings_classes())])


def main(argv: list[str]) -> int:
    """`python -m service.settings_doc [PATH]`: write the page to PATH, or print it."""
    page = render()  # before opening PATH: a refusal leaves the old page intact
    if argv:
        Path(argv[0]).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
