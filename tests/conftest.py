"""Shared fixtures: a tiny randomly initialised BERT saved to disk, and the real material in ../shared.

No test touches the network: the tiny model's tokenizer is read from the local MiniLM folder, and every
model and data file comes from ../shared or a tmp dir.
"""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
TINY_HIDDEN = 32  # hidden size of the tiny model


def make_tiny_model(path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised BERT (hidden 32, 2 layers, 2 heads) with MiniLM's tokenizer to `path`.

    A plain Hugging Face folder (no modules.json), so `mrl.Encoder.from_pretrained(path)` reads it as mean
    pooling + L2 normalisation. Deterministic for a given `seed`.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    if not (MINILM / "vocab.txt").is_file():
        pytest.skip(f"no tokenizer at {MINILM}")
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT + tokenizer saved as a plain HF folder (read-only for tests: copy before changing)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_encoder(tiny_model_dir):
    """A fresh mrl.Encoder on the tiny model (mean pooling, normalize=True), in eval mode."""
    from mrl import Encoder

    torch.manual_seed(0)
    return Encoder.from_pretrained(str(tiny_model_dir)).eval()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    if not (MINILM / "modules.json").is_file():
        pytest.skip(f"no MiniLM model at {MINILM}")
    return MINILM


def make_tiny_decoder(path, seed: int = 0, padding_side: str = "left", hidden: int = 32, layers: int = 2) -> Path:
    """Write a tiny, randomly initialised Qwen3 decoder (hidden 32, 2 layers, 2 query heads sharing 1 key/value
    head, RoPE; `hidden` and `layers` for a larger one) with a byte-level BPE tokenizer trained here on STS-B
    sentences: no BOS, no EOS of its own (as base decoder LLMs tokenize), <|endoftext|> as EOS, <|pad|> for
    padding on `padding_side`."""
    import csv

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    sts = SHARED / "data" / "stsb" / "train.csv"
    if not sts.is_file():
        pytest.skip(f"no STS-B at {sts}")
    with open(sts, encoding="utf-8") as f:
        sentences = [text for row in csv.DictReader(f) for text in (row["sentence1"], row["sentence2"])]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        padding_side=padding_side, model_max_length=512)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    path = Path(path)
    Qwen3Model(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 decoder + BPE tokenizer (left padding), a plain HF folder (read-only for tests)."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen3"))
