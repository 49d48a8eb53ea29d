"""Token embeddings -> one embedding per text: mean, CLS or last-token pooling, as sentence-transformers'
Pooling module computes them (its `pooling_mode`), so a model keeps its pooling through mrl and back.

Every mode reads the attention mask, so it holds under right and left padding alike: mean averages the real
tokens; cls takes the first real token; lasttoken the last real token (decoder LLMs, whose last token has
seen the whole text). With a prompt left out of the embedding (include_prompt=False), the first
prompt_length real tokens of each text are masked out first, as sentence-transformers does.
"""

import torch
from torch import Tensor

POOLING_MODES = ("mean", "cls", "lasttoken")


def pool(token_embeddings: Tensor, attention_mask: Tensor, mode: str = "mean",
         prompt_length: Tensor | None = None) -> Tensor:
    """(B, T, H) token embeddings, (B, T) mask -> (B, H); prompt_length (B,): prompt tokens to leave out."""
    if prompt_length is not None:
        attention_mask = exclude_prompt(attention_mask, prompt_length)
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)  # (B, T, 1): padding contributes 0
    if mode == "mean":  # sums in float32 at least, as sentence-transformers sums bf16 and fp16 tokens
        sum_dtype = torch.promote_types(token_embeddings.dtype, torch.float32)
        mean = (token_embeddings * mask).sum(1, dtype=sum_dtype) / mask.sum(1, dtype=sum_dtype).clamp(min=1e-9)
        return mean.to(token_embeddings.dtype)
    if mode == "cls":
        first = attention_mask.to(torch.int).argmax(1)  # the first real token (0 under right padding)
        return token_embeddings[torch.arange(len(first), device=first.device), first]
    if mode == "lasttoken":
        length = attention_mask.shape[1]
        last = length - 1 - attention_mask.to(torch.int).flip(1).argmax(1)  # the last real token, either padding
        return (token_embeddings * mask)[torch.arange(len(last), device=last.device), last]
    check_pooling(mode)


def check_pooling(mode: str) -> None:
    """Raise ValueError unless `mode` is one of POOLING_MODES."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling: expected one of {' | '.join(POOLING_MODES)}, got {mode!r}")


def exclude_prompt(attention_mask: Tensor, prompt_length: Tensor) -> Tensor:
    """The mask with each row's first prompt_length real tokens zeroed (after any left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]  # (1, T)
    start = attention_mask.to(torch.int).argmax(1, keepdim=True)  # (B, 1): where each row's text begins
    return attention_mask * (positions >= start + prompt_length.to(start.device).view(-1, 1))


def mean_pool(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token embeddings over real tokens only.  (B, T, H), (B, T) -> (B, H)."""
    return pool(token_embeddings, attention_mask, "mean")
