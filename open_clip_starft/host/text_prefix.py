"""Exact speed-up: run a causal text tower only as far as the longest caption in the batch.

Captions are padded to the context length (77 for OpenAI CLIP) but class-name captions use ~10
tokens. With a causal attention mask and pooling at the end-of-text token, positions after the
last real token of every caption cannot change any pooled feature, so the text tower can stop at
``max(caption length)``: same features (up to float summation order), a fraction of the FLOPs.

OpenCLIP's ``CLIP.encode_text`` adds the full positional embedding and mask, so it cannot take a
shorter sequence; ``encode_text_prefix`` below is that method with the two slices added (written
here because upstream has no such option; checked equal to upstream's in the tests).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from open_clip import CLIP
from open_clip.transformer import text_global_pool


def supports_prefix(model: torch.nn.Module) -> bool:
    """True for OpenCLIP ``CLIP`` models with a causal text mask and end-of-text pooling."""
    return (isinstance(model, CLIP) and getattr(model, "attn_mask", None) is not None
            and model.text_pool_type in ("argmax", "eos"))


def encode_text_prefix(self: CLIP, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``CLIP.encode_text`` for token ids ``[B, L]`` with any ``L`` ≤ the context length."""
    length = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:length].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def install_prefix_encoding(model: torch.nn.Module) -> bool:
    """Let ``model`` (not yet wrapped in DDP) encode shortened token batches; False if it cannot."""
    if not supports_prefix(model):
        return False
    model.encode_text = types.MethodType(encode_text_prefix, model)
    return True


def has_prefix_encoding(model: torch.nn.Module) -> bool:
    """Whether ``model`` (possibly inside DDP or ``torch.compile``) encodes shortened token batches."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    inner = getattr(inner, "module", inner)
    return getattr(getattr(inner, "encode_text", None), "__func__", None) is encode_text_prefix


def prefix_length(tokens: torch.Tensor, pad_id: int = 0) -> int:
    """1 + the last position holding a non-pad token in any row of ``tokens [B, L]``."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return int(((tokens != pad_id) * positions).max())


def trim_tokens(*batches: torch.Tensor, pad_id: int = 0) -> list[torch.Tensor]:
    """The token batches cut to their common prefix length (only padding is dropped)."""
    length = max(prefix_length(t, pad_id) for t in batches)
    return [t[:, :length] for t in batches]
