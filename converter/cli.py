"""`python -m converter`: trained run -> model bundle; validation report of every variant.

    python -m converter convert RUN --quantize int8 --out models/default [--report]
    python -m converter report RUN [--md docs/results/quantization.md] [--bundles DIR]
    python -m converter diagnose RUN --bundle DIR [--frames 1000]
    python -m converter test-bundle OUT --features 48
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import sys
import tempfile

from converter import convert as cv

log = logging.getLogger(__name__)

DEFAULT_MD = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results" / "quantization.md"


def _prepare(args):
    """Models, held-out and calibration data, the float equivalence check."""
    from converter import validate

    cv.quiet_tensorflow()
    models = cv.from_run(args.run)
    train, val = validate.load_split(args.run, args.data, args.cache)
    x = val[0].features.x[: args.check_frames or None]
    diff = cv.check_equivalence(models, x)
    print(f"step == sequence (float) over {len(x)} frames of {val[0].name}: max abs diff {diff:.2e} "
          f"(limit {cv.EQUIVALENCE_TOL:g})")
    return models, train, val, diff


def _training_summary(run, train, val, diff) -> dict:
    run = pathlib.Path(run)
    out = {"run": str(run), "train_dances": [d.name for d in train], "val_dances": [d.name for d in val],
           "train_frames": int(sum(d.n_frames for d in train)), "val_frames": int(sum(d.n_frames for d in val)),
           "step_vs_sequence_max_abs_diff": diff}
    mpath = run / "metrics.json"
    if mpath.exists():
        m = json.loads(mpath.read_text())
        out["trainer"] = m.get("training", {})
        out["keras_val_metrics"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    return out


def _max_gain(run) -> float:
    """The run's own bound on the output gain (train_config.json max_gain), else the trainer's default."""
    from trainer.config import TrainConfig

    p = pathlib.Path(run) / "train_config.json"
    return float(json.loads(p.read_text()).get("max_gain", TrainConfig.max_gain)) if p.exists() else TrainConfig.max_gain


def _samples(models, train, args) -> list[dict]:
    """Calibration samples: one run of the float step model over the training songs' first frames."""
    return cv.representative_samples(models, [d.features.x[: args.calib_frames] for d in train], n_samples=args.samples)


def _readout_songs(train, args) -> list:
    """What the int8 pose read-out is refitted on: the training songs' first frames."""
    return [d.features.x[: args.readout_frames] for d in train]


def _validate(models, bundle_dir, val, ref, kf, mode, float_size):
    from converter import validate

    res = validate.evaluate_bundle(bundle_dir, val, ref)
    lat = validate.latency(bundle_dir, val[0].features.x)
    size = (pathlib.Path(bundle_dir) / "model.tflite").stat().st_size
    return validate.summarize(mode, size, float_size, lat, res, kf), res


def cmd_convert(args) -> int:
    from converter import bundle, validate

    models, train, val, diff = _prepare(args)
    samples = _samples(models, train, args) if args.quantize in ("int8", "int16x8") else None
    blob = cv.to_tflite(models, args.quantize, samples, readout_songs=_readout_songs(train, args))
    training = _training_summary(args.run, train, val, diff)
    out = bundle.write_bundle(args.out, blob, models, args.quantize, training=training)
    print(f"wrote {out}: {args.quantize}, {len(blob)} bytes")
    if args.quantize != "float" and not args.keep_output_stage:
        st = validate.refit_output_stage(out, models, train, _max_gain(args.run))
        if st is not None:
            print(f"output stage refitted to the {args.quantize} model: low-pass {st['alpha']:.2f}/{st['alpha2']:.2f}, "
                  f"gain {st['gain']:.2f} (Keras: {models.smoothing['alpha']:.2f}/{models.smoothing['alpha2']:.2f}, "
                  f"{models.smoothing['gain']:.2f})")
    if args.report:
        float_size = len(cv.to_tflite(models, "float")) if args.quantize != "float" else len(blob)
        ref = validate.keras_reference(models, val)
        kf = validate.keras_float_metrics(val, ref)
        row, res = _validate(models, out, val, ref, kf, args.quantize, float_size)
        bundle.update_manifest(out, metrics={"held_out": row, "songs": res["songs"], "keras_float": kf["mean"]})
        print(validate.markdown_table([row]))
    return 0


