"""Encoder: a Hugging Face backbone + mask-aware mean pooling (+ optional Dense head, + optional L2 norm).

Models are saved in the sentence-transformers folder layout (the HF backbone at the root, plus modules.json,
1_Pooling/, 2_Dense/, ...; mrl.st_format), so that sentence-transformers, MTEB and embedding servers read what
we write; `Encoder.from_pretrained` reads that layout or a plain HF model folder, from a local path or a hub id.
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from .st_format import ACTIVATIONS, read_layout, write_layout


def mean_pool(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token embeddings over real tokens only.  (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)  # (B, T, 1): padding contributes 0
    return (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class Encoder(nn.Module):
    """Text -> embedding.  forward(features) = normalize?( dense?( mean_pool(backbone(features)) ) ).

    backbone: any transformers AutoModel; tokenizer: its tokenizer; dense: an optional projection head
    (nn.Linear + activation, as in the reduced-dim recipe); normalize: whether the model's output is L2
    normalised (saved as a Normalize module).
    """

    def __init__(self, backbone: nn.Module, tokenizer, max_seq_length: int = 256, normalize: bool = True,
                 dense: nn.Linear | None = None, dense_activation: str = "tanh"):
        super().__init__()
        if dense_activation not in ACTIVATIONS:
            raise ValueError(f"dense_activation: expected one of {sorted(ACTIVATIONS)}, got {dense_activation!r}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.normalize = normalize
        self.dense = dense
        self.dense_activation = dense_activation
        self.activation = ACTIVATIONS[dense_activation]() if dense is not None else None
        # A backbone's own pooler head (BERT's [CLS] dense + tanh) has no part in a mean-pooled embedding: frozen,
        # so it is kept for saving but never trained, and DDP finds no parameter without a gradient.
        if isinstance(getattr(backbone, "pooler", None), nn.Module):
            backbone.pooler.requires_grad_(False)

    @property
    def embedding_dim(self) -> int:
        return self.dense.out_features if self.dense is not None else self.backbone.config.hidden_size

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Dynamic padding: pad to the longest text of this batch, truncate at max_seq_length."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_seq_length,
                              return_tensors="pt")

    @property
    def num_layers(self) -> int:
        return self.backbone.config.num_hidden_layers

    def forward(self, features: dict[str, Tensor], all_layers: bool = False) -> Tensor:
        """(B, D) embeddings; with all_layers, (B, L, D): [:, l-1] is the embedding of the first l of the
        backbone's L layers (2D Matryoshka), [:, -1] the usual one."""
        if not all_layers:
            token_embeddings = self.backbone(**features).last_hidden_state  # (B, T, H)
            return self._head(mean_pool(token_embeddings, features["attention_mask"]))  # (B, D)
        outputs = self.backbone(**features, output_hidden_states=True)
        hidden_states = [*outputs.hidden_states[1:-1], outputs.last_hidden_state]  # L × (B, T, H); the last as
        pooled = [mean_pool(h, features["attention_mask"]) for h in hidden_states]  # forward() sees it (final norms)
        return self._head(torch.stack(pooled, dim=1))  # (B, L, D)

    def _head(self, x: Tensor) -> Tensor:
        if self.dense is not None:
            x = self.activation(self.dense(x))  # (..., D)
        return F.normalize(x, dim=-1) if self.normalize else x

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, truncate_dim: int | None = None, normalize: bool = True,
               show_progress: bool = False, n_layers: int | None = None, layer_norm: bool = False) -> Tensor:
        """Embed `texts` -> float32 (N, truncate_dim or embedding_dim) tensor on the CPU, in input order.

        Texts are batched longest first (less padding), then put back in input order. Truncation to the
        first `truncate_dim` dims happens before the (re-)normalisation, so a truncated embedding is unit-length
        when normalize=True. n_layers=k embeds with the output of the backbone's first k layers (for models
        trained with 2D Matryoshka); default: all layers. layer_norm=True applies a (parameter-free) layer norm
        over the full width before truncating, as some published Matryoshka models were trained; layer norm
        ignores the scale, so it is the same before or after the model's own normalisation.
        """
        if isinstance(texts, str) or texts is None:
            raise TypeError(f"encode expects a list of texts, got {type(texts).__name__}")
        not_text = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if not_text is not None:
            raise TypeError(f"texts[{not_text}]: expected a string, got {texts[not_text]!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 0 < truncate_dim <= self.embedding_dim):
            raise ValueError(f"truncate_dim: expected an integer in 1..{self.embedding_dim}, got {truncate_dim!r}")
        if n_layers is not None and not 0 < n_layers <= self.num_layers:
            raise ValueError(f"n_layers: must be in 1..{self.num_layers}, got {n_layers}")
        was_training, device = self.training, next(self.parameters()).device
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not show_progress):
            features = self.tokenize([texts[i] for i in order[start:start + batch_size]])
            features = {k: v.to(device) for k, v in features.items()}
            embeddings = self(features) if n_layers is None else self(features, all_layers=True)[:, n_layers - 1]
            chunks.append(embeddings.float().cpu())
        self.train(was_training)
        if not chunks:
            return torch.empty(0, truncate_dim or self.embedding_dim)
        sorted_embeddings = torch.cat(chunks)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[torch.tensor(order)] = sorted_embeddings  # undo the length sort
        if layer_norm:
            embeddings = F.layer_norm(embeddings, embeddings.shape[-1:])
        embeddings = embeddings[:, :truncate_dim]
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    # --- the sentence-transformers folder layout (mrl.st_format) ---------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, max_seq_length: int | None = None, normalize: bool | None = None,
                        dense_dim: int | None = None, dense_activation: str = "tanh",
                        dtype: torch.dtype = torch.float32) -> "Encoder":
        """Load a sentence-transformers folder or a plain HF model (local directory or hub id).

        A sentence-transformers model brings its own pooling, Dense head, normalisation and max_seq_length;
        explicit arguments override the last two. `dense_dim` adds a new, randomly initialised projection head
        to a model that has none (the reduced-dim recipe). Only mean pooling, Dense and Normalize modules can
        run here: any other module in modules.json is an error that names it.
        """
        layout = read_layout(name_or_path)
        backbone = AutoModel.from_pretrained(name_or_path, subfolder=layout.subfolder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder=layout.subfolder)
        if len(tokenizer) * 10 < backbone.config.vocab_size:  # transformers builds one without a vocabulary
            raise ValueError(f"{name_or_path}: its tokenizer knows {len(tokenizer)} tokens, its model "
                             f"{backbone.config.vocab_size}: are its tokenizer files missing (tokenizer.json, "
                             f"tokenizer_config.json, vocab.txt, ...)? Every word would be [UNK]")
        dense, activation = layout.dense, layout.dense_activation or dense_activation
        if dense_dim is not None:
            if dense is not None:
                raise ValueError(f"model.dense_dim: {name_or_path} already has a Dense head "
                                 f"({dense.in_features}->{dense.out_features})")
            dense = nn.Linear(backbone.config.hidden_size, dense_dim)
        if max_seq_length is None:
            max_seq_length = layout.max_seq_length or min(512, getattr(tokenizer, "model_max_length", 512))
        if normalize is None:
            normalize = layout.normalize
        encoder = cls(backbone, tokenizer, max_seq_length, normalize, dense, activation)
        encoder.name_or_path = name_or_path  # where it was loaded from (a local copy, for a mirrored hub id)
        return encoder.to(dtype).eval()  # like transformers: loaded models start in eval mode

    def save(self, path: str, matryoshka_dims: list[int] | None = None) -> None:
        """Write the sentence-transformers layout: backbone + tokenizer at the root, module configs beside."""
        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        write_layout(path, self.backbone.config.hidden_size, self.max_seq_length, self.normalize, self.dense,
                     self.dense_activation, matryoshka_dims)

    load = from_pretrained  # Encoder.load(dir) reads what Encoder.save(dir) wrote
