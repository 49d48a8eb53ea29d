"""The model card (README.md) of a trained model folder, written from the run's own config and results.

It says what the model is (base model, data, loss, dims), how well each dim does (the run's per-dim table),
how to reproduce it (the exact command) and how to use it truncated, with mrl and with sentence-transformers.
The YAML header is the hub's model-card metadata, so the folder can be pushed as it is.
"""

import os

from .evaluation import markdown_table


def _describe(spec: dict | None) -> str:
    if not spec:
        return "none"
    name = f"`{spec['path']}`" + (f" (subset `{spec['name']}`)" if spec.get("name") else "")
    if spec.get("data_files"):
        name += f", files {spec['data_files']}"
    return f"{name}, split `{spec['split']}`"


def model_card(config: dict, results: dict, command: str, embedding_dim: int) -> str:
    """config: the resolved config as a dict; results: train.py's results (dims, dev/test per-dim scores,
    train stats); command: the command line that reproduces the run."""
    model, loss, train, data, evaluation = (config[k] for k in ("model", "loss", "train", "data", "eval"))
    base = model["name"]
    rule = loss["dim_weights"] if isinstance(loss["dim_weights"], str) else None
    dims = sorted(loss["dims"], reverse=True) if loss["matryoshka"] else [embedding_dim]
    example_dim = min((d for d in dims if d < embedding_dim), default=embedding_dim, key=lambda d: abs(d - 64))
    is_hub_id = not os.path.exists(base) and base.count("/") == 1

    header = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
              "tags: [sentence-transformers, sentence-similarity, feature-extraction, matryoshka, mrl]"]
    if is_hub_id:
        header.append(f"base_model: {base}")
    header.append("---")

    if loss["matryoshka"]:
        weight_of = {int(d): w for d, w in results["train"]["dim_weights"].items()}  # as trained (learned: at the end)
        weights = [weight_of[d] for d in dims]
        objective = (f"`{loss['name']}` loss (scale {loss['scale']:g}) inside a Matryoshka loss over the dims "
                     f"{', '.join(map(str, dims))} ("
                     + (f"{rule} " if rule else "") + ("weights at the end" if rule == "learned" else "weights")
                     + f" {', '.join(f'{w:.3g}' for w in weights)}"
                     + (f", {loss['n_dims_per_step']} dims per step ({loss.get('dim_schedule', 'random')}"
                        + (", always the largest" if loss.get("always_full_dim") else "") + ")"
                        if loss["n_dims_per_step"] else "")
                     + "): each prefix of the embedding is trained to be an embedding on its own")
    else:
        objective = (f"`{loss['name']}` loss (scale {loss['scale']:g}) on the full {embedding_dim}-dim "
                     "embedding only (no Matryoshka loss)")
    extras = [text for on, text in (
        (loss.get("two_d"), f"2D Matryoshka: {loss.get('n_layers_per_step')} earlier layer(s) per step, layer weight "
                            f"{loss.get('layer_weight')}, KL weight {loss.get('kl_weight')} at temperature "
                            f"{loss.get('kl_temperature')}"),
        (loss.get("distill_weight"), f"prefix self-distillation toward the full embedding, weight "
                                     f"{loss.get('distill_weight')} at temperature {loss.get('distill_temperature')}"),
        (results.get("train", {}).get("cross_device"), "negatives from every process"),
        (train.get("cache_chunk_size"), f"GradCache in chunks of {train.get('cache_chunk_size')} texts")) if on]
    if extras:
        objective += "; " + "; ".join(extras)
    stats = results.get("train", {})
    rows = {f"{split}, {when}": scores for split in ("dev", "test")
            for when, scores in results.get(split, {}).items() if scores}
    eval_data = "; ".join(f"{split}: {_describe(evaluation[split])}" for split in ("dev", "test") if evaluation[split])

    lines = [
        *header, "",
        f"# A Matryoshka embedding model ({embedding_dim} dims), trained with mrl", "",
        f"- Base model: `{base}`",
        f"- Training data: {_describe(data['train'])}",
        f"- Objective: {objective}",
        f"- Training: {stats.get('steps', '?')} optimiser steps, batch {train['batch_size']} × "
        f"{stats.get('processes', 1)} process(es) × {train['grad_accum']} accumulation, lr {train['lr']:g}, "
        f"{train['epochs']} epoch(s) at most, warm-up {train['warmup_ratio']:g}, seed {train['seed']}, "
        f"precision {train['mixed_precision']}; {stats.get('samples', '?')} samples in {stats.get('seconds', '?')} s",
        "",
        "## Results", "",
        f"STS Spearman ×100 of the cosine of truncated, re-normalised embeddings, at each dim ({eval_data}):", "",
        markdown_table(rows) if rows else "(this run evaluated nothing)", "",
        "## Reproduce", "",
        "```bash", command, "```", "",
        "## Use", "",
        "With mrl:", "",
        "```python", "from mrl import Encoder",
        'model = Encoder.from_pretrained("path/to/this/folder")',
        f'embeddings = model.encode(["A man is playing a guitar.", "Someone plays music."], truncate_dim={example_dim})',
        "print(embeddings @ embeddings.T)  # cosine similarities: truncated vectors come re-normalised",
        "```", "",
        "With sentence-transformers:", "",
        "```python", "from sentence_transformers import SentenceTransformer",
        f'model = SentenceTransformer("path/to/this/folder", truncate_dim={example_dim})',
        'embeddings = model.encode(["A man is playing a guitar.", "Someone plays music."])',
        "print(model.similarity(embeddings, embeddings))  # cosine, so truncated vectors need no re-normalising",
        "```", "",
    ]
    return "\n".join(lines)
