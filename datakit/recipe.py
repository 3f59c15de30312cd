"""Build recipes: YAML files under ``pipelines/`` that name sources, stages, output and Ray settings.

Loading validates everything before any work starts. An unknown key, a wrong type, a missing
file or an unset ``${VARIABLE}`` is a ``RecipeError`` whose message names the file, the key and
what is expected. Relative paths are taken relative to the recipe file's folder, so a recipe
means the same thing from any working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datakit import registry
from datakit.cache import CacheSettings
from datakit.store import is_url

# source keys added after recipes were first hashed; left out of the hash when unset
OPTIONAL_SOURCE_KEYS = ("roots", "names_file", "person_key_column", "subject_box_column", "subject_frame_column", "follow_symlinks")

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the source's name in the manifests (column source) and in image ids
    license: str | None = None  # the source's licence, as its publisher states it: carried into the dataset card
    intended_use: str | None = None  # what the publisher allows it to be used for (e.g. research only): into the dataset card
    homepage: str | None = None  # where the source is published: into the dataset card


class NamesFile(_Strict):
    """A table naming each identity folder, e.g. VGGFace2's ``identity_meta.csv``
    (``Class_ID, Name, Sample_Num, Flag, Gender``: header fields after a comma start with a
    space, names are quoted and may hold commas, gender is ``m`` / ``f``)."""

    path: Path  # the names table (CSV)
    id_column: str = "Class_ID"  # the folder name: kept as the item's person_key
    name_column: str = "Name"  # becomes the label
    gender_column: str | None = "Gender"  # m / f (also male / female); null: no gender
    # VGGFace2 writes names with underscores ("A_Fine_Frenzy"); labels keep them as written


class FolderSource(SourceBase):
    """``ROOT/<label>/<file>``: the VGGFace2-HQ layout; the folder name is the identity.

    ``roots`` lists several roots of one source (VGGFace2's train/ and test/); each item's
    locator then starts with its root's folder name, so the roots' names must differ. With a
    ``names_file`` the folder name is the person key and the label comes from the file."""

    kind: Literal["folder"]  # a folder tree, one subfolder per identity
    root: Path | None = None  # ROOT/<identity>/<file>; give root or roots
    roots: list[Path] = Field(default_factory=list)  # several roots of one source (locators start with each root's folder name)
    names_file: NamesFile | None = None
    # null takes every file: a non-image must still become a manifest row (undecodable)
    extensions: list[str] | None = None
    # false: a symbolic link leading outside the root is not read (a dropped row, outside_root)
    follow_symlinks: bool = False

    @model_validator(mode="after")
    def _one_way_to_give_roots(self) -> FolderSource:
        if (self.root is None) == (not self.roots):
            raise ValueError("give either root (one folder) or roots (a list of folders), not both or neither")
        if self.roots:
            names = [Path(r).name for r in self.roots]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"roots must have different folder names (locators start with them); repeated: {', '.join(dupes)}")
        return self

    def all_roots(self) -> list[tuple[str, Path]]:
        """(locator prefix, folder) of each root; a single ``root`` has no prefix."""
        if self.root is not None:
            return [("", self.root)]
        return [(f"{Path(r).name}/", r) for r in self.roots]


class UrlSource(SourceBase):
    """A CSV, TSV, parquet or JSONL list of URLs, with an optional name column."""

    kind: Literal["urls"]  # a list file of URLs, fetched by the download stage
    path: Path  # the list file
    format: Literal["csv", "tsv", "parquet", "jsonl"] | None = None  # null: from the suffix
    url_column: str = "url"  # the column holding each item's URL
    name_column: str | None = None  # the column holding the person's name (the label); other columns go to extra
    # Relative URLs are fetched from base_url (a mirror); the manifest keeps them as listed,
    # so image ids do not change with the mirror's address.
    base_url: str | None = None
    # The column identifying the person (IMDb-Face: ``index``, the IMDb id nm...): names spelled
    # two ways under one key are one identity. A value like nm0000001_rm..._1899 keeps its
    # leading run of letters and digits (the id).
    person_key_column: str | None = None
    # The labelled person's face box "x0 y0 x1 y1" (IMDb-Face: ``rect``), measured in an image of
    # the size in subject_frame_column ("height width", IMDb-Face: ``height width``); detect
    # scales it to the image as served and takes the face that matches it.
    subject_box_column: str | None = None
    subject_frame_column: str | None = None  # see subject_box_column

    @model_validator(mode="after")
    def _box_needs_frame(self) -> UrlSource:
        if (self.subject_box_column is None) != (self.subject_frame_column is None):
            raise ValueError("subject_box_column and subject_frame_column go together (the box is measured in that frame)")
        return self


Source = Annotated[FolderSource | UrlSource, Field(discriminator="kind")]


class RaySettings(_Strict):
    address: str | None = None  # null: RAY_ADDRESS if set, else a local Ray
    num_cpus: int | None = Field(default=None, ge=1)  # local Ray only
    partition_size: int = Field(default=256, ge=1)  # items per partition (the unit of resume)
    # Consecutive partition stages without num_gpus or concurrency of their own share one actor
    # pool, each actor running a partition through all of them; false: a pool per stage.
    fuse_steps: bool = True
    # When no partition of a running stage finishes for this long, the run restarts that stage's
    # pending partitions (a hung worker, or an actor lost with a node that does not come back); null turns it off.
    stall_timeout: float | None = Field(default=900.0, gt=0)
    stall_restarts: int = Field(default=2, ge=0)  # then the run stops with an error; run it again to resume


class Recipe(_Strict):
    name: str  # the build's name (dataset card, summary)
    description: str | None = None  # a sentence for the dataset card
    output: Path | str  # a folder (relative to the recipe) or an fsspec URL such as s3://bucket/corpus
    # fsspec options for an output URL (endpoint_url, region, ...): not part of what is built,
    # so neither hashed nor written to recipe.json or build.json (they may hold credentials).
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
    # Redaction logs (redactions.jsonl) of earlier builds: the items they name are not fetched.
    # OUTPUT/redactions.jsonl, when there is one, counts without being listed.
    redactions: list[Path] = Field(default_factory=list)
    sources: list[Source] = Field(min_length=1)
    faces: dict[str, Any] | None = None  # validated by portrait.faces.FaceSettings when used
    stages: dict[str, dict[str, Any] | None]  # stage name -> its settings (sections stages.NAME below); download is required
    ray: RaySettings = RaySettings()
    # the download cache shared by builds: a folder or fsspec URL, or {path, max_bytes}
    cache: CacheSettings | None = None

    # filled in after validation
    path: Path | None = Field(default=None, exclude=True)

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_as_path(cls, value):
        return {"path": str(value)} if isinstance(value, (str, Path)) else value

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages):
        unknown = [n for n in stages if n not in registry.STAGES]
        if unknown:
            raise ValueError(
                f"unknown stage {unknown[0]!r}; known stages, in run order: {', '.join(registry.STAGES)}"
            )
        if "download" not in stages:
            raise ValueError("the download stage is required (it reads every source)")
        return stages

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources):
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return sources

    # derived views
    def stage_names(self) -> list[str]:
        return registry.ordered(self.stages)

    def stage_settings(self, name: str):
        return registry.stage_class(name).Settings.model_validate(self.stages.get(name) or {})

    def face_settings(self):
        from portrait.faces import FaceSettings  # imported late: only face recipes need it

        return FaceSettings.model_validate(self.faces or {})

    def canonical(self) -> dict:
        """What determines the build's output: everything but where Ray runs."""
        data = self.model_dump(mode="json")
        for key in ("address", "num_cpus", "stall_timeout", "stall_restarts", "fuse_steps"):
            data["ray"].pop(key, None)
        if not data["redactions"]:
            del data["redactions"]  # so recipes without it keep the hash they had before it existed
        if data["cache"] is None:
            del data["cache"]  # likewise
        for source in data["sources"]:
            source.pop("base_url", None)  # a mirror's address; locators are kept as listed
            for key in OPTIONAL_SOURCE_KEYS:  # unset: recipes without them keep their hash
                if source.get(key) in (None, [], False):
                    source.pop(key, None)
        data["stages"] = {n: self.stage_settings(n).model_dump(mode="json") for n in self.stage_names()}
        return data

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def load_recipe(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Recipe:
    """Read, substitute ``${VAR}``, validate and resolve paths. Raises RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level (name, output, sources, stages)")
    raw = _substitute_env(raw, path, [])
    if output is not None:
        raw["output"] = str(output)
    return validate_recipe(raw, path)


def validate_recipe(raw: dict, path: Path) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_explain(e, path, raw)) from None
    base = path.resolve().parent
    recipe.path = path.resolve()
    recipe.output = _resolve_output(base, recipe.output)
    if recipe.cache is not None:
        recipe.cache.path = str(_resolve_output(base, recipe.cache.path))
    for i, log in enumerate(recipe.redactions):
        recipe.redactions[i] = _resolve(base, log)
        if not recipe.redactions[i].is_file():
            raise RecipeError(f"{path}: redactions[{i}]: file not found: {recipe.redactions[i]}")
    for i, source in enumerate(recipe.sources):
        if isinstance(source, FolderSource):
            if source.root is not None:
                source.root = _resolve(base, source.root)
                if not source.root.is_dir():
                    raise RecipeError(f"{path}: sources[{i}].root: folder not found: {source.root}")
            for j, root in enumerate(source.roots):
                source.roots[j] = _resolve(base, root)
                if not source.roots[j].is_dir():
                    raise RecipeError(f"{path}: sources[{i}].roots[{j}]: folder not found: {source.roots[j]}")
            if source.names_file is not None:
                source.names_file.path = _resolve(base, source.names_file.path)
                if not source.names_file.path.is_file():
                    raise RecipeError(f"{path}: sources[{i}].names_file.path: file not found: {source.names_file.path}")
        else:
            source.path = _resolve(base, source.path)
            if not source.path.is_file():
                raise RecipeError(f"{path}: sources[{i}].path: file not found: {source.path}")
    for name in recipe.stage_names():
        try:
            recipe.stage_settings(name)
        except ValidationError as e:
            raise RecipeError(_explain(e, path, raw, prefix=("stages", name))) from None
    if recipe.faces is not None or any(n in recipe.stages for n in ("detect", "embed")):
        try:
            recipe.face_settings()
        except ValidationError as e:
            raise RecipeError(_explain(e, path, raw, prefix=("faces",))) from None
    return recipe


def _resolve_output(base: Path, output) -> Path | str:
    text = str(output)
    if is_url(text):
        return text.rstrip("/")
    return _resolve(base, Path(text.removeprefix("file://")))


def _resolve(base: Path, p: Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p).resolve()


def _substitute_env(node, path: Path, keys: list):
    if isinstance(node, dict):
        return {k: _substitute_env(v, path, keys + [str(k)]) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_env(v, path, keys + [f"[{i}]"]) for i, v in enumerate(node)]
    if isinstance(node, str):

        def replace(m):
            value = os.environ.get(m.group(1))
            if value is None:
                key = ".".join(keys).replace(".[", "[")
                raise RecipeError(f"{path}: {key}: environment variable {m.group(1)} is not set")
            return value

        return ENV_PATTERN.sub(replace, node)
    return node


def _explain(error: ValidationError, path: Path, raw: dict, prefix: tuple = ()) -> str:
    lines = []
    for err in error.errors():
        loc = list(prefix) + _without_union_tag(list(err["loc"]))
        key = _format_key(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            what = "unknown key"
        elif kind == "missing":
            what = "required key is missing"
        else:
            given = err.get("input")
            what = f"{err['msg']} (got {given!r})" if not isinstance(given, dict | list) else err["msg"]
        lines.append(f"{path}: {key}: {what}")
    return "\n".join(lines)


def _without_union_tag(loc: list) -> list:
    """pydantic names the chosen source kind in the path (sources.0.folder.root); drop just that
    element, so a key that happens to be called "folder" or "urls" elsewhere stays."""
    if len(loc) >= 3 and loc[0] == "sources" and isinstance(loc[1], int) and loc[2] in ("folder", "urls"):
        return loc[:2] + loc[3:]
    return loc


def _format_key(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
