"""The README's Python snippets run as written (on a model saved by mrl in place of runs/default/model) and
the sentence-transformers one gives mrl's vectors."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_MODEL = "runs/default/model"


def snippet(section: str) -> str:
    """The first ```python block under the README heading `## {section}`."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


@pytest.fixture(scope="module")
def saved_minilm(minilm_dir, tmp_path_factory):
    """The real MiniLM, loaded and saved again by mrl: the folder a training run writes."""
    from mrl import Encoder

    path = tmp_path_factory.mktemp("model")
    Encoder.from_pretrained(str(minilm_dir)).save(str(path), matryoshka_dims=[384, 256, 128, 64, 32, 16, 8])
    return path


def run_snippet(section: str, model_path: Path) -> dict:
    code = snippet(section)
    assert SNIPPET_MODEL in code
    namespace = {}
    exec(code.replace(SNIPPET_MODEL, str(model_path)), namespace)
    return namespace


@pytest.mark.integration
def test_use_a_trained_model_snippet(saved_minilm):
    from mrl import Encoder

    emb = run_snippet("Use a trained model", saved_minilm)["emb"]
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    expected = Encoder.from_pretrained(str(saved_minilm)).encode(
        ["A man is playing a guitar.", "Someone plays music."], truncate_dim=64)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)


@pytest.mark.integration
def test_use_your_model_elsewhere_snippet_equals_mrl(saved_minilm):
    pytest.importorskip("sentence_transformers")
    from mrl import Encoder

    namespace = run_snippet("Use your model elsewhere", saved_minilm)
    embeddings = torch.as_tensor(namespace["embeddings"])
    assert embeddings.shape == (2, 64)
    texts = ["A man is playing a guitar.", "Someone plays music."]
    ours = Encoder.from_pretrained(str(saved_minilm)).encode(texts, truncate_dim=64, normalize=False)
    torch.testing.assert_close(embeddings, ours, rtol=0, atol=1e-5)
    similarity = torch.as_tensor(namespace["model"].similarity(namespace["embeddings"], namespace["embeddings"]))
    unit = torch.nn.functional.normalize(ours, dim=-1)
    torch.testing.assert_close(similarity, unit @ unit.T, rtol=0, atol=1e-5)
