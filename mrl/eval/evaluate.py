"""Evaluate saved models at every dim on STS and retrieval; write JSON, Markdown tables and the blog's two plots.

    python -m mrl.eval --model runs/default/model --model runs/baseline/model --name Matryoshka --name baseline \
        --nli-triplets data/nli/triplets.jsonl.gz data/nli/triplets-extra.jsonl.gz \
        --quantization --out runs/eval

    python -m mrl.eval --from-results runs/default/results.json runs/baseline/results.json --out runs/plots

Writes to --out: results.json, results.md and PNG plots (matplotlib, `pip install -e .[plots]`): the score per
dim of each model, and each model's score relative to its own best dim. STS data is a dataset spec (hub id or
local files, through the mirror file as in train.py); retrieval data is a BEIR folder or NLI triplets
(mrl.retrieval.data.nli_retrieval_set).
"""

import argparse
import json
import os
import sys

import torch
import yaml

from mrl.cli import one_line_errors
from mrl.data.tables import load_table
from mrl.eval.precision import by_storage, quantization_markdown, quantization_table
from mrl.eval.report import markdown_table, retention_markdown
from mrl.retrieval.data import load_beir, nli_retrieval_set
from mrl.retrieval.metrics import METRICS, evaluate_retrieval
from mrl.retrieval.quantize import PRECISIONS
from mrl.sources import load_mirror, resolve_model
from mrl.eval.sts import evaluate_sts_stored

DEFAULT_STS = "{path: sentence-transformers/stsb, split: test}"


def default_dims(width: int) -> list[int]:
    """width, then halving down to 8 (384 -> 384, 192, 96, 48, 24, 12; 768 -> 768, 384, ..., 12), plus the
    usual Matryoshka dims that fit."""
    dims, d = {width}, width
    while d // 2 >= 8:
        d //= 2
        dims.add(d)
    return sorted(dims | {d for d in (512, 256, 128, 64, 32, 16, 8) if d < width}, reverse=True)


