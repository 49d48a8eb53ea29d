"""Training throughput of mrl's train.py against the reference trainer (sentence-transformers), side by side.

Both train the same model on the same data with the same batch size, steps, learning rate, warm-up, precision
and Matryoshka dims, one after the other on this machine, in one of two recipes: `sts` (the default run: CoSENT
in Matryoshka 384..8 on STS-B train, batch 16) or `nli` (configs/nli-matryoshka.yaml on all-MiniLM-L6-v2:
in-batch-negatives contrastive loss, MultipleNegativesRankingLoss in sentence-transformers, in Matryoshka
384..32 on the NLI triplets, batch 128, max length 75, no duplicate texts in a batch).
Reported: samples/s and tokens/s of the training loop (tokens = samples × the mean number of tokens of a
training sample after truncation), model TFLOP/s and MFU (with --peak-tflops; train_flops_per_token), peak
memory, the ratio mrl / reference, and STS-B test Spearman ×100 at every dim of both trained models, scored
by the same evaluator (mrl.eval.sts).

    python benchmarks/train_throughput.py --quick                        # CPU: 40 steps each
    python benchmarks/train_throughput.py --epochs 4 --bf16              # the full STS recipe on a GPU
    python benchmarks/train_throughput.py --recipe nli --bf16            # the NLI recipe, 1 epoch, on a GPU
    python benchmarks/train_throughput.py --epochs 4 --bf16 --skip-reference \\
        --set speed.compile=reduce-overhead --set speed.pad_to_multiple_of=32   # mrl with CUDA graphs
Model and data are the configs' hub ids, or local copies through configs/mirror.yaml (or MRL_MIRROR).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mrl.run.config import load_config  # noqa: E402
from mrl.data import load_table  # noqa: E402
from mrl.model.encoder import Encoder  # noqa: E402
from mrl.eval.report import markdown_table  # noqa: E402
from mrl.sources import load_mirror, resolve_model  # noqa: E402
from mrl.eval.sts import evaluate_sts  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# recipe -> the config train.py runs and its overrides (MiniLM for the NLI recipe, whose config names mpnet)
RECIPES = {
    "sts": ("configs/default.yaml", []),
    "nli": ("configs/nli-matryoshka.yaml", ["model.name=sentence-transformers/all-MiniLM-L6-v2",
                                            "loss.dims=[384,256,128,64,32]"]),
}


def recipe_config(recipe: str):
    path, overrides = RECIPES[recipe]
    return load_config(os.path.join(ROOT, path), overrides)


def train_flops_per_token(encoder: Encoder, seq_len: float) -> float:
    """Model FLOPs of one token's forward + backward pass, as PaLM counts them for MFU (Chowdhery et al. 2022,
    appendix B): 6·N + 12·L·d·T, N the parameters outside the embedding tables and the pooler, L layers, d the
    width, T the sequence length (the attention scores and their use). Padding is not counted: MFU measures
    useful work."""
    config = encoder.backbone.config
    n_params = sum(p.numel() for name, p in encoder.named_parameters()
                   if "embeddings." not in name and "pooler." not in name)  # (the pooler is not in our forward)
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_memory_mib(device: str, children: bool = False) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def run_mrl(args, out_dir: str) -> dict:
    """train.py itself, in a subprocess (its loop is what users run); its own timer covers the loop only."""
    config, overrides = RECIPES[args.recipe]
    overrides = overrides + [
        f"output_dir={out_dir}", "eval.dev=null", "eval.test=null", f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}", f"train.lr={args.lr}", f"train.seed={args.seed}", "train.save_every=0",
        f"train.mixed_precision={'bf16' if args.bf16 else 'no'}", f"loss.matryoshka={not args.plain}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    overrides += args.set  # mrl's own options, e.g. speed.compile=reduce-overhead speed.pad_to_multiple_of=16
    cmd = [sys.executable, "train.py", "--config", config, *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "results.json")) as f:
        train = json.load(f)["train"]
    return {"samples": train["samples"], "seconds": train["seconds"], "steps": train["steps"],
            "peak_mib": train["peak_cuda_memory_mib"] if DEVICE == "cuda" else peak_memory_mib("cpu", True),
            "model": os.path.join(out_dir, "model"), "new_shape_steps": train["new_shape_steps"],
            "other_steps_rate": train["samples_per_second_other_steps"]}


def run_reference(args, cfg, model_path: str, train_table, out_dir: str) -> dict:
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers

    model = SentenceTransformer(model_path, device=DEVICE)
    if cfg.model.max_seq_length:
        model.max_seq_length = cfg.model.max_seq_length
    if args.recipe == "nli":
        loss, data, sampler = losses.MultipleNegativesRankingLoss(model, scale=cfg.loss.scale), train_table, \
            BatchSamplers.NO_DUPLICATES
    else:
        loss, data, sampler = losses.CoSENTLoss(model), train_table.rename_column("label", "score"), \
            BatchSamplers.BATCH_SAMPLER
    if not args.plain:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=cfg.loss.dims)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        max_steps=args.steps or -1, learning_rate=args.lr, warmup_ratio=cfg.train.warmup_ratio, seed=args.seed,
        bf16=args.bf16, batch_sampler=sampler, save_strategy="no", report_to="none", logging_steps=50,
        use_cpu=DEVICE == "cpu")
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=data, loss=loss)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steps = trainer.state.global_step
    model.save(os.path.join(out_dir, "model"))
    return {"samples": min(steps * args.batch_size, len(data) * args.epochs), "seconds": round(seconds, 1),
            "steps": steps, "peak_mib": peak_memory_mib(DEVICE), "model": os.path.join(out_dir, "model")}


def loss_overhead_ms(loss_name: str, n_columns: int, batch_size: int, width: int, dims: list[int], device: str,
                     repeats: int = 200) -> dict:
    """Milliseconds per step of the loss alone (forward + backward on random (B, width) embeddings of each text
    column): the plain loss at full width vs the Matryoshka loss over `dims` (nested, as train.py computes it)."""
    from mrl.loss.base import LOSSES
    from mrl.loss.matryoshka import MatryoshkaLoss
    from mrl.loss.nested import NESTED_LOSSES

    generator = torch.Generator().manual_seed(0)
    embeddings = [torch.randn(batch_size, width, generator=generator).to(device).requires_grad_()
                  for _ in range(n_columns)]
    labels = torch.rand(batch_size, generator=generator).to(device) if loss_name == "cosent" else None
    base, nested = LOSSES[loss_name], NESTED_LOSSES[loss_name]
    losses = {"plain": MatryoshkaLoss(base, [width], nested_loss=nested),
              "matryoshka": MatryoshkaLoss(base, dims, nested_loss=nested)}
    timings = dict.fromkeys(losses, 0.0)
    for i in range(repeats + 20):  # interleaved, so drift in the machine's speed hits both alike; 20 warm-ups
        for name, loss_fn in losses.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_fn(embeddings, labels, dims=loss_fn.dims).total.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 20:
                timings[name] += 1000 * (time.perf_counter() - start) / repeats
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 steps each (CPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="sts")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (16 sts, 128 nli)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--plain", action="store_true", help="plain CoSENT (no Matryoshka) on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train.py override for the mrl run only, e.g. speed.compile=reduce-overhead")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak in TFLOP/s at the run's precision, for MFU (e.g. 989 for H100/H200 "
                             "SXM bf16); no MFU without it")
    args = parser.parse_args()
    if args.quick:
        args.steps = args.steps or 40

    cfg = recipe_config(args.recipe)
    args.batch_size = args.batch_size or cfg.train.batch_size
    mirror = load_mirror(os.path.join(ROOT, cfg.mirror))
    model_path = resolve_model(cfg.model.name, mirror)
    train_table = load_table(cfg.data.train, "data.train", args.recipe == "sts", mirror)
    test_table = load_table(cfg.eval.test, "eval.test", True, mirror)
    encoder = Encoder.from_pretrained(model_path)
    max_length = cfg.model.max_seq_length or encoder.max_seq_length
    text_columns = [c for c in train_table.column_names if c != "label"]
    lengths = [len(ids) for column in text_columns
               for ids in encoder.tokenizer(list(train_table[column]), truncation=True, max_length=max_length)["input_ids"]]
    tokens_per_sample = sum(lengths) / len(train_table)  # a sample: a pair (sts) or a triplet (nli)
    flops_per_sample = tokens_per_sample * train_flops_per_token(encoder, sum(lengths) / len(lengths))
    dims = cfg.loss.dims

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["mrl"] = run_mrl(args, os.path.join(tmp, "mrl"))
        if not args.skip_reference:
            try:
                runs["sentence-transformers"] = run_reference(args, cfg, model_path, train_table,
                                                              os.path.join(tmp, "reference"))
            except ImportError:
                print("sentence-transformers is not installed: the reference run is skipped")
        quality = {name: evaluate_sts(Encoder.from_pretrained(run["model"]).to(DEVICE), test_table, dims)
                   for name, run in runs.items()}

    loss_name = {"sts": "CoSENT", "nli": "contrastive (MNRL)"}[args.recipe]
    if args.set:
        print(f"\nmrl run with {' '.join(args.set)}")
    print(f"\n{args.recipe} recipe: {'plain' if args.plain else 'Matryoshka'} {loss_name}, batch {args.batch_size}, "
          f"{runs['mrl']['steps']} steps, {'bf16' if args.bf16 else 'fp32'}, "
          f"{'cuda: ' + torch.cuda.get_device_name() if DEVICE == 'cuda' else f'cpu ({os.cpu_count()} cores)'}; "
          f"{tokens_per_sample:.1f} tokens per {'pair' if args.recipe == 'sts' else 'triplet'}\n")
    print("| trainer | samples/s | tokens/s | model TFLOP/s | MFU | peak memory MiB | speed vs reference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    reference = runs.get("sentence-transformers")
    for name, run in runs.items():
        rate = run["samples"] / run["seconds"]
        ratio = f"{rate / (reference['samples'] / reference['seconds']):.2f}×" if reference else "–"
        peak = f"{run['peak_mib']:.0f}" if run["peak_mib"] is not None else "–"
        tflops = rate * flops_per_sample / 1e12
        mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "–"
        print(f"| {name} | {rate:.1f} | {rate * tokens_per_sample:.0f} | {tflops:.3f} | {mfu} | {peak} | {ratio} |")
    new_shapes = runs["mrl"]["new_shape_steps"]
    print(f"\nmrl: the {new_shapes['count']} steps that met a new batch shape (compiling, with speed.compile) took "
          f"{new_shapes['seconds']} s, included above; the other steps ran at {runs['mrl']['other_steps_rate'] or '–'} "
          "samples/s")
    step_ms = 1000 * runs["mrl"]["seconds"] / runs["mrl"]["steps"]
    loss_ms = loss_overhead_ms(cfg.loss.name, len(text_columns), args.batch_size, encoder.embedding_dim, dims, DEVICE)
    extra = loss_ms["matryoshka"] - loss_ms["plain"]
    print(f"\nMatryoshka overhead: the loss over {len(dims)} dims takes {loss_ms['matryoshka']:.2f} ms per step (forward "
          f"+ backward) against {loss_ms['plain']:.2f} ms for the plain loss: +{extra:.2f} ms, "
          f"{100 * extra / step_ms:.2f}% of mrl's {step_ms:.0f} ms step.")
    print("\nSTS-B test Spearman ×100 after training:\n")
    print(markdown_table(quality))


if __name__ == "__main__":
    main()
