"""Peak memory and step time of gradient checkpointing and LoRA against the plain run, on a small random Qwen3
decoder (tests/conftest.py make_tiny_decoder) on the CPU: one training step = the MNRL-in-Matryoshka loss of
a batch of NLI triplets (last-token pooling, EOS appended) forward and backward, then AdamW. Each variant
runs in a fresh process; reported: the peak RSS above the loaded model and the median step time, as ratios
to the plain run.

    python benchmarks/backbone_memory.py                                    # hidden 256, 4 layers, 32 triplets
    python benchmarks/backbone_memory.py --hidden 512 --layers 8 --batch 64 --steps 6
"""

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"plain": [], "gradient checkpointing": ["checkpointing"], "LoRA r=16": ["lora"],
            "LoRA r=16 + gradient checkpointing": ["lora", "checkpointing"]}


def one_variant(args) -> dict:
    """Train a few steps with the variant's options; print its peak RSS above the loaded model and step times."""
    sys.path.insert(0, ROOT)
    import torch

    from mrl import Encoder
    from mrl.loss.base import contrastive_loss
    from mrl.loss.matryoshka import MatryoshkaLoss
    from mrl.loss.nested import contrastive_losses_nested

    torch.manual_seed(0)
    class Lora:
        r, alpha, dropout, target_modules, save = 16, 32.0, 0.0, "all-linear", "merged"

    model = Encoder.from_pretrained(args.model, pooling="lasttoken", append_eos=True,
                                    gradient_checkpointing="checkpointing" in args.options,
                                    lora=Lora if "lora" in args.options else None).train()
    with gzip.open(os.path.join(args.shared, "data", "nli", "triplets.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.batch * (args.steps + 1)))]
    loss_fn = MatryoshkaLoss(partial(contrastive_loss, scale=20.0), [args.hidden, args.hidden // 2, args.hidden // 4],
                             nested_loss=partial(contrastive_losses_nested, scale=20.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.steps + 1):  # the first step is a warm-up, not timed
        batch = rows[step * args.batch:(step + 1) * args.batch]
        texts = [r[c] for c in ("anchor", "positive", "negative") for r in batch]
        started = time.perf_counter()
        loss = loss_fn(list(model(model.tokenize(texts)).chunk(3)), dims=loss_fn.dims).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - base) / 1024, "step_s": statistics.median(times[1:]),
            "trainable": sum(p.numel() for p in trainable), "params": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="triplets per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--options", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.options is not None:  # one variant, in this process
        print(json.dumps(one_variant(args)))
        return
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import make_tiny_decoder

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_decoder(tmp, hidden=args.hidden, layers=args.layers))
        runs = {}
        for name, options in VARIANTS.items():
            cmd = [sys.executable, __file__, "--model", model, "--hidden", str(args.hidden), "--batch",
                   str(args.batch), "--steps", str(args.steps), "--shared", args.shared, "--options", *options]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[name] = json.loads(out.strip().splitlines()[-1])
    plain = runs["plain"]
    print(f"Qwen3 decoder, hidden {args.hidden}, {args.layers} layers, {plain['params'] / 1e6:.1f}M parameters; "
          f"{args.batch} NLI triplets per step; CPU ({os.cpu_count()} cores), float32\n")
    print("| variant | trainable parameters | peak RSS above the model, MiB | vs plain | step, s | vs plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, run in runs.items():
        print(f"| {name} | {run['trainable'] / 1e6:.2f}M | {run['peak_mib']:.0f} | {run['peak_mib'] / plain['peak_mib']:.2f}× "
              f"| {run['step_s']:.2f} | {run['step_s'] / plain['step_s']:.2f}× |")


if __name__ == "__main__":
    main()
