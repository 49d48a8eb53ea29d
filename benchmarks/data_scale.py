"""Start-up and memory of train.py as the training table grows: 10k, 100k, 1M (and with --10m, 10M) rows.

    python benchmarks/data_scale.py                         # 10k, 100k, 1M; the table: docs/scaling.md
    python benchmarks/data_scale.py --rows 10000 100000     # while developing
    python benchmarks/data_scale.py --10m                   # adds 10M (about 1.6 GB of parquet, 6 GB of cache)

The tables are contrastive pairs of distinct synthetic texts (`anchor <i>: ` / `positive <i>: ` and 6-23 words of
MiniLM's vocabulary, seeded), written once as parquet under --tables (runs/data_scale/, never committed). Each
measurement is train.py in a fresh process: the default model (all-MiniLM-L6-v2), loss.name=contrastive (so
no-duplicates batches), eval off, train.max_steps=--steps. Cold: a new, empty datasets cache
(HF_DATASETS_CACHE); warm: the same run again on that cache. (The parquet file itself may be in the OS page cache
either way.) Reported per run:
    first step   seconds from starting the process to the end of the first batch (results.json
                 train.first_batch_at)
    tokenise     rows per second of the tokenise map, from its progress bar (rows / elapsed); "cached" when warm
    peak memory  peak memory of the process tree (the sum of each process's PSS, so pages the tokenising
                 workers share with the main process count once); the peak of its anonymous part alone (what
                 is not pages of memory-mapped files, such as the table and its token ids, which the kernel can
                 drop and read again); both sampled every 0.5 s (a sample reads /proc/<pid>/smaps_rollup, about
                 10 ms a process with a large table mapped); and the main process's own peak resident memory
                 (its rusage, as /usr/bin/time reports it)
    steps/s      the steady step rate: batches after the first per second (samples_per_second_after_first / the batch size)
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT.parent / "shared" / "models" / "all-MiniLM-L6-v2" / "vocab.txt"


def write_table(path: Path, n_rows: int, seed: int = 0) -> None:
    """n_rows pairs of distinct texts, as parquet, written in parts of 500k rows (memory stays flat)."""
    vocab = [w for w in VOCAB.read_text(encoding="utf-8").split("\n")[2000:12000] if w.isalpha()]
    rng, tmp = np.random.default_rng(seed), path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("anchor", pa.string()), ("positive", pa.string())])) as writer:
        for start in range(0, n_rows, 500_000):
            n, columns = min(500_000, n_rows - start), {}
            for column, shortest, longest in (("anchor", 6, 14), ("positive", 10, 24)):
                lengths, words = rng.integers(shortest, longest, n), rng.integers(0, len(vocab), (n, longest))
                columns[column] = [f"{column} {start + i}: " + " ".join(vocab[j] for j in words[i, :lengths[i]])
                                   for i in range(n)]
            writer.write_table(pa.table(columns))
    tmp.rename(path)


class PeakMemory(threading.Thread):
    """The largest sum, over a process and its descendants, of proportional resident memory (PSS: a page shared by
    n processes counts 1/n in each), and apart the largest sum of its anonymous part (heap, stacks: what the
    kernel cannot drop; the rest is pages of memory-mapped files, the table among them), sampled every `every` s."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.process, self.every, self.done = psutil.Process(pid), every, threading.Event()
        self.peak = self.peak_anon = 0

    def run(self):
        while not self.done.is_set():
            total = anon = 0
            try:
                for p in [self.process, *self.process.children(recursive=True)]:
                    rollup = smaps_rollup(p.pid)
                    total, anon = total + rollup["Pss"], anon + rollup["Pss_Anon"]
            except (psutil.Error, OSError):
                pass
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            self.done.wait(self.every)


def smaps_rollup(pid: int) -> dict[str, int]:
    """A process's /proc/<pid>/smaps_rollup (Linux 4.14+): {field: bytes}."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {k.rstrip(":"): int(v) * 1024 for k, v, *unit in (line.split() for line in f) if unit == ["kB"]}


def tokenise_rate(log: str) -> float | None:
    """Rows per second of the last finished `tokenise` progress bar in a train.py log (rows / its elapsed time)."""
    bars = re.findall(r"tokenise[^\r\n]*?100%\|[^\r\n]*?(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log)
    if not bars:
        return None
    rows, hours, minutes, seconds = bars[-1]
    elapsed = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
    return int(rows) / max(elapsed, 0.5)  # tqdm shows whole seconds: under one second reads as half of one


def measure(table: Path, cache: Path, out: Path, steps: int, extra: list[str]) -> dict:
    """One train.py run in a fresh process on `table` with datasets cache `cache`: what the module docstring lists."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    overrides = [f"data.train={{path: parquet, data_files: {{train: {table}}}, split: train}}", "loss.name=contrastive",
                 "eval.dev=null", "eval.test=null", f"train.max_steps={steps}", f"output_dir={out}", *extra]
    command = [sys.executable, "train.py", "--overwrite", *(a for o in overrides for a in ("--set", o))]
    load_before, start = os.getloadavg()[0], time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = PeakMemory(process.pid)
    peak.start()
    log = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    peak.done.set()
    peak.join()
    (out / "train.log").write_text(log, encoding="utf-8")
    if status != 0:
        sys.exit(f"train.py failed on {table}:\n{log[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    train, batch = results["train"], results["config"]["train"]["batch_size"]
    return {"first_step_s": round(train["first_batch_at"] - start, 1), "tokenise_rows_per_s": tokenise_rate(log),
            "peak_tree_gb": round(peak.peak / 1e9, 2),
            "peak_anon_gb": round(peak.peak_anon / 1e9, 2), "peak_main_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "steps_per_s": round((train["samples_per_second_after_first"] or 0) / batch, 2),
            "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def markdown(results: list[dict]) -> str:
    rows = ["| rows | cache | first step (s) | tokenise (rows/s) | peak memory, tree / anonymous / main (GB) | "
            "steps/s | load (1-min, before / after) |", "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        rate = "cached" if r["cache"] == "warm" and r["tokenise_rows_per_s"] is None else (
            f"{r['tokenise_rows_per_s']:,.0f}" if r["tokenise_rows_per_s"] else "–")
        rows.append(f"| {r['rows']:,} | {r['cache']} | {r['first_step_s']} | {rate} | {r['peak_tree_gb']} / "
                    f"{r['peak_anon_gb']} / {r['peak_main_gb']} | {r['steps_per_s']} | "
                    f"{r['load'][0]} / {r['load'][1]} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--10m", dest="ten_million", action="store_true", help="also 10M rows")
    parser.add_argument("--steps", type=int, default=12, help="train.max_steps of each run")
    parser.add_argument("--tables", type=Path, default=ROOT / "runs" / "data_scale", help="where the parquet goes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more train.py overrides")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.tables.mkdir(parents=True, exist_ok=True)
    results = []
    for n_rows in args.rows + ([10_000_000] if args.ten_million else []):
        table = args.tables / f"pairs-{n_rows}.parquet"
        if not table.exists():
            write_table(table, n_rows)
        cache, out = Path(tempfile.mkdtemp(prefix="cache-", dir=args.tables)), args.tables / f"run-{n_rows}"
        try:
            for kind in ("cold", "warm"):
                results.append({"rows": n_rows, "cache": kind, **measure(table, cache, out, args.steps, args.set)})
                print(json.dumps(results[-1]), flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"\n{markdown(results)}\n\nmachine: {os.cpu_count()} CPUs; python benchmarks/data_scale.py "
          + " ".join(sys.argv[1:]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
