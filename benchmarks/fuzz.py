"""The fuzzing benchmark run: every network decoder, >= 10,000 cases each.

1. Hypothesis: ``tests/test_fuzz_*.py`` with ``SHOAL_FUZZ_EXAMPLES=N`` (structured and
   mutated inputs, see ``tests/fuzz_targets.py``);
2. atheris (coverage-guided, libFuzzer), when it is installed (``pip install atheris``):
   each target of ``tests/fuzz_targets.py`` for ``N`` runs from the valid seed payloads,
   in its own process (a crash stops only that target). Codec targets are also called on
   the input with its CRC recomputed, so mutations get past the checksum.

One JSON line per (engine, target): cases, seconds, and whether it failed.

    .venv/bin/python benchmarks/fuzz.py --runs 10000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _one_target(name: str, runs: int) -> None:
    import atheris

    with atheris.instrument_imports():
        import fuzz_targets as ft

    target = ft.TARGETS[name]
    crc = name in ("wire_update", "wire_download", "upload")

    def one(data: bytes) -> None:
        target(data)
        if crc:
            target(ft.fix_crc(data))

    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for i, seed in enumerate(ft.seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=4096", "-timeout=10",
                   "-rss_limit_mb=4096", str(corpus)], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--only", choices=["hypothesis", "atheris"])
    p.add_argument("--target", help=argparse.SUPPRESS)  # child process: one atheris target
    args = p.parse_args(argv)
    if args.target:
        _one_target(args.target, args.runs)
        return 0
    failed = False
    env = dict(os.environ, SHOAL_FUZZ_EXAMPLES=str(args.runs))
    if args.only != "atheris":
        for test in sorted((ROOT / "tests").glob("test_fuzz_*.py")):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p",
                                   "no:cacheprovider", str(test)], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            failed |= proc.returncode != 0
            print(json.dumps({"engine": "hypothesis", "file": test.name,
                              "cases_per_test": args.runs, "ok": proc.returncode == 0,
                              "seconds": round(time.perf_counter() - t0, 1),
                              "summary": proc.stdout.strip().splitlines()[-1]}), flush=True)
            if proc.returncode:
                print(proc.stdout[-4000:], file=sys.stderr)
    if args.only != "hypothesis":
        try:
            import atheris  # noqa: F401
        except ImportError:
            print(json.dumps({"engine": "atheris", "skipped": "not installed "
                              "(pip install atheris)"}))
            return int(failed)
        import fuzz_targets as ft

        for name in ft.TARGETS:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--target", name, "--runs",
                                   str(args.runs)], cwd=ROOT, capture_output=True, text=True)
            failed |= proc.returncode != 0
            done = [ln for ln in proc.stderr.splitlines() if ln.startswith("Done ")]
            print(json.dumps({"engine": "atheris", "target": name, "runs": args.runs,
                              "ok": proc.returncode == 0,
                              "seconds": round(time.perf_counter() - t0, 1),
                              "libfuzzer": done[-1] if done else ""}), flush=True)
            if proc.returncode:
                print(proc.stderr[-4000:], file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
