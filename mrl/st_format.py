"""The sentence-transformers folder layout, read and written with our own code (sentence-transformers is never
imported): the Hugging Face backbone and tokenizer at the folder's root (or in 0_Transformer/), modules.json
listing the modules, 1_Pooling/config.json, 2_Dense/ (config and weights) when there is a projection head,
a Normalize module, sentence_bert_config.json (max_seq_length) and config_sentence_transformers.json
(similarity function, prompts, the Matryoshka dims). Folders or hub ids.
"""

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}
ST_ACTIVATION_NAMES = {"tanh": "torch.nn.modules.activation.Tanh", "identity": "torch.nn.modules.linear.Identity",
                       "relu": "torch.nn.modules.activation.ReLU", "gelu": "torch.nn.modules.activation.GELU"}
ST_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass
class Layout:
    """What a model folder says beyond its backbone."""
    subfolder: str = ""  # where the backbone is: "" (the root) or "0_Transformer"
    max_seq_length: int | None = None  # sentence_bert_config.json's, if any
    dense: nn.Linear | None = None  # the projection head, loaded
    dense_activation: str | None = None  # its activation, a key of ACTIVATIONS
    normalize: bool = True  # a Normalize module (a plain HF folder, with no modules.json: True)


def read_layout(name_or_path: str) -> Layout:
    """The modules of a sentence-transformers folder, or the defaults for a plain HF model. Only mean pooling,
    Dense and Normalize can run in mrl: any other module is an error that names it."""
    modules = _read_json(name_or_path, "modules.json")
    st = _read_json(name_or_path, "sentence_bert_config.json") or {}
    layout = Layout(normalize=not modules)
    for module in modules or []:
        kind = _module_kind(module, name_or_path)
        if kind == "Transformer":
            layout.subfolder = module.get("path", "")
        elif kind == "Pooling":
            _check_mean_pooling(_read_json(name_or_path, f"{module['path']}/config.json") or {}, name_or_path)
        elif kind == "Dense":
            layout.dense, layout.dense_activation = _load_dense(name_or_path, module["path"])
        elif kind == "Normalize":
            layout.normalize = True
    if layout.subfolder and not st:
        st = _read_json(name_or_path, f"{layout.subfolder}/sentence_bert_config.json") or {}
    layout.max_seq_length = st.get("max_seq_length")
    return layout


def write_layout(path: str, hidden_size: int, max_seq_length: int, normalize: bool, dense: nn.Linear | None,
                 dense_activation: str, matryoshka_dims: list[int] | None) -> None:
    """Every file of the layout except the backbone's and the tokenizer's (Encoder.save writes those)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    _write_json(os.path.join(path, "1_Pooling", "config.json"), {
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True})
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
    _write_json(os.path.join(path, "config_sentence_transformers.json"), {
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
        "matryoshka_dims": sorted(matryoshka_dims, reverse=True) if matryoshka_dims else None})


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
