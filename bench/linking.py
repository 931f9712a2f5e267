"""Linking throughput: our `Linker` against a bare pyahocorasick scan, in one process.

    .venv/bin/python bench/linking.py --names 1000000 --captions 20000

Both sides use the same 1M synthetic names (random CJK strings of 2-6 characters, seeded) and the
same captions (filler text with names inserted). "Bare" is pyahocorasick's own leftmost-longest
`iter_long` over the raw caption: no normalisation, no offsets back to the original text, no
disambiguation. Ours adds NFKC + traditional->simplified matching, offset mapping and `Mention`
objects. Prints captions/s for both, the ratio, and build time and memory per million names.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

import ahocorasick
import psutil
import pyarrow as pa

from rapid_pipeline.linker import LinkConfig, Linker

# Common CJK ideographs: a slice of the URO block keeps names readable and collisions rare.
HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 6000)]


def make_names(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = {"".join(rng.choices(HAN, k=rng.randint(2, 6))) for _ in range(int(n * 1.02))}
    return sorted(names)[:n]


def make_captions(names: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    filler = "一张的照片桌上放着和在里面很好看新鲜"
    caps = []
    for _ in range(n):
        parts = ["".join(rng.choices(filler, k=rng.randint(2, 6))) for _ in range(3)]
        parts.insert(rng.randint(0, 3), rng.choice(names))
        if rng.random() < 0.5:
            parts.insert(rng.randint(0, 4), rng.choice(names))
        caps.append("".join(parts))
    return caps


def rss() -> int:
    gc.collect()
    pa.default_memory_pool().release_unused()
    return psutil.Process(os.getpid()).memory_info().rss


def retained_bytes(automaton: ahocorasick.Automaton, linker: Linker | None = None) -> int:
    """What stays allocated after the build: the trie, plus our per-key columns and entity ids."""
    total = automaton.get_stats()["total_size"]
    if linker is not None:
        ix = linker.index
        total += ix.key_len.nbytes + ix.entity_code.nbytes + ix.flags.nbytes
        total += sum(sys.getsizeof(e) for e in ix.entity_ids) + sys.getsizeof(ix.entity_ids)
    return total


def build_bare(names: list[str]) -> ahocorasick.Automaton:
    a = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    for i, name in enumerate(names):
        a.add_word(name, i)
    a.make_automaton()
    return a


def timed(fn, *args):
    m0, t0 = rss(), time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0, rss() - m0


def scan(fn, captions: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for c in captions:
            fn(c)
        best = min(best, time.perf_counter() - t0)
    return len(captions) / best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", type=int, default=1_000_000)
    p.add_argument("--captions", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = make_names(args.names, args.seed)
    captions = make_captions(names, args.captions, args.seed)
    bare, bare_s, bare_mem = timed(build_bare, names)
    ours, ours_s, ours_mem = timed(Linker.build, ((n, f"e{i}", 1.0) for i, n in enumerate(names)), LinkConfig(stoplist=()))
    bare_cps = scan(lambda c: list(bare.iter_long(c)), captions, args.rounds)
    ours_cps = scan(ours.link, captions, args.rounds)
    per_m = 1e6 / len(names)
    result = {"names": len(names), "captions": len(captions),
              "bare_captions_per_s": round(bare_cps), "ours_captions_per_s": round(ours_cps), "ratio": round(ours_cps / bare_cps, 3),
              "bare_build_s_per_million": round(bare_s * per_m, 2), "ours_build_s_per_million": round(ours_s * per_m, 2),
              "bare_rss_mb_per_million": round(bare_mem * per_m / 2**20, 1), "ours_rss_mb_per_million": round(ours_mem * per_m / 2**20, 1),
              "bare_retained_mb_per_million": round(retained_bytes(bare) * per_m / 2**20, 1),
              "ours_retained_mb_per_million": round(retained_bytes(ours.automaton, ours) * per_m / 2**20, 1)}
    print(f"bare pyahocorasick iter_long: {bare_cps:,.0f} captions/s (1 core)")
    print(f"rapid Linker.link:            {ours_cps:,.0f} captions/s (1 core)   ratio {result['ratio']:.2f} (goal >= 0.5)")
    print(f"build per million names: bare {result['bare_build_s_per_million']} s, ours {result['ours_build_s_per_million']} s")
    print(f"memory per million names (RSS growth during build / retained structures): "
          f"bare {result['bare_rss_mb_per_million']} / {result['bare_retained_mb_per_million']} MB, "
          f"ours {result['ours_rss_mb_per_million']} / {result['ours_retained_mb_per_million']} MB")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
