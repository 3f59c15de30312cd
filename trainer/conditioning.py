"""Conditioning shared by training and inference: prompt embeddings (SDXL's two text encoders),
CLIP hidden states of reference face crops, SDXL's size/crop time ids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's image normalisation (also OpenCLIP's ViT-H/14 and bigG)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def face_pixels(face: Image.Image, size: int) -> np.ndarray:
    """An aligned face crop resized for the CLIP vision encoder: uint8 RGB, CHW, size x size."""
    face = face.convert("RGB")
    if face.size != (size, size):
        face = face.resize((size, size), Image.BICUBIC)
    return np.asarray(face, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalise_clip(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 crops [..., 3, S, S] -> CLIP's normalised float input (float input is taken as
    normalised already)."""
    if pixels.dtype != torch.uint8:
        return pixels
    mean = torch.as_tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.as_tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def model_inputs(batch: dict, device, dtype=torch.float32) -> dict:
    """The loader ships images as uint8 (a quarter of float32's bytes between processes); this
    makes the model's inputs on ``device``: target pixels in [-1, 1], the landmark image in [0, 1],
    the references CLIP-normalised."""
    return {
        "pixels": (batch["pixels"].to(device).float() / 127.5 - 1.0).to(dtype),
        "landmark_image": (batch["landmark_image"].to(device).float() / 255.0).to(dtype),
        "reference_pixels": normalise_clip(batch["reference_pixels"].to(device)).to(dtype),
    }


@torch.no_grad()
def encode_prompts(tokenizers, text_encoders, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings: the penultimate hidden states of both encoders, concatenated
    ([B, 77, d1 + d2]), and the second encoder's pooled projection ([B, d2]). Empty prompts
    give zeros (SDXL's force_zeros_for_empty_prompt), the unconditional input of CFG."""
    hidden = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)  # the second encoder has the projection
    if pooled is None:
        raise ValueError("the last text encoder must be a CLIPTextModelWithProjection (SDXL's text_encoder_2)")
    prompt_embeds = torch.cat(hidden, dim=-1)
    empty = torch.tensor([not c for c in captions], device=device)
    if empty.any():
        prompt_embeds = prompt_embeds.masked_fill(empty[:, None, None], 0.0)
        pooled = pooled.masked_fill(empty[:, None], 0.0)
    return prompt_embeds, pooled


@torch.no_grad()
def encode_reference_crops(image_encoder, pixels: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """[B, k, 3, S, S] normalised crops -> CLIP vision hidden states [B, k, T, d] of ``layer``."""
    batch, k = pixels.shape[:2]
    out = image_encoder(pixels.flatten(0, 1), output_hidden_states=True)
    hidden = out.hidden_states[layer]
    return hidden.unflatten(0, (batch, k))


def time_ids(original_hw, crop_top_left, target_hw) -> list[float]:
    """SDXL micro-conditioning: original size, crop top-left, target size (all (h, w))."""
    return [float(v) for v in (*original_hw, *crop_top_left, *target_hw)]
