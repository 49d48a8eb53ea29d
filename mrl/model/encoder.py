"""Encoder: a Hugging Face backbone + pooling (mean, CLS or last token) (+ optional Dense head, + optional L2 norm),
with named prompts.

Models are saved in the sentence-transformers folder layout (the HF backbone at the root, plus modules.json,
1_Pooling/, 2_Dense/, ...; mrl.model.folder), so that sentence-transformers, MTEB and embedding servers read what
we write; `Encoder.from_pretrained` reads that layout or a plain HF model folder, from a local path or a hub id.
Encoders (BERT, MPNet, ...) and decoder LLMs (Qwen3, Llama, ...) alike load through AutoModel.
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from mrl.model.lora import add_lora, backbone_to_save
from mrl.model.pooling import check_pooling, mean_pool, pool  # noqa: F401  (mean_pool: part of the public API)
from mrl.model.folder import ACTIVATIONS, Layout, read_layout, write_layout


class Encoder(nn.Module):
    """Text -> embedding.  forward(features) = normalize?( dense?( pool(backbone(features)) ) ).

    backbone: any transformers AutoModel; tokenizer: its tokenizer; dense: an optional projection head
    (nn.Linear + activation, as in the reduced-dim recipe); normalize: whether the model's output is L2
    normalised (saved as a Normalize module); pooling: mean | cls | lasttoken (mrl.model.pooling); prompts: named
    prompt texts (e.g. {"query": "query: "}), prepended to a text before tokenising; include_prompt=False
    leaves a prompt's tokens out of the pooled embedding; name_or_path: where it was loaded from (a local copy,
    for a mirrored hub id); lora_save: with LoRA adapters on the backbone (mrl.model.lora), whether save() writes
    them merged into the weights ("merged") or the adapter alone ("adapter").
    """

    def __init__(self, backbone: nn.Module, tokenizer, max_seq_length: int = 256, normalize: bool = True,
                 dense: nn.Linear | None = None, dense_activation: str = "tanh", pooling: str = "mean",
                 include_prompt: bool = True, prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None, name_or_path: str | None = None,
                 lora_save: str = "merged"):
        super().__init__()
        if dense_activation not in ACTIVATIONS:
            raise ValueError(f"dense_activation: expected one of {sorted(ACTIVATIONS)}, got {dense_activation!r}")
        check_pooling(pooling)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.normalize = normalize
        self.dense = dense
        self.dense_activation = dense_activation
        self.activation = ACTIVATIONS[dense_activation]() if dense is not None else None
        self.pooling, self.include_prompt = pooling, include_prompt
        self.prompts, self.default_prompt_name = dict(prompts or {}), default_prompt_name
        self.name_or_path, self.lora_save = name_or_path, lora_save
        # A backbone's own pooler head (BERT's [CLS] dense + tanh) is not part of the embedding: frozen, so it is
        # kept for saving but never trained, and DDP finds no parameter without a gradient.
        if isinstance(getattr(backbone, "pooler", None), nn.Module):
            backbone.pooler.requires_grad_(False)

    @property
    def embedding_dim(self) -> int:
        return self.dense.out_features if self.dense is not None else self.backbone.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.backbone.config.num_hidden_layers

    def prompt_text(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The text to prepend: `prompt` itself, or the named prompt (default: default_prompt_name, if any)."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        name = prompt_name if prompt is None else None
        if prompt is None and name is None:
            name = self.default_prompt_name
        if name is not None and name not in self.prompts:
            raise ValueError(f"prompt_name: {name!r} is not one of the model's prompts {sorted(self.prompts)}")
        return self.prompts[name] if name is not None else prompt

    def column_prompts(self, prompts: dict[str, str] | None) -> tuple[dict[str, str], dict[str, int]]:
        """{column: a prompt name or text} -> ({column: text}, {column: its tokens}), for mrl.data.Collator."""
        texts = {column: self.prompts.get(value, value) for column, value in (prompts or {}).items()}
        return texts, {column: self.prompt_length(text) for column, text in texts.items()}

    def prompt_length(self, prompt: str) -> int:
        """How many tokens `prompt` adds at the start of a text, as sentence-transformers counts them: the prompt
        tokenised alone, less a trailing special token (the [SEP] or EOS the tokenizer closes every text with)."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.max_seq_length)["input_ids"]
        return len(ids) - (len(ids) > 0 and ids[-1] in self.tokenizer.all_special_ids)

    def tokenize(self, texts: list[str], prompt: str | None = None) -> dict[str, Tensor]:
        """Dynamic padding (on the tokenizer's side): pad to the longest text of this batch, truncate at
        max_seq_length; with a prompt, it is prepended to every text and `prompt_length` says how many tokens
        it took."""
        features = dict(self.tokenizer([(prompt or "") + t for t in texts], padding=True, truncation=True,
                                       max_length=self.max_seq_length, return_tensors="pt"))
        if prompt:
            features["prompt_length"] = torch.full((len(texts),), self.prompt_length(prompt))
        return features

    def forward(self, features: dict[str, Tensor], all_layers: bool = False) -> Tensor:
        """(B, D) embeddings; with all_layers, (B, L, D): [:, l-1] is the embedding of the first l of the
        backbone's L layers (2D Matryoshka), [:, -1] the usual one. features: the tokenizer's tensors, and
        optionally `prompt_length` (B,), the prompt tokens each text starts with."""
        features = dict(features)
        prompt_length = features.pop("prompt_length", None)
        prompt_length = None if self.include_prompt else prompt_length
        mask = features["attention_mask"]
        if not all_layers:
            token_embeddings = self.backbone(**features).last_hidden_state  # (B, T, H)
            return self._head(pool(token_embeddings, mask, self.pooling, prompt_length))  # (B, D)
        outputs = self.backbone(**features, output_hidden_states=True)
        hidden_states = [*outputs.hidden_states[1:-1], outputs.last_hidden_state]  # L × (B, T, H); the last as
        pooled = [pool(h, mask, self.pooling, prompt_length) for h in hidden_states]  # forward() sees it (final norms)
        return self._head(torch.stack(pooled, dim=1))  # (B, L, D)

    def _head(self, x: Tensor) -> Tensor:
        if self.dense is not None:
            x = self.activation(self.dense(x))  # (..., D)
        return F.normalize(x, dim=-1) if self.normalize else x

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, truncate_dim: int | None = None, normalize: bool = True,
               show_progress: bool = False, n_layers: int | None = None, layer_norm: bool = False,
               prompt: str | None = None, prompt_name: str | None = None) -> Tensor:
        """Embed `texts` -> float32 (N, truncate_dim or embedding_dim) tensor on the CPU, in input order.

        prompt: a text to prepend to every text; prompt_name: one of the model's named prompts (default: its
        default_prompt_name, if it has one), as sentence-transformers' encode takes them.

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
        prompt = self.prompt_text(prompt, prompt_name)
        was_training, device = self.training, next(self.parameters()).device
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not show_progress):
            features = self.tokenize([texts[i] for i in order[start:start + batch_size]], prompt)
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

    # --- the sentence-transformers folder layout (mrl.model.folder) ---------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, max_seq_length: int | None = None, normalize: bool | None = None,
                        dense_dim: int | None = None, dense_activation: str = "tanh",
                        dtype: torch.dtype = torch.float32, pooling: str | None = None,
                        include_prompt: bool | None = None, prompts: dict[str, str] | None = None,
                        append_eos: bool = False, gradient_checkpointing: bool = False, lora=None) -> "Encoder":
        """Load a sentence-transformers folder or a plain HF model (local directory or hub id).

        A sentence-transformers model brings its own pooling, prompts, Dense head, normalisation and
        max_seq_length; explicit arguments override them (`prompts` are added to the model's). A plain HF model
        gets mean pooling and normalisation. `dense_dim` adds a new, randomly initialised projection head to a
        model that has none (the reduced-dim recipe). append_eos=True makes the tokenizer end every text with
        its EOS token (last-token pooling of a decoder whose tokenizer does not), in the saved tokenizer too.
        Only Pooling, Dense and Normalize modules can run here: any other module in modules.json is an error
        that names it. gradient_checkpointing=True recomputes each layer's activations in the backward
        (checkpoint_activations); lora: a LoRA setting (r, alpha, dropout, target_modules, save; as
        mrl.run.config.LoraConfig) puts trainable adapters on the backbone, whose own weights then stay frozen.
        """
        layout = read_layout(name_or_path)
        backbone = AutoModel.from_pretrained(name_or_path, subfolder=layout.subfolder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder=layout.subfolder)
        if len(tokenizer) * 10 < backbone.config.vocab_size:  # transformers builds one without a vocabulary
            raise ValueError(f"{name_or_path}: its tokenizer knows {len(tokenizer)} tokens, its model "
                             f"{backbone.config.vocab_size}: are its tokenizer files missing (tokenizer.json, "
                             f"tokenizer_config.json, vocab.txt, ...)? Every word would be [UNK]")
        if tokenizer.pad_token is None:  # decoder LLMs: padding is masked, so any token serves; theirs is EOS
            tokenizer.pad_token = tokenizer.eos_token
        if append_eos:
            append_eos_token(tokenizer)
        dense, activation = layout.dense, layout.dense_activation or dense_activation
        if dense_dim is not None:
            if dense is not None:
                raise ValueError(f"model.dense_dim: {name_or_path} already has a Dense head "
                                 f"({dense.in_features}->{dense.out_features})")
            dense = nn.Linear(backbone.config.hidden_size, dense_dim)
        if max_seq_length is None:
            max_seq_length = layout.max_seq_length or min(512, getattr(tokenizer, "model_max_length", 512))
        backbone.to(dtype)  # every module, also those transformers keeps in float32
        if dense is not None:
            dense.to(dtype)
        if gradient_checkpointing:
            checkpoint_activations(backbone)
        if lora is not None:  # the adapters stay float32 on a half-precision backbone (peft's default)
            backbone = add_lora(backbone, lora)
        return cls(backbone, tokenizer, max_seq_length, layout.normalize if normalize is None else normalize, dense,
                   activation, pooling or layout.pooling, layout.include_prompt if include_prompt is None else
                   include_prompt, {**layout.prompts, **(prompts or {})}, layout.default_prompt_name,
                   name_or_path, "merged" if lora is None else lora.save).eval()  # like transformers: eval mode

    def save(self, path: str, matryoshka_dims: list[int] | None = None, lora_save: str | None = None) -> None:
        """Write the sentence-transformers layout: backbone + tokenizer at the root, module configs beside.
        lora_save: "merged" or "adapter", for this save only (default: the Encoder's lora_save)."""
        os.makedirs(path, exist_ok=True)
        backbone_to_save(self.backbone, lora_save or self.lora_save).save_pretrained(path)  # LoRA: merged, or alone
        self.tokenizer.save_pretrained(path)
        write_layout(path, self.backbone.config.hidden_size, self.max_seq_length, self.normalize, self.dense,
                     self.dense_activation, matryoshka_dims,
                     Layout(pooling=self.pooling, include_prompt=self.include_prompt, prompts=self.prompts,
                            default_prompt_name=self.default_prompt_name))

    load = from_pretrained  # Encoder.load(dir) reads what Encoder.save(dir) wrote


def checkpoint_activations(backbone: nn.Module) -> None:
    """Gradient (activation) checkpointing: each layer's activations are recomputed in the backward instead of
    kept (less memory, about a third more compute); non-reentrant, so dropout replays its masks."""
    enable = getattr(backbone, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def append_eos_token(tokenizer) -> None:
    """Make a fast tokenizer end every text with its EOS token, unless it already ends texts with a special token:
    a step added to its post-processor, which tokenizer.json saves, so sentence-transformers tokenizes the saved
    model alike."""
    if tokenizer.eos_token is None:
        raise ValueError("model.append_eos: the tokenizer has no EOS token")
    if tokenizer("a")["input_ids"][-1] in tokenizer.all_special_ids:  # it ends texts with a special token already
        return  # (Qwen3-Embedding's ends them with <|endoftext|>, while its eos_token is <|im_end|>)
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("model.append_eos: needs a fast tokenizer (tokenizer.json)")
    eos = tokenizer.eos_token
    template = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                             special_tokens=[(eos, tokenizer.eos_token_id)])
    backend.post_processor = (processors.Sequence([backend.post_processor, template]) if backend.post_processor
                              else template)
