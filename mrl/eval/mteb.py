"""MTEB at every dim × precision: python -m mrl.mteb (mteb is an optional extra, pip install -e .[mteb],
imported only inside functions).

    python -m mrl.mteb --model runs/default/model --tasks STSBenchmark SciFact --dims 384 128 32 \
        --precision float32 int8 binary --out runs/mteb --card runs/default/model
    python -m mrl.mteb --model runs/default/model --benchmark "MTEB(eng, v2)" --dims 384 64 --out runs/mteb-eng
    python -m mrl.mteb --model sentence-transformers/all-MiniLM-L6-v2 --local-sts data/sts/test.csv \
        --local-nli data/nli/triplets.jsonl.gz --out runs/mteb-local   # offline: your own STS table, NLI triplets

--model is a folder or a hub id (through the mirror file, as in train.py), of mrl or any model mrl.Encoder reads.
Each (dim, precision) is its own MTEB model: its name carries both, and its revision is a hash of the folder's
files (a hub model: its commit), since mteb's result cache is keyed by model name and revision only (see
`model_meta`). A task's texts are embedded once at full width, with the model's saved prompts (`prompt_name`);
each dim is a prefix of those vectors, re-normalised, as mrl's own evaluators cut it, so the scores equal theirs
(tests/test_mteb.py). Precisions store a prefix as mrl.retrieval.quantize does (`stored`).

Writes to --out: mteb.json, mteb.md (rows tasks, columns dim × precision, the main score ×100, and seconds per
task) and the plot of score against dim (mteb.png, mteb_relative.png); mteb's cache in --cache.
"""

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mrl.cli import one_line_errors
from mrl.eval.evaluate import default_dims, plot
from mrl.eval.mteb_local import load_tasks
from mrl.eval.report import mteb_table, with_mteb_section
from mrl.retrieval.exact import prefix
from mrl.retrieval.quantize import PRECISIONS, stored as stored_prefix
from mrl.sources import load_mirror, resolve_model

def prompt_name(prompts: dict, task_metadata, prompt_type) -> str | None:
    """The model's prompt for this task and side, in sentence-transformers' MTEB order: '<task>-<side>', '<task>',
    '<task type>-<side>', '<task type>', '<side>' (query | document). None: the model's default prompt, if any."""
    side = getattr(prompt_type, "value", prompt_type)
    name, kind = task_metadata.name, task_metadata.type
    keys = [f"{name}-{side}", name, f"{kind}-{side}", kind, side] if side else [name, kind]
    return next((k for k in keys if k in prompts), None)


def stored(full: Tensor, d: int, precision: str, is_query: bool) -> Tensor:
    """The first d dims as stored at `precision`, as float64 rows whose dot products are the search scores of
    mrl.retrieval.quantize.quantized_search: float32, unit norm (dot = cosine); int8 / int4, codes × per-dim scales
    calibrated on the texts embedded together (a corpus, one STS column), queries kept in float (asymmetric);
    binary, the signs as ±1 (dot = d − 2·Hamming), queries too."""
    if precision == "float32":
        return F.normalize(full[:, :d].double(), dim=-1)  # as mrl.eval.sts scores STS
    if is_query and precision != "binary":
        return prefix(full, d).double()  # (N, d) float32 unit norm, as quantized_search cuts it
    return stored_prefix(full, d, precision).double()


class FullWidth:
    """Full-width embeddings of every text a task asked for, by prompt: each dim and precision is cut from them,
    so a task's texts are embedded once (one task at a time: a new task gets a new one)."""

    def __init__(self, encoder, batch_size: int):
        self.encoder, self.batch_size, self.rows = encoder, batch_size, {}

    def __call__(self, texts: list[str], prompt_name: str | None) -> Tensor:
        prompt = self.encoder.prompt_text(prompt_name=prompt_name)
        new = list(dict.fromkeys(t for t in texts if (prompt, t) not in self.rows))
        if new:
            embeddings = self.encoder.encode(new, batch_size=self.batch_size, normalize=False, prompt_name=prompt_name)
            self.rows.update(zip([(prompt, t) for t in new], embeddings))
        return torch.stack([self.rows[(prompt, t)] for t in texts])  # (N, D)


