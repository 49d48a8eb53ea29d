"""Encoder: a Hugging Face backbone + mask-aware mean pooling (+ optional Dense head, + optional L2 norm).

Models are saved in the sentence-transformers folder layout (the HF backbone at the root, plus modules.json,
1_Pooling/, 2_Dense/, ...), so that sentence-transformers, MTEB and embedding servers read what we write;
`Encoder.from_pretrained` reads that layout or a plain HF model folder, from a local path or a hub id.
"""

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

ACTIVATIONS = {"tanh": nn.Tanh, "identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}
ST_ACTIVATION_NAMES = {"tanh": "torch.nn.modules.activation.Tanh", "identity": "torch.nn.modules.linear.Identity",
                       "relu": "torch.nn.modules.activation.ReLU", "gelu": "torch.nn.modules.activation.GELU"}
ST_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")


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
        if isinstance(texts, str):
            raise TypeError("encode expects a list of texts, got a single string")
        if truncate_dim is not None and not 0 < truncate_dim <= self.embedding_dim:
            raise ValueError(f"truncate_dim: must be in 1..{self.embedding_dim}, got {truncate_dim}")
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

    # --- the sentence-transformers folder layout -------------------------------------------------------------

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
        modules = _read_json(name_or_path, "modules.json")
        st = _read_json(name_or_path, "sentence_bert_config.json") or {}
        dense, activation, has_normalize, subfolder = None, dense_activation, False, ""
        for module in modules or []:
            kind = _module_kind(module, name_or_path)
            if kind == "Transformer":
                subfolder = module.get("path", "")  # "" (backbone at the root) or "0_Transformer"
            elif kind == "Pooling":
                _check_mean_pooling(_read_json(name_or_path, f"{module['path']}/config.json") or {}, name_or_path)
            elif kind == "Dense":
                dense, activation = _load_dense(name_or_path, module["path"])
            elif kind == "Normalize":
                has_normalize = True
        if subfolder and not st:
            st = _read_json(name_or_path, f"{subfolder}/sentence_bert_config.json") or {}
        backbone = AutoModel.from_pretrained(name_or_path, subfolder=subfolder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder=subfolder)
        if dense_dim is not None:
            if dense is not None:
                raise ValueError(f"model.dense_dim: {name_or_path} already has a Dense head "
                                 f"({dense.in_features}->{dense.out_features})")
            dense = nn.Linear(backbone.config.hidden_size, dense_dim)
        if max_seq_length is None:
            max_seq_length = st.get("max_seq_length") or min(512, getattr(tokenizer, "model_max_length", 512))
        if normalize is None:
            normalize = has_normalize if modules else True
        encoder = cls(backbone, tokenizer, max_seq_length, normalize, dense, activation)
        return encoder.to(dtype).eval()  # like transformers: loaded models start in eval mode

    def save(self, path: str, matryoshka_dims: list[int] | None = None) -> None:
        """Write the sentence-transformers layout: backbone + tokenizer at the root, module configs beside."""
        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        hidden = self.backbone.config.hidden_size
        _write_json(os.path.join(path, "1_Pooling", "config.json"), {
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True})
        if self.dense is not None:
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
            _write_json(os.path.join(path, "2_Dense", "config.json"), {
                "in_features": self.dense.in_features, "out_features": self.dense.out_features,
                "bias": self.dense.bias is not None,
                "activation_function": ST_ACTIVATION_NAMES[self.dense_activation]})
            weights = {f"linear.{k}": v.detach().float().contiguous().cpu() for k, v in self.dense.state_dict().items()}
            save_file(weights, os.path.join(path, "2_Dense", "model.safetensors"), metadata={"format": "pt"})
        if self.normalize:
            idx = len(modules)
            modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        _write_json(os.path.join(path, "modules.json"), modules)
        _write_json(os.path.join(path, "sentence_bert_config.json"),
                    {"max_seq_length": self.max_seq_length, "do_lower_case": False})
        _write_json(os.path.join(path, "config_sentence_transformers.json"), {
            "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
            "matryoshka_dims": sorted(matryoshka_dims, reverse=True) if matryoshka_dims else None})

    load = from_pretrained  # Encoder.load(dir) reads what Encoder.save(dir) wrote


def _module_kind(module: dict, name_or_path: str) -> str:
    kind = module.get("type", "").rsplit(".", 1)[-1]
    if not module.get("type", "").startswith("sentence_transformers.") or kind not in ST_MODULE_KINDS:
        raise ValueError(f"{name_or_path}/modules.json: module {module.get('type')!r} (path {module.get('path')!r}) "
                         f"cannot run in mrl, which supports {', '.join(ST_MODULE_KINDS)}")
    if kind == "Transformer" and module.get("path") not in ("", "0_Transformer"):
        raise ValueError(f"{name_or_path}/modules.json: the Transformer must sit at the folder's root, "
                         f"got path {module.get('path')!r}")
    return kind


def _check_mean_pooling(config: dict, name_or_path: str) -> None:
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
    if "pooling_mode" in config:  # sentence-transformers >= 6 writes {"pooling_mode": "mean"}
        modes = ["pooling_mode_mean_tokens" if config["pooling_mode"] == "mean" else f"pooling_mode={config['pooling_mode']}"]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{name_or_path}: its Pooling module asks for {modes or 'no pooling'}; mrl implements "
                         "mean pooling (pooling_mode_mean_tokens) only")


def _load_dense(name_or_path: str, subdir: str) -> tuple[nn.Linear, str]:
    config = _read_json(name_or_path, f"{subdir}/config.json")
    names = {v: k for k, v in ST_ACTIVATION_NAMES.items()}
    activation_name = config.get("activation_function", ST_ACTIVATION_NAMES["tanh"])
    if activation_name not in names:
        raise ValueError(f"{name_or_path}/{subdir}: activation {activation_name!r} is not one of {sorted(names)}")
    dense = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    weights_file = _fetch(name_or_path, f"{subdir}/model.safetensors")
    if weights_file is not None:
        state = load_file(weights_file)
    else:
        bin_file = _fetch(name_or_path, f"{subdir}/pytorch_model.bin")
        if bin_file is None:
            raise FileNotFoundError(f"{name_or_path}/{subdir}: no model.safetensors or pytorch_model.bin")
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
    dense.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return dense, names[activation_name]


def _fetch(name_or_path: str, filename: str) -> str | None:
    """Local path of `filename` inside a model folder or hub repo, or None if the model has no such file."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        return hf_hub_download(name_or_path, filename)
    except EntryNotFoundError:
        return None


def _read_json(name_or_path: str, filename: str):
    path = _fetch(name_or_path, filename)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
