"""Mine hard negatives for (anchor, positive) pairs with a model: the corpus texts most similar to each anchor,
its positive skipped, within a rank window, with a margin rule against false negatives; written as a dataset
with negative columns that train.py reads as it is.

    python -m mrl.data.mine --model runs/default/model --data "{path: json, data_files: pairs.jsonl, split: train}" \\
        --negatives 1 --range-min 10 --range-max 100 --relative-margin 0.05 --out runs/mined.jsonl
    python -m mrl.data.mine ... --corpus corpus.txt            # search a corpus of its own (a text a line)
    python -m mrl.data.mine ... --ivf 1024 --probes 64         # an approximate index, for a corpus of millions

For each anchor a, with s(x) its cosine to x (the full-width embeddings, as the model encodes them):
  1. candidates: the corpus texts at ranks range_min .. range_max-1 of a's search (0 = the most similar),
     leaving out a itself and its positive p (by text) and texts already chosen for a;
  2. the margin rule drops likely false negatives: s(n) <= s(p) - absolute_margin, s(n) <= s(p)·(1 -
     relative_margin), and s(n) <= max_score, each where given;
  3. the first `negatives` that remain, most similar first, become columns negative_1 .. negative_k (or
     `negative` for one); an anchor with fewer is left out (every row of a training table has every column),
     and the count of those is printed.
"""

import argparse
import json
import os
import sys

import torch
from tqdm.auto import tqdm

from mrl.cli import one_line_errors
from mrl.retrieval.exact import prefix, top_k
from mrl.retrieval.ivf import IVFIndex


def mine(anchors: list[str], positives: list[str], corpus: list[str], anchor_embeddings: torch.Tensor,
         corpus_embeddings: torch.Tensor, positive_scores: torch.Tensor, negatives: int = 1, range_min: int = 0,
         range_max: int = 50, absolute_margin: float | None = None, relative_margin: float | None = None,
         max_score: float | None = None, index: IVFIndex | None = None, n_probe: int | None = None
         ) -> list[list[str]]:
    """Per anchor, its hard negatives, most similar first (see the module docstring). Embeddings are unit
    rows; positive_scores (N,) are s(p) of each pair; `index`: an IVF index over the corpus to search instead of
    exact search."""
    pieces = []  # anchors 4096 at a time: a search's score buffer holds anchors × corpus chunk floats
    for start in tqdm(range(0, len(anchors), 4096), desc="search", disable=len(anchors) <= 4096):
        queries = anchor_embeddings[start:start + 4096]
        pieces.append(index.search(queries, range_max, n_probe) if index is not None
                      else top_k(queries, corpus_embeddings, range_max))  # (n, range_max), best first
    scores, ids = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    chosen = []
    for i, (row_scores, row_ids) in enumerate(tqdm(list(zip(scores.tolist(), ids.tolist())), desc="choose",
                                                   disable=len(anchors) < 10_000)):
        ceiling = positive_scores[i].item()
        found, seen = [], {anchors[i], positives[i]}
        for rank, (score, j) in enumerate(zip(row_scores, row_ids)):
            if len(found) == negatives:
                break
            if rank < range_min or j < 0 or corpus[j] in seen:
                continue
            if (absolute_margin is not None and score > ceiling - absolute_margin
                    or relative_margin is not None and score > ceiling * (1 - relative_margin)
                    or max_score is not None and score > max_score):
                continue
            found.append(corpus[j])
            seen.add(corpus[j])
        chosen.append(found)
    return chosen


def main(argv=None):
    sys.excepthook = one_line_errors
    parser = argparse.ArgumentParser(prog="python -m mrl.data.mine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder or hub id")
    parser.add_argument("--data", required=True, help="a dataset spec (YAML) of (anchor, positive) pairs")
    parser.add_argument("--columns", nargs=2, default=None, metavar=("ANCHOR", "POSITIVE"),
                        help="the two text columns (default: the spec's first two)")
    parser.add_argument("--corpus", help="a text file, one document a line (default: the positives)")
    parser.add_argument("--negatives", type=int, default=1, help="negatives per anchor")
    parser.add_argument("--range-min", type=int, default=0, help="skip the most similar candidates, ranks < this")
    parser.add_argument("--range-max", type=int, default=50, help="look at ranks < this")
    parser.add_argument("--absolute-margin", type=float, help="keep s(n) <= s(p) - margin")
    parser.add_argument("--relative-margin", type=float, help="keep s(n) <= s(p)·(1 - margin)")
    parser.add_argument("--max-score", type=float, help="keep s(n) <= this")
    parser.add_argument("--ivf", type=int, default=0, help="an IVF index of this many clusters (0: exact search)")
    parser.add_argument("--probes", type=int, default=None, help="with --ivf: lists each anchor scans")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mirror", default="configs/mirror.yaml" if os.path.exists("configs/mirror.yaml") else None)
    parser.add_argument("--out", required=True, help="a .jsonl file")
    args = parser.parse_args(argv)
    if not 0 <= args.range_min < args.range_max:
        parser.error("--range-min must be >= 0 and below --range-max")
    if args.negatives < 1:
        parser.error("--negatives must be >= 1")
    if bool(args.ivf) != (args.probes is not None):
        parser.error("--ivf and --probes go together")

    import yaml

    from mrl.data.tables import load_table, text_columns
    from mrl.model.encoder import Encoder
    from mrl.sources import load_mirror, resolve_model

    mirror = load_mirror(args.mirror)
    table = load_table(yaml.safe_load(args.data), "--data", mirror=mirror)
    anchor_column, positive_column = args.columns or text_columns(table)[:2]
    anchors, positives = list(table[anchor_column]), list(table[positive_column])
    if args.corpus:
        with open(args.corpus, encoding="utf-8") as f:
            corpus = list(dict.fromkeys(line.rstrip("\n") for line in f if line.strip()))
    else:
        corpus = list(dict.fromkeys(positives))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Encoder.from_pretrained(resolve_model(args.model, mirror)).to(device)
    encode = dict(batch_size=args.batch_size, normalize=True, show_progress=True)
    anchor_embeddings, positive_embeddings = model.encode(anchors, **encode), model.encode(positives, **encode)
    corpus_embeddings = model.encode(corpus, **encode)
    dim = corpus_embeddings.shape[1]
    index = IVFIndex(prefix(corpus_embeddings, dim), args.ivf) if args.ivf else None
    found = mine(anchors, positives, corpus, anchor_embeddings, corpus_embeddings,
                 (anchor_embeddings * positive_embeddings).sum(-1), args.negatives, args.range_min, args.range_max,
                 args.absolute_margin, args.relative_margin, args.max_score, index, args.probes)
    names = ["negative"] if args.negatives == 1 else [f"negative_{k + 1}" for k in range(args.negatives)]
    written = short = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for anchor, positive, negatives in zip(anchors, positives, found):
            if len(negatives) < args.negatives:
                short += 1
                continue
            f.write(json.dumps({"anchor": anchor, "positive": positive, **dict(zip(names, negatives))}) + "\n")
            written += 1
    print(f"wrote {written} rows to {args.out}; left out {short} anchors with fewer than {args.negatives} "
          f"negatives in ranks {args.range_min}..{args.range_max - 1} after the margin rule")
    if not written:
        raise ValueError("no anchor kept enough negatives: widen --range-max, or loosen the margins")


if __name__ == "__main__":
    main()
