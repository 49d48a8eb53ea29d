"""Funnel (adaptive) retrieval vs full-width exact search on a 1M-document corpus: speed, FLOPs, recall, nDCG.

The corpus: the real embeddings of every distinct NLI hypothesis in the triplet files (about 35k), plus
augmented copies up to --corpus-size: copy = normalize(e + σ·g), g ~ N(0, I/D), so each copy is a near
neighbour of a real text (σ = 0.75 gives cosine ≈ 0.8 to its source). Queries: the last --queries premises of
the files (mrl.retrieval.data.nli_retrieval_set); relevant documents: their real entailments. Both searches run in
this process on the same tensors; the speed-up is the ratio of their wall times.

    python benchmarks/funnel_retrieval.py --model runs/default/model \
        --triplets ../shared/data/nli/triplets.jsonl.gz ../shared/data/nli/triplets-extra.jsonl.gz
"""

import argparse
import os
import statistics
import time

import torch

from mrl import Encoder
from mrl.retrieval.data import nli_retrieval_set
from mrl.retrieval.exact import prefix, top_k
from mrl.retrieval.funnel import FunnelIndex
from mrl.retrieval.metrics import rankings_from, retrieval_metrics


def parse_stages(text: str) -> list[tuple[int, int]]:
    """'48:1000,256:100,384:10' -> [(48, 1000), (256, 100), (384, 10)]"""
    return [tuple(int(x) for x in stage.split(":")) for stage in text.split(",")]


def timed(fn, repeats: int):
    """fn's result and its median wall time over `repeats` runs after a warm-up (the median, as the 2-core
    VMs this was written on stall now and then: runs of one search varied by up to 1.5×)."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return out, statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--triplets", nargs="+", required=True)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--corpus-size", type=int, default=1_000_000)
    parser.add_argument("--sigma", type=float, default=0.75)
    parser.add_argument("--stages", nargs="+", default=None,
                        help="funnels to measure, e.g. 48:1000,256:100,384:10 (default: a few from the model's width)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16-shortlist", action="store_true", help="also run every funnel with a bf16 first stage")
    parser.add_argument("--int8-shortlist", action="store_true", help="also run every funnel with an int8 first stage")
    parser.add_argument("--ivf", type=int, default=0, metavar="CLUSTERS",
                        help="also run every funnel with an IVF first stage of this many k-means clusters")
    parser.add_argument("--probes", type=int, nargs="+", default=[64, 128], help="n_probe values for --ivf: lists each query scans")
    parser.add_argument("--cache", default="runs/funnel_embeddings.pt", help="embeddings cache (per model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    data = nli_retrieval_set(args.triplets, args.queries)
    if os.path.exists(args.cache) and torch.load(args.cache)["model"] == args.model:
        cached = torch.load(args.cache)
        queries, docs = cached["queries"], cached["docs"]
    else:
        encoder = Encoder.from_pretrained(args.model).to(device)
        queries = encoder.encode(data.queries, batch_size=128, normalize=False, show_progress=True)
        docs = encoder.encode(data.docs, batch_size=128, normalize=False, show_progress=True)
        os.makedirs(os.path.dirname(args.cache) or ".", exist_ok=True)
        torch.save({"model": args.model, "queries": queries, "docs": docs}, args.cache)
    width = docs.shape[1]
    real = torch.nn.functional.normalize(docs, dim=-1)
    n_copies = max(args.corpus_size - len(real), 0)
    sources = torch.randint(len(real), (n_copies,))
    noise = torch.randn(n_copies, width) / width ** 0.5
    corpus = torch.cat([real, torch.nn.functional.normalize(real[sources] + args.sigma * noise, dim=-1)]).to(device)
    del noise
    doc_ids = data.doc_ids + [f"copy{i}" for i in range(n_copies)]  # copies are never relevant
    data.doc_ids = doc_ids
    queries = queries.to(device)
    print(f"corpus: {len(real)} real + {n_copies} augmented = {len(corpus)} × {width} dims; {len(queries)} queries; "
          f"device {device}")

    stages_list = [parse_stages(s) for s in args.stages] if args.stages else [
        [(48, 1000), (min(256, width), 100), (width, 10)],
        [(48, 100), (width, 10)],
        [(64, 100), (width, 10)],
        [(64, 200), (width, 10)],
        [(96, 100), (width, 10)]]
    dims = [width] + [d for stages in stages_list for d, _ in stages]
    exact_index = FunnelIndex(corpus, dims)
    searches = [("float32 shortlist", exact_index, None)]  # (name, index, n_probe)
    dtypes = [("float32", torch.float32)] + [(n, t) for n, t, wanted in (("bf16", torch.bfloat16, args.bf16_shortlist),
                                                                         ("int8", torch.int8, args.int8_shortlist)) if wanted]
    for name, dtype in dtypes:  # only the first stage in `dtype`: the float32 prefixes (re-scoring) are shared
        if dtype != torch.float32:
            searches.append((f"{name} shortlist", FunnelIndex(corpus, [], shortlist_dtype=dtype), None))
        if args.ivf:  # one IVF index per first-stage dim, searched with each n_probe
            ivf_index = FunnelIndex(corpus, [], shortlist_dtype=dtype, ivf_clusters=args.ivf)
            searches += [(f"{name} IVF, {args.ivf} clusters, {p} lists probed", ivf_index, p) for p in args.probes]
    for _, index, _ in searches:
        index.prefixes = exact_index.prefixes
    full = exact_index.prefixes[width]
    q_full = prefix(queries, width)
    (exact_scores, exact_top), exact_seconds = timed(lambda: top_k(q_full, full, 10), args.repeats)
    exact_metrics = retrieval_metrics(rankings_from(exact_top, data), data.qrels)
    exact_flops = 2 * len(corpus) * width

    rows = [f"| exact, {width} dims | {exact_flops / 1e6:.0f}M | {1000 * exact_seconds / len(queries):.3f} | 1.0× | "
            f"100.0% | {exact_metrics['ndcg@10']:.2f} | {exact_metrics['mrr@10']:.2f} |"]
    for (shortlist, index, n_probe), stages in ((s, st) for s in searches for st in stages_list):
        scanned = None
        if n_probe is not None:  # build the IVF index outside the timing, and count what a query scans
            start = time.perf_counter()
            ivf = index.first_stage(stages[0][0])
            if time.perf_counter() - start > 1:
                print(f"IVF index on {stages[0][0]} dims ({shortlist.split(',')[0]}): {ivf.n_lists} lists, "
                      f"built in {time.perf_counter() - start:.1f} s", flush=True)
            scanned = ivf.scanned(prefix(queries, stages[0][0]), n_probe)
        (_, top), seconds = timed(lambda: index.search(queries, stages, n_probe), args.repeats)
        overlap = sum(len(set(a) & set(b)) for a, b in zip(top.tolist(), exact_top.tolist())) / exact_top.numel()
        metrics = retrieval_metrics(rankings_from(top, data), data.qrels)
        name = " → ".join(f"{d}d keep {k}" for d, k in stages) + f" ({shortlist})"
        rows.append(f"| funnel {name} | {index.flops_per_query(stages, scanned) / 1e6:.0f}M | "
                    f"{1000 * seconds / len(queries):.3f} | {exact_seconds / seconds:.1f}× | {100 * overlap:.1f}% | "
                    f"{metrics['ndcg@10']:.2f} | {metrics['mrr@10']:.2f} |")
        print(rows[-1], flush=True)
    print("\n| search | FLOPs/query | ms/query | speed-up | recall of full-width top-10 | nDCG@10 | MRR@10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
