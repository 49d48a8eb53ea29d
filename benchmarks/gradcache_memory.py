"""Peak memory of one contrastive Matryoshka training step, plain vs GradCache, as the batch grows.

Each (mode, batch) runs in a fresh subprocess: one forward + backward of MNRL in Matryoshka on real NLI triplets,
and reports the peak memory above what the loaded model and data already held (CUDA: max_memory_allocated;
CPU: the process's peak RSS, which only a fresh process can measure). Plain memory grows with the batch;
GradCache stays at about one chunk's activations. Dropout is off, so both modes print the same loss.

    python benchmarks/gradcache_memory.py --model ../shared/models/all-MiniLM-L6-v2 \
        --triplets ../shared/data/nli/triplets.jsonl.gz --batches 64 128 256 512 1024 --chunk 64
"""

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
from functools import partial


def one_step(args) -> dict:
    import torch

    from mrl import Encoder
    from mrl.run.gradcache import cached_backward
    from mrl.loss.base import contrastive_loss
    from mrl.loss.matryoshka import MatryoshkaLoss
    from mrl.loss.nested import contrastive_losses_nested

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with gzip.open(args.triplets, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(args.batch), f)]
    texts = [r[c] for c in ("anchor", "positive", "negative") for r in rows]
    # dropout off, so both modes compute the same loss (a check that they train the same thing)
    model = Encoder.from_pretrained(args.model, max_seq_length=args.max_seq_length).to(device).eval()
    features = {k: v.to(device) for k, v in model.tokenize(texts).items()}
    dims = [d for d in (768, 512, 384, 256, 128, 64, 32) if d <= model.embedding_dim]
    loss_fn = MatryoshkaLoss(partial(contrastive_loss), dims, nested_loss=contrastive_losses_nested)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if args.mode == "cached":
            loss = cached_backward(model, features, 3, partial(loss_fn, dims=dims), args.chunk,
                                   backward=lambda l: l.backward()).total
        else:
            loss = loss_fn(list(model(features).chunk(3)), dims=dims).total
            loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"mode": args.mode, "batch": args.batch, "texts": len(texts), "device": device.type,
            "peak_mib": round(peak / 2**20, 1), "seconds": round(time.perf_counter() - start, 2),
            "loss": round(float(loss), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--triplets", required=True, help="jsonl(.gz) with anchor/positive/negative")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--plain-max", type=int, default=None, help="skip plain steps above this batch")
    parser.add_argument("--chunk", type=int, default=64, help="GradCache chunk, in texts")
    parser.add_argument("--max-seq-length", type=int, default=75)
    parser.add_argument("--mode", choices=["plain", "cached"], help=argparse.SUPPRESS)  # one step, in a subprocess
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_step(args)))
        return

    results = []
    for batch in args.batches:
        for mode in ("plain", "cached"):
            if mode == "plain" and args.plain_max and batch > args.plain_max:
                results.append({"mode": mode, "batch": batch, "peak_mib": None, "note": "skipped"})
                continue
            cmd = [sys.executable, __file__, "--model", args.model, "--triplets", args.triplets, "--mode", mode,
                   "--batch", str(batch), "--chunk", str(args.chunk), "--max-seq-length", str(args.max_seq_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. out of memory: that is a result too
                results.append({"mode": mode, "batch": batch, "peak_mib": None,
                                "note": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)

    print(f"\n| triplets per step | plain: peak MiB | GradCache (chunk {args.chunk} texts): peak MiB | "
          "plain s | GradCache s | loss plain | loss GradCache |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        plain, cached = (next(r for r in results if r["batch"] == batch and r["mode"] == m) for m in ("plain", "cached"))
        cell = lambda r, k: r[k] if r.get(k) is not None else (r.get("note", "-") if k == "peak_mib" else "-")  # noqa: E731
        print(f"| {batch} | {cell(plain, 'peak_mib')} | {cell(cached, 'peak_mib')} | {cell(plain, 'seconds')} | "
              f"{cell(cached, 'seconds')} | {cell(plain, 'loss')} | {cell(cached, 'loss')} |")


if __name__ == "__main__":
    main()
