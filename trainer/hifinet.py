"""HiFi-Net: a ControlNet built from the SDXL UNet, steered by landmarks and multi-face tokens.

- ControlNet (``diffusers.ControlNetModel.from_unet``): control input = the landmark image,
  cross-attention condition = the face refiner's multi-face tokens. Its residuals go into the
  frozen SDXL UNet, which receives the text prompt.
- Decoupled face cross-attention (optional, on by default, as in IP-Adapter / InstantID): every
  cross-attention layer of the frozen UNet gets a ``FaceAttnProcessor`` that attends to the text
  tokens with the UNet's own (frozen) projections and, separately, to the face tokens with new
  trained key/value projections, and adds the two.

Trained: the ControlNet, the face refiner and the face key/value projections. Frozen: the UNet's
own weights, the VAE, both text encoders and the CLIP vision encoder. ``HiFiNet`` holds only the
trained parts as sub-modules; it keeps a reference to the frozen UNet outside its module tree, so
DDP neither broadcasts nor tracks the 2.6B frozen parameters, and ``HiFiNet.state_dict()`` is
exactly what a checkpoint has to store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from trainer.refiner import FaceRefiner


class FaceAttnProcessor(nn.Module):
    """Cross-attention over [text tokens; num_face_tokens face tokens], decoupled.

    The encoder states arrive concatenated (text first, the last ``num_face_tokens`` are faces):
    text goes through the layer's frozen to_k/to_v, faces through the trained to_k_face /
    to_v_face, the same query attends to each, and the outputs are summed with ``scale`` on
    the face part before the frozen output projection.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_face_tokens: int, scale: float = 1.0):
        super().__init__()
        self.num_face_tokens = num_face_tokens
        self.scale = scale
        self.to_k_face = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_face = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("FaceAttnProcessor is for cross-attention layers (attn2) only")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        text = encoder_hidden_states[:, : -self.num_face_tokens]
        faces = encoder_hidden_states[:, -self.num_face_tokens :]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        text_out = F.scaled_dot_product_attention(query, heads(attn.to_k(text)), heads(attn.to_v(text)))
        face_out = F.scaled_dot_product_attention(
            query, heads(self.to_k_face(faces).to(query.dtype)), heads(self.to_v_face(faces).to(query.dtype))
        )
        hidden_states = text_out + self.scale * face_out
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_module(unet, processor_name: str):
    module = unet
    for part in processor_name.removesuffix(".processor").split("."):
        module = getattr(module, part)
    return module


def install_face_attention(unet, num_face_tokens: int, scale: float) -> dict[str, FaceAttnProcessor]:
    """Give every cross-attention layer (attn2) of ``unet`` a FaceAttnProcessor; self-attention
    keeps PyTorch SDPA. The face projections start as copies of the layer's text projections
    (IP-Adapter's initialisation), in float32 whatever the UNet's dtype."""
    processors: dict[str, object] = {}
    face: dict[str, FaceAttnProcessor] = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            processors[name] = AttnProcessor2_0()
            continue
        attn = _attention_module(unet, name)
        proc = FaceAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, num_face_tokens, scale)
        if attn.to_k.weight.device.type != "meta":
            with torch.no_grad():
                proc.to_k_face.weight.copy_(attn.to_k.weight.float())
                proc.to_v_face.weight.copy_(attn.to_v.weight.float())
        proc.to(attn.to_k.weight.device)
        processors[name] = face[name] = proc
    unet.set_attn_processor(processors)
    return face


