"""Quantisation-aware Matryoshka (loss.quantisation) against post-hoc quantisation, per dim × precision, over seeds.

Each variant is a set of `--set` overrides of one recipe, trained with the same budget (benchmarks/quality.py's
run_one: one train.py run per variant and seed); every run is then scored at each dim × precision by
`python -m mrl.eval --quantization` (float32, int8, int4, binary, each quantised one also with float rescoring):

    sts   configs/sts-matryoshka.yaml at 1 epoch; STS-B test Spearman ×100
    nli   configs/nli-matryoshka.yaml on the local MiniLM, dims 384..8, batch 32, 100 steps, fp32 (the NLI grid of
          docs/loss-options.md); NLI retrieval nDCG@10 and Recall@100 (mrl.retrieval.data.nli_retrieval_set). Its queries, the last
          1000 distinct premises of the triplet files, are premises the recipe trains on: every triplet of a query
          premise is held out, and the runs train on the rest (<out>/data/train-without-queries.jsonl)

Writes <out>/quantisation.md (mean ± std over seeds; retention: % of the post-hoc model's float32 score at the
full dim, mean over seeds; each variant's step time), quantisation.json and retention_vs_bytes.png.

    python benchmarks/quantisation.py --recipe sts --seeds 0 1 2 --jobs 2 --threads 1 --out runs/quantisation-sts
    python benchmarks/quantisation.py --recipe nli --seeds 0 --set train.max_steps=2 --out runs/q-smoke  # a smoke run
Runs and evaluations already finished in --out are reused, so an interrupted study continues.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from quality import ROOT, mean_std, run_one  # noqa: E402  (ROOT is on sys.path from here)
from mrl.eval.precision import by_storage  # noqa: E402
from mrl.retrieval.data import nli_retrieval_set  # noqa: E402
from mrl.retrieval.quantize import storage_bytes  # noqa: E402

NLI_FILES = [os.path.join(ROOT, "..", "shared", "data", "nli", name)  # those configs/mirror.yaml names
             for name in ("triplets.jsonl.gz", "triplets-extra.jsonl.gz")]
RECIPES = {
    "sts": ("configs/sts-matryoshka.yaml", ["train.epochs=1"]),
    "nli": ("configs/nli-matryoshka.yaml", ["model.name=../shared/models/all-MiniLM-L6-v2",
                                            "loss.dims=[384,256,128,64,32,16,8]", "train.mixed_precision=no",
                                            "train.batch_size=32", "train.max_steps=100", "train.save_every=0",
                                            "eval.every=0"]),
}
ALL = ["loss.quantisation.int8=1.0", "loss.quantisation.int4=1.0", "loss.quantisation.binary=1.0"]
VARIANTS = {  # "posthoc": the option off (the model quantised after training, as a store does)
    "posthoc": [],
    "qat": ALL,
    "qat_int8": ["loss.quantisation.int8=1.0"],
    "qat_int4": ["loss.quantisation.int4=1.0"],
    "qat_binary": ["loss.quantisation.binary=1.0"],
    "qat_spread_out": [*ALL, "loss.quantisation.regulariser=spread_out", "loss.quantisation.regulariser_weight=1.0"],
    "qat_orthogonality": [*ALL, "loss.quantisation.regulariser=orthogonality",
                          "loss.quantisation.regulariser_weight=1.0"],
}
PLOTTED = ("float32", "int8", "int4", "binary")  # rescored storages keep float vectors too: no single size


def held_out_training_file(out: str) -> str:
    """The NLI triplets less every one whose premise is a query of the retrieval set, as a JSON-lines file."""
    path = os.path.join(out, "data", "train-without-queries.jsonl")
    if not os.path.exists(path):
        queries = set(nli_retrieval_set(NLI_FILES).queries)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kept = held = 0
        with open(path + ".tmp", "w", encoding="utf-8") as out_file:
            for name in NLI_FILES:
                with gzip.open(name, "rt", encoding="utf-8") as f:
                    for row in map(json.loads, filter(str.strip, f)):
                        held += row["anchor"] in queries
                        if row["anchor"] not in queries:
                            kept += 1
                            out_file.write(json.dumps({k: row[k] for k in ("anchor", "positive", "negative")}) + "\n")
        os.replace(path + ".tmp", path)
        print(f"NLI training file: {kept} triplets kept; {held} triplets of the {len(queries)} query premises held out")
    return path


def evaluate_run(args, run_dir: str, dims: list[int]) -> dict:
    """python -m mrl.eval --quantization on a run's model (reused when done): {storage: {dim: score}} per metric."""
    out = os.path.join(run_dir, "eval")
    if not os.path.exists(os.path.join(out, "results.json")):
        data = ["--sts", ""] + ["--nli-triplets", *NLI_FILES] if args.recipe == "nli" else []
        cmd = [sys.executable, "-m", "mrl.eval", "--model", os.path.join(run_dir, "model"), "--name", "run",
               "--quantization", "--no-plots", "--dims", *map(str, dims), *data, "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"evaluating {run_dir} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as f:
        entry = json.load(f)["run"]
    if args.recipe == "sts":
        return {"spearman": {name: {int(d): s for d, s in by_dim.items()}
                             for name, by_dim in {"float32": entry["sts"], **entry["sts_precisions"]}.items()}}
    return {metric: by_storage(entry["quantization"], metric) for metric in ("ndcg@10", "recall@100")}


def summarise(scores: list[dict]) -> dict:
    """metric -> storage -> dim -> (mean, std) over the seeds' evaluations."""
    return {m: {s: {d: mean_std([run[m][s][d] for run in scores]) for d in by_dim} for s, by_dim in storages.items()}
            for m, storages in scores[0].items()}


def tables(summary: dict, dims: list[int], reference: float) -> list[str]:
    head = "| variant | storage | " + " | ".join(f"d={d}" for d in dims) + " |"
    rule = "| --- | --- |" + " ---: |" * len(dims)
    absolute, retained = [head, rule], [head, rule]
    for variant, storages in summary.items():
        for storage, by_dim in storages.items():
            absolute.append(f"| {variant} | {storage} | " + " | ".join(f"{by_dim[d][0]:.2f} ± {by_dim[d][1]:.2f}"
                                                                       for d in dims) + " |")
            retained.append(f"| {variant} | {storage} | " + " | ".join(f"{100 * by_dim[d][0] / reference:.1f}"
                                                                       for d in dims) + " |")
    return ["\n".join(absolute), "\n".join(retained)]


def plot(summary: dict, reference: float, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, (variant, storages) in enumerate(summary.items()):
        for j, storage in enumerate(s for s in PLOTTED if s in storages):
            points = sorted((storage_bytes(storage, d), 100 * m / reference) for d, (m, _) in storages[storage].items())
            ax.plot(*zip(*points), marker="o", linestyle=styles[i % 4], color=f"C{j}", label=f"{variant}, {storage}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per vector")
    ax.set_ylabel(f"{metric}, % of post-hoc float32 at the full dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="sts")
    parser.add_argument("--variants", nargs="+", default=["posthoc", "qat"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per run (CPU)")
    parser.add_argument("--out", default="runs/quantisation")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    if "posthoc" not in args.variants:
        args.variants.insert(0, "posthoc")  # retention is against post-hoc float32
    args.config, recipe_set = RECIPES[args.recipe]
    args.set = [*recipe_set, *args.set]
    if args.recipe == "nli":  # the retrieval queries' triplets held out of training
        held_out = held_out_training_file(args.out)
        args.set.insert(0, f"data.train={{path: json, data_files: {{train: {held_out}}}, split: train}}")

    from mrl.run.config import load_config

    recipe = load_config(os.path.join(ROOT, args.config), args.set)
    dims = sorted(recipe.eval.dims or recipe.loss.dims, reverse=True)
    grid = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = list(pool.map(lambda vs: run_one(args, *vs, variants=VARIANTS), grid))
        scores = list(pool.map(lambda vs: evaluate_run(args, os.path.join(args.out, "runs", f"{vs[0]}-seed{vs[1]}"),
                                                       dims), grid))
    by_variant = {v: summarise([sc for (gv, _), sc in zip(grid, scores) if gv == v]) for v in args.variants}
    metrics = list(by_variant["posthoc"])
    report = [f"# Quantisation-aware Matryoshka vs post-hoc quantisation: {args.recipe} recipe, seeds {args.seeds}", "",
              f"Command: `python benchmarks/quantisation.py --recipe {args.recipe} --seeds "
              f"{' '.join(map(str, args.seeds))} --variants {' '.join(args.variants)}"
              + "".join(f" --set {o}" for o in args.set[len(recipe_set) + (args.recipe == 'nli'):]) + "`", "",
              f"Recipe: `{args.config}` with " + " ".join(f"`{o}`" for o in args.set) + "", "",
              *[f"- {v}: {' '.join(VARIANTS[v]) or '(none: quantised after training)'}" for v in args.variants], ""]
    for metric in metrics:
        summary = {v: by_variant[v][metric] for v in args.variants}
        reference = summary["posthoc"]["float32"][dims[0]][0]
        absolute, retained = tables(summary, dims, reference)
        report += [f"## {metric} ×100, mean ± std over seeds", "", absolute, "",
                   f"## {metric}: retention, % of post-hoc float32 at d={dims[0]} ({reference:.2f})", "", retained, ""]
        if metric == metrics[0]:
            plot(summary, reference, metric, os.path.join(args.out, "retention_vs_bytes.png"))
    report += ["## Step time (train.py's own count: seconds of training / steps)", "",
               "| variant | s/step | samples/s after each shape's first step |", "| --- | ---: | ---: |"]
    for v in args.variants:
        runs = [r["train"] for (gv, _), r in zip(grid, trained) if gv == v]
        per_step = mean_std([r["seconds"] / r["steps"] for r in runs])
        other = [r["samples_per_second_other_steps"] for r in runs if r["samples_per_second_other_steps"]]
        report.append(f"| {v} | {per_step[0]:.2f} ± {per_step[1]:.2f} | "
                      + (f"{mean_std(other)[0]:.1f} |" if other else "– |"))
    report += ["", "![retention against bytes per vector](retention_vs_bytes.png)", ""]
    with open(os.path.join(args.out, "quantisation.md"), "w") as f:
        f.write("\n".join(report))
    with open(os.path.join(args.out, "quantisation.json"), "w") as f:
        json.dump({"recipe": args.recipe, "overrides": args.set, "seeds": args.seeds, "dims": dims,
                   "scores": {v: {m: {s: {d: list(ms) for d, ms in by_dim.items()} for s, by_dim in st.items()}
                                  for m, st in by_variant[v].items()} for v in args.variants}}, f, indent=2)
    print("\n".join(report))


if __name__ == "__main__":
    main()
