"""Model architectures as config dicts: SDXL's real ones and the small ``tiny`` ones.

The SDXL dicts transcribe the ``config.json`` files of the Hugging Face repositories
``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``, ``scheduler/``) and ``h94/IP-Adapter`` (``models/image_encoder/``, an
OpenCLIP ViT-H/14 vision tower: 257 tokens per 224px image, the "N x 257 x d" of the paper).
They are written here because nothing can be downloaded; the benchmark builds them on the meta
device to count parameters, and the known totals (UNet 2,567,463,684 parameters) check the
transcription.

The tiny dicts keep SDXL's shape (three UNet levels, two text encoders whose hidden states
concatenate into the cross-attention width, pooled text + time ids through
``addition_embed_type="text_time"``) at sizes that train on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_TEXT_ENCODER = {  # CLIP ViT-L/14 text tower
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14 text tower
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

IMAGE_ENCODER_VIT_H = {  # OpenCLIP ViT-H/14 vision tower (IP-Adapter's image encoder)
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "image_size": 224,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "projection_dim": 1024,
}

SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TINY_TEXT_WIDTH = 32  # each tiny text encoder; concatenated they make the cross-attention width 64

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 2 * TINY_TEXT_WIDTH,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TINY_TEXT_WIDTH + 6 * 8,
    "norm_num_groups": 8,
}

TINY_VAE = {
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}


def _tiny_text(hidden_act: str) -> dict:
    vocab = tiny_vocab()
    return {
        "hidden_act": hidden_act,
        "hidden_size": TINY_TEXT_WIDTH,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": TINY_TEXT_WIDTH,
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


TINY_IMAGE_ENCODER = {
    "hidden_act": "gelu",
    "hidden_size": 32,
    "image_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "projection_dim": 32,
}


def _bytes_to_unicode() -> list[str]:
    """The byte-to-character table of GPT-2/CLIP byte-level BPE, in byte order of the table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary with no merges: every byte, alone or word-final, and the two
    special tokens. Tokenisation is per character, which is all a random tiny model needs."""
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=tiny_vocab(), merges=[], model_max_length=77)


def build_tiny_base(folder: Path, seed: int) -> Path:
    """Build the tiny base from ``seed`` and save it as a diffusers SDXL folder plus
    ``image_encoder/``. Same seed, same weights; an existing complete folder is reused."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    folder = Path(folder)
    marker = folder / "tiny_base.json"
    if marker.is_file() and json.loads(marker.read_text()).get("seed") == seed:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    parts = {
        "unet": UNet2DConditionModel(**TINY_UNET),
        "vae": AutoencoderKL(**TINY_VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**_tiny_text("quick_gelu"))),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**_tiny_text("gelu"))),
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER)),
    }
    for name, model in parts.items():
        model.save_pretrained(folder / name, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tiny_tokenizer().save_pretrained(folder / name)
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    marker.write_text(json.dumps({"seed": seed}) + "\n")
    return folder
