"""MTEB tasks from local data, for evaluating without network: an STS table (sentence pairs and gold scores) as an
mteb AbsTaskSTS, and a retrieval set (mrl.retrieval.data: a BEIR folder or NLI triplets) as an AbsTaskRetrieval.
Their data is held in memory and handed over in load_data, as mteb's own test tasks do. mteb is imported inside
the functions (pip install -e .[mteb]). `load_tasks`: what python -m mrl.mteb's task flags name.

mteb caches a result by model and task *name*, whatever the task's data, so each name carries a hash of the data:
another file under the same flag is another task, never a cached one.
"""

import hashlib
import json

from mrl.data.tables import LABEL, load_table, text_columns
from mrl.retrieval.data import RetrievalSet, nli_retrieval_set


def data_hash(*columns) -> str:
    return hashlib.sha256(json.dumps(columns, sort_keys=True).encode()).hexdigest()[:8]


def _metadata(name: str, kind: str, main_score: str, description: str, digest: str):
    from mteb import TaskMetadata

    return TaskMetadata(name=name, description=description, type=kind, category="t2t", modalities=["text"],
                        dataset={"path": f"local/{name}", "revision": digest}, eval_splits=["test"],
                        eval_langs=["eng-Latn"], main_score=main_score, reference=None)


def sts_task(sentence1: list[str], sentence2: list[str], scores: list[float], name: str = "LocalSTS",
             score_range: tuple[float, float] = (0.0, 5.0)):
    """An STS task (main score: Spearman of the cosine against the gold scores) on these pairs, split `test`."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks import AbsTaskSTS

    columns = {"sentence1": list(sentence1), "sentence2": list(sentence2), "score": [float(s) for s in scores]}
    digest = data_hash(columns)

    class LocalSTS(AbsTaskSTS):
        metadata = _metadata(f"{name}-{digest}", "STS", "cosine_spearman",
                             f"{len(scores)} local sentence pairs with gold scores in {list(score_range)}", digest)
        min_score, max_score = score_range

        def load_data(self, num_proc=None, **kwargs):
            self.dataset, self.data_loaded = DatasetDict({"test": Dataset.from_dict(columns)}), True

    return LocalSTS()


def retrieval_task(data: RetrievalSet, name: str = "LocalRetrieval"):
    """A retrieval task (main score: nDCG@10) on these queries, corpus and qrels, split `test`. A document with
    the query's own id is not counted, as mrl.retrieval.metrics skips it."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskRetrieval

    digest = data_hash(data.query_ids, data.queries, data.doc_ids, data.docs, data.qrels)

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _metadata(f"{name}-{digest}", "Retrieval", "ndcg_at_10",
                             f"{len(data.queries)} local queries against {len(data.docs)} documents", digest)
        ignore_identical_ids = True

        def load_data(self, num_proc=None, **kwargs):
            split = {"queries": Dataset.from_dict({"id": data.query_ids, "text": data.queries}),
                     "corpus": Dataset.from_dict({"id": data.doc_ids, "text": data.docs}),
                     "relevant_docs": {q: dict(docs) for q, docs in data.qrels.items()}, "top_ranked": None}
            self.dataset, self.data_loaded = {"default": {"test": split}}, True  # fresh: evaluation filters it

    return LocalRetrieval()


def load_tasks(args):
    """The named MTEB tasks and the local ones, or a one-line error naming the unknown task."""
    import mteb

    tasks = []
    for task_name in args.tasks:
        try:
            tasks.append(mteb.get_task(task_name))
        except KeyError as error:
            raise ValueError(f"--tasks: {str(error.args[0]).removeprefix('KeyError: ')}") from None  # with close names
    if args.benchmark:
        try:
            tasks += list(mteb.get_benchmark(args.benchmark).tasks)
        except KeyError as error:
            raise ValueError(f"--benchmark: {str(error.args[0]).removeprefix('KeyError: ')}") from None
    if args.local_sts:
        table = load_table({"path": "csv", "data_files": {"test": args.local_sts}, "split": "test", "score_max": 5},
                           "--local-sts", needs_label=True)  # scores divided by 5: in [0, 1]
        first, second = text_columns(table)[:2]
        tasks.append(sts_task(table[first], table[second], table[LABEL], name="LocalSTS", score_range=(0.0, 1.0)))
    if args.local_nli:
        tasks.append(retrieval_task(nli_retrieval_set(args.local_nli, args.n_queries), name="LocalNLIRetrieval"))
    if not tasks:
        raise ValueError("--tasks: no task given (name MTEB tasks, or --local-sts / --local-nli)")
    return tasks