def cmd_report(args) -> int:
    from converter import bundle, validate

    models, train, val, diff = _prepare(args)
    samples, songs = _samples(models, train, args), _readout_songs(train, args)
    ref = validate.keras_reference(models, val)
    kf = validate.keras_float_metrics(val, ref)
    root = pathlib.Path(args.bundles) if args.bundles else pathlib.Path(tempfile.mkdtemp(prefix="edgedance-report-"))
    rows, details = [], {}
    float_size = None
    variants = [(mode, mode, {}) for mode in cv.QUANTIZE_MODES]
    variants.append(("int8, states not tied", "int8", {"tie_states": False}))  # the tie's effect
    variants.append(("int8, calibrated input", "int8", {"fixed_input": False}))  # the fixed 1/127 input's
    variants.append(("int8, Keras output stage", "int8", {"keep_output_stage": True}))  # the refit's
    variants.append(("int8, Keras read-out weights", "int8", {"refit_readout": False}))  # the read-out refit's
    variants.append(("int8, f*c not carried", "int8", {"carry_products": False}))  # f * c on its min/max grid
    variants.append(("int8, pose output calibrated", "int8", {"pin_pose": False}))  # y on its min/max grid
    variants.append(("int8, cell state not scaled", "int8", {"scale_cell": False}))  # one grid for all units
    for label, mode, kw in variants:
        blob = cv.to_tflite(models, mode, samples if mode in ("int8", "int16x8") else None, readout_songs=songs,
                            **{k: v for k, v in kw.items() if k != "keep_output_stage"})
        if mode == "float":
            float_size = len(blob)
        out = bundle.write_bundle(root / label.replace(", ", "-").replace(" ", "_"), blob, models, mode,
                                  training=_training_summary(args.run, train, val, diff))
        if mode != "float" and not kw.get("keep_output_stage"):
            validate.refit_output_stage(out, models, train, _max_gain(args.run))
        row, res = _validate(models, out, val, ref, kf, label, float_size)
        bundle.update_manifest(out, metrics={"held_out": row, "songs": res["songs"], "keras_float": kf["mean"]})
        rows.append(row)
        details[label] = res
        print(validate.markdown_table([row]).splitlines()[-1], flush=True)
    md = report_markdown(args, models, val, kf, rows, details, diff, len(samples))
    write_section(pathlib.Path(args.md), md)
    print(f"wrote {args.md}; bundles in {root}")
    return 0


