"""`python -m trainer train | generate | experiments`."""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time


def cmd_train(args) -> int:
    from trainer.config import build_config
    from trainer.train import train

    sets = list(args.set or [])
    if args.minutes is not None:
        sets.append(f"minutes={args.minutes}")
    cfg = build_config(args.config or [], sets)
    out = args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.kind}"
    m = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    vm, tr = m["val_mean"], m["training"]
    print(f"run: {out}")
    print(f"stopped by {tr['stop_reason']} after {tr['epochs']} epochs ({tr['train_seconds'] / 60:.1f} min, "
          f"{tr['seconds_per_epoch']:.1f} s/epoch), best epoch {tr['best_epoch']}")
    print("held out: " + " ".join(f"{k}={v:.4g}" for k, v in vm.items()))
    return 0


def cmd_generate(args) -> int:
    from trainer.generate import generate_file

    poses = generate_file(args.audio, args.out, args.model, heading_out=args.heading_out, seed=args.seed)
    print(f"{args.out}: poses {poses.shape} at 25 fps")
    return 0


def cmd_experiments(args) -> int:
    from trainer.experiments import run_suite

    rows = run_suite(args.suite, minutes_per_run=args.minutes_per_run, out_root=args.out, doc=args.doc,
                     only=args.only, report_only=args.report_only, config_files=args.config or [],
                     sets=args.set or [],
                     notes=pathlib.Path(args.suite_notes).read_text() if args.suite_notes else "")
    print(f"{args.doc}: {len(rows)} runs reported")
    if args.training_run:
        training_report(args)
    return 0


def training_report(args) -> None:
    """docs/results/training.md for a finished run, beside the baselines suite's runs."""
    import json

    from device.contract import FeatureConfig
    from trainer.config import from_dict
    from trainer.experiments import BASELINES_SUITE, tempo_responses, write_training_report
    from trainer.train import load_data

    run = pathlib.Path(args.training_run)
    cfg = from_dict(json.loads((run / "train_config.json").read_text()), str(run / "train_config.json"))
    fcfg = FeatureConfig.from_dict(json.loads((run / "feature_config.json").read_text()))
    train, val = load_data(cfg, fcfg, run)
    tempo = tempo_responses(run, val, n=args.tempo_dances) if args.tempo_dances else None
    base = pathlib.Path(args.out) / "baselines"
    baselines = {k.upper(): base / k for k in BASELINES_SUITE}
    matched = None
    if args.matched_energy:
        from trainer.experiments import matched_energy

        matched = matched_energy({"ours": run, **baselines}, train, val)
    cmd = " ".join(["python -m trainer"] + sys.argv[1:])
    notes = pathlib.Path(args.notes).read_text() if args.notes else ""
    write_training_report(run, baselines, args.training_doc, cmd, tempo, notes, matched)
    print(f"{args.training_doc}: written")


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "experiments": cmd_experiments}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="edgedance training, generation, experiments")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--config", action="append", help="JSON or INI override file (repeatable; later wins)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one field of TrainConfig")
    t.add_argument("--out", help="run folder (default runs/<time>-<kind>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--minutes", type=float, help="wall-clock budget (same as --set minutes=N)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = sub.add_parser("generate", help="poses for an audio file with a Keras model")
    g.add_argument("audio", help="WAV, MP3 or FLAC file")
    g.add_argument("--out", required=True, help="output .npy: (T, 14, 2) float32 at 25 fps")
    g.add_argument("--model", help="run or model folder (default models/default/keras)")
    g.add_argument("--heading-out", help="also write the integrated heading (T,) radians here")
    g.add_argument("--seed", type=int, default=0, help="noise seed (models with a noise input)")
    e = sub.add_parser("experiments", help="the paper's studies, each run with the same budget")
    e.add_argument("--suite", default="paper", help="suite name (paper, levers)")
    e.add_argument("--minutes-per-run", type=float, default=4.0, help="training budget per run, minutes of CPU time on one thread (default: %(default)s)")
    e.add_argument("--out", default="runs/experiments", help="folder for the runs")
    e.add_argument("--doc", default="docs/results/experiments.md", help="markdown report to write")
    e.add_argument("--only", action="append", help="run only these experiment names (repeatable)")
    e.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    e.add_argument("--config", action="append", help="base config override file for every run (repeatable)")
    e.add_argument("--training-run", help="also write the training report of this run (with the baselines suite)")
    e.add_argument("--training-doc", default="docs/results/training.md", help="where --training-run writes")
    e.add_argument("--suite-notes", help="markdown file appended to the suite's report (findings)")
    e.add_argument("--notes", help="markdown file appended to the training report (findings, lever probes)")
    e.add_argument("--matched-energy", action="store_true",
                   help="with --training-run: also compare MSE at equal motion energy (same fitted output stage for all)")
    e.add_argument("--tempo-dances", type=int, default=3, help="held-out dances for the tempo response (0 = skip)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="base config override for every run")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
