"""`python -m device COMMAND`: the device's command line.

Each subcommand is a function `cmd_<name>(args) -> int` plus a parser set-up
`add_<name>(parser)`, registered in COMMANDS (one table; add a row to add a command).
Bad input (a missing or undecodable file, a bad argument) ends with a one-line message
on stderr naming the problem and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from device import demo, pipeline, selftest

log = logging.getLogger(__name__)

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""


# -- beats --------------------------------------------------------------------------------
def add_beats(p: argparse.ArgumentParser) -> None:
    p.description = ("Print the beat times (seconds from the start of the file, one per line) that the "
                     "device's causal tracker raises while listening: each beat is predicted from past audio "
                     "only, as live. The first beats come after about 2.5 s of warm-up.")
    p.add_argument("audio", metavar="AUDIO", help="WAV, MP3 or FLAC file (stereo is mixed to mono)")
    p.add_argument("--tempo", action="store_true",
                   help="also print a tempo / metre summary to stderr (median BPM over the song, final metre)")


def cmd_beats(args: argparse.Namespace) -> int:
    from device.features import extract_file
    f = _extract(args.audio, extract_file)
    for t in f.beat_times:
        print(f"{t:.3f}")
    if args.tempo:
        print(_summary(f, args.audio), file=sys.stderr)
    return 0


# -- features -----------------------------------------------------------------------------
def add_features(p: argparse.ArgumentParser) -> None:
    p.description = ("Compute the model's input, one row per 40 ms pose frame: 40 level-normalized Mel "
                     "bands, onset strength, beat and bar phase (sin/cos), tempo, beat flag and metre, each "
                     "a fixed affine map into [-1, 1] (device.features.FEATURE_SCALE).")
    p.add_argument("audio", metavar="AUDIO", help="WAV, MP3 or FLAC file (stereo is mixed to mono)")
    p.add_argument("--out", metavar="F.npy",
                   help="write x, the model input, as float32 (T, F) .npy; beside it F.json holds the column "
                        "names, the feature-config hash and per-frame bpm / phase / meter / is_beat")
    p.add_argument("--info", action="store_true", help="print shape, median tempo and metre to stdout")


def cmd_features(args: argparse.Namespace) -> int:
    from device import features
    if not args.out and not args.info:
        raise CliError("features: nothing to do; give --out F.npy and/or --info")
    f = _extract(args.audio, features.extract_file)
    if args.out:
        out = args.out if args.out.endswith(".npy") else args.out + ".npy"
        try:
            np.save(out, f.x)
            meta = {
                "columns": list(features.feature_names()),
                "feature_config_hash": features.DEFAULT_FEATURES.config_hash(),
                "pose_fps": features.DEFAULT_FEATURES.pose_fps,
                "beat_times": [round(float(t), 3) for t in f.beat_times],
                "bpm": [round(float(v), 2) for v in f.bpm],
                "phase": [round(float(v), 3) for v in f.phase],
                "bar_phase": [round(float(v), 3) for v in f.bar_phase],
                "meter": [int(v) for v in f.meter],
                "is_beat": [int(v) for v in f.is_beat],
            }
            with open(out[:-4] + ".json", "w") as fh:
                json.dump(meta, fh)
        except OSError as e:
            raise CliError(f"features: cannot write {out!r}: {e.strerror or e}") from e
    if args.info:
        print(f"x: {f.x.shape[0]} frames x {f.x.shape[1]} features at "
              f"{features.DEFAULT_FEATURES.pose_fps} fps\n{_summary(f, args.audio)}")
    return 0


# -- helpers ------------------------------------------------------------------------------
def _extract(path: str, fn):
    from device.audio import AudioError
    try:
        return fn(path)
    except AudioError as e:
        raise CliError(str(e)) from e


def _summary(f, path: str) -> str:
    known = f.bpm[f.bpm > 0]
    bpm = f"{float(np.median(known)):.1f} BPM" if len(known) else "unknown"
    meter = {3: "3/4", 4: "4/4"}.get(int(f.meter[-1]) if len(f.meter) else 0, "unknown")
    return f"{os.path.basename(path)}: tempo {bpm}, metre {meter}, {len(f.beat_times)} beats"


# name -> (set-up, run, one-line help). Other helpers add rows here.
COMMANDS: dict[str, tuple] = {
    "beats": (add_beats, cmd_beats, "print the causal beat tracker's beat times, seconds, one per line"),
    "features": (add_features, cmd_features, "compute the model's input features (pose rate, fixed-point Mel + beat)"),
    "generate": (pipeline.add_generate, pipeline.cmd_generate, "poses for an audio file through the device pipeline "
                 "(TFLite), no broker: P.npy (T, 14, 2) + P.heading.npy"),
    "run": (pipeline.add_run, pipeline.cmd_run, "the live job: microphone (or file / stdin) -> poses -> MQTT"),
    "selftest": (selftest.add_selftest, selftest.cmd_selftest, "on-device checks, one PASS/FAIL line each; "
                 "non-zero exit on failure"),
    "devices": (pipeline.add_devices, pipeline.cmd_devices, "list the microphones PortAudio sees"),
    "demo": (demo.add_demo_args, lambda args: _demo(args), "the whole system on this machine: broker, device, "
             "simulated robot, live display; writes a GIF of the dance and the servo trace"),
}


def _demo(args) -> int:
    try:
        return demo.run_demo(args)
    except RuntimeError as e:  # a missing bundle, a broker that will not start: say so, no traceback
        raise CliError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m device",
        description="edgedance device: listen to music, extract fixed-point features, dance.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
