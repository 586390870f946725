"""Benchmarks: scripts, not timed tests. One module per topic (`bench/<topic>.py`).

The contract every module follows (bench.run relies on it):

- `main(argv: list[str] | None = None) -> str`: parse the module's own options from `argv`
  (argparse, so `python -m bench.<topic> --help` works), measure side by side in one run,
  write `docs/bench/<topic>.md` (the section plus the command that made it) and return the
  same markdown section, starting with a `## ` heading.
- Real data only through EDGEDANCE_DATA (the Music-to-Dance folder); without it, a module
  measures on synthesized audio and says so in its section.
- CPU time with `time.process_time()`; keep a whole run bounded (about a minute per topic).

`python -m bench.run [--only frontend,beat]` runs every module's `main([])` and writes
docs/BENCHMARKS.md: a header (date, machine, command) and the sections in order.
"""

import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def write_section(text: str, path) -> str:
    """Write a module's markdown section (a relative path is taken from the repository root,
    wherever the command runs) and return it, as `main` does."""
    out = pathlib.Path(path)
    out = out if out.is_absolute() else REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