def processor_key(name: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return name.replace(".", "-")


class HiFiNet(nn.Module):
    """The trained parts (ControlNet, face refiner, face attention) and the forward pass of one
    denoising step through them and the frozen UNet."""

    def __init__(self, controlnet: ControlNetModel, refiner: FaceRefiner, face_processors: dict[str, FaceAttnProcessor]):
        super().__init__()
        self.controlnet = controlnet
        self.refiner = refiner
        self.face_attention = nn.ModuleDict({processor_key(k): v for k, v in face_processors.items()})
        self._frozen_unet = None

    def attach_unet(self, unet) -> None:
        # object.__setattr__ keeps the frozen UNet out of this module's tree (see module docstring)
        object.__setattr__(self, "_frozen_unet", unet)

    @property
    def unet(self):
        if self._frozen_unet is None:
            raise RuntimeError("HiFiNet has no UNet attached: call attach_unet(unet) first")
        return self._frozen_unet

    @property
    def uses_face_attention(self) -> bool:
        return len(self.face_attention) > 0

    def face_tokens(self, clip_hidden: torch.Tensor, id_embeds: torch.Tensor, face_keep: torch.Tensor | None = None):
        tokens = self.refiner(clip_hidden, id_embeds)
        if face_keep is not None:  # dropped face condition = zero tokens (the unconditional branch of CFG)
            tokens = tokens * face_keep.to(tokens.dtype)[:, None, None]
        return tokens

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        landmark_image: torch.Tensor,
        clip_hidden: torch.Tensor | None = None,
        id_embeds: torch.Tensor | None = None,
        face_keep: torch.Tensor | None = None,
        face_tokens: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """Noise prediction [B, 4, h, w]. Pass either the refiner inputs or ready face tokens."""
        if face_tokens is None:
            face_tokens = self.face_tokens(clip_hidden, id_embeds, face_keep)
        added = {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids}
        down_residuals, mid_residual = self.controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=face_tokens,
            controlnet_cond=landmark_image,
            conditioning_scale=conditioning_scale,
            added_cond_kwargs=added,
            return_dict=False,
        )
        # the frozen UNet takes its inputs in its own dtype (bf16/fp16 on GPU), as diffusers' ControlNet
        # training does: a float32 residual added to its skip connections would reach its GroupNorms
        # as float32 against bf16 weights
        dtype = self.unet.dtype
        context = torch.cat([prompt_embeds, face_tokens], dim=1) if self.uses_face_attention else prompt_embeds
        return self.unet(
            noisy_latents.to(dtype),
            timesteps,
            encoder_hidden_states=context.to(dtype),
            added_cond_kwargs={"text_embeds": pooled_prompt_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
            down_block_additional_residuals=[r.to(dtype) for r in down_residuals],
            mid_block_additional_residual=mid_residual.to(dtype),
            return_dict=False,
        )[0]


def check_conditioning_channels(channels: list[int], vae_factor: int) -> None:
    if 2 ** (len(channels) - 1) != vae_factor:
        raise ValueError(
            f"hifinet.conditioning_embedding_channels {channels} downsample the landmark image by "
            f"{2 ** (len(channels) - 1)}, but the VAE downsamples by {vae_factor}: use {len(channels)} -> "
            f"{vae_factor.bit_length()} entries"
        )


def build_hifinet(
    unet,
    clip_dim: int,
    id_dim: int,
    refiner_cfg,
    hifinet_cfg,
    vae_factor: int,
    unet_dtype=None,
    device=None,
    copy_weights: bool = True,
) -> HiFiNet:
    """A ControlNet copied from the frozen UNet's weights (before the UNet is cast to
    ``unet_dtype`` and moved to ``device``), a fresh refiner and, if enabled, the face attention
    processors installed into the UNet after the cast, so the trained projections stay float32.
    ``copy_weights=False`` skips copying (for models built on the meta device)."""
    check_conditioning_channels(list(hifinet_cfg.conditioning_embedding_channels), vae_factor)
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(hifinet_cfg.conditioning_embedding_channels),
        load_weights_from_unet=copy_weights,
    )
    controlnet.requires_grad_(True)
    move = {k: v for k, v in (("device", device), ("dtype", unet_dtype)) if v is not None}
    if move:
        unet.to(**move)
    controlnet.set_attn_processor(AttnProcessor2_0())
    refiner = FaceRefiner(
        clip_dim=clip_dim,
        id_dim=id_dim,
        output_dim=unet.config.cross_attention_dim,
        num_tokens=refiner_cfg.num_tokens,
        dim=refiner_cfg.dim,
        depth=refiner_cfg.depth,
        heads=refiner_cfg.heads,
        dim_head=refiner_cfg.dim_head,
        ff_mult=refiner_cfg.ff_mult,
        id_tokens=refiner_cfg.id_tokens,
    )
    face = {}
    if hifinet_cfg.face_cross_attention:
        face = install_face_attention(unet, refiner_cfg.num_tokens, hifinet_cfg.face_attention_scale)
    else:
        unet.set_attn_processor(AttnProcessor2_0())
    net = HiFiNet(controlnet, refiner, face)
    net.attach_unet(unet)
    return net


def parameter_split(net: HiFiNet, frozen: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """Parameter counts of what is trained and what is frozen, by part."""
    trained = {
        "controlnet": sum(p.numel() for p in net.controlnet.parameters()),
        "face_refiner": sum(p.numel() for p in net.refiner.parameters()),
        "face_attention": sum(p.numel() for p in net.face_attention.parameters()),
    }
    frozen_counts = {
        name: sum(p.numel() for p in module.parameters() if not p.requires_grad) for name, module in frozen.items()
    }
    return {"trained": trained, "frozen": frozen_counts}
