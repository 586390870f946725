"""Whole DSP path speed: frontend + beat tracker + features, CPU per second of audio.

    python -m bench.dsp [--data DIR] [--songs 3] [--seconds 60] [--repeats 3]

Streams each song's first `--seconds` through device.features.FeatureExtractor in the device's
640-sample chunks (one pose frame per call, as the live job does), and, side by side in the
same run, the stages alone: the frontend in 640-sample chunks, the beat tracker on the
precomputed log-Mel, and batch `features.extract` on the whole excerpt. CPU is
time.process_time (one core), the best of `--repeats` runs. Target: >= 100x real time.
Without the data folder it uses 60 s of a synthesized drum pattern.
"""
from __future__ import annotations

from bench import write_section
import argparse
import logging
import os
import pathlib
import time

import numpy as np

from device.contract import DEFAULT_FEATURES as CFG

log = logging.getLogger(__name__)
REPO = pathlib.Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "bench" / "dsp.md"
DEFAULT_DATA = os.environ.get("EDGEDANCE_DATA") or str(REPO.parent / "shared" / "data" / "music-to-dance")
SONGS = ("DANCE_C_2", "DANCE_R_3", "DANCE_W_1")
CHUNK = CFG.samples_per_pose_frame  # 640


def first_seconds(path: str, seconds: float) -> np.ndarray:
    """int16 mono at the contract rate, the first `seconds` of a file (decodes only those)."""
    import soundfile as sf

    from device.audio import resample, to_pcm16
    with sf.SoundFile(path) as f:
        x = f.read(int(seconds * f.samplerate), dtype="float32", always_2d=True).mean(axis=1)
        return to_pcm16(resample(x, f.samplerate, CFG.sample_rate_hz))


def synth_drums(seconds: float, bpm: float = 120.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sr = CFG.sample_rate_hz
    y = 0.003 * rng.standard_normal(int(seconds * sr))
    t = np.arange(int(0.15 * sr)) / sr
    kick = np.sin(2 * np.pi * np.cumsum(50 + 100 * np.exp(-t * 30)) / sr) * np.exp(-t * 25)
    for b in np.arange(0, seconds - 0.2, 60 / bpm):
        i = int(b * sr)
        y[i:i + len(kick)] += kick
        n = int(0.05 * sr)
        y[i:i + n] += 0.2 * rng.standard_normal(n) * np.exp(-np.arange(n) / (0.01 * sr))
    return (np.clip(y * 0.3, -1, 1) * 32767).astype(np.int16)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def measure(pcm: np.ndarray, repeats: int) -> dict[str, float]:
    from device.beat import BeatTracker
    from device.features import FeatureExtractor, extract
    from device.frontend import Frontend, log_mel
    chunks = [pcm[i:i + CHUNK] for i in range(0, len(pcm), CHUNK)]
    mel = log_mel(pcm, CFG)
    fe, bt, fx = Frontend(CFG), BeatTracker(CFG), FeatureExtractor(CFG)

    def frontend_stream():
        fe.reset()
        for c in chunks:
            fe.process(c)

    def beat_only():
        bt.reset()
        bt.process(mel)

    def features_stream():
        fx.reset()
        for c in chunks:
            fx.process(c)

    return {
        "frontend, 640-sample chunks": _best(frontend_stream, repeats),
        "beat tracker (on precomputed log-Mel)": _best(beat_only, repeats),
        "whole DSP path, 640-sample chunks (FeatureExtractor)": _best(features_stream, repeats),
        "whole DSP path, batch (features.extract)": _best(lambda: extract(pcm, CFG), repeats),
    }


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.dsp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="Music-to-Dance folder (default: $EDGEDANCE_DATA)")
    ap.add_argument("--songs", type=int, default=len(SONGS), help=f"how many of {SONGS}")
    ap.add_argument("--seconds", type=float, default=60.0, help="audio per song, from its start")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best kept)")
    ap.add_argument("--out", default=str(OUT), help="markdown file to write")
    args = ap.parse_args(argv)
    paths = [pathlib.Path(args.data) / s / "audio.mp3" for s in SONGS[: args.songs]]
    if all(p.exists() for p in paths):
        signals = [(p.parent.name, first_seconds(str(p), args.seconds)) for p in paths]
        source = f"the first {args.seconds:g} s of {', '.join(n for n, _ in signals)}"
    else:
        signals = [("synth", synth_drums(args.seconds))]
        source = f"{args.seconds:g} s of a synthesized drum pattern (no data folder at {args.data!r})"
    totals: dict[str, float] = {}
    seconds = 0.0
    for name, pcm in signals:
        for k, v in measure(pcm, args.repeats).items():
            totals[k] = totals.get(k, 0.0) + v
        seconds += len(pcm) / CFG.sample_rate_hz
        log.info("%s done", name)
    whole = totals["whole DSP path, 640-sample chunks (FeatureExtractor)"]
    cmd = "python -m bench.dsp" + "".join(f" --{k} {v}" for k, v in (("songs", args.songs), ("seconds", args.seconds),
                                                                       ("repeats", args.repeats))
                                          if v != ap.get_default(k))
    lines = ["## Whole DSP path speed (frontend + beat + features)", "",
             f"Command: `{cmd}`; audio: {source}; CPU = process time on one core, best of {args.repeats}.", "",
             "| stage | CPU ms per s of audio | x real time | share of the streaming path |",
             "| --- | --- | --- | --- |"]
    for k, v in totals.items():
        lines.append(f"| {k} | {1000 * v / seconds:.2f} | {seconds / v:.0f} | {v / whole:.2f} |")
    verdict = "meets" if seconds / whole >= 100 else "MISSES"
    lines += ["", f"Target >= 100x real time for the streaming path: {seconds / whole:.0f}x, {verdict} it.", ""]
    return write_section("\n".join(lines), args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(main())
