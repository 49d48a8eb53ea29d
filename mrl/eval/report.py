"""What a run reports: per-dim tables in Markdown (results.md, the log) and the model card (README.md) of a
trained model folder, written from the run's own config and results.

The card says what the model is (base model, data, loss, dims), how well each dim does (the run's per-dim
table), how to reproduce it (the exact command) and how to use it truncated, with mrl and with
sentence-transformers. Its YAML header is the hub's model-card metadata, so the folder can be pushed as it is.
"""

import os

from mrl.loss.quantisation import QUANTISED  # int8, int4, binary


def markdown_table(results: dict[str, dict[int, float]], metric: str = "Spearman ×100") -> str:
    """{'name': {dim: score}} -> a Markdown table, one row per name, one column per dim (largest first)."""
    dims = sorted({d for scores in results.values() for d in scores}, reverse=True)
    lines = [f"| {metric} | " + " | ".join(f"d={d}" for d in dims) + " |",
             "| --- |" + " ---: |" * len(dims)]
    for name, scores in results.items():
        cells = [f"{scores[d]:.2f}" if d in scores else "" for d in dims]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retention(scores: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Each score as % of scores["float32"] at its largest dim: 100 · s(d, p) / s(D, float32)."""
    reference = scores["float32"][max(scores["float32"])]
    return {name: {d: 100 * s / reference for d, s in by_dim.items()} for name, by_dim in scores.items()}


def retention_markdown(scores: dict[str, dict[int, float]]) -> str:
    """retention as a Markdown table: a row per precision, a column per dim."""
    full = max(scores["float32"])
    return markdown_table(retention(scores), f"% of float32 at d={full}")


def mteb_table(results: dict) -> str:
    """python -m mrl.mteb's results -> a Markdown table: a row per task, a column per dim × precision (the
    task's main score ×100), and the seconds the task took at all of them."""
    columns = [f"d{d}/{p}" for d in results["dims"] for p in results["precisions"]]
    lines = ["| task | " + " | ".join(c.replace("/", " ") for c in columns) + " | seconds |",
             "| --- |" + " ---: |" * (len(columns) + 1)]
    for task, scores in results["scores"].items():
        lines.append(f"| {task} | " + " | ".join(f"{scores[c]:.2f}" for c in columns)
                     + f" | {results['seconds'][task]:g} |")
    return "\n".join(lines)


MTEB_START, MTEB_END = "<!-- mteb -->", "<!-- /mteb -->"


def with_mteb_section(card: str, table: str) -> str:
    """The model card with its MTEB section (between the two markers) replaced by `table`, or added at the end."""
    section = (f"{MTEB_START}\n## MTEB\n\nMain score ×100 of each task at each dim and precision, from "
               f"`python -m mrl.mteb` (truncated, re-normalised embeddings):\n\n{table}\n{MTEB_END}")
    if MTEB_START in card and MTEB_END in card:
        before, rest = card.split(MTEB_START, 1)
        return before + section + rest.split(MTEB_END, 1)[1]
    return card.rstrip("\n") + ("\n\n" if card.strip() else "") + section + "\n"


def result_rows(results: dict) -> dict[str, dict[int, float]]:
    """train.py's results -> the rows of its per-dim table: {'dev, after training': {dim: score}, ...}."""
    return {f"{split}, {when}": scores for split in ("dev", "test")
            for when, scores in results.get(split, {}).items() if scores}


def results_markdown(results: dict) -> str:
    """results.md: the run's per-dim table, after a line of its training statistics."""
    return f"STS-B Spearman ×100 per dim; {results['train']}\n\n{markdown_table(result_rows(results))}\n"


def _describe(spec: dict | None) -> str:
    if not spec:
        return "none"
    if "path" not in spec:  # a mixture: {name: spec}
        return "a mixture of " + "; ".join(f"{name}: {_describe(one)} (weight {one.get('weight', 1)}, loss "
                                           f"{one.get('loss', 'as loss.name')})" for name, one in spec.items())
    name = f"`{spec['path']}`" + (f" (subset `{spec['name']}`)" if spec.get("name") else "")
    if spec.get("data_files"):
        name += f", files {spec['data_files']}"
    return f"{name}, split `{spec['split']}`"


def _objective(loss: dict, train: dict, results: dict, embedding_dim: int) -> str:
    """One sentence: the loss, its Matryoshka dims and weights, and every option beyond plain MRL."""
    if not loss["matryoshka"]:
        return (f"`{loss['name']}` loss (scale {loss['scale']:g}) on the full {embedding_dim}-dim "
                "embedding only (no Matryoshka loss)")
    dims = sorted(loss["dims"], reverse=True)
    rule = loss["dim_weights"] if isinstance(loss["dim_weights"], str) else None
    weight_of = {int(d): w for d, w in results["train"]["dim_weights"].items()}  # as trained (learned: at the end)
    sampling, distill, two_d = loss["dim_sampling"], loss["distill"], loss["two_d"]
    quantisation = loss.get("quantisation") or {}
    stored = ", ".join(f"{p} (weight {quantisation[p]:g})" for p in QUANTISED if quantisation.get(p))
    text = (f"`{loss['name']}` loss (scale {loss['scale']:g}) inside a Matryoshka loss over the dims "
            f"{', '.join(map(str, dims))} (" + (f"{rule} " if rule else "")
            + ("weights at the end" if rule == "learned" else "weights")
            + f" {', '.join(f'{weight_of[d]:.3g}' for d in dims)}"
            + (f", {sampling['dims_per_step']} dims per step ({sampling['schedule']}"
               + (", always the largest" if sampling["always_full"] else "") + ")" if sampling["dims_per_step"] else "")
            + "): each prefix of the embedding is trained to be an embedding on its own")
    extras = [text for on, text in (
        (two_d["enabled"], f"2D Matryoshka: {two_d['layers_per_step']} earlier layer(s) per step, layer weight "
                           f"{two_d['layer_weight']}, KL weight {two_d['kl_weight']} at temperature "
                           f"{two_d['kl_temperature']}"),
        (distill["weight"], f"prefix self-distillation toward the full embedding, weight {distill['weight']} at "
                            f"temperature {distill['temperature']}"),
        (stored, f"quantisation-aware: every trained prefix also stored as {stored}, through a straight-through "
                 "estimator (precisions, weights and ranges in quantisation.json)"),
        (quantisation.get("regulariser"), f"{quantisation.get('regulariser')} regulariser, weight "
                                          f"{quantisation.get('regulariser_weight')}"),
        (results["train"].get("cross_device"), "negatives from every process"),
        (train["cache_chunk_size"], f"GradCache in chunks of {train['cache_chunk_size']} texts")) if on]
    return "; ".join([text, *extras])


def _retention_section(results: dict) -> list[str]:
    """The card's quantisation section: STS at each dim × precision as % of float32 at the full dim (test, else
    dev), when the run scored the stored precisions ("after training, <precision>"); else nothing."""
    for split in ("test", "dev"):
        rows = results.get(split, {})
        stored = {p: rows[f"after training, {p}"] for p in QUANTISED if rows.get(f"after training, {p}")}
        if stored and rows.get("after training"):
            table = {"float32": rows["after training"], **stored}
            return ["## Quantisation", "",
                    f"STS Spearman ({split}) of the truncated embeddings stored at each precision (int8 / int4: codes "
                    "with per-dim scales calibrated on the evaluation sentences; binary: signs, the scaled cosine), "
                    f"as % of float32 at d={max(table['float32'])}:", "", retention_markdown(table), ""]
    return []


def model_card(config: dict, results: dict, command: str, embedding_dim: int) -> str:
    """config: the resolved config as a dict; results: train.py's results (dims, dev/test per-dim scores,
    train stats); command: the command line that reproduces the run."""
    model, loss, train, data, evaluation = (config[k] for k in ("model", "loss", "train", "data", "eval"))
    base = model["name"]
    dims = sorted(loss["dims"], reverse=True) if loss["matryoshka"] else [embedding_dim]
    example_dim = min((d for d in dims if d < embedding_dim), default=embedding_dim, key=lambda d: abs(d - 64))
    is_hub_id = not os.path.exists(base) and base.count("/") == 1
    header = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
              "tags: [sentence-transformers, sentence-similarity, feature-extraction, matryoshka, mrl]",
              *([f"base_model: {base}"] if is_hub_id else []), "---"]
    stats, rows = results.get("train", {}), result_rows(results)
    eval_data = "; ".join(f"{split}: {_describe(evaluation[split])}" for split in ("dev", "test") if evaluation[split])
    lines = [
        *header, "",
        f"# A Matryoshka embedding model ({embedding_dim} dims), trained with mrl", "",
        f"- Base model: `{base}`",
        f"- Training data: {_describe(data['train'])}",
        f"- Objective: {_objective(loss, train, results, embedding_dim)}",
        f"- Training: {stats.get('steps', '?')} optimiser steps, batch {train['batch_size']} × "
        f"{stats.get('processes', 1)} process(es) × {train['grad_accum']} accumulation, lr {train['lr']:g}, "
        f"{train['epochs']} epoch(s) at most, warm-up {train['warmup_ratio']:g}, seed {train['seed']}, "
        f"precision {train['mixed_precision']}; {stats.get('samples', '?')} samples in {stats.get('seconds', '?')} s",
        "",
        "## Results", "",
        f"STS Spearman ×100 of the cosine of truncated, re-normalised embeddings, at each dim ({eval_data}):", "",
        markdown_table(rows) if rows else "(this run evaluated nothing)", "",
        *_retention_section(results),
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
