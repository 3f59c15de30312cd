"""CLIP-T (image-prompt) and CLIP-I (image-reference) with a CLIP model from a local folder.

CLIP-T is the cosine between the output's CLIP image embedding and its prompt's text embedding;
CLIP-I the mean cosine between the output's image embedding and each reference photo's. Both are
plain cosines (papers print them as is or x100; PhotoMaker and PuLID use ViT-L/14, some
CLIPScore's 2.5 x max(cos, 0): compare like with like). The folder is a transformers
``save_pretrained`` CLIP (model, tokenizer, image processor), e.g. a local copy of
openai/clip-vit-large-patch14; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def folder_sha256(folder: Path) -> str:
    """One hash over the weight files (name and bytes), so two copies of a model hash the same."""
    digest = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for path in weights:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


class ClipScorer:
    def __init__(self, folder: Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"scorers.clip: {folder} is not a local CLIP folder (config.json, weights, tokenizer and "
                "preprocessor files as transformers' save_pretrained writes them)"
            )
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.name = f"clip:{folder.name}"
        self.model_sha256 = folder_sha256(folder)

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> np.ndarray:
        inputs = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt").to(self.device)
        features = self.model.get_image_features(**inputs)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        max_length = self.processor.tokenizer.model_max_length
        inputs = self.processor(text=texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
        features = self.model.get_text_features(**inputs.to(self.device))
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
