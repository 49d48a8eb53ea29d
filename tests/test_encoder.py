"""mrl.Encoder: pooling, padding, encode, the sentence-transformers folder layout, and parity with
sentence-transformers (on the tiny random model, and on the real MiniLM where noted)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from mrl import Encoder, mean_pool

from conftest import TINY_HIDDEN

TEXTS = [
    "A man is playing a guitar.",
    "A woman slices an onion.",
    "Two dogs run across a snowy field while their owner watches from the porch, holding a mug of coffee.",
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "A plane is taking off.",
    "Children are playing football in the park on a sunny afternoon.",
]
LONG_TEXT = " ".join(["an unusually long sentence with many words about many different things"] * 12)


def raw_embedding(encoder, text):
    """Independent reference: the backbone on this text alone (no padding at all), plain mean of its tokens."""
    features = encoder.tokenizer([text], return_tensors="pt", truncation=True, max_length=encoder.max_seq_length)
    was_training = encoder.backbone.training
    encoder.backbone.eval()  # no dropout
    with torch.no_grad():
        hidden = encoder.backbone(**features).last_hidden_state[0]  # (T, H)
        x = hidden.mean(0)
        if encoder.dense is not None:
            x = encoder.activation(encoder.dense(x))
    encoder.backbone.train(was_training)
    return x


def raw_embeddings(encoder, texts):
    return torch.stack([raw_embedding(encoder, t) for t in texts])


def st_model(path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def st_encode(model, texts, **kwargs):
    return torch.as_tensor(model.encode(texts, convert_to_tensor=True, **kwargs)).float().cpu()


# --- mean pooling and padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_pool_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 5, 7, 4
    tokens = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    mask[0] = torch.tensor([1, 0, 1, 1, 0, 0, 1])  # holes, not just right padding
    pooled = mean_pool(tokens, mask)
    assert pooled.shape == (B, H)
    for b in range(B):
        kept = [tokens[b, t] for t in range(T) if mask[b, t] == 1]
        expected = sum(kept) / len(kept)
        torch.testing.assert_close(pooled[b], expected, rtol=1e-12, atol=1e-12)


def test_mean_pool_empty_row_is_zero_not_nan():
    pooled = mean_pool(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert torch.equal(pooled[1], torch.zeros(4))
    assert torch.equal(pooled[0], torch.ones(4))


@pytest.mark.parametrize("normalize", [True, False])
def test_padding_never_leaks(tiny_model_dir, normalize):
    encoder = Encoder.from_pretrained(str(tiny_model_dir), normalize=normalize)
    for text in ("Hi", "A man is playing a guitar."):
        alone = encoder.encode([text], normalize=normalize)
        batched = encoder.encode([LONG_TEXT, text, "x"], normalize=normalize, batch_size=8)
        assert len(encoder.tokenize([LONG_TEXT, text])["input_ids"][0]) > 3 * len(encoder.tokenize([text])["input_ids"][0])
        torch.testing.assert_close(batched[1], alone[0], rtol=0, atol=1e-5)


def test_forward_on_padded_batch_matches_each_text_alone(tiny_encoder):
    features = tiny_encoder.tokenize([LONG_TEXT] + TEXTS)
    assert (features["attention_mask"] == 0).any()
    with torch.no_grad():
        batched = tiny_encoder(features)
    expected = F.normalize(raw_embeddings(tiny_encoder, [LONG_TEXT] + TEXTS), dim=-1)
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-5)


# --- encode ------------------------------------------------------------------------------------------------------


def test_encode_dtype_shape_and_input_order(tiny_encoder):
    out = tiny_encoder.encode(TEXTS, batch_size=3)  # several batches, sorted by length inside encode
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == (len(TEXTS), TINY_HIDDEN)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(out[i], tiny_encoder.encode([text])[0], rtol=0, atol=1e-5)
    expected = F.normalize(raw_embeddings(tiny_encoder, TEXTS), dim=-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)


def test_encode_restores_training_mode(tiny_encoder):
    tiny_encoder.train()
    tiny_encoder.encode(TEXTS[:2])
    assert tiny_encoder.training
    tiny_encoder.eval()
    tiny_encoder.encode(TEXTS[:2])
    assert not tiny_encoder.training


def test_encode_leaves_every_submodule_mode_as_it_found_it(tiny_model_dir):
    encoder = Encoder.from_pretrained(str(tiny_model_dir))
    features = encoder.tokenize(TEXTS[:3])
    modes = {name: m.training for name, m in encoder.named_modules()}
    with torch.no_grad():
        before = encoder(features)
    encoder.encode(TEXTS[:2])
    assert {name: m.training for name, m in encoder.named_modules()} == modes
    with torch.no_grad():
        torch.testing.assert_close(encoder(features), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [1, 8, 16, TINY_HIDDEN])
def test_truncate_dim_gives_unit_norm_prefix(tiny_model_dir, d):
    raw_encoder = Encoder.from_pretrained(str(tiny_model_dir), normalize=False)
    full_raw = raw_embeddings(raw_encoder, TEXTS)  # unnormalised, independent of encode
    torch.testing.assert_close(raw_encoder.encode(TEXTS, normalize=False), full_raw, rtol=0, atol=1e-5)

    normalized_encoder = Encoder.from_pretrained(str(tiny_model_dir))  # normalize=True
    for encoder in (raw_encoder, normalized_encoder):
        out = encoder.encode(TEXTS, truncate_dim=d, batch_size=4)
        assert out.shape == (len(TEXTS), d) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
        torch.testing.assert_close(out, F.normalize(full_raw[:, :d], dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("d", [4, 20])
def test_truncate_without_normalize_returns_raw_prefix(tiny_model_dir, d):
    raw_encoder = Encoder.from_pretrained(str(tiny_model_dir), normalize=False)
    full_raw = raw_embeddings(raw_encoder, TEXTS)
    out = raw_encoder.encode(TEXTS, truncate_dim=d, normalize=False)
    torch.testing.assert_close(out, full_raw[:, :d], rtol=0, atol=1e-5)
    # a normalising model: the prefix of its (full-width normalised) output, not re-normalised
    normalized_encoder = Encoder.from_pretrained(str(tiny_model_dir))
    out = normalized_encoder.encode(TEXTS, truncate_dim=d, normalize=False)
    torch.testing.assert_close(out, F.normalize(full_raw, dim=-1)[:, :d], rtol=0, atol=1e-5)


def test_encode_errors_and_empty_input(tiny_encoder):
    with pytest.raises(TypeError):
        tiny_encoder.encode("a single string")
    for bad in (0, TINY_HIDDEN + 1, -1):
        with pytest.raises(ValueError, match="truncate_dim"):
            tiny_encoder.encode(TEXTS, truncate_dim=bad)
    assert tiny_encoder.encode([]).shape == (0, TINY_HIDDEN)
    assert tiny_encoder.encode([], truncate_dim=8).shape == (0, 8)


def test_max_seq_length_truncates(tiny_model_dir):
    encoder = Encoder.from_pretrained(str(tiny_model_dir), max_seq_length=8)
    assert encoder.max_seq_length == 8
    assert encoder.tokenize([LONG_TEXT, "Hi"])["input_ids"].shape == (2, 8)
    torch.testing.assert_close(encoder.encode([LONG_TEXT]), F.normalize(raw_embeddings(encoder, [LONG_TEXT]), dim=-1),
                               rtol=0, atol=1e-5)


def test_plain_hf_folder_defaults(tiny_model_dir):
    encoder = Encoder.from_pretrained(str(tiny_model_dir))
    assert encoder.normalize is True
    assert encoder.dense is None
    assert encoder.embedding_dim == TINY_HIDDEN
    assert encoder.max_seq_length == min(512, encoder.tokenizer.model_max_length)


# --- save / load -----------------------------------------------------------------------------------------------


def make_encoder(tiny_model_dir, dense_dim=None, normalize=None, dense_activation="tanh", seed=0):
    torch.manual_seed(seed)
    return Encoder.from_pretrained(str(tiny_model_dir), dense_dim=dense_dim, normalize=normalize,
                                   dense_activation=dense_activation)


VARIANTS = {
    "plain": dict(),
    "dense": dict(dense_dim=16),
    "raw": dict(normalize=False),
    "dense_raw_relu": dict(dense_dim=16, normalize=False, dense_activation="relu"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_load_round_trip(tiny_model_dir, tmp_path, variant):
    encoder = make_encoder(tiny_model_dir, **VARIANTS[variant])
    if encoder.dense is not None:
        with torch.no_grad():
            encoder.dense.bias.add_(0.1)  # a non-default bias must survive too
    encoder.save(str(tmp_path / "saved"), matryoshka_dims=[8, 16])
    loaded = Encoder.load(str(tmp_path / "saved"))

    assert loaded.normalize == encoder.normalize
    assert loaded.embedding_dim == encoder.embedding_dim
    assert loaded.max_seq_length == encoder.max_seq_length
    assert (loaded.dense is None) == (encoder.dense is None)
    if encoder.dense is not None:
        assert loaded.dense_activation == encoder.dense_activation
        assert torch.equal(loaded.dense.weight, encoder.dense.weight)
        assert torch.equal(loaded.dense.bias, encoder.dense.bias)
    normalize = encoder.normalize
    torch.testing.assert_close(loaded.encode(TEXTS, normalize=normalize), encoder.encode(TEXTS, normalize=normalize),
                               rtol=0, atol=1e-7)

    modules = json.loads((tmp_path / "saved" / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    assert kinds == ["Transformer", "Pooling"] + (["Dense"] if encoder.dense is not None else []) + (
        ["Normalize"] if encoder.normalize else [])
    assert [m["idx"] for m in modules] == list(range(len(modules)))
    st_config = json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())
    assert st_config["matryoshka_dims"] == [16, 8]


def test_explicit_arguments_override_saved_model(tiny_model_dir, tmp_path):
    make_encoder(tiny_model_dir).save(str(tmp_path / "saved"))
    loaded = Encoder.from_pretrained(str(tmp_path / "saved"), normalize=False, max_seq_length=16)
    assert loaded.normalize is False and loaded.max_seq_length == 16


def test_dense_dim_on_a_model_with_a_dense_head_raises(tiny_model_dir, tmp_path):
    make_encoder(tiny_model_dir, dense_dim=16).save(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="dense_dim"):
        Encoder.from_pretrained(str(tmp_path / "saved"), dense_dim=8)


def test_unknown_dense_activation_raises(tiny_model_dir):
    with pytest.raises(ValueError, match="dense_activation"):
        Encoder.from_pretrained(str(tiny_model_dir), dense_dim=8, dense_activation="swish")


@pytest.fixture
def saved_dir(tiny_model_dir, tmp_path):
    path = tmp_path / "saved"
    make_encoder(tiny_model_dir).save(str(path))
    return path


def rewrite_modules(path, edit):
    modules = json.loads((path / "modules.json").read_text())
    (path / "modules.json").write_text(json.dumps(edit(modules)))


@pytest.mark.parametrize("module_type", ["sentence_transformers.models.CNN", "my_package.modules.MyPooling",
                                         "sentence_transformers.models.WeightedLayerPooling"])
def test_unsupported_module_raises_naming_it(saved_dir, module_type):
    rewrite_modules(saved_dir, lambda m: m + [{"idx": len(m), "name": str(len(m)), "path": "9_Extra",
                                               "type": module_type}])
    with pytest.raises(ValueError, match=module_type.replace(".", r"\.")):
        Encoder.from_pretrained(str(saved_dir))


def test_transformer_not_at_root_raises(saved_dir):
    def move(modules):
        modules[0]["path"] = "elsewhere"
        return modules

    rewrite_modules(saved_dir, move)
    with pytest.raises(ValueError, match="Transformer"):
        Encoder.from_pretrained(str(saved_dir))


def legacy_pooling_config(flag):
    return {"word_embedding_dimension": TINY_HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, flag: True}


@pytest.mark.parametrize("flag, mode", [("pooling_mode_max_tokens", "max"),
                                        ("pooling_mode_weightedmean_tokens", "weightedmean"),
                                        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens")])
def test_a_pooling_mrl_cannot_run_raises_naming_it(saved_dir, flag, mode):
    write_pooling_config(saved_dir, legacy_pooling_config(flag))
    with pytest.raises(ValueError, match=f"asks for {mode}; mrl implements one of mean, cls, lasttoken"):
        Encoder.from_pretrained(str(saved_dir))


@pytest.mark.parametrize("flag, mode", [("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "lasttoken"),
                                        ("pooling_mode_mean_tokens", "mean")])
def test_each_pooling_mode_is_read_from_the_older_flags_and_the_newer_field(saved_dir, flag, mode):
    write_pooling_config(saved_dir, legacy_pooling_config(flag))
    assert Encoder.from_pretrained(str(saved_dir)).pooling == mode
    write_pooling_config(saved_dir, {"embedding_dimension": TINY_HIDDEN, "pooling_mode": mode, "include_prompt": False})
    loaded = Encoder.from_pretrained(str(saved_dir))
    assert (loaded.pooling, loaded.include_prompt) == (mode, False)


def test_mean_plus_another_pooling_mode_raises(saved_dir):
    config = legacy_pooling_config("pooling_mode_cls_token")
    config["pooling_mode_mean_tokens"] = True
    write_pooling_config(saved_dir, config)
    with pytest.raises(ValueError, match=r"asks for cls \+ mean"):
        Encoder.from_pretrained(str(saved_dir))


def test_missing_dense_weights_raise(tiny_model_dir, tmp_path):
    path = tmp_path / "saved"
    make_encoder(tiny_model_dir, dense_dim=16).save(str(path))
    (path / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="2_Dense"):
        Encoder.from_pretrained(str(path))


# --- parity with sentence-transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sentence_transformers_reads_what_we_save(tiny_model_dir, tmp_path, variant):
    encoder = make_encoder(tiny_model_dir, **VARIANTS[variant])
    encoder.save(str(tmp_path / "saved"), matryoshka_dims=[16, 8])
    model = st_model(tmp_path / "saved")
    assert model.get_embedding_dimension() == encoder.embedding_dim
    assert model.max_seq_length == encoder.max_seq_length
    normalize = encoder.normalize
    torch.testing.assert_close(encoder.encode(TEXTS, normalize=normalize), st_encode(model, TEXTS),
                               rtol=0, atol=1e-5)
    for d in (8, 4):
        torch.testing.assert_close(encoder.encode(TEXTS, truncate_dim=d),
                                   st_encode(model, TEXTS, truncate_dim=d, normalize_embeddings=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(encoder.encode(TEXTS, truncate_dim=d, normalize=False),
                                   st_encode(model, TEXTS, truncate_dim=d), rtol=0, atol=1e-5)


@pytest.mark.integration
def test_minilm_matches_sentence_transformers(minilm_dir):
    encoder = Encoder.from_pretrained(str(minilm_dir))
    assert encoder.embedding_dim == 384 and encoder.normalize is True and encoder.max_seq_length == 256
    model = st_model(minilm_dir)
    texts = TEXTS + [LONG_TEXT]
    torch.testing.assert_close(encoder.encode(texts, batch_size=3), st_encode(model, texts, batch_size=3),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(encoder.encode(texts, truncate_dim=64),
                               st_encode(model, texts, truncate_dim=64, normalize_embeddings=True), rtol=0, atol=1e-5)


@pytest.mark.integration
def test_minilm_save_round_trip(minilm_dir, tmp_path):
    encoder = Encoder.from_pretrained(str(minilm_dir))
    encoder.save(str(tmp_path / "saved"))
    loaded = Encoder.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(loaded.encode(TEXTS), encoder.encode(TEXTS), rtol=0, atol=1e-7)


def test_copy_of_saved_folder_is_self_contained(saved_dir, tmp_path):
    """Everything from_pretrained needs lives inside the folder (no reference back to the tiny model dir)."""
    copy = tmp_path / "copy"
    shutil.copytree(saved_dir, copy)
    shutil.rmtree(saved_dir)
    assert Encoder.from_pretrained(str(copy)).encode(TEXTS[:2]).shape == (2, TINY_HIDDEN)


# --- layouts written by other sentence-transformers versions ---------------------------------------------------


def move_transformer_to_subfolder(path):
    """The older sentence-transformers layout: the HF backbone, tokenizer and sentence_bert_config.json in
    0_Transformer/, named by modules.json."""
    sub = path / "0_Transformer"
    sub.mkdir()
    for f in list(path.iterdir()):
        if f.is_file() and f.name not in ("modules.json", "config_sentence_transformers.json", "README.md"):
            shutil.move(str(f), str(sub / f.name))

    def point_at_subfolder(modules):
        modules[0]["path"] = "0_Transformer"
        return modules

    rewrite_modules(path, point_at_subfolder)


def test_transformer_in_0_transformer_subfolder_loads(saved_dir):
    expected = Encoder.from_pretrained(str(saved_dir)).encode(TEXTS)
    move_transformer_to_subfolder(saved_dir)
    torch.testing.assert_close(Encoder.from_pretrained(str(saved_dir)).encode(TEXTS), expected, rtol=0, atol=1e-6)


def test_sentence_transformers_reads_the_0_transformer_layout(saved_dir):
    """The layout of the test above is a valid sentence-transformers model (so mrl should read it too)."""
    expected = Encoder.from_pretrained(str(saved_dir)).encode(TEXTS)
    move_transformer_to_subfolder(saved_dir)
    torch.testing.assert_close(st_encode(st_model(saved_dir), TEXTS), expected, rtol=0, atol=1e-5)


ST6_POOLING_BUG = ("BUG: sentence-transformers >= 6 writes 1_Pooling/config.json as {'pooling_mode': 'mean', "
                   "'embedding_dimension': ...}, with no pooling_mode_* flags; _check_mean_pooling sees no flag and "
                   "rejects the model ('asks for no pooling'), so mrl cannot read models saved by the installed "
                   "sentence-transformers")


def write_pooling_config(path, config):
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))


def test_new_style_mean_pooling_config_loads(saved_dir):
    expected = Encoder.from_pretrained(str(saved_dir)).encode(TEXTS)
    write_pooling_config(saved_dir, {"embedding_dimension": TINY_HIDDEN, "pooling_mode": "mean",
                                     "include_prompt": True})
    torch.testing.assert_close(Encoder.from_pretrained(str(saved_dir)).encode(TEXTS), expected, rtol=0, atol=1e-6)


def test_new_style_max_pooling_config_raises_naming_it(saved_dir):
    write_pooling_config(saved_dir, {"embedding_dimension": TINY_HIDDEN, "pooling_mode": "max",
                                     "include_prompt": True})
    with pytest.raises(ValueError) as info:
        Encoder.from_pretrained(str(saved_dir))
    assert "max" in str(info.value).replace(str(saved_dir), "<model>")  # the message, not the folder, names it


@pytest.mark.parametrize("variant", ["plain", "dense"])
def test_model_saved_by_sentence_transformers_loads(tiny_model_dir, tmp_path, variant):
    encoder = make_encoder(tiny_model_dir, **VARIANTS[variant])
    encoder.save(str(tmp_path / "ours"))
    st_model(tmp_path / "ours").save(str(tmp_path / "by-st"))
    loaded = Encoder.from_pretrained(str(tmp_path / "by-st"))
    assert loaded.embedding_dim == encoder.embedding_dim and loaded.normalize == encoder.normalize
    torch.testing.assert_close(loaded.encode(TEXTS), encoder.encode(TEXTS), rtol=0, atol=1e-6)


def test_encode_layer_norm_before_truncation(tiny_encoder):
    texts = ["a man plays a guitar", "a dog runs", "rain"]
    with torch.no_grad():  # a random BERT's outputs have mean 0 (its last LayerNorm has bias 0): shift them
        final_norm = tiny_encoder.backbone.encoder.layer[-1].output.LayerNorm
        final_norm.bias.add_(torch.randn(final_norm.bias.shape, generator=torch.Generator().manual_seed(0)))
    raw = tiny_encoder.encode(texts, normalize=False)
    by_hand = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(raw.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = torch.nn.functional.normalize(by_hand[:, :8], dim=-1)
    torch.testing.assert_close(tiny_encoder.encode(texts, truncate_dim=8, layer_norm=True), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(tiny_encoder.encode(texts, truncate_dim=8), expected, atol=1e-3)
