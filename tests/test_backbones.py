"""The backbones people train now, on tiny random models built here (no download): mean, CLS and last-token
pooling against loop formulas, under left and right padding; decoder LLMs (Qwen3) with EOS appended; prompts,
left out of the mean when asked; LoRA through peft; gradient checkpointing. sentence-transformers loads what mrl
writes with the vectors mrl computes (skipped where it is absent)."""

import json

import pytest
import torch
import torch.nn.functional as F

from mrl import Encoder
from mrl.model.encoder import append_eos_token
from mrl.data import Collator, chunk_features
from mrl.model.pooling import pool
from mrl.run.speed import embed_by_length

from conftest import make_tiny_decoder

TEXTS = ["a man plays a guitar on the stage tonight", "rain", "two dogs run on the beach near the quiet sea",
         "a chef cuts onions", "someone plays music"]


# --- pooling against loops -----------------------------------------------------------------------------------------

def loop_pool(tokens, mask, mode, prompt_length=0):
    """Each row by hand: its real positions (mask 1), the first prompt_length of them dropped, then the mode."""
    out = []
    for t, m in zip(tokens, mask):
        real = [i for i in range(len(m)) if m[i] == 1][prompt_length:]
        if mode == "mean":
            out.append(sum(t[i] for i in real) / len(real))
        elif mode == "cls":
            out.append(t[real[0]])
        else:
            out.append(t[real[-1]])
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt_length", [0, 2])
def test_each_pooling_equals_its_loop_under_either_padding(mode, side, prompt_length):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    lengths = [7, 3, 5, 4]
    mask = torch.zeros(4, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1 if side == "right" else 0
        if side == "left":
            mask[row, 7 - n:] = 1
    got = pool(tokens, mask, mode, torch.full((4,), prompt_length) if prompt_length else None)
    torch.testing.assert_close(got, loop_pool(tokens, mask, mode, prompt_length), rtol=0, atol=1e-12)


# --- decoders: last-token pooling, EOS, left padding ----------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_a_decoder_embeds_a_text_alike_alone_and_in_a_padded_batch(tmp_path, side):
    model = Encoder.from_pretrained(str(make_tiny_decoder(tmp_path, padding_side=side)), pooling="lasttoken",
                                    append_eos=True)
    batch = model.tokenize(TEXTS)
    assert (batch["attention_mask"][:, 0 if side == "left" else -1] == 0).any()  # really padded, on that side
    together = model.encode(TEXTS)
    alone = torch.cat([model.encode([t]) for t in TEXTS])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_last_token_pooling_reads_the_appended_eos_token(tiny_decoder_dir):
    model = Encoder.from_pretrained(str(tiny_decoder_dir), pooling="lasttoken", append_eos=True)
    eos = model.tokenizer.eos_token_id
    assert model.tokenizer("a dog")["input_ids"][-1] == eos
    plain = Encoder.from_pretrained(str(tiny_decoder_dir), pooling="lasttoken")  # without append_eos: nothing added
    assert plain.tokenizer("a dog")["input_ids"][-1] != eos
    twice = Encoder.from_pretrained(str(tiny_decoder_dir), append_eos=True)  # a tokenizer that already ends texts
    append_eos_token(twice.tokenizer)  # with a special token is left as it is: one EOS, not two
    assert twice.tokenizer("a dog")["input_ids"] == model.tokenizer("a dog")["input_ids"]
    features = model.tokenize(["a dog", "a man plays a guitar"])
    hidden = model.backbone(**features).last_hidden_state
    last = [hidden[i, int(features["attention_mask"][i].nonzero().max())] for i in range(2)]  # left padded: T-1
    assert all(features["input_ids"][i, -1] == eos for i in range(2))
    torch.testing.assert_close(model(features), F.normalize(torch.stack(last), dim=-1), rtol=0, atol=1e-6)


def test_left_padded_batches_collate_chunk_and_group_as_the_tokenizer_pads(tiny_decoder_dir):
    model = Encoder.from_pretrained(str(tiny_decoder_dir), pooling="lasttoken", append_eos=True)
    rows = [{"anchor": a, "positive": p} for a, p in zip(TEXTS[:3], TEXTS[2:])]
    collate = Collator(["anchor", "positive"], model.tokenizer, 64)
    import datasets

    table = collate.pretokenize(datasets.Dataset.from_list(rows))
    from_ids, from_text = collate(list(table)), collate(rows)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(from_ids[key], from_text[key]), key  # pre-tokenised ids are left-padded alike
    assert (from_ids["attention_mask"][:, 0] == 0).any() and (from_ids["attention_mask"][:, -1] == 1).all()
    chunk = chunk_features(from_ids, slice(1, 2))  # "rain": its leading padding columns go
    assert chunk["input_ids"].shape[1] == int(from_ids["attention_mask"][1].sum())
    whole = model(from_ids)
    torch.testing.assert_close(embed_by_length(model, from_ids, 3), whole, rtol=0, atol=1e-5)
    padded = chunk_features(from_ids, slice(1, 2), pad_to_multiple_of=4)  # the kept padding stays on the left
    assert padded["input_ids"].shape[1] == -(-chunk["input_ids"].shape[1] // 4) * 4
    assert padded["attention_mask"][0, -1] == 1 and padded["attention_mask"][0, 0] == 0


# --- prompts --------------------------------------------------------------------------------------------------------

def test_a_prompt_left_out_of_the_mean_pools_the_text_tokens_only(tiny_model_dir):
    model = Encoder.from_pretrained(str(tiny_model_dir), include_prompt=False, prompts={"query": "query: "})
    assert model.prompt_length("query: ") == 3  # [CLS] query : ([SEP] is not the prompt's)
    got = model.encode(["a man plays a guitar"], prompt_name="query")
    features = model.tokenizer(["query: a man plays a guitar"], return_tensors="pt")
    hidden = model.backbone(**features).last_hidden_state[0]
    expected = F.normalize(hidden[3:].mean(0), dim=-1)  # every token after the prompt, [SEP] included
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-6)
    kept = Encoder.from_pretrained(str(tiny_model_dir), prompts={"query": "query: "})
    assert not torch.allclose(kept.encode(["a man plays a guitar"], prompt_name="query"), got, atol=1e-3)


def test_column_prompts_reach_the_batch_with_their_lengths(tiny_model_dir):
    model = Encoder.from_pretrained(str(tiny_model_dir), include_prompt=False,
                                    prompts={"query": "query: ", "document": "passage: "})
    texts, lengths = model.column_prompts({"anchor": "query", "positive": "document"})
    assert texts == {"anchor": "query: ", "positive": "passage: "} and lengths == {"anchor": 3, "positive": 3}
    rows = [{"anchor": "a dog", "positive": "an animal"}, {"anchor": "rain", "positive": "wet weather"}]
    batch = Collator(["anchor", "positive"], model.tokenizer, 64, None, texts, lengths)(rows)
    assert batch["prompt_length"].tolist() == [3, 3, 3, 3]
    expected = torch.cat([model.encode(["a dog", "rain"], prompt_name="query"),
                          model.encode(["an animal", "wet weather"], prompt_name="document")])
    torch.testing.assert_close(model(batch), expected, rtol=0, atol=1e-6)


# --- what sentence-transformers reads ------------------------------------------------------------------------------

def cls_encoder(tiny_model_dir, **kwargs):
    return Encoder.from_pretrained(str(tiny_model_dir), pooling="cls", include_prompt=False,
                                   prompts={"query": "query: ", "document": ""}, **kwargs)


@pytest.mark.parametrize("kind", ["mean", "cls", "lasttoken-decoder"])
def test_sentence_transformers_reads_each_pooling_and_the_prompts(tiny_model_dir, tiny_decoder_dir, tmp_path, kind):
    st = pytest.importorskip("sentence_transformers")
    model = {"mean": lambda: Encoder.from_pretrained(str(tiny_model_dir), prompts={"query": "query: "}),
             "cls": lambda: cls_encoder(tiny_model_dir),
             "lasttoken-decoder": lambda: Encoder.from_pretrained(str(tiny_decoder_dir), pooling="lasttoken",
                                                                  append_eos=True, prompts={"query": "Query: "})}[kind]()
    model.save(str(tmp_path / "saved"))
    pooling = json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == model.pooling and pooling["include_prompt"] == model.include_prompt
    reference = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    reloaded = Encoder.from_pretrained(str(tmp_path / "saved"))
    assert (reloaded.pooling, reloaded.prompts) == (model.pooling, model.prompts)
    for kwargs in ({}, {"prompt_name": "query"}):
        ours = model.encode(TEXTS, **kwargs)
        theirs = reference.encode(TEXTS, convert_to_tensor=True, **kwargs)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded.encode(TEXTS, **kwargs), ours, rtol=0, atol=1e-6)


