"""Quality of the Matryoshka loss's options against plain MRL, per dim, over seeds: one table.

Each variant is a set of `--set` overrides of one recipe; every (variant, seed) is one train.py run with the
same budget. The table gives STS-B dev Spearman ×100 per dim as mean ± std over the seeds (sample std) and
each variant's change against plain MRL. A variant is chosen on dev alone: the best mean over the small dims
(32, 16, 8 by default) among those whose full dim is at most 0.2 below plain MRL's; test is then reported for
plain MRL and the chosen variant only.

    python benchmarks/quality.py --seeds 0 1 2 --jobs 2 --set train.max_steps=200 --out runs/quality-sts
    python benchmarks/quality.py --variants mrl distill --seeds 0 --set train.max_steps=10   # a smoke run
Runs already finished in --out are reused (their results.json), so an interrupted grid continues.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mrl.run.config import load_config  # noqa: E402

# name -> overrides of the recipe; "mrl" is plain MRL (the reference's objective, our code)
VARIANTS = {
    "mrl": [],
    "distill": ["loss.distill.weight=1.0", "loss.distill.temperature=0.05"],
    "cyclic_full": ["loss.dim_sampling.dims_per_step=4", "loss.dim_sampling.schedule=cyclic",
                    "loss.dim_sampling.always_full=true"],
    "inverse_sqrt": ["loss.dim_weights=inverse_sqrt"],
    "inverse": ["loss.dim_weights=inverse"],
    "learned": ["loss.dim_weights=learned"],
    "baseline": ["loss.matryoshka=false"],  # no Matryoshka loss at all, for scale
}


def run_one(args, variant: str, seed: int, variants: dict = VARIANTS) -> dict:
    """train.py with args.config, args.set and the variant's overrides (of `variants`) at `seed`, in
    <args.out>/runs/<variant>-seed<seed>; its results.json (a finished run of the same config is reused)."""
    out_dir = os.path.join(args.out, "runs", f"{variant}-seed{seed}")
    results_path = os.path.join(out_dir, "results.json")
    overrides = [*args.set, *variants[variant], f"train.seed={seed}", f"output_dir={out_dir}", "eval.at_start=false"]
    if os.path.exists(results_path):  # reuse a finished run, but only one of this very config
        with open(results_path) as f:
            if json.load(f)["config"] != load_config(os.path.join(ROOT, args.config), overrides).to_dict():
                raise RuntimeError(f"{out_dir} holds a run of another config; use another --out")
    else:
        cmd = [sys.executable, "train.py", "--config", args.config, *[a for o in overrides for a in ("--set", o)]]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} seed {seed} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        print(f"{variant} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    with open(results_path) as f:
        return json.load(f)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(scores: dict[str, list[dict]], split: str, dims: list[int]) -> dict[str, dict[int, tuple]]:
    """variant -> dim -> (mean, std) of Spearman ×100 over the seeds."""
    return {v: {d: mean_std([r[split]["after training"][str(d)] for r in runs]) for d in dims}
            for v, runs in scores.items()}


def table(summary: dict, dims: list[int], reference: str = "mrl") -> str:
    lines = ["| variant | " + " | ".join(f"d={d}" for d in dims) + " |", "| --- |" + " ---: |" * len(dims)]
    for variant, by_dim in summary.items():
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in (by_dim[d] for d in dims)]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        if variant != reference and reference in summary:
            deltas = [by_dim[d][0] - summary[reference][d][0] for d in dims]
            lines.append(f"| Δ vs {reference} | " + " | ".join(f"{x:+.2f}" for x in deltas) + " |")
    return "\n".join(lines)


def choose(summary: dict, small_dims: list[int], full: int, reference: str = "mrl") -> tuple[str, dict]:
    """The variant with the best mean over small_dims whose full dim is at most 0.2 below the reference."""
    allowed = {v: s for v, s in summary.items() if s[full][0] >= summary[reference][full][0] - 0.2 and v != "baseline"}
    small_mean = {v: statistics.mean(s[d][0] for d in small_dims) for v, s in allowed.items()}
    return max(small_mean, key=small_mean.get), small_mean


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sts-matryoshka.yaml", help="the recipe")
    parser.add_argument("--variants", nargs="+", default=["mrl", "distill", "cyclic_full", "inverse_sqrt", "learned"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--small-dims", nargs="+", type=int, default=[32, 16, 8], help="dims the choice looks at")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per run (CPU)")
    parser.add_argument("--out", default="runs/quality")
    args = parser.parse_args()
    if "mrl" not in args.variants:
        args.variants.insert(0, "mrl")  # every delta and the choice are against plain MRL

    recipe = load_config(os.path.join(ROOT, args.config), args.set)
    dims = sorted(recipe.eval.dims or recipe.loss.dims, reverse=True)
    if recipe.eval.dev is None or recipe.eval.test is None:
        raise ValueError("the recipe needs eval.dev (to choose on) and eval.test (to report)")
    if not set(args.small_dims) <= set(dims):
        raise ValueError(f"--small-dims {args.small_dims}: not all among the evaluated dims {dims}")

    grid = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        finished = list(pool.map(lambda vs: run_one(args, *vs), grid))
    scores = {v: [r for (gv, _), r in zip(grid, finished) if gv == v] for v in args.variants}
    dev = summarise(scores, "dev", dims)
    chosen, small_mean = choose(dev, args.small_dims, dims[0])
    test = summarise({v: scores[v] for v in dict.fromkeys(["mrl", chosen])}, "test", dims)

    overrides = " ".join(f"--set {o}" for o in args.set)
    report = "\n".join([
        f"# Quality of the Matryoshka options: {args.config}, seeds {args.seeds}",
        "", f"Command: `python benchmarks/quality.py --config {args.config} --seeds {' '.join(map(str, args.seeds))} "
            f"--variants {' '.join(args.variants)} {overrides}`".replace("  ", " "),
        "", "Variants (overrides of the recipe):", "",
        *[f"- {v}: {' '.join(VARIANTS[v]) or '(none: plain MRL)'}" for v in args.variants],
        "", "## STS-B dev Spearman ×100, mean ± std over seeds (the choice is made here)", "", table(dev, dims),
        "", f"Mean over d ∈ {args.small_dims} (variants within 0.2 of plain MRL at d={dims[0]}): "
            + ", ".join(f"{v} {m:.2f}" for v, m in sorted(small_mean.items(), key=lambda kv: -kv[1])),
        f"Chosen on dev: **{chosen}**.",
        "", "## STS-B test Spearman ×100 of plain MRL and the chosen variant, mean ± std over seeds", "",
        table(test, dims), "",
        f"Training time per run: {statistics.mean(r['train']['seconds'] for r in finished):.0f} s on average "
        f"({finished[0]['train']['steps']} steps).", ""])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"config": args.config, "overrides": args.set, "seeds": args.seeds, "chosen": chosen,
                   "dev": {v: {d: list(ms) for d, ms in s.items()} for v, s in dev.items()},
                   "test": {v: {d: list(ms) for d, ms in s.items()} for v, s in test.items()}}, f, indent=2)
    print(report)


if __name__ == "__main__":
    main()
