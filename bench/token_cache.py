"""Token-cache build at scale: a generated 1 GB jsonl corpus tokenized with GPT-2's BPE by 1
and by 2 worker processes, side by side.

Each case runs ``prepare_data`` in a fresh process (as the launcher does, torch imported) on
an empty cache folder, while this script samples the resident memory of that process and all
its children (the workers) every 0.5 s. The issue's bars: the whole build's peak resident
memory (the sum over the processes) stays under 1 GB, 2 workers are at least 1.7x faster than
1 on this 2-core machine, and the cached ids equal tokenizing each document alone (checked on
a sample of documents spread over the corpus).

    .venv/bin/python bench/token_cache.py [--gb 1.0] [--corpus /tmp/plait_corpus] [--json out.json]

The corpus is written once (sentences of random words with numbers and punctuation, documents
of 50 to 3,000 words, 16 jsonl files) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will more can "
         "crown sword night day love death rose thorn speak hear king queen river mountain engine matrix "
         "gradient tensor parallel pipeline shard expert token window memory").split()
FILES = 16


def write_corpus(folder: str, gigabytes: float, seed: int = 0) -> None:
    """``gigabytes`` of jsonl documents in FILES files (skipped when the folder is complete)."""
    done = os.path.join(folder, "DONE")
    if os.path.isfile(done):
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    words = np.array(WORDS + [f"{w}," for w in WORDS[:20]] + [f"{w}." for w in WORDS[:20]] + [str(i) for i in range(200)])
    per_file = int(gigabytes * 1e9 / FILES)
    for k in range(FILES):
        with open(os.path.join(folder, f"part_{k:02d}.jsonl"), "w") as out:
            written = 0
            while written < per_file:
                lengths = rng.integers(50, 3000, size=256)
                picks = words[rng.integers(0, len(words), size=int(lengths.sum()))]
                cuts = np.cumsum(lengths)[:-1]
                lines = [json.dumps({"text": " ".join(doc)}) + "\n" for doc in np.split(picks, cuts)]
                block = "".join(lines)
                out.write(block)
                written += len(block)
    open(done, "w").close()


CHILD = """
import sys, json
from plait.config import DataConfig
from plait.data import prepare_data
cfg = DataConfig(source=sys.argv[1], tokenizer="gpt2", cache_dir=sys.argv[2], workers=int(sys.argv[3]), val_fraction=0.0)
bundle = prepare_data(cfg, seq_len=1024, seed=0)
print(json.dumps({"tokens": bundle.n_train_tokens, "docs": bundle.train.store.n_docs}))
"""


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of ``proc`` and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def build(corpus: str, cache: str, workers: int) -> dict:
    """One cold build in a fresh process; its wall time, peak tree memory and counts."""
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, corpus, cache, str(workers)], env=env,
                             stdout=subprocess.PIPE, text=True)
    peak, watched = 0, psutil.Process(child.pid)

    def sample() -> None:
        nonlocal peak
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss(watched))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, _ = child.communicate()
    sampler.join()
    seconds = time.perf_counter() - began
    if child.returncode:
        raise SystemExit(f"build with {workers} workers failed (exit {child.returncode})")
    return {"workers": workers, "seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20),
            **json.loads(out.strip().splitlines()[-1])}


def check_ids(corpus: str, cache: str, n: int = 200) -> int:
    """Compare the cached ids of ``n`` documents spread over the corpus with each alone."""
    from plait.data.sources import iter_documents
    from plait.data.token_store import CachedCorpus
    from plait.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("gpt2", [], cache, "")
    (folder,) = [os.path.join(cache, "tokens", d) for d in os.listdir(os.path.join(cache, "tokens"))]
    corpus_cache = CachedCorpus.open(folder)
    store = corpus_cache.split(np.arange(corpus_cache.n_docs))
    picks = set(np.linspace(0, corpus_cache.n_docs - 1, n).astype(int).tolist())
    checked = 0
    for i, doc in enumerate(iter_documents(corpus)):
        if i in picks:
            got = store.tokens[int(store.offsets[i]) : int(store.offsets[i + 1])].tolist()
            if got != tokenizer.encode(doc) + [tokenizer.eos_id]:
                raise SystemExit(f"document {i}: cached ids differ from tokenizing it alone")
            checked += 1
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "plait_corpus"))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    began = time.perf_counter()
    write_corpus(args.corpus, args.gb)
    size = sum(os.path.getsize(os.path.join(args.corpus, f)) for f in os.listdir(args.corpus))
    print(f"corpus: {size / 1e9:.2f} GB in {FILES} jsonl files ({time.perf_counter() - began:.0f} s to ensure)")
    cache = tempfile.mkdtemp(prefix="plait_tokcache_")
    try:
        rows = [build(args.corpus, cache, workers) for workers in (1, 2)]
        checked = check_ids(args.corpus, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for r in rows:
        print(f"workers={r['workers']}: {r['seconds']:7.1f} s  {size / 1e6 / r['seconds']:6.1f} MB/s  "
              f"{r['tokens'] / r['seconds'] / 1e6:5.2f} M tokens/s  peak RSS (all processes) {r['peak_rss_mb']} MiB")
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    peak = max(r["peak_rss_mb"] for r in rows)
    print(f"speedup 2 vs 1 workers: {speedup:.2f}x (bar 1.7x); peak RSS {peak} MiB (bar 1024); "
          f"{checked} sampled documents equal their ids alone; {rows[0]['docs']:,} documents, {rows[0]['tokens']:,} tokens")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bytes": size, "rows": rows, "speedup": speedup, "checked": checked}, fh, indent=1)


if __name__ == "__main__":
    main()
