"""The face refiner: fuses k reference faces into M multi-face tokens for cross-attention.

Inputs per example, for each of the k references: the CLIP vision encoder's hidden states of
the aligned face crop (local features, T tokens of width ``clip_dim``) and the identity
embedding (global feature, ``id_dim``). Each embedding becomes ``id_tokens`` tokens, so local and
global features of all references form one context sequence. ``num_tokens`` learned queries,
shifted by a projection of the mean identity embedding, read that context through Perceiver
blocks (the queries attend to context + themselves, then a feed-forward), and a projection to
the UNet's cross-attention width gives the M multi-face tokens.

References are an unordered set: no reference index enters, so their order does not matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PerceiverAttention(nn.Module):
    """Queries attend to [context; queries] (Flamingo's Perceiver resampler)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_context = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        queries_n = self.norm_queries(queries)
        keys_values = torch.cat([self.norm_context(context), queries_n], dim=1)
        q = self.to_q(queries_n)
        k, v = self.to_kv(keys_values).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FaceRefiner(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        clip_dim: int,
        id_dim: int,
        output_dim: int,
        num_tokens: int = 16,
        dim: int = 1280,
        depth: int = 4,
        heads: int = 20,
        dim_head: int = 64,
        ff_mult: int = 4,
        id_tokens: int = 4,
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) / dim**0.5)
        self.local_in = nn.Linear(clip_dim, dim)
        self.global_in = nn.Linear(id_dim, dim * id_tokens)
        self.identity_to_queries = nn.Linear(id_dim, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, clip_hidden: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """clip_hidden [B, k, T, clip_dim], id_embeds [B, k, id_dim] -> [B, num_tokens, output_dim]."""
        if clip_hidden.ndim != 4 or id_embeds.ndim != 3 or clip_hidden.shape[:2] != id_embeds.shape[:2]:
            raise ValueError(
                f"face refiner wants clip_hidden [B,k,T,d] and id_embeds [B,k,D] with the same B and k; "
                f"got {tuple(clip_hidden.shape)} and {tuple(id_embeds.shape)}"
            )
        batch = clip_hidden.shape[0]
        local = self.local_in(clip_hidden).flatten(1, 2)  # [B, k*T, dim]
        global_ = self.global_in(id_embeds).reshape(batch, -1, self.config.dim)  # [B, k*id_tokens, dim]
        context = torch.cat([local, global_], dim=1)
        queries = self.queries.expand(batch, -1, -1) + self.identity_to_queries(id_embeds.mean(dim=1))[:, None]
        for attention, feed_forward in self.blocks:
            queries = queries + attention(queries, context)
            queries = queries + feed_forward(queries)
        return self.norm_out(self.proj_out(queries))