class MatryoshkaModel:
    """One (dim, precision) of a model, as mteb's EncoderProtocol: encode, similarity(_pairwise), mteb_model_meta."""

    def __init__(self, full_width: FullWidth, dim: int, precision: str, meta):
        self.full_width, self.dim, self.precision, self.mteb_model_meta = full_width, dim, precision, meta

    def encode(self, inputs, *, task_metadata, hf_split=None, hf_subset=None, prompt_type=None, **kwargs) -> Tensor:
        texts = [text for batch in inputs for text in batch["text"]]
        name = prompt_name(self.full_width.encoder.prompts, task_metadata, prompt_type)
        side = getattr(prompt_type, "value", prompt_type)
        return stored(self.full_width(texts, name), self.dim, self.precision, is_query=side == "query")

    def similarity(self, a, b) -> Tensor:
        return torch.as_tensor(a).double() @ torch.as_tensor(b).double().T  # (Q, N)

    def similarity_pairwise(self, a, b) -> Tensor:
        return (torch.as_tensor(a).double() * torch.as_tensor(b).double()).sum(-1)  # (N,)


def folder_revision(path: str) -> str:
    """A hash of a model folder's files (not its card): a folder trained again in place is a new revision."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(f for f in files if f != "README.md"):
            digest.update(os.path.relpath(os.path.join(root, name), path).encode())
            with open(os.path.join(root, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def model_meta(name: str, revision: str, dim: int, precision: str, encoder):
    """mteb rejects a wrapper without model metadata, and caches results by name and revision alone (not by
    embed_dim): so the dim and the precision go into the name, and two of them never share a result."""
    from mteb.models import ModelMeta

    return ModelMeta(loader=None, name=f"{name}-d{dim}-{precision}", revision=revision, release_date=None,
                     languages=None, n_parameters=sum(p.numel() for p in encoder.parameters()), memory_usage_mb=None,
                     max_tokens=encoder.max_seq_length, embed_dim=dim, license=None, open_weights=True,
                     public_training_code=None, public_training_data=None, framework=["PyTorch"],
                     similarity_fn_name="dot", use_instructions=bool(encoder.prompts), training_datasets=None,
                     adapted_from=name)


def evaluate_mteb(encoder, tasks, dims: list[int], precisions: list[str], name: str, revision: str, cache,
                  batch_size: int = 128) -> dict:
    """{'scores': {task: {'d<dim>/<precision>': main score ×100}}, 'seconds': {task: s}}, one mteb.evaluate per
    task × dim × precision (its cache: `cache`, an mteb.ResultCache, or None). Seconds: mteb's evaluation time
    summed over them (the first dim's includes the task's one encoding pass), as run, even when read back."""
    import mteb

    scores, seconds = {}, {}
    bar = tqdm(total=len(tasks) * len(dims), desc="MTEB tasks × dims")
    for task in tasks:
        full_width, seconds[task.metadata.name] = FullWidth(encoder, batch_size), 0.0
        for d in dims:
            for precision in precisions:
                model = MatryoshkaModel(full_width, d, precision, model_meta(name, revision, d, precision, encoder))
                result = mteb.evaluate(model, task, cache=cache, show_progress_bar=False,
                                       encode_kwargs={"batch_size": batch_size, "show_progress_bar": False})
                task_result = result.task_results[0]
                scores.setdefault(task.metadata.name, {})[f"d{d}/{precision}"] = 100 * task_result.get_score()
                seconds[task.metadata.name] += task_result.evaluation_time or 0.0  # as run (kept by the cache)
            bar.update()
    bar.close()
    return {"scores": scores, "seconds": {task: round(s, 1) for task, s in seconds.items()}}


def main(argv=None):
    sys.excepthook = one_line_errors  # an error a user can fix prints as one line (mrl/cli.py)
    parser = argparse.ArgumentParser(prog="python -m mrl.mteb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or hub id")
    parser.add_argument("--name", help="the results' model name (default: the hub id, or local/<folder name>)")
    parser.add_argument("--tasks", nargs="*", default=[], help="MTEB task names (mteb.get_task)")
    parser.add_argument("--benchmark", help='an MTEB benchmark\'s tasks, e.g. "MTEB(eng, v2)" (mteb.get_benchmark)')
    parser.add_argument("--local-sts", help="a CSV of sentence1, sentence2, score in [0, 5] as an STS task")
    parser.add_argument("--local-nli", nargs="+", help="NLI triplet files as a retrieval task (mrl.retrieval.data)")
    parser.add_argument("--n-queries", type=int, default=1000, help="queries of the --local-nli task")
    parser.add_argument("--dims", type=int, nargs="+", help="default: the model's matryoshka_dimensions, else "
                        "the width and its halvings (mrl.eval.evaluate.default_dims)")
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=PRECISIONS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", help="mteb's result cache folder (default: <out>/mteb-cache)")
    parser.add_argument("--card", help="a model folder whose README.md gets (or updates) its MTEB section")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--mirror", default="configs/mirror.yaml" if os.path.exists("configs/mirror.yaml") else None)
    args = parser.parse_args(argv)
    try:
        import mteb
    except ImportError:
        raise ImportError("python -m mrl.mteb needs mteb: pip install -e .[mteb]") from None
    import datasets

    datasets.disable_progress_bars()  # mteb's per-evaluation dataset maps would bury the tasks × dims bar
    from mrl.model.encoder import Encoder

    if args.card and not os.path.isdir(args.card):
        raise FileNotFoundError(f"--card: no model folder at {args.card!r}")
    try:
        path = resolve_model(args.model, load_mirror(args.mirror))
    except FileNotFoundError as error:  # resolve_model names the config field
        raise FileNotFoundError(str(error).replace("model.name", "--model", 1)) from None
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "modules.json")):
        raise ValueError(f"--model: {args.model} is a folder without config.json or modules.json, not a model")
    tasks = load_tasks(args)
    encoder = Encoder.from_pretrained(path).to("cuda" if torch.cuda.is_available() else "cpu")
    width = encoder.embedding_dim
    dims = args.dims or getattr(encoder.backbone.config, "matryoshka_dimensions", None) or default_dims(width)
    bad = [d for d in dims if not 0 < d <= width]
    if bad:
        raise ValueError(f"--dims: {bad} outside 1..{width}, the width of {args.model}")
    dims = sorted(set(dims), reverse=True)
    local = os.path.isdir(path)
    name = args.name or (f"local/{os.path.basename(os.path.abspath(path))}" if local and path == args.model
                         else args.model)
    revision = folder_revision(path) if local else getattr(encoder.backbone.config, "_commit_hash", None) or "main"
    cache = mteb.ResultCache(cache_path=args.cache or os.path.join(args.out, "mteb-cache"))
    results = {"model": args.model, "name": name, "revision": revision, "dims": dims, "precisions": args.precision,
               **evaluate_mteb(encoder, tasks, dims, args.precision, name, revision, cache, args.batch_size)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mteb.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = mteb_table(results)
    figures = [] if args.no_plots else plot(
        {f"{task} ({p})": {d: by[f"d{d}/{p}"] for d in dims} for task, by in results["scores"].items()
         for p in args.precision}, "main score ×100", "MTEB per dim", os.path.join(args.out, "mteb"))
    with open(os.path.join(args.out, "mteb.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures) + "\n")
    if args.card:
        card_path = os.path.join(args.card, "README.md")
        card = open(card_path, encoding="utf-8").read() if os.path.isfile(card_path) else ""
        with open(card_path, "w", encoding="utf-8") as f:
            f.write(with_mteb_section(card, table))
    print(table + f"\n\nwrote {args.out}/mteb.json, mteb.md" + (f" and {len(figures)} plots" if figures else "")
          + (f"; the MTEB section of {args.card}/README.md" if args.card else ""))


if __name__ == "__main__":  # guarded: importing every module of mrl (tests/test_no_st_import.py) runs nothing
    main()
