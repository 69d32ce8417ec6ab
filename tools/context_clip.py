"""A reference context-aware CLIP text encoder (BLIP-Diffusion's `ContextCLIPTextModel`), for tests and tools.

The subject embeddings are inserted into the token-embedding sequence before the
position embeddings are added; the rest is the plain SD-1.5 CLIP text transformer.
In ComfyUI the same maths runs inside ComfyUI's own CLIP (see nodes/prompt.py); this
module is the ComfyUI-independent reference the node is tested against, and it gives
tools/make_tiny_model.py the released text encoder's tensor layout. Users never run it.
Parameter names follow transformers' `CLIPTextModel` (`text_model.*`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blip_diffusion_nodes.blip_core.config import dataclass_from
from blip_diffusion_nodes.blip_core.layers import activation, attention, layer_norm, norm_layer
from blip_diffusion_nodes.blip_core.layout import TEXT_ENCODER
from blip_diffusion_nodes.blip_core.loading import load_strict, read_state_dict
from blip_diffusion_nodes.blip_core.prompt import CTX_BEGIN_POS, splice_context


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_json(cls, path: Path) -> TextConfig:
        return dataclass_from(cls, json.loads(Path(path).read_text(encoding="utf-8")))


class TextLayer(nn.Module):
    def __init__(self, cfg: TextConfig, operations, dtype=None, device=None):
        super().__init__()
        dim = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.layer_norm1 = norm_layer(operations, dim, cfg.layer_norm_eps, device)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, operations.Linear(dim, dim, dtype=dtype, device=device))
        self.layer_norm2 = norm_layer(operations, dim, cfg.layer_norm_eps, device)
        self.mlp = nn.Module()
        self.mlp.fc1 = operations.Linear(dim, cfg.intermediate_size, dtype=dtype, device=device)
        self.mlp.fc2 = operations.Linear(cfg.intermediate_size, dim, dtype=dtype, device=device)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        a, h = self.self_attn, layer_norm(self.layer_norm1, x)
        x = x + a.out_proj(attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads, causal_mask))
        h = layer_norm(self.layer_norm2, x)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(h)))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = operations.Embedding(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device
        )
        self.embeddings.position_embedding = operations.Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, device=device
        )
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            TextLayer(cfg, operations, dtype, device) for _ in range(cfg.num_hidden_layers)
        )
        # diffusers builds it with nn.LayerNorm's default eps, whatever the config says
        self.final_layer_norm = norm_layer(operations, cfg.hidden_size, 1e-5, device)

    def forward(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """token embeddings [B,L,D] (context already inserted) -> last hidden state [B,L,D]."""
        length = token_embeds.shape[1]
        positions = torch.arange(length, device=token_embeds.device)
        x = token_embeds + self.embeddings.position_embedding(positions)
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        for layer in self.encoder.layers:
            x = layer(x, causal)
        return layer_norm(self.final_layer_norm, x)


class TextEncoder:
    """CLIP tokenizer + context-aware text transformer."""

    def __init__(self, model: CLIPTextTransformer, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's CLIP tokens without BOS/EOS."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def layout(self, prompt: str, num_context: int, begin: int = CTX_BEGIN_POS) -> list[int | None]:
        """Ids of the 77 positions; None marks where context embeddings go."""
        t = self.tokenizer
        return splice_context(
            self.token_ids(prompt), [None] * num_context, t.bos_token_id, t.eos_token_id, t.pad_token_id, begin
        )

    @torch.no_grad()
    def encode(
        self, prompts: list[str], ctx: torch.Tensor | None = None, ctx_begin_pos: int = CTX_BEGIN_POS
    ) -> torch.Tensor:
        """[B,77,D] hidden states; with `ctx` [B,N,D] the N context embeddings go in at `ctx_begin_pos`."""
        table = self.model.embeddings.token_embedding
        device = table.weight.device
        rows = []
        for i, prompt in enumerate(prompts):
            layout = self.layout(prompt, 0 if ctx is None else ctx.shape[1], ctx_begin_pos)
            ids = torch.tensor([0 if t is None else t for t in layout], device=device)
            embeds = table(ids)
            if ctx is not None:
                slots = torch.tensor([t is None for t in layout], device=device)
                embeds[slots] = ctx[i].to(embeds)
            rows.append(embeds)
        return self.model(torch.stack(rows)).float()


def load_text_encoder(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, operations=nn
) -> TextEncoder:
    """From a BLIP-Diffusion folder: `text_encoder/` (config + weights) and `tokenizer/`."""
    from transformers import CLIPTokenizer

    path = Path(path)
    weights = TEXT_ENCODER.weights_file(path)
    if not (path / "tokenizer").is_dir():
        raise FileNotFoundError(f"{path} has no tokenizer/ folder (vocab.json, merges.txt)")
    config = TextConfig.from_json(TEXT_ENCODER.config_file(path))
    state_dict = read_state_dict(weights)
    state_dict = {k[len("text_model.") :]: v for k, v in state_dict.items() if k.startswith("text_model.")}
    state_dict.pop("embeddings.position_ids", None)
    with torch.device("meta"):
        model = CLIPTextTransformer(config, operations, dtype)
    load_strict(model, state_dict, weights, device)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    return TextEncoder(model, tokenizer)
