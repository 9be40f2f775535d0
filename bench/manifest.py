"""What a checkpoint manifest costs: SHA-256 of checkpoint-sized files against writing them.

    python bench/manifest.py                 # 1 GiB over 4 files; about half a minute on a 2-core VM
    python bench/manifest.py --gib 4 --files 8

Writes `--files` random files of `--gib` GiB in all into a temporary directory (through the page
cache, then fsync: what a checkpoint save does), then hashes them with `cir.manifest.digest_files`
at 1, 2, 4 and 8 threads, and reports GB/s for each against the write. The pieces of a file are
hashed in parallel (hashlib releases the GIL), so hashing scales with cores until memory bandwidth
runs out; a training checkpoint also shares the files over its ranks. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from cir import manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="bytes in all, GiB")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = parser.parse_args()
    total = int(args.gib * 2**30)
    each = total // args.files
    block = os.urandom(64 << 20)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for i in range(args.files):
            with open(root / f"f{i}.bin", "wb") as f:
                left = each
                while left:
                    left -= f.write(block[: min(left, len(block))])
                f.flush()
                os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        names = manifest.list_files(root)
        rows = [("write + fsync", write_s)]
        for threads in (1, 2, 4, 8):
            start = time.perf_counter()
            manifest.digest_files(root, names, threads=threads)
            rows.append((f"sha256, {threads} thread{'s' * (threads > 1)}", time.perf_counter() - start))
    nbytes = each * args.files
    machine = platform.processor() or platform.machine()
    print(f"{nbytes / 2**30:.2f} GiB in {args.files} files, {os.cpu_count()} CPUs, {machine}")
    print(f"{'what':<22} {'seconds':>8} {'GB/s':>7}")
    for name, seconds in rows:
        print(f"{name:<22} {seconds:8.2f} {nbytes / seconds / 1e9:7.2f}")
    print(json.dumps({"bytes": nbytes, "cpus": os.cpu_count(),
                      **{name: round(nbytes / seconds / 1e9, 3) for name, seconds in rows}}))


if __name__ == "__main__":
    main()
