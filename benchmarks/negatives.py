"""Which negatives train a Matryoshka contrastive model best, per dim: the NLI triplets' own (the given
contradictions), negatives mined with the starting model (python -m mrl.data.mine), and the given ones with
false-negative masking (loss.false_negative_margin). MNRL in Matryoshka on the local NLI triplets, seeds
apart; scored per dim on STS-B dev and on an NLI retrieval set held out of training.

    python benchmarks/negatives.py --seeds 0 1 2 --out runs/negatives

The retrieval set (mrl.retrieval.data.nli_retrieval_set): the last 1000 distinct premises of the triplet
files are the queries, every distinct hypothesis the corpus, a premise's entailments its relevant documents.
Every triplet of those 1000 premises is left out of training (and of mining), so the queries and their
relevant documents are new to every model. Budget (CPU): all-MiniLM-L6-v2, dims 384..32, batch 32 triplets,
max length 75, --steps optimiser steps (default 100), lr 2e-5, fp32. Mining: the starting model, 1 negative per
anchor from ranks 10..99 of the training positives, skipping any scored above 95% of the anchor's positive.
Runs already finished in --out are reused.
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mrl.retrieval.data import nli_retrieval_set  # noqa: E402

DIMS = [384, 256, 128, 64, 32]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    parser.add_argument("--out", default="runs/negatives")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model = os.path.join(args.shared, "models", "all-MiniLM-L6-v2")
    files = [os.path.join(args.shared, "data", "nli", name) for name in ("triplets.jsonl.gz", "triplets-extra.jsonl.gz")]

    held_out = set(nli_retrieval_set(files).queries)  # the retrieval queries: their triplets are not trained on
    rows = [json.loads(line) for path in files for line in gzip.open(path, "rt", encoding="utf-8") if line.strip()]
    train = [{k: r[k] for k in ("anchor", "positive", "negative")} for r in rows if r["anchor"] not in held_out]
    given = os.path.join(out, "train-given.jsonl")
    with open(given, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    mined = os.path.join(out, "train-mined.jsonl")
    if not os.path.exists(mined):
        print(run([sys.executable, "-m", "mrl.data.mine", "--model", model, "--negatives", "1", "--range-min", "10",
                   "--range-max", "100", "--relative-margin", "0.05", "--out", mined, "--data",
                   f"{{path: json, data_files: {{train: {given}}}, split: train, columns: [anchor, positive]}}"]))
    variants = {"given negatives": (given, []), "mined negatives": (mined, []),
                "given negatives, false negatives masked": (given, ["loss.false_negative_margin=0.0"])}
    results = {}
    for name, (data, extra) in variants.items():
        for seed in args.seeds:
            run_dir = os.path.join(out, f"{name.replace(' ', '-').replace(',', '')}-seed{seed}")
            if not os.path.exists(os.path.join(run_dir, "results.json")):
                settings = [f"model.name={model}", f"loss.dims={DIMS}".replace(" ", ""), "train.mixed_precision=no",
                            "train.batch_size=32", f"train.max_steps={args.steps}", "train.save_every=0",
                            "eval.every=0", "eval.at_start=false", "eval.test=null", f"train.seed={seed}",
                            f"data.train={{path: json, data_files: {{train: {data}}}, split: train}}",
                            f"output_dir={run_dir}", *extra]
                run([sys.executable, "train.py", "--config", "configs/nli-matryoshka.yaml", "--overwrite",
                     *[a for s in settings for a in ("--set", s)]])
            if not os.path.exists(os.path.join(run_dir, "retrieval", "results.json")):
                run([sys.executable, "-m", "mrl.eval", "--model", os.path.join(run_dir, "model"), "--sts", "",
                     "--dims", *map(str, DIMS), "--nli-triplets", *files, "--no-plots", "--out",
                     os.path.join(run_dir, "retrieval")])
            with open(os.path.join(run_dir, "results.json")) as f:
                sts = json.load(f)["dev"]["after training"]
            with open(os.path.join(run_dir, "retrieval", "results.json")) as f:
                ndcg = {d: m["ndcg@10"] for d, m in next(iter(json.load(f).values()))["retrieval"].items()}
            results.setdefault(name, []).append({"sts": sts, "ndcg": ndcg})
            print(f"{name}, seed {seed}: done", flush=True)

    def cells(name, key):
        return " | ".join(f"{statistics.mean(r[key][str(d)] for r in results[name]):.2f} ± "
                          f"{statistics.stdev(r[key][str(d)] for r in results[name]) if len(args.seeds) > 1 else 0:.2f}"
                          for d in DIMS)

    header = "| negatives | " + " | ".join(f"d={d}" for d in DIMS) + " |\n| --- |" + " ---: |" * len(DIMS)
    report = "\n".join([
        f"# Negatives for MNRL in Matryoshka: seeds {args.seeds}, {args.steps} steps of 32 triplets (CPU)", "",
        f"`python benchmarks/negatives.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}`; "
        f"{len(train)} training triplets, {len(held_out)} held-out queries.", "",
        "## STS-B dev Spearman ×100, mean ± std over seeds", "", header,
        *[f"| {name} | {cells(name, 'sts')} |" for name in results], "",
        "## NLI retrieval (held-out premises), nDCG@10 ×100, mean ± std over seeds", "", header,
        *[f"| {name} | {cells(name, 'ndcg')} |" for name in results], ""])
    with open(os.path.join(out, "negatives.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
