"""Quality of mrl against the reference trainer at one budget: a recipe trained by both, over seeds, each model
scored by the same evaluator (mrl.eval.sts) on the recipe's STS dev and test sets; mean ± std per dim, side by side.

    python benchmarks/vs_reference.py --seeds 0 1 2 --set train.epochs=1 --out runs/vs-reference-sts
    python benchmarks/vs_reference.py --config configs/nli-matryoshka.yaml --seeds 0 1 2 \\
        --set model.name=../shared/models/all-MiniLM-L6-v2 --set loss.dims=[384,256,128,64,32] \\
        --set train.mixed_precision=no --set train.batch_size=32 --set train.max_steps=100 --out runs/vs-reference-nli
    python benchmarks/vs_reference.py ... --variant wd0=train.weight_decay=0   # an mrl variant beside them

mrl is train.py as it is (the recipe with --set overrides). The reference is sentence-transformers'
SentenceTransformerTrainer with the same model, data, loss (CoSENT or MultipleNegativesRankingLoss, in
MatryoshkaLoss over loss.dims unless loss.matryoshka is false), batch size, steps, learning rate, warm-up,
clipping and seed, and its own defaults otherwise: weight decay 0 (mrl: 0.01; --reference-weight-decay sets
it), its own shuffling and its NO_DUPLICATES sampler for contrastive recipes. Runs already finished in --out
are reused, so an interrupted comparison continues; runs go one at a time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mrl.run.config import load_config  # noqa: E402


def run_mrl(args, name: str, overrides: list[str], seed: int) -> dict:
    out = os.path.join(args.out, f"{name}-seed{seed}")
    if not os.path.exists(os.path.join(out, "results.json")):
        settings = [*args.set, *overrides, f"train.seed={seed}", f"output_dir={out}", "eval.at_start=false"]
        cmd = [sys.executable, "train.py", "--config", args.config, "--overwrite",
               *[a for o in settings for a in ("--set", o)]]
        run(cmd, f"{name} seed {seed}")
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def run_reference(args, seed: int) -> dict:
    out = os.path.join(args.out, f"reference-seed{seed}")
    if not os.path.exists(os.path.join(out, "results.json")):
        cmd = [sys.executable, __file__, "--train-reference", "--seed", str(seed), "--config", args.config,
               "--out", out, "--reference-weight-decay", str(args.reference_weight_decay),
               *(["--reference-batches", args.reference_batches] if args.reference_batches != "own" else []),
               *[a for o in args.set for a in ("--set", o)]]
        run(cmd, f"reference seed {seed}")
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def run(cmd: list[str], what: str) -> None:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    print(f"{what}: {time.perf_counter() - started:.0f} s", flush=True)


def train_reference(args) -> None:
    """One SentenceTransformerTrainer run of the recipe; writes results.json as train.py's (dev, test, train)."""
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.training_args import BatchSamplers

    from mrl import Encoder
    from mrl.data import load_table
    from mrl.sources import load_mirror, resolve_model
    from mrl.eval.sts import evaluate_sts

    cfg = load_config(os.path.join(ROOT, args.config), args.set)
    mirror = load_mirror(os.path.join(ROOT, cfg.mirror) if cfg.mirror else None)
    table = load_table(cfg.data.train, "data.train", cfg.loss.name == "cosent", mirror)
    model = SentenceTransformer(resolve_model(cfg.model.name, mirror), device="cpu")
    if cfg.model.max_seq_length:
        model.max_seq_length = cfg.model.max_seq_length
    if cfg.loss.name == "cosent":
        loss, sampler, table = losses.CoSENTLoss(model, scale=cfg.loss.scale), BatchSamplers.BATCH_SAMPLER, \
            table.rename_column("label", "score")
    else:
        loss, sampler = losses.MultipleNegativesRankingLoss(model, scale=cfg.loss.scale), BatchSamplers.NO_DUPLICATES
    if cfg.loss.matryoshka:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=cfg.loss.dims)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.out, per_device_train_batch_size=cfg.train.batch_size, num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps or -1, learning_rate=cfg.train.lr, warmup_ratio=cfg.train.warmup_ratio,
        weight_decay=args.reference_weight_decay, max_grad_norm=cfg.train.max_grad_norm, seed=args.seed,
        batch_sampler=sampler, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        bf16=cfg.train.mixed_precision == "bf16")
    if args.reference_batches == "mrl":  # mrl's batches, in mrl's order (mrl.data.BatchSampler, as train.py makes them)
        from mrl.run.config import uses_no_duplicates
        from mrl.data import BatchSampler, text_columns

        columns = text_columns(table)
        batches = BatchSampler(list(zip(*(table[c] for c in columns))), cfg.train.batch_size,
                               uses_no_duplicates(cfg, cfg.loss.name), cfg.train.drop_last, args.seed)  # mrl's train.seed
        training_args.batch_sampler = lambda dataset, **kwargs: batches
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=table, loss=loss)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save(os.path.join(args.out, "model"))
    encoder = Encoder.from_pretrained(os.path.join(args.out, "model"))
    dims = cfg.eval.dims or cfg.loss.dims
    results = {split: {"after training": evaluate_sts(encoder, load_table(spec, f"eval.{split}", True, mirror), dims)}
               for split, spec in (("dev", cfg.eval.dev), ("test", cfg.eval.test)) if spec is not None}
    results["train"] = {"steps": trainer.state.global_step, "seconds": round(seconds, 1)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def table(runs: dict[str, list[dict]], split: str, dims: list[int]) -> str:
    """One row per trainer (mean ± std over seeds), then each mrl row's difference to the reference."""
    scores = {name: {d: [r[split]["after training"][str(d)] for r in results] for d in dims}
              for name, results in runs.items()}
    lines = ["| trainer | " + " | ".join(f"d={d}" for d in dims) + " |", "| --- |" + " ---: |" * len(dims)]
    lines += [f"| {name} | " + " | ".join(mean_std(by_dim[d]) for d in dims) + " |" for name, by_dim in scores.items()]
    reference = scores["reference"]
    for name, by_dim in scores.items():
        if name != "reference":
            deltas = [statistics.mean(by_dim[d]) - statistics.mean(reference[d]) for d in dims]
            lines.append(f"| {name} − reference | " + " | ".join(f"{x:+.2f}" for x in deltas) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sts-matryoshka.yaml", help="the recipe")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both trainers")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                        help="an mrl variant run beside mrl as it is, e.g. wd0=train.weight_decay=0")
    parser.add_argument("--reference-weight-decay", type=float, default=0.0, help="the reference's (its default: 0)")
    parser.add_argument("--reference-batches", choices=["own", "mrl"], default="own",
                        help="the reference's own shuffled batches, or mrl's (the same batches in the same order)")
    parser.add_argument("--out", default="runs/vs-reference")
    parser.add_argument("--train-reference", action="store_true", help=argparse.SUPPRESS)  # one reference run
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_reference:
        return train_reference(args)

    cfg = load_config(os.path.join(ROOT, args.config), args.set)
    dims = sorted(cfg.eval.dims or cfg.loss.dims, reverse=True)
    variants = {"mrl": []} | {v.split("=", 1)[0]: v.split("=", 1)[1].split(",") for v in args.variant}
    runs = {name: [run_mrl(args, name, overrides, seed) for seed in args.seeds] for name, overrides in variants.items()}
    runs["reference"] = [run_reference(args, seed) for seed in args.seeds]  # seeds: the trainers' own
    sets = " ".join(f"--set {o}" for o in args.set)
    report = "\n".join([
        f"# mrl against the reference trainer: {args.config}, seeds {args.seeds}", "",
        f"`python benchmarks/vs_reference.py --config {args.config} --seeds {' '.join(map(str, args.seeds))} {sets}"
        + "".join(f" --variant {v}" for v in args.variant)
        + (f" --reference-weight-decay {args.reference_weight_decay:g}" if args.reference_weight_decay else "")
        + (f" --reference-batches {args.reference_batches}" if args.reference_batches != "own" else "") + "`",
        "", f"Reference weight decay: {args.reference_weight_decay:g}; mrl's: {cfg.train.weight_decay:g}. Reference "
            f"batches: {'its own' if args.reference_batches == 'own' else 'mrl' + chr(39) + 's'}. "
            f"Variants: " + (", ".join(f"{k}: {' '.join(v)}" for k, v in variants.items() if v) or "none") + ".",
        *[part for split in ("dev", "test") if split in runs["reference"][0]
          for part in ("", f"## STS {split} Spearman ×100 after training, mean ± std over the seeds", "",
                       table(runs, split, dims))],
        "", "Training seconds per run: " + ", ".join(
            f"{name} {statistics.mean(r['train']['seconds'] for r in results):.0f}" for name, results in runs.items()),
        ""])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vs_reference.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
