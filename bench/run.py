"""Run every benchmark module in bench/ and write docs/BENCHMARKS.md.

    python -m bench.run [--only frontend,beat] [--out docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import pathlib
import pkgutil
import platform
import sys
import time
import traceback

import bench

log = logging.getLogger(__name__)
REPO = pathlib.Path(__file__).resolve().parent.parent
SKIP = {"run"}
ORDER = ("frontend", "beat", "features", "model")  # the data path first, then the rest by name


def topics() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in SKIP and not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy as np
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated topics to run (default: all of {', '.join(topics())})")
    ap.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"), help="the markdown file to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    chosen = topics()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = sorted(set(wanted) - set(chosen))
        if unknown:
            ap.error(f"unknown topic(s) {unknown}; known: {chosen}")
        chosen = [t for t in chosen if t in wanted]
    else:  # opt-in topics (e.g. arm64: root and tens of minutes under emulation) run only when named
        chosen = [t for t in chosen if not getattr(importlib.import_module(f"bench.{t}"), "OPT_IN", False)]

    sections, failed = [], []
    for name in topics():
        if name not in chosen:  # keep the last figures of topics not run this time
            earlier = REPO / "docs" / "bench" / f"{name}.md"
            if earlier.exists():
                sections.append(earlier.read_text().rstrip() + "\n\n(From an earlier run: not re-run by this command.)\n")
            continue
        print(f"== bench.{name}", flush=True)
        t0 = time.perf_counter()
        try:
            section = importlib.import_module(f"bench.{name}").main([])
        except Exception:  # one broken topic must not hide the others' figures
            failed.append(name)
            section = f"## {name}\n\nFAILED:\n\n```\n{traceback.format_exc()}```\n"
            log.error("bench.%s failed", name, exc_info=True)
        sections.append(section.rstrip() + "\n")
        print(f"   done in {time.perf_counter() - t0:.0f} s", flush=True)

    data = os.environ.get("EDGEDANCE_DATA") or "(unset: synthesized audio only)"
    command = "python -m bench.run" + (f" --only {','.join(chosen)}" if args.only else "")
    header = (f"# edgedance benchmarks\n\n"
              f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}\n"
              f"- machine: {machine()}\n"
              f"- command: `{command}` (EDGEDANCE_DATA={data})\n"
              f"- topics run: {', '.join(chosen)}\n\n"
              "Each section below is also in docs/bench/<topic>.md with its own command.\n")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n" + "\n".join(sections))
    print(f"wrote {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