# --- LoRA ------------------------------------------------------------------------------------------------------------

class LoraSettings:
    r, alpha, dropout, target_modules, save = 4, 8.0, 0.0, "all-linear", "merged"


@pytest.mark.parametrize("kind", ["mean", "cls", "lasttoken-decoder"])
def test_lora_trains_only_the_adapters_and_the_merged_model_loads_in_sentence_transformers(
        tiny_model_dir, tiny_decoder_dir, tmp_path, kind):
    pytest.importorskip("peft")
    load = {"mean": lambda **lora: Encoder.from_pretrained(str(tiny_model_dir), **lora),
            "cls": lambda **lora: cls_encoder(tiny_model_dir, **lora),
            "lasttoken-decoder": lambda **lora: Encoder.from_pretrained(str(tiny_decoder_dir), pooling="lasttoken",
                                                                        append_eos=True, **lora)}[kind]
    before = {name: p.detach().clone() for name, p in load().backbone.named_parameters()}  # the weights on disk
    model = load(lora=LoraSettings)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # lora_B starts at 0: the first step moves B, the next ones A too
        embeddings = model(model.tokenize(TEXTS))
        (embeddings @ embeddings.T).triu(1).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    base = model.backbone.get_base_model()
    for name, p in base.named_parameters():  # the backbone's own weights did not move
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(p, before[key], rtol=0, atol=0, msg=name)
    trained = model.encode(TEXTS)
    model.save(str(tmp_path / "merged"))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = Encoder.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged.encode(TEXTS), trained, rtol=0, atol=1e-5)
    assert (merged.encode(TEXTS) - Encoder.from_pretrained(str(tiny_model_dir if kind != "lasttoken-decoder"
                                                               else tiny_decoder_dir)).encode(TEXTS)).abs().max() > 1e-4
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(theirs, trained, rtol=0, atol=1e-5)
    model.save(str(tmp_path / "adapter"), lora_save="adapter")  # the adapter alone, loaded on top of its base model
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    torch.testing.assert_close(Encoder.from_pretrained(str(tmp_path / "adapter")).encode(TEXTS), trained,
                               rtol=0, atol=1e-5)


