"""Training configuration: one pydantic model, two presets (``tiny`` and ``sdxl``) as YAML files.

``load_config("tiny")`` reads ``trainer/configs/tiny.yaml``; a path to a YAML file works too.
Overrides come from the command line as ``section.field=value`` strings, parsed as YAML scalars,
so ``--set train.max_steps=50`` and ``--set data.num_workers=0`` do what they say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Where the frozen base comes from.

    ``kind: tiny`` builds a randomly initialised SDXL-shaped base from ``tiny_seed`` and saves it
    under ``OUTPUT/base`` (so inference loads it like any diffusers folder). ``kind: sdxl`` loads a
    local diffusers SDXL folder (``pretrained``) and a local CLIP image encoder folder
    (``image_encoder``); nothing is downloaded.
    """

    kind: Literal["tiny", "sdxl"] = "tiny"
    pretrained: str | None = None
    image_encoder: str | None = None
    # a local VAE folder replacing the base's, e.g. madebyollin's sdxl-vae-fp16-fix (its config has
    # force_upcast false, so it encodes in bf16/fp16 instead of float32); nothing is downloaded
    vae: str | None = None
    variant: str | None = None  # e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors
    tiny_seed: int = 0


class RefinerConfig(_Strict):
    """Face refiner: a Perceiver-style resampler with ``num_tokens`` learned queries."""

    num_tokens: int = Field(16, ge=1)
    dim: int = Field(1280, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(20, ge=1)
    dim_head: int = Field(64, ge=4)
    ff_mult: int = Field(4, ge=1)
    id_tokens: int = Field(4, ge=1)  # tokens made from each reference's identity embedding
    clip_layer: int = -2  # which CLIP vision hidden state feeds the refiner (penultimate, as IP-Adapter Plus)


class HiFiNetConfig(_Strict):
    face_cross_attention: bool = True  # decoupled face cross-attention in the frozen UNet (InstantID style)
    face_attention_scale: float = 1.0
    conditioning_embedding_channels: list[int] = [16, 32, 96, 256]  # 2**(len-1) must equal the VAE factor
    controlnet_conditioning_scale: float = 1.0


class DataConfig(_Strict):
    resolution: int = Field(1024, ge=16)
    references: int = Field(4, ge=1)  # k references per target (the recipe's 1 + 4)
    examples_per_identity: int = Field(1, ge=1)  # per visit of an identity: balances large clusters
    batch_size: int = Field(1, ge=1)  # per process
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(64, ge=1)
    batches_per_epoch: int = Field(1000, ge=1)  # per process, the with_epoch length
    holdout_fraction: float = Field(0.02, ge=0.0, lt=1.0)  # identities kept for validation (by id hash)
    use_cache: bool = True  # the precompute pass's files beside the shards, when present (python -m trainer.precompute)


class TrainConfig(_Strict):
    seed: int = 0
    max_steps: int = Field(10000, ge=1)
    # One learning rate per trained part (the reference recipes: ControlNet 1e-5 as diffusers'
    # train_controlnet_sdxl.py, the from-scratch refiner and face K/V 1e-4 as IP-Adapter / InstantID).
    learning_rate: float = 1e-5  # the ControlNet
    refiner_learning_rate: float = 1e-4
    face_attention_learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(500, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' AdamW8bit (GPU)
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"  # "no" on CPU unless cpu_mixed_precision
    cpu_mixed_precision: bool = False  # run bf16 autocast on CPU too: checks the GPU dtype plumbing (slow)
    gradient_checkpointing: bool = True  # the trained ControlNet's blocks
    # the frozen UNet's blocks: backward still runs through them; recomputing them costs ~17% of a
    # step's FLOPs and saves their activations (off on 80 GB cards, on for 40 GB: see the presets)
    unet_gradient_checkpointing: bool = True
    prompt_dropout: float = Field(0.05, ge=0.0, le=1.0)
    face_dropout: float = Field(0.05, ge=0.0, le=1.0)
    joint_dropout: float = Field(0.05, ge=0.0, le=1.0)  # prompt and face dropped together (IP-Adapter's scheme)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    validate_every: int = Field(2000, ge=1)
    val_identities: int = Field(4, ge=0)
    val_inference_steps: int = Field(30, ge=1)
    val_guidance_scale: float = 5.0
    # collective timeout (minutes) for every rank: long enough for the main process's validation
    # while the others wait at the barrier after it (checkpoints are written in the background)
    distributed_timeout_minutes: int = Field(60, ge=1)
    export_pipeline: bool = True  # a finished run writes OUTPUT/pipeline (save_pretrained: the whole model, ~12 GB for sdxl)


class Config(_Strict):
    name: str = "custom"
    model: ModelConfig = ModelConfig()
    refiner: RefinerConfig = RefinerConfig()
    hifinet: HiFiNetConfig = HiFiNetConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _sdxl_needs_paths(self) -> "Config":
        if self.model.kind == "sdxl" and self.model.pretrained is None:
            raise ValueError(
                "config 'sdxl' needs model.pretrained: a local diffusers SDXL folder "
                "(pass --model DIR, or MODEL=DIR to make train)"
            )
        if self.model.kind == "sdxl" and self.model.image_encoder is None:
            raise ValueError(
                "config 'sdxl' needs model.image_encoder: a local CLIP vision model folder "
                "(pass --image-encoder DIR; default is DIR/image_encoder when it exists)"
            )
        t = self.train
        if t.prompt_dropout + t.face_dropout + t.joint_dropout > 1.0:
            raise ValueError("train.prompt_dropout + face_dropout + joint_dropout must be at most 1")
        return self


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _read_tree(name_or_path: str, seen: tuple = ()) -> dict:
    """A YAML config; ``extends: NAME`` starts from another preset (e.g. the card-size presets
    change only batch, accumulation and checkpointing of ``sdxl``)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"config {name_or_path!r} not found (presets: {presets}; or a YAML path)")
    if path.resolve() in seen:
        raise ValueError(f"config {path} extends itself")
    tree = yaml.safe_load(path.read_text()) or {}
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    return _merge(_read_tree(str(parent), (*seen, path.resolve())), tree)


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset by name (``tiny``, ``sdxl``, ``sdxl-80gb``, ``sdxl-40gb``) or a YAML file,
    then apply overrides."""
    tree = _read_tree(name_or_path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return Config.model_validate(tree)