def plot(scores: dict[str, dict[int, float]], ylabel: str, title: str, path_stem: str) -> list[str]:
    """Two charts: the score per dim of each model, and each score relative to that model's best (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for relative in (False, True):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, by_dim in scores.items():
            dims = sorted(by_dim)
            values = [by_dim[d] for d in dims]
            if relative:
                values = [100 * v / max(values) for v in values]
            ax.plot(dims, values, marker="o", label=name)
        ax.set_xscale("log", base=2)
        all_dims = sorted({d for by_dim in scores.values() for d in by_dim})
        ax.set_xticks(all_dims, [str(d) for d in all_dims])
        ax.set_xlabel("embedding dimensions (prefix length)")
        ax.set_ylabel(f"{ylabel}, % of the model's best" if relative else ylabel)
        ax.set_title(title + (" (relative)" if relative else ""))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = f"{path_stem}{'_relative' if relative else ''}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def evaluate_models(args) -> dict:
    from mrl.model.encoder import Encoder

    mirror = load_mirror(args.mirror)
    sts_table = load_table(yaml.safe_load(args.sts), "--sts", needs_label=True, mirror=mirror) if args.sts else None
    data = None
    if args.beir:
        data = load_beir(args.beir, args.beir_split)
    elif args.nli_triplets:
        data = nli_retrieval_set(args.nli_triplets, args.n_queries)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for name, model_path in zip(args.name, args.model):
        encoder = Encoder.from_pretrained(resolve_model(model_path, mirror)).to(device)
        dims = args.dims or default_dims(encoder.embedding_dim)
        entry = {"model": model_path, "dims": dims}
        if sts_table is not None:  # with --quantization, each precision too, from the same vectors
            precisions = PRECISIONS if args.quantization else ["float32"]
            sts = evaluate_sts_stored(encoder, sts_table, dims, precisions, args.batch_size, show_progress=True,
                                      n_layers=args.n_layers, layer_norm=args.layer_norm, rescore=True)
            entry["sts"] = sts.pop("float32")
            if sts:
                entry["sts_precisions"] = sts
        if data is not None:
            encode = dict(batch_size=args.batch_size, normalize=False, show_progress=True, n_layers=args.n_layers,
                          layer_norm=args.layer_norm)
            queries = encoder.encode(data.queries, **encode).to(device)
            docs = encoder.encode(data.docs, **encode).to(device)
            entry["retrieval"] = evaluate_retrieval(queries, docs, data, dims)
            entry["retrieval_set"] = {"queries": len(data.queries), "documents": len(data.docs)}
            if args.quantization:
                entry["quantization"] = quantization_table(queries, docs, data, dims)
        results[name] = entry
    return results


def write_outputs(results: dict, out: str, plots: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    sections, figures = [], []
    sts = {name: {int(d): s for d, s in r["sts"].items()} for name, r in results.items() if r.get("sts")}
    if sts:
        sections.append("## STS: Spearman ×100 per dim\n\n" + markdown_table(sts))
    retrieval = {name: {int(d): m for d, m in r["retrieval"].items()} for name, r in results.items()
                 if r.get("retrieval")}
    for metric in METRICS if retrieval else ():
        table = {name: {d: m[metric] for d, m in by_dim.items()} for name, by_dim in retrieval.items()}
        sections.append(f"## Retrieval: {metric} ×100 per dim\n\n" + markdown_table(table, metric))
    for name, r in results.items():
        if r.get("sts_precisions"):
            table = {"float32": {int(d): s for d, s in r["sts"].items()},
                     **{p: {int(d): s for d, s in by_dim.items()} for p, by_dim in r["sts_precisions"].items()}}
            sections.append(f"## STS × precision: {name}\n\nSpearman ×100 (rescored: the first sentence in float)"
                            f"\n\n{markdown_table(table)}\n\nRetained:\n\n{retention_markdown(table)}")
        if r.get("quantization"):
            ndcg = by_storage(r["quantization"])
            sections.append(f"## Quantisation × truncation: {name}\n\n{quantization_markdown(r['quantization'])}"
                            f"\n\nnDCG@10 retained:\n\n{retention_markdown(ndcg)}")
    if plots:
        if sts:
            figures += plot(sts, "Spearman ×100", "STS per dim", os.path.join(out, "sts"))
        if retrieval:
            ndcg = {name: {d: m["ndcg@10"] for d, m in by_dim.items()} for name, by_dim in retrieval.items()}
            figures += plot(ndcg, "nDCG@10 ×100", "Retrieval per dim", os.path.join(out, "retrieval_ndcg"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                                          for p in figures) + "\n")
    print("\n\n".join(sections))
    print(f"\nwrote {out}/results.json, results.md" + (f" and {len(figures)} plots" if figures else ""))


def from_run_results(paths: list[str], names: list[str]) -> dict:
    """train.py's results.json files -> this module's results (STS test after training, else dev)."""
    results = {}
    for path, name in zip(paths, names):
        with open(path) as f:
            run = json.load(f)
        split = "test" if run.get("test", {}).get("after training") else "dev"
        results[name] = {"model": path, "sts": run[split]["after training"], "split": split}
    return results


def main(argv=None, prog: str | None = None):
    sys.excepthook = one_line_errors  # an error a user can fix prints as one line (mrl/cli.py)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="model folder or hub id (repeat for several)")
    parser.add_argument("--name", action="append", default=[], help="a name per --model (default: the path)")
    parser.add_argument("--from-results", nargs="+", default=[], help="train.py results.json files to plot")
    parser.add_argument("--sts", default=DEFAULT_STS, help="dataset spec (YAML) of an STS table; '' to skip")
    parser.add_argument("--beir", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    parser.add_argument("--beir-split", default="test")
    parser.add_argument("--nli-triplets", nargs="+", help="NLI triplet files to build a retrieval set from")
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--dims", type=int, nargs="+", help="default: the width, its halvings while >= 8, and 512..8 below the width")
    parser.add_argument("--n-layers", type=int, help="embed with the first n layers (2D Matryoshka models)")
    parser.add_argument("--layer-norm", action="store_true", help="layer norm before truncation")
    parser.add_argument("--quantization", action="store_true",
                        help="STS and retrieval at each dim × float32 / int8 / int4 / binary, with and without rescoring")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mirror", default="configs/mirror.yaml" if os.path.exists("configs/mirror.yaml") else None)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.from_results):
        parser.error("give --model (evaluate saved models) or --from-results (plot train.py results), not both")
    sources = args.model or args.from_results
    if args.name and len(args.name) != len(sources):
        parser.error(f"--name: {len(args.name)} names for {len(sources)} models")
    args.name = args.name or sources
    results = evaluate_models(args) if args.model else from_run_results(args.from_results, args.name)
    write_outputs(results, args.out, plots=not args.no_plots)

