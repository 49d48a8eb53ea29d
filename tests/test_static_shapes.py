"""Batches padded to a few shapes (speed.pad_to_multiple_of) and the compiled training forward (speed.compile):
the padding is masked, so embeddings, gradients and a trained model are those of the unpadded, eager run."""

import csv
import json

import pytest
import torch

from mrl import Encoder
from mrl.run.config import load_config
from mrl.data import Collator, chunk_features, padded_length
from mrl.run.speed import embed_by_length

from test_train import STSB, run_train

TEXTS = ["a man plays a guitar on the stage tonight while the crowd sings along loudly", "a dog", "rain",
         "two women are talking in a busy cafe", "someone plays music", "an animal"]


@pytest.mark.parametrize("length, multiple, limit, expected", [
    (5, 8, 100, 8), (8, 8, 100, 8), (9, 8, 100, 16), (9, 8, 12, 12), (12, 8, 12, 12), (5, 1, 100, 5)])
def test_padded_length_rounds_up_within_the_limit(length, multiple, limit, expected):
    assert padded_length(length, multiple, limit) == expected


def rows_of(texts):
    half = len(texts) // 2
    return [{"sentence1": a, "sentence2": b, "label": 0.5} for a, b in zip(texts[:half], texts[half:])]


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("pretokenised", [False, True])
def test_collator_pads_to_a_multiple_and_only_adds_masked_padding(tiny_encoder, multiple, pretokenised):
    tokenizer, columns = tiny_encoder.tokenizer, ["sentence1", "sentence2"]
    rows = rows_of(TEXTS)
    if pretokenised:  # the rows as Collator.pretokenize writes them
        rows = [{**row, **{c + ".ids": tokenizer(row[c])["input_ids"] for c in columns}} for row in rows]
    plain = Collator(columns, tokenizer, 128)(rows)
    padded = Collator(columns, tokenizer, 128, pad_to_multiple_of=multiple)(rows)
    width = plain["input_ids"].shape[1]
    assert width % multiple != 0  # the texts really need the extra padding
    assert padded["input_ids"].shape[1] == -(-width // multiple) * multiple
    assert list(padded) == list(plain)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(padded[key][:, :width], plain[key]), key
    assert (padded["input_ids"][:, width:] == tokenizer.pad_token_id).all()
    assert (padded["attention_mask"][:, width:] == 0).all()
    torch.testing.assert_close(padded["labels"], plain["labels"])


def test_collator_never_pads_past_max_length(tiny_encoder):
    rows = rows_of(TEXTS)
    width = Collator(["sentence1", "sentence2"], tiny_encoder.tokenizer, 128)(rows)["input_ids"].shape[1]
    padded = Collator(["sentence1", "sentence2"], tiny_encoder.tokenizer, width + 1, pad_to_multiple_of=64)(rows)
    assert padded["input_ids"].shape[1] == width + 1


def test_padded_batches_and_length_groups_embed_as_the_unpadded_batch(tiny_model_dir):
    """Values and parameter gradients of the padded batch, whole or in length groups, equal the unpadded ones."""
    torch.manual_seed(0)
    model = Encoder.from_pretrained(str(tiny_model_dir)).double().eval()
    plain = Collator(["sentence1", "sentence2"], model.tokenizer, 128)(rows_of(TEXTS))
    padded = Collator(["sentence1", "sentence2"], model.tokenizer, 128, pad_to_multiple_of=16)(rows_of(TEXTS))
    for batch in (plain, padded):
        batch.pop("labels")
    trained = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(len(TEXTS), model.embedding_dim, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)

    def value_and_grads(embeddings):
        return embeddings, torch.autograd.grad((embeddings * weights).sum(), trained)

    expected, expected_grads = value_and_grads(model(plain))
    widths = []

    def embed(features):
        widths.append(features["input_ids"].shape[1])
        return model(features)

    for embeddings, grads in (value_and_grads(model(padded)),
                              value_and_grads(embed_by_length(embed, padded, 2, pad_to_multiple_of=8))):
        torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-12)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert all(w % 8 == 0 for w in widths) and min(widths) < padded["input_ids"].shape[1]  # groups still trimmed


def test_chunk_features_keeps_padding_up_to_the_multiple(tiny_encoder):
    features = Collator(["sentence1", "sentence2"], tiny_encoder.tokenizer, 128, pad_to_multiple_of=32)(rows_of(TEXTS))
    short = features["attention_mask"][1].sum().item()  # "a dog"
    assert chunk_features(features, slice(1, 2))["input_ids"].shape[1] == short
    assert short % 3 != 0  # so that the multiple adds columns
    assert chunk_features(features, slice(1, 2), pad_to_multiple_of=3)["input_ids"].shape[1] == -(-short // 3) * 3


def test_bad_compile_and_padding_options_fail_with_the_field_name():
    with pytest.raises(ValueError, match="speed.compile: needs speed.pad_to_multiple_of"):
        load_config(None, ["speed.compile=default"])
    with pytest.raises(ValueError, match="speed.compile: expected one of"):
        load_config(None, ["speed.compile=fast", "speed.pad_to_multiple_of=16"])
    with pytest.raises(ValueError, match="speed.compile: not with train.cache_chunk_size"):
        load_config(None, ["speed.compile=default", "speed.pad_to_multiple_of=16", "train.cache_chunk_size=8"])
    with pytest.raises(ValueError, match="speed.compile: reduce-overhead .* not with train.grad_accum"):
        load_config(None, ["speed.compile=reduce-overhead", "speed.pad_to_multiple_of=16", "train.grad_accum=2"])
    with pytest.raises(ValueError, match="speed.pad_to_multiple_of: must be >= 1"):
        load_config(None, ["speed.pad_to_multiple_of=0"])
    cfg = load_config(None, ["speed.compile=reduce-overhead", "speed.pad_to_multiple_of=16"])
    assert (cfg.speed.compile, cfg.speed.pad_to_multiple_of) == ("reduce-overhead", 16)


def test_compiled_training_trains_the_same_model_as_eager(tmp_path, tiny_model_dir):
    """train.py with speed.compile=default (one compiled shape: every batch padded to 64 tokens) trains the
    model of the eager run, dropout off so that both draw nothing at random: their embeddings of 40 dev texts
    agree to 1e-4, where training (at a large learning rate) moved them by more than 1e-2."""
    model_dir = tmp_path / "no-dropout"
    model_dir.mkdir()
    for path in tiny_model_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model_dir / "config.json").write_text(json.dumps(config))
    texts = [row["sentence1"] for row in csv.DictReader(open(STSB / "dev.csv", encoding="utf-8"))][:40]

    embeddings = {"start": Encoder.from_pretrained(str(model_dir)).encode(texts)}
    for name, extra in (("eager", []), ("compiled", ["speed.compile=default"])):
        proc = run_train(tmp_path / name, model_dir, "speed.pad_to_multiple_of=64", "train.lr=1e-3", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        embeddings[name] = Encoder.from_pretrained(str(tmp_path / name / "run" / "model")).encode(texts)
        steps = json.loads((tmp_path / name / "run" / "results.json").read_text())["train"]["new_shape_steps"]
        assert steps["count"] == 1  # one shape: 8 pairs of 64 tokens
    moved = (embeddings["eager"] - embeddings["start"]).abs().max().item()
    differ = (embeddings["eager"] - embeddings["compiled"]).abs().max().item()
    assert moved > 1e-2 and differ < 1e-4, (moved, differ)