def report_markdown(args, models, val, kf, rows, details, diff, n_samples) -> str:
    from converter import validate

    m = models.mcfg
    cmd = "python -m converter report " + " ".join(a for a in sys.argv[2:]) if sys.argv[1:2] == ["report"] else "python -m converter report"
    lines = [
        "## Measured: every variant on the held-out songs",
        "",
        f"Produced by `{cmd}` on {datetime.date.today().isoformat()}: run `{args.run}` "
        f"(kind {m.kind}, {m.layers} x {m.units} encoder, decoder {m.dec_units}, lookback {m.lookback}), "
        f"{len(val)} held-out songs ({sum(d.n_frames for d in val)} frames: {', '.join(d.name for d in val)}), "
        f"{n_samples} calibration samples from the training songs. Step == sequence in float: max abs diff "
        f"{diff:.1e}. Keras float on the same songs: pose MSE {kf['mean']['mse']:.5f}, BAS {kf['mean']['bas']:.4f}. "
        f"Latency: `StreamingModel.step`, LiteRT, 1 thread, {os.cpu_count()} cores shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f} at the end): the p99 column mostly measures that load. "
        "BAS - Keras: the mean of the song-by-song differences ± its standard error; two variants "
        "within about two of these are not told apart by these songs.",
        "",
        validate.markdown_table(rows),
        "",
        "Per song (pose MSE vs ground truth; Keras float first):",
        "",
        "| song | frames | Keras MSE | " + " | ".join(f"{r['variant']} MSE" for r in rows) + " | Keras BAS | "
        + " | ".join(f"{r['variant']} BAS" for r in rows) + " |",
        "|" + " --- |" * (4 + 2 * len(rows)),
    ]
    for i, ks in enumerate(kf["songs"]):
        lines.append(f"| {ks['dance']} | {ks['frames']} | {ks['mse']:.5f} | "
                     + " | ".join(f"{details[r['variant']]['songs'][i]['mse']:.5f}" for r in rows)
                     + f" | {ks['bas']:.4f} | " + " | ".join(f"{details[r['variant']]['songs'][i]['bas']:.4f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- converter report: begin -->", "<!-- converter report: end -->"


def write_section(path: pathlib.Path, md: str) -> None:
    """Replace the text between the report markers of an existing document (the prose around
    it stays), or write a new document."""
    block = f"{BEGIN}\n{md}{END}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) + 1:]
    else:
        text = text + ("\n" if text else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def cmd_diagnose(args) -> int:
    from converter import validate

    models, _, val, _ = _prepare(args)
    x = val[0].features.x[: args.frames]
    errs = validate.local_errors(args.bundle, models, x)
    print(f"{args.bundle} on {len(x)} frames of {val[0].name}: each output's error made inside the graph in one "
          "frame (the float step model fed the same inputs), in steps of its int8 grid (rounding alone: 0.25 mean)")
    print("| output | step | mean | max |\n| --- | --- | --- | --- |")
    for name, e in errs.items():
        unit = f"{e['scale']:.3g}" if e["scale"] else "float (absolute)"
        print(f"| {name} | {unit} | {e['mean']:.2f} | {e['max']:.1f} |")
    return 0


def cmd_test_bundle(args) -> int:
    from converter import bundle

    cv.quiet_tensorflow()
    out = bundle.make_test_bundle(args.out, args.features, seed=args.seed, layers=args.layers, units=args.units,
                                  quantize=args.quantize)
    print(f"wrote {out}")
    return 0


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def _common(p):
    p.add_argument("run", help="trained run folder (model.weights.h5, model_config.json, feature_config.json, "
                               "normalization.json), e.g. runs/<name> or models/default/keras")
    p.add_argument("--data", default=None, help="Music-to-Dance folder (default: the run's data_root, "
                                                "else EDGEDANCE_DATA)")
    p.add_argument("--cache", default=None, help="feature cache folder (default: the run's cache_dir)")
    p.add_argument("--check-frames", type=int, default=0,
                   help="frames of the first held-out song for the step == sequence check (default 0: all)")
    p.add_argument("--samples", type=_positive_int, default=500, help="calibration samples for int8/int16x8 (default 500)")
    p.add_argument("--calib-frames", type=_positive_int, default=600,
                   help="frames per training song the calibration run steps through (default 600)")
    p.add_argument("--readout-frames", type=_positive_int, default=1500,
                   help="frames per training song the int8 pose read-out is refitted on, the int8 graph and "
                        "the float model each running free (default 1500)")



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m converter", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="a trained run -> a model bundle (model.tflite + manifest.json)")
    _common(p)
    p.add_argument("--quantize", choices=cv.QUANTIZE_MODES, default="int8",
                   help="float: float32; dynamic: int8 weights; int8: full integer (default); "
                        "int16x8: int16 activations, int8 weights")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--report", action="store_true",
                   help="validate on the held-out songs and write the figures into the manifest")
    p.add_argument("--keep-output-stage", action="store_true",
                   help="keep the Keras model's output low-pass and gain instead of refitting them to the "
                        "converted model's own output on the training songs (quantized variants)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("report", help="convert every variant, validate each, write the markdown report")
    _common(p)
    p.add_argument("--md", default=str(DEFAULT_MD), help=f"markdown file to write (default {DEFAULT_MD})")
    p.add_argument("--bundles", default=None, help="keep the variants' bundles here (default: a temp folder)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("diagnose", help="where a quantized bundle's error arises: each output's one-frame error "
                                        "against the float step model fed the same inputs")
    _common(p)
    p.add_argument("--bundle", required=True, help="bundle folder converted from RUN")
    p.add_argument("--frames", type=_positive_int, default=1000, help="frames of the first held-out song (default 1000)")
    p.set_defaults(fn=cmd_diagnose)

    p = sub.add_parser("test-bundle", help="a small real bundle with random weights, for tests")
    p.add_argument("out", help="bundle folder to write")
    p.add_argument("--features", type=int, default=48, help="number of features (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--units", type=int, default=16)
    p.add_argument("--quantize", choices=cv.QUANTIZE_MODES, default="int8")
    p.set_defaults(fn=cmd_test_bundle)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (cv.ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
