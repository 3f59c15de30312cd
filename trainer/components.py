"""Load the frozen base: SDXL's UNet, VAE, two text encoders and tokenizers, the noise
scheduler, and a CLIP vision encoder, all from local folders (nothing is downloaded).

A missing folder or file is an error that names it. Every module comes back frozen
(``requires_grad`` off, eval mode); the caller moves and casts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class Base:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    image_encoder: torch.nn.Module
    scheduler_config: dict

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "image_encoder": self.image_encoder,
        }


def check_base_folders(model_dir: str | Path, image_encoder_dir: str | Path) -> tuple[Path, Path]:
    model_dir, image_encoder_dir = Path(model_dir), Path(image_encoder_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"SDXL model folder {model_dir} does not exist: pass a local diffusers SDXL folder "
            f"(with {', '.join(SUBFOLDERS)}); nothing is downloaded"
        )
    missing = [name for name in SUBFOLDERS if not (model_dir / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"SDXL model folder {model_dir} lacks sub-folder(s): {', '.join(missing)}")
    if not (image_encoder_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP image encoder folder {image_encoder_dir} has no config.json: pass a local "
            "CLIPVisionModelWithProjection folder (e.g. IP-Adapter's models/image_encoder)"
        )
    return model_dir, image_encoder_dir


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def load_base(model_dir: str | Path, image_encoder_dir: str | Path, variant: str | None = None, vae_dir: str | Path | None = None) -> Base:
    """``vae_dir``: a local VAE folder used instead of ``model_dir/vae`` (e.g. an fp16-fix VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    model_dir, image_encoder_dir = check_base_folders(model_dir, image_encoder_dir)
    common = {"use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant=variant, **common)
    if vae_dir is not None:
        if not (Path(vae_dir) / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {vae_dir} (model.vae) has no config.json: pass a local diffusers AutoencoderKL folder")
        vae = AutoencoderKL.from_pretrained(vae_dir, **common)
    else:
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=variant, **common)
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=variant, **common)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
        model_dir, subfolder="text_encoder_2", variant=variant, **common
    )
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder_dir, **common)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
    from diffusers import DDPMScheduler

    scheduler_config = dict(DDPMScheduler.load_config(model_dir, subfolder="scheduler"))
    for module in (unet, vae, text_encoder, text_encoder_2, image_encoder):
        freeze(module)
    return Base(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, image_encoder, scheduler_config)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
