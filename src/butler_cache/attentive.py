"""`AttentivePredictor`: the first-generation TokenButler predictor.

Reads the hidden state entering layer 0, projects it down, runs one small causal self-attention block
(RoPE) and a feed-forward, adds the result back at full width, and emits with two MLPs an importance
query and an importance key for every (sparse layer, query head, token), RoPE applied in ``d'`` dims.

At decode time its self-attention needs the K/V of its own past tokens: the cache keeps them in the
predictor state (`new_state`), cropped, reordered and selected with the model's K/V, so that decoding
token by token gives exactly what the teacher-forced pass gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compat import DynamicLayer
from .config import ButlerConfig
from .growth import GrowingLayer
from .predictor import ButlerPredictor, Importance, LayerInput
from .selection import validity_from_padding


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, H, T, E]`` at ``positions`` ``[B or 1, T]`` (half-split convention)."""
    E = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, E, 2, device=x.device, dtype=torch.float32) / E)  # [E/2]
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # [B, 1, T, E/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(x.dtype), torch.cat([angles.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class AttentivePredictor(ButlerPredictor):
    """First-generation predictor: a small causal self-attention over layer-0 hidden states."""

    predictor_type = "attentive"

    def __init__(self, config: ButlerConfig):
        super().__init__(config)
        shape = config.base_model
        D, d, inter = shape.hidden_size, config.attentive_hidden_size, config.intermediate_size
        out = len(config.sparse_layers) * shape.num_attention_heads * config.importance_dim
        self.norm = nn.LayerNorm(D)
        self.down = nn.Linear(D, d)
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.up = nn.Linear(d, D)
        self.query_head = nn.Sequential(nn.Linear(D, inter), nn.SiLU(), nn.Linear(inter, out))
        self.key_head = nn.Sequential(nn.Linear(D, inter), nn.SiLU(), nn.Linear(inter, out))

    @property
    def producer_layers(self) -> tuple[int, ...]:
        return (0,)

    @property
    def key_heads(self) -> int:
        return self.config.base_model.num_attention_heads

    def new_state(self) -> DynamicLayer:
        return GrowingLayer()  # the self-attention block's K/V, [B, heads, L, d / heads] (empty again after a reset)

    def produce(
        self, layer_idx: int, inputs: LayerInput, state: DynamicLayer | None = None, *, backend: str = "torch"
    ) -> dict[int, Importance]:
        # no compiled producer: every backend runs these modules
        if layer_idx != 0:
            return {}
        cfg, shape = self.config, self.config.base_model
        x = inputs.hidden_states.to(self.down.weight.dtype)  # [B, T, D]
        B, T, _ = x.shape
        past = state.get_seq_length() if state is not None else 0
        positions = inputs.position_ids if inputs.position_ids is not None else torch.arange(past, past + T, device=x.device)[None]
        positions = positions[:, -T:]

        h = self.down(self.norm(x))  # [B, T, d]
        heads = cfg.attentive_num_heads
        q, k, v = self.qkv(self.attn_norm(h)).view(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, dh]
        q, k = rotate(q, positions, cfg.rope_theta), rotate(k, positions, cfg.rope_theta)
        if state is not None:
            k, v = state.update(k, v)  # [B, h, past + T, dh]
        valid = validity_from_padding(inputs.key_padding, T, k.shape[2], x.device)  # [B|1, 1, T, L]
        valid = valid | ~valid.any(dim=-1, keepdim=True)  # padding queries: attend anywhere, stay finite
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=valid)  # [B, h, T, dh]
        h = h + self.out(a.transpose(1, 2).reshape(B, T, -1))
        h = h + self.ffn(self.ffn_norm(h))
        z = x + self.up(h)  # [B, T, D]

        n, HQ, E = len(cfg.sparse_layers), shape.num_attention_heads, cfg.importance_dim
        iq = self.query_head(z).view(B, T, n * HQ, E).transpose(1, 2)  # [B, n*HQ, T, E]
        ik = self.key_head(z).view(B, T, n * HQ, E).transpose(1, 2)
        iq = rotate(iq, positions, cfg.rope_theta).view(B, n, HQ, T, E)
        ik = rotate(ik, positions, cfg.rope_theta).view(B, n, HQ, T, E)
        return {layer: Importance(iq[:, i], ik[:, i]) for i, layer in enumerate(cfg.sparse_layers)}
