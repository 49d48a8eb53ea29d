"""A saved folder as embedding servers read it: the Matryoshka dims in config.json (vLLM's `dimensions`
request), the pooling config in the older flags and the newer field, the module types, Normalize and Dense.

The readers below follow the servers' loading rules for sentence-transformers folders, not their code: vLLM
finds the Pooling module through modules.json and reads its pooling_mode_* flags, normalises when a Normalize
module is listed, loads each Dense module's config and `linear.*` weights, and accepts `dimensions` only when
config.json has `matryoshka_dimensions` (a dim of that list) or `is_matryoshka`; TEI reads 1_Pooling/config.json
and 2_Dense/. No server runs here.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from mrl import Encoder

POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_lasttoken": "lasttoken"}  # the flags the servers map to CLS, MEAN, LAST


def read_as_a_server(path) -> dict:
    modules = json.loads((path / "modules.json").read_text())
    types = [m["type"] for m in modules]
    by_type = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    pooling = json.loads((path / by_type["Pooling"]["path"] / "config.json").read_text())
    flag_modes = [mode for flag, mode in POOLING_FLAGS.items() if pooling.get(flag)]
    config = json.loads((path / "config.json").read_text())
    read = {"types": types, "flag_modes": flag_modes, "field_mode": pooling.get("pooling_mode"),
            "normalize": "sentence_transformers.models.Normalize" in types,
            "hidden": config["hidden_size"], "matryoshka_dimensions": config.get("matryoshka_dimensions"),
            "is_matryoshka": config.get("is_matryoshka", False), "dense": None}
    if "Dense" in by_type:
        dense_dir = path / by_type["Dense"]["path"]
        dense = json.loads((dense_dir / "config.json").read_text())
        weights = load_file(str(dense_dir / "model.safetensors"))
        read["dense"] = (dense["in_features"], dense["out_features"], dense["activation_function"],
                         tuple(weights["linear.weight"].shape))
    return read


def accepts_dimensions(read: dict, d: int) -> bool:
    """vLLM's rule for an OpenAI-style `dimensions` request."""
    if read["matryoshka_dimensions"] is not None:
        return d in read["matryoshka_dimensions"]
    return bool(read["is_matryoshka"])


@pytest.mark.parametrize("variant", ["mean", "cls", "dense_raw"])
def test_servers_read_the_saved_folder(tiny_model_dir, tmp_path, variant):
    kwargs = {"mean": {}, "cls": {"pooling": "cls"}, "dense_raw": {"dense_dim": 16, "normalize": False}}[variant]
    encoder = Encoder.from_pretrained(str(tiny_model_dir), **kwargs)
    encoder.save(str(tmp_path / "m"), matryoshka_dims=[8, 32, 16])
    read = read_as_a_server(tmp_path / "m")

    assert read["matryoshka_dimensions"] == [32, 16, 8]
    assert read["is_matryoshka"] is True
    assert accepts_dimensions(read, 16) and not accepts_dimensions(read, 12)
    mode = kwargs.get("pooling", "mean")
    assert read["flag_modes"] == [mode] and read["field_mode"] == mode  # the older and the newer format agree
    assert read["types"][:2] == ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling"]
    assert read["normalize"] == encoder.normalize
    if encoder.dense is not None:
        assert read["dense"] == (32, 16, "torch.nn.modules.activation.Tanh", (16, 32))
    st_config = json.loads((tmp_path / "m" / "config_sentence_transformers.json").read_text())
    assert st_config["matryoshka_dims"] == [32, 16, 8] and st_config["similarity_fn_name"] == "cosine"
    # the keys are plain config attributes: mrl (and transformers) load the folder as before
    loaded = Encoder.from_pretrained(str(tmp_path / "m"))
    torch.testing.assert_close(loaded.encode(["a test"], normalize=False), encoder.encode(["a test"], normalize=False),
                               rtol=0, atol=1e-6)


def test_a_folder_saved_without_dims_claims_none(tiny_model_dir, tmp_path):
    """Re-saving a Matryoshka model without dims drops the keys its loaded config carried (no stale claim)."""
    Encoder.from_pretrained(str(tiny_model_dir)).save(str(tmp_path / "a"), matryoshka_dims=[32, 8])
    assert Encoder.from_pretrained(str(tmp_path / "a")).backbone.config.matryoshka_dimensions == [32, 8]
    Encoder.from_pretrained(str(tmp_path / "a")).save(str(tmp_path / "b"))
    read = read_as_a_server(tmp_path / "b")
    assert read["matryoshka_dimensions"] is None and not accepts_dimensions(read, 8)


@pytest.mark.integration
def test_minilm_saved_with_dims_is_matryoshka_for_servers(minilm_dir, tmp_path):
    Encoder.from_pretrained(str(minilm_dir)).save(str(tmp_path / "m"), matryoshka_dims=[384, 128, 32])
    read = read_as_a_server(tmp_path / "m")
    assert read["matryoshka_dimensions"] == [384, 128, 32] and read["hidden"] == 384
    assert read["flag_modes"] == ["mean"] and read["normalize"]