# --- gradient checkpointing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tiny_decoder_dir, kind):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = (Encoder.from_pretrained(str(tiny_model_dir), gradient_checkpointing=checkpointing)
                 if kind == "encoder" else
                 Encoder.from_pretrained(str(tiny_decoder_dir), pooling="lasttoken", append_eos=True,
                                         gradient_checkpointing=checkpointing)).double()
        model.train()  # dropout on (the encoder's): checkpointing replays its masks
        attention = next(m for name, m in model.backbone.named_modules()  # inside layer 0, so inside its checkpoint
                         if name.endswith(("layer.0.attention", "layers.0.self_attn")))
        calls = []
        attention.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)
        embeddings = model(model.tokenize(TEXTS))
        (embeddings[:, :8] @ embeddings[:, :8].T).triu(1).sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward: checkpointing is on
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12, msg=name)


# --- the new recipes, end to end on tiny models -------------------------------------------------------------------

def test_the_qwen3_lora_recipe_runs_on_a_tiny_decoder_and_saves_a_merged_model(tmp_path, tiny_decoder_dir):
    pytest.importorskip("peft")
    from test_train import TWO_PROCESSES, run_nli_recipe

    proc = run_nli_recipe(tmp_path, "configs/qwen3-matryoshka-lora.yaml", tiny_decoder_dir, "train.batch_size=8",
                          "train.cache_chunk_size=8", "model.lora.r=4", launcher=TWO_PROCESSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GradCache chunks of 8 texts" in proc.stdout and "negatives from every process" in proc.stdout
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["steps"] == 2 and results["train"]["processes"] == 2
    saved = Encoder.from_pretrained(str(run / "model"))
    assert saved.pooling == "lasttoken" and set(saved.prompts) == {"query", "sts"}
    assert not (run / "model" / "adapter_config.json").exists()  # merged: a plain model
    assert saved.tokenizer("a dog")["input_ids"][-1] == saved.tokenizer.eos_token_id  # EOS kept in the tokenizer
    start = Encoder.from_pretrained(str(tiny_decoder_dir), pooling="lasttoken", append_eos=True)
    assert (saved.encode(TEXTS) - start.encode(TEXTS)).abs().max() > 1e-5  # the adapters trained


def test_the_cls_recipe_runs_and_keeps_its_pooling(tmp_path, tiny_model_dir):
    from test_train import run_train

    proc = run_train(tmp_path, tiny_model_dir, "train.gradient_checkpointing=true", config="configs/bge-matryoshka.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Encoder.from_pretrained(str(tmp_path / "run" / "model")).pooling == "cls"
    config = json.loads((tmp_path / "run" / "model" / "1_Pooling" / "config.json").read_text())
    assert config["pooling_mode"] == "cls" and config["pooling_mode_cls_token"] is True
