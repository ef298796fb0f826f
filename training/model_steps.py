"""Where in a fitted model something happens: every step with its path
(`prep/cat/impute`), and which of them a converter failed on."""

from __future__ import annotations

import types
from typing import Any

ROOT = "model"


def named_steps(model: Any) -> list[tuple[str, Any]]:
    """The model and every step inside it, depth first, each with the path of
    names a user wrote (Pipeline steps, ColumnTransformer and FeatureUnion parts)."""
    found: list[tuple[str, Any]] = []

    def walk(path: str, step: Any) -> None:
        found.append((path or ROOT, step))
        prefix = f"{path}/" if path else ""
        children: list[tuple[str, Any]] = []
        if hasattr(step, "steps"):
            children = [(name, child) for name, child in step.steps]
        elif hasattr(step, "transformers_"):
            children = [(name, child) for name, child, _ in step.transformers_]
        elif hasattr(step, "transformer_list"):
            children = list(step.transformer_list)
        for name, child in children:
            if not isinstance(child, str):  # "drop" and "passthrough"
                walk(prefix + name, child)

    walk("", model)
    return found


def failing_step(exc: BaseException, model: Any) -> str:
    """The path of the step a conversion failed on: the converter's own operator
    in the traceback, else the first step whose class the message names, else
    the model itself."""
    paths: dict[int, str] = {id(step): path for path, step in named_steps(model)}
    tb: types.TracebackType | None = exc.__traceback__
    deepest: str | None = None
    while tb is not None:
        operator = tb.tb_frame.f_locals.get("operator")
        raw = getattr(operator, "raw_operator", None)
        if raw is not None and id(raw) in paths:
            deepest = paths[id(raw)]
        tb = tb.tb_next
    if deepest is not None:
        return deepest
    message = str(exc)
    for named, step in reversed(named_steps(model)):
        if type(step).__name__ in message:
            return str(named)
    return ROOT
