"""The reference page of every recipe key, generated from the settings models themselves.

``python -m datakit.reference`` writes ``pipelines/KEYS.md``: each key's path, type, default,
limits and meaning, from the pydantic models that validate recipes (``datakit.recipe``), each
stage's ``Settings`` (``datakit.registry``) and the face settings (``portrait.faces``). The
meaning is the field's ``description``, else the comment the code gives it (on its line, or
the comment lines just above it), so the page says what the code says. A test keeps the file
equal to what this module generates: a key added, renamed or changed shows up as a failing test.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

PAGE = Path(__file__).resolve().parent.parent / "pipelines" / "KEYS.md"
COMMAND = "python -m datakit.reference"


def render() -> str:
    from datakit import recipe, registry
    from portrait.faces import FaceSettings

    out = [
        "# Recipe keys",
        "",
        f"Every key a recipe may hold, generated from the settings models by `{COMMAND}` "
        "(do not edit by hand: a test compares this file with the models). Recipes are described in "
        "the [README](../README.md#recipes); `${VARIABLE}` in any value is replaced from the environment, and "
        "relative paths are relative to the recipe file.",
        "",
    ]
    out += section("Top level", recipe.Recipe, "", skip={"sources", "ray", "path"})
    out += section("`sources[]`, common to both kinds", recipe.SourceBase, "sources[].")
    out += section("`sources[]` with `kind: folder`", recipe.FolderSource, "sources[].", skip=set(recipe.SourceBase.model_fields) | {"names_file"})
    out += section("`sources[].names_file`", recipe.NamesFile, "sources[].names_file.")
    out += section("`sources[]` with `kind: urls`", recipe.UrlSource, "sources[].", skip=set(recipe.SourceBase.model_fields))
    out += section("`ray`", recipe.RaySettings, "ray.")
    out += section("`faces` (the face stages' backend)", FaceSettings, "faces.")
    for name in registry.STAGES:
        cls = registry.stage_class(name)
        about = (inspect.getdoc(sys.modules[cls.__module__]) or "").split("\n\n")[0]  # the stage module's first paragraph
        out += section(f"`stages.{name}`", cls.Settings, f"stages.{name}.", about=about)
    return "\n".join(out).rstrip() + "\n"


def section(title: str, model: type[BaseModel], prefix: str, skip: set[str] = frozenset(), about: str = "") -> list[str]:
    lines = [f"## {title}", ""]
    doc = inspect.cleandoc(model.__dict__.get("__doc__") or "") or about  # its own, not a base class's
    if doc:
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if name in skip or field.exclude and name == "path":
            continue
        required = field.is_required()
        default = "required" if required else f"`{_value(field.get_default(call_default_factory=True))}`"
        kind = type_name(field.annotation) + _limits(field.metadata)
        meaning = field.description or comment(model, name)
        lines.append(f"| `{prefix}{name}` | {kind} | {default} | {_cell(meaning)} |")
    return lines + [""]


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (below)"
    if annotation is typing.Any:
        return "any"
    return {"str": "text", "int": "integer", "float": "number", "bool": "true/false", "Path": "path"}.get(
        getattr(annotation, "__name__", str(annotation)), getattr(annotation, "__name__", str(annotation))
    )


def _limits(metadata) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "at least", "max_length": "at most", "pattern": "matching"}
    out = []
    for item in metadata:
        for attr, word in words.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{word} `{value}`" if attr == "pattern" else f"{word} {value}" + (" items" if "length" in attr else ""))
    return f" ({', '.join(out)})" if out else ""


def _value(value) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return "{...}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def comment(model: type[BaseModel], name: str) -> str:
    """The comment the code gives field ``name``: on its line, else the lines just above it."""
    for cls in model.__mro__:
        if name not in getattr(cls, "__annotations__", {}):
            continue
        lines, _ = inspect.getsourcelines(cls)
        for i, line in enumerate(lines):
            if re.match(rf"\s+{re.escape(name)}\s*:", line):
                trailing = _comment_text(line)
                if trailing:
                    return trailing
                above = []
                for prev in reversed(lines[:i]):
                    if not prev.strip().startswith("#"):
                        break
                    above.insert(0, prev.strip().lstrip("#").strip())
                return " ".join(above)
    return ""


def _comment_text(line: str) -> str:
    if "#" not in line:
        return ""
    code, _, text = line.partition("  #")
    text = text.strip()
    return "" if not text or text.startswith(("fmt:", "noqa", "type:")) else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> int:
    PAGE.write_text(render())
    print(f"wrote {PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
