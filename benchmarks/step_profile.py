"""Where a training step's time goes, part by part, on real batches of a recipe (train_throughput.py's: STS-B
pairs or NLI triplets): each option against its alternative, measured interleaved in one process (so drift in
the machine's speed hits both alike).

    python benchmarks/step_profile.py                 # CPU or GPU, whichever is here; 30 batches of 16 pairs
    python benchmarks/step_profile.py --batches 100 --bf16
    python benchmarks/step_profile.py --pad 16 --compile reduce-overhead   # + padded shapes, compiled
    python benchmarks/step_profile.py --recipe nli --batches 4 --groups 1 2 4 8 12 16   # 128 triplets a batch

Parts: collate (tokenise per step vs pad pre-tokenised ids), forward + backward of the encoder (one forward vs
length groups), the recipe's loss (plain vs Matryoshka, forward + backward), the optimiser step
(AdamW foreach vs fused); with --pad, one forward padded to a multiple of that many tokens (speed.pad_to_multiple_of),
eager and, with --compile, compiled (speed.compile; each new shape compiles in an untimed call first).
Milliseconds per step, median over shuffled batches, as training draws them.
"""

import argparse
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
from train_throughput import RECIPES, recipe_config  # (benchmarks/, this script's folder, is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mrl.run.config import COMPILE_MODES  # noqa: E402
from mrl.data import Collator, load_table, pad_columns, padded_length, text_columns  # noqa: E402
from mrl.model.encoder import Encoder  # noqa: E402
from mrl.loss.matryoshka import MatryoshkaLoss  # noqa: E402
from mrl.loss.nested import losses_for  # noqa: E402
from mrl.sources import load_mirror, resolve_model  # noqa: E402
from mrl.run.speed import embed_by_length  # noqa: E402


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="sts")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (16 sts, 128 nli)")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4], help="length groups to time (default 1 2 4)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--pad", type=int, default=None, help="also time one forward padded to a multiple of this")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None, help="also time it compiled (needs --pad)")
    args = parser.parse_args()
    if min(args.groups) < 1:
        parser.error("--groups: each count must be >= 1")
    if args.compile and not args.pad:
        parser.error("--compile needs --pad (a few shapes)")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    cfg = recipe_config(args.recipe)
    batch_size = args.batch_size or cfg.train.batch_size
    mirror = load_mirror(os.path.join(ROOT, cfg.mirror))
    model = Encoder.from_pretrained(resolve_model(cfg.model.name, mirror)).to(device).train()
    table = load_table(cfg.data.train, "data.train", args.recipe == "sts", mirror)
    columns = text_columns(table)
    collate = Collator(columns, model.tokenizer, cfg.model.max_seq_length or model.max_seq_length)
    tokenised = collate.pretokenize(table)
    autocast = torch.autocast(device, torch.bfloat16) if args.bf16 else nullcontext()
    dims = cfg.loss.dims
    loss_name = cfg.loss.name
    base_loss, nested_loss = losses_for(loss_name, cfg.loss.scale, cfg.loss.symmetric)
    losses = {f"plain {loss_name}": MatryoshkaLoss(base_loss, [model.embedding_dim], nested_loss=nested_loss),
              f"Matryoshka {loss_name}, {len(dims)} dims": MatryoshkaLoss(base_loss, dims, nested_loss=nested_loss)}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimisers = {name: torch.optim.AdamW(trained, lr=1e-12, **kwargs)
                  for name, kwargs in (("AdamW foreach", {"foreach": True}), ("AdamW fused", {"fused": True}))}

    compiled = torch.compile(model, mode=args.compile, dynamic=False) if args.compile else None
    compiled_shapes = set()
    times = {}

    def record(part: str, option: str, ms: float):
        times.setdefault(part, {}).setdefault(option, []).append(ms)

    order = list(range(len(table)))
    random.Random(0).shuffle(order)  # batches as training draws them: the table's own order groups similar texts
    for i in range(args.batches + 3):  # 3 warm-up batches
        rows = order[i * batch_size:(i + 1) * batch_size]
        text_rows, id_rows = [table[r] for r in rows], [tokenised[r] for r in rows]
        batches = {}
        for option, batch_rows in (("tokenise per step", text_rows), ("pad pre-tokenised ids", id_rows)):
            ms = timed(lambda: batches.__setitem__(option, collate(batch_rows)), device)
            if i >= 3:
                record("collate", option, ms)
        batch = {k: v.to(device) for k, v in batches["pad pre-tokenised ids"].items()}
        labels = batch.pop("labels", None)
        forwards = {f"{groups} length group(s)": (partial(embed_by_length, model, groups=groups), batch)
                    for groups in args.groups}  # option -> (embed, its features)
        if args.pad:
            width = padded_length(batch["input_ids"].shape[1], args.pad, collate.max_length)
            padded = pad_columns(batch, width, model.tokenizer.pad_token_id)
            forwards[f"1 group, padded to a multiple of {args.pad}"] = model, padded
            if compiled is not None:
                forwards[f"1 group, padded to a multiple of {args.pad}, compiled ({args.compile})"] = compiled, padded
        for name, (embed, features) in forwards.items():
            def step():
                if embed is compiled:
                    torch.compiler.cudagraph_mark_step_begin()  # (reduce-overhead: a new training step)
                with autocast:
                    embeddings = embed(features)
                embeddings.float().sum().backward()
            if embed is compiled and width not in compiled_shapes:  # compiling is not part of a step
                compiled_shapes.add(width)
                step()
            ms = timed(step, device)
            if i >= 3:
                record("encoder forward + backward", name, ms)
        with torch.no_grad(), autocast:
            embeddings = model(batch).float()
        columns_embedded = [e.detach().requires_grad_() for e in embeddings.chunk(len(columns))]
        for name, loss_fn in losses.items():
            ms = timed(lambda: loss_fn(columns_embedded, labels, dims=loss_fn.dims).total.backward(), device)
            if i >= 3:
                record("loss forward + backward", name, ms)
        for name, optimiser in optimisers.items():
            ms = timed(optimiser.step, device)
            if i >= 3:
                record("optimiser step", name, ms)
        model.zero_grad()

    where = f"cuda: {torch.cuda.get_device_name()}" if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    sample = "pairs" if args.recipe == "sts" else "triplets"
    print(f"\n{where}, {'bf16' if args.bf16 else 'fp32'}, {args.recipe} recipe: batch {batch_size} {sample}, median of "
          f"{args.batches} shuffled batches\n")
    print("| part | option | ms per step | vs first option |")
    print("| --- | --- | ---: | ---: |")
    for part, options in times.items():
        first = statistics.median(next(iter(options.values())))
        for option, values in options.items():
            median = statistics.median(values)
            print(f"| {part} | {option} | {median:.2f} | {median / first:.2f}× |")


if __name__ == "__main__":
    main()
