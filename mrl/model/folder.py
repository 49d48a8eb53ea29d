"""The sentence-transformers folder layout, read and written with our own code (sentence-transformers is never
imported): the Hugging Face backbone and tokenizer at the folder's root (or in 0_Transformer/), modules.json
listing the modules, 1_Pooling/config.json (the pooling mode, in the older pooling_mode_* flags or the newer
pooling_mode field, and include_prompt), 2_Dense/ (config and weights) when there is a projection head, a
Normalize module, sentence_bert_config.json (max_seq_length) and config_sentence_transformers.json
(similarity function, prompts, the Matryoshka dims). Folders or hub ids.

The Matryoshka dims also go into the backbone's config.json as `matryoshka_dimensions` (and `is_matryoshka`):
config_sentence_transformers.json's `matryoshka_dims` is read by no embedding server, while vLLM accepts an
OpenAI-style `dimensions` request only for a config.json with one of those keys (and only a listed dim).
"""

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mrl.model.pooling import POOLING_MODES

ACTIVATIONS = {"tanh": nn.Tanh, "identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}
ST_ACTIVATION_NAMES = {"tanh": "torch.nn.modules.activation.Tanh", "identity": "torch.nn.modules.linear.Identity",
                       "relu": "torch.nn.modules.activation.ReLU", "gelu": "torch.nn.modules.activation.GELU"}
ST_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")
LEGACY_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",  # flag -> mode
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass
class Layout:
    """What a model folder says beyond its backbone."""
    subfolder: str = ""  # where the backbone is: "" (the root) or "0_Transformer"
    max_seq_length: int | None = None  # sentence_bert_config.json's, if any
    dense: nn.Linear | None = None  # the projection head, loaded
    dense_activation: str | None = None  # its activation, a key of ACTIVATIONS
    normalize: bool = True  # a Normalize module (a plain HF folder, with no modules.json: True)
    pooling: str = "mean"  # a mode of mrl.model.pooling.POOLING_MODES
    include_prompt: bool = True  # False: a prompt's tokens are left out of the pooled embedding
    prompts: dict = field(default_factory=dict)  # named prompts, e.g. {"query": "query: "}
    default_prompt_name: str | None = None


def read_layout(name_or_path: str) -> Layout:
    """The modules of a sentence-transformers folder, or the defaults for a plain HF model. Only Pooling (mean,
    cls, lasttoken), Dense and Normalize can run in mrl: any other module or mode is an error naming it."""
    modules = _read_json(name_or_path, "modules.json")
    st = _read_json(name_or_path, "sentence_bert_config.json") or {}
    layout = Layout(normalize=not modules)
    for module in modules or []:
        kind = _module_kind(module, name_or_path)
        if kind == "Transformer":
            layout.subfolder = module.get("path", "")
        elif kind == "Pooling":
            config = _read_json(name_or_path, f"{module['path']}/config.json") or {}
            layout.pooling = pooling_mode(config, name_or_path)
            layout.include_prompt = config.get("include_prompt", True)
        elif kind == "Dense":
            layout.dense, layout.dense_activation = _load_dense(name_or_path, module["path"])
        elif kind == "Normalize":
            layout.normalize = True
    if layout.subfolder and not st:
        st = _read_json(name_or_path, f"{layout.subfolder}/sentence_bert_config.json") or {}
    layout.max_seq_length = st.get("max_seq_length")
    sentence_transformers = _read_json(name_or_path, "config_sentence_transformers.json") or {}
    layout.prompts = sentence_transformers.get("prompts") or {}
    layout.default_prompt_name = sentence_transformers.get("default_prompt_name")
    return layout


def write_layout(path: str, hidden_size: int, max_seq_length: int, normalize: bool, dense: nn.Linear | None,
                 dense_activation: str, matryoshka_dims: list[int] | None, layout: Layout) -> None:
    """Every file of the layout except the backbone's and the tokenizer's (Encoder.save writes those); the
    pooling, prompts and default prompt come from `layout`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    flags = {flag: mode == layout.pooling for flag, mode in LEGACY_POOLING_FLAGS.items()}  # what older readers read
    _write_json(os.path.join(path, "1_Pooling", "config.json"), {
        "word_embedding_dimension": hidden_size, **flags, "pooling_mode": layout.pooling,
        "include_prompt": layout.include_prompt})
    if dense is not None:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        _write_json(os.path.join(path, "2_Dense", "config.json"), {
            "in_features": dense.in_features, "out_features": dense.out_features, "bias": dense.bias is not None,
            "activation_function": ST_ACTIVATION_NAMES[dense_activation]})
        weights = {f"linear.{k}": v.detach().float().contiguous().cpu() for k, v in dense.state_dict().items()}
        save_file(weights, os.path.join(path, "2_Dense", "model.safetensors"), metadata={"format": "pt"})
    if normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(os.path.join(path, "modules.json"), modules)
    _write_json(os.path.join(path, "sentence_bert_config.json"), {"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False})
    dims = sorted(matryoshka_dims, reverse=True) if matryoshka_dims else None
    _write_json(os.path.join(path, "config_sentence_transformers.json"), {
        "prompts": layout.prompts, "default_prompt_name": layout.default_prompt_name, "similarity_fn_name": "cosine",
        "matryoshka_dims": dims})
    write_matryoshka_config(path, dims)


SERVER_MATRYOSHKA_KEYS = ("matryoshka_dimensions", "is_matryoshka")  # what vLLM reads in config.json


def write_matryoshka_config(path: str, dims: list[int] | None) -> None:
    """Add the dims to the backbone's config.json (largest first), or remove stale ones when there are none: a
    model loaded from a Matryoshka folder carries the keys in its config, and must not claim them unless saved
    with dims. A LoRA adapter saved alone has no config.json (its base model's serves): nothing to write."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    for key in SERVER_MATRYOSHKA_KEYS:
        config.pop(key, None)
    if dims:
        config.update(matryoshka_dimensions=dims, is_matryoshka=True)
    _write_json(config_path, config)


def _module_kind(module: dict, name_or_path: str) -> str:
    kind = module.get("type", "").rsplit(".", 1)[-1]
    if not module.get("type", "").startswith("sentence_transformers.") or kind not in ST_MODULE_KINDS:
        raise ValueError(f"{name_or_path}/modules.json: module {module.get('type')!r} (path {module.get('path')!r}) "
                         f"cannot run in mrl, which supports {', '.join(ST_MODULE_KINDS)}")
    if kind == "Transformer" and module.get("path") not in ("", "0_Transformer"):
        raise ValueError(f"{name_or_path}/modules.json: the Transformer must sit at the folder's root, "
                         f"got path {module.get('path')!r}")
    return kind


def pooling_mode(config: dict, name_or_path: str) -> str:
    """The one pooling mode of a Pooling config (the newer `pooling_mode` field, else the older flags), or an
    error naming what mrl cannot run (max, weighted mean, several modes at once)."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"] if isinstance(config["pooling_mode"], list) else [config["pooling_mode"]]
    else:
        modes = [mode for flag, mode in LEGACY_POOLING_FLAGS.items() if config.get(flag)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"{name_or_path}: its Pooling module asks for {' + '.join(map(str, modes))}; mrl implements "
                         f"one of {', '.join(POOLING_MODES)}")
    return modes[0]


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
