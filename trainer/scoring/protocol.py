"""An evaluation protocol (YAML): who, with which references, prompts, driving photos and seeds,
scored by which models. One case is one generated image: identity x prompt x driving photo x seed.

    name: demo-heldout
    identities:
      shards: ../../manifests/demo/shards   # the held-out identities of a build's shards ...
      holdout_fraction: 0.1                 # ... as trainer.train splits them (data.holdout_fraction)
      # folder: DIR                         # ... or DIR/<identity>/<photos> (every identity, or `names`)
      names: []                             # only these (labels, folder names or identity ids)
      limit: 8                              # at most this many identities, in order
    references: 4                           # k: the first k photos of each identity (by key / file name)
    prompts: ["a photo of a person", "a photo of a person in a red sweater, in a park"]
    driving: [../../data/demo/folder/Tony_Blair/Tony_Blair_0005.jpg]   # pose and expression
    seeds: [0]
    generation: {steps: 30, guidance: 5.0, size: null}   # size null: the checkpoint's resolution
    faces: {backend: dlib}                  # detector and landmarks (portrait.faces settings)
    scorers:
      recognition:                          # at least one; name them for the summary
        - {name: dlib, kind: dlib}
        - {name: arcface, kind: arcface, model: /models/buffalo_l/w600k_r50.onnx}
      clip: /models/clip-vit-large-patch14  # a local transformers CLIP folder; null: no CLIP-T/CLIP-I
      bootstrap: 2000                       # resamples for the 95% intervals

Relative paths are taken from the protocol file's folder; ``${VARIABLE}`` is replaced from the
environment (unset: an error naming the key); a ``driving`` entry that is a folder stands for
every image in it, in name order. A photo that no one could use (no face,
undecodable) is skipped when choosing references and said so; an identity with fewer than k + 1
usable photos (k references and one for calibration) is left out and said so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Identities(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: str | None = None
    holdout_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    folder: str | None = None
    names: list[str] = []
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.shards is None) == (self.folder is None):
            raise ValueError("give exactly one of shards (a build's shards) or folder (DIR/<identity>/<photos>)")
        return self


class Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(30, ge=1)
    guidance: float = 5.0
    size: int | None = Field(None, ge=16)
    negative_prompt: str = ""


class Recognizer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["dlib", "arcface"]
    model: str | None = None  # arcface: an ArcFace ONNX file (insightface's w600k_r50.onnx, glintr100.onnx)

    @model_validator(mode="after")
    def _model(self):
        if self.kind == "arcface" and not self.model:
            raise ValueError(f"recognizer {self.name}: kind arcface needs model (a local ArcFace .onnx file)")
        return self


class Scorers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recognition: list[Recognizer] = Field(default_factory=lambda: [Recognizer(name="dlib", kind="dlib")], min_length=1)
    clip: str | None = None
    bootstrap: int = Field(2000, ge=100)


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    identities: Identities
    references: int = Field(4, ge=1)
    prompts: list[str] = Field(min_length=1)
    driving: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    generation: Generation = Generation()
    faces: dict = Field(default_factory=dict)
    scorers: Scorers = Scorers()

    base_dir: Path = Path(".")

    def path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def driving_paths(self) -> list[Path]:
        out = []
        for value in self.driving:
            path = self.path(value)
            if path.is_dir():
                out += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            else:
                out.append(path)
        return out


def substitute_env(node, keys: tuple = ()):
    """``${VAR}`` in every string of a YAML tree, from the environment; unset: KeyError(key)."""
    if isinstance(node, dict):
        return {k: substitute_env(v, keys + (str(k),)) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, keys + (str(i),)) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match):
        if match.group(1) not in os.environ:
            raise KeyError(f"{'.'.join(keys)}: environment variable {match.group(1)} is not set")
        return os.environ[match.group(1)]

    return ENV_PATTERN.sub(replace, node)


def load_protocol(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Protocol:
    """The protocol of a YAML file with ``section.key=value`` overrides (as ``trainer.train
    --set``); a plain ValueError naming the file and the key otherwise."""
    from trainer.config import _set_dotted, parse_override

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exn:
        raise ValueError(f"{path}: cannot read the protocol ({exn.strerror or exn})") from None
    except yaml.YAMLError as exn:
        raise ValueError(f"{path}: not valid YAML ({exn})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping (name, identities, prompts, driving, ...)")
    try:
        for text in overrides:
            _set_dotted(data, *parse_override(text))
        data = substitute_env(data)
    except KeyError as exn:
        raise ValueError(f"{path}: {exn.args[0]}") from None
    try:
        protocol = Protocol.model_validate({**data, "base_dir": path.resolve().parent})
    except ValidationError as exn:
        first = exn.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise ValueError(f"{path}: {key}: {first['msg']}") from None
    for i, driving in enumerate(protocol.driving):
        if not protocol.path(driving).exists():
            raise ValueError(f"{path}: driving.{i}: {protocol.path(driving)} does not exist")
    if not protocol.driving_paths():
        raise ValueError(f"{path}: driving: no photo found")
    return protocol


# ------------------------------------------------------------------ identities and cases


@dataclass
class Photo:
    name: str  # the shard key or the file name
    data: bytes


@dataclass
class Identity:
    slug: str  # identity id (shards) or folder name; case ids start with it
    label: str
    photos: list[Photo] = field(default_factory=list)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "identity"


def wanted(protocol: Protocol, *names: str) -> bool:
    return not protocol.identities.names or any(n in protocol.identities.names for n in names)


def read_identities(protocol: Protocol) -> list[Identity]:
    """Every identity the protocol names, with its photos in a stable order."""
    spec = protocol.identities
    found = folder_identities(protocol) if spec.folder else shard_identities(protocol)
    return found[: spec.limit] if spec.limit else found


def folder_identities(protocol: Protocol) -> list[Identity]:
    root = protocol.path(protocol.identities.folder)
    if not root.is_dir():
        raise ValueError(f"identities.folder: {root} is not a folder")
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not wanted(protocol, folder.name):
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        out.append(Identity(slug(folder.name), folder.name, [Photo(p.name, p.read_bytes()) for p in files]))
    return out


def shard_identities(protocol: Protocol) -> list[Identity]:
    from trainer.data import heldout_groups

    shards = protocol.identities.shards
    source = shards if "://" in shards else str(protocol.path(shards))
    out = []
    for group in heldout_groups(source, protocol.identities.holdout_fraction):
        label = str(group[0].meta.get("label") or group[0].identity_id)
        if wanted(protocol, label, group[0].identity_id):
            records = sorted(group, key=lambda r: r.key)
            out.append(Identity(slug(group[0].identity_id), label, [Photo(r.key, r.image) for r in records]))
    return out


@dataclass(frozen=True)
class Case:
    case_id: str
    identity: str  # slug
    prompt_index: int
    prompt: str
    driving_index: int
    seed: int


def cases_for(protocol: Protocol, identities: list[Identity]) -> list[Case]:
    """Every case, in a fixed order: identity, prompt, driving photo, seed."""
    return [
        Case(f"{ident.slug}__p{p}__d{d}__s{seed}", ident.slug, p, prompt, d, seed)
        for ident in identities
        for p, prompt in enumerate(protocol.prompts)
        for d in range(len(protocol.driving_paths()))
        for seed in protocol.seeds
    ]


def find_image(folder: Path, case_id: str) -> Path | None:
    """The image of a case in a folder of outputs: CASE_ID.png / .jpg / .jpeg / .webp."""
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{case_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None
