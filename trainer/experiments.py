"""The paper's studies on the real data, every run with the same CPU budget (one thread):
LSTM layers 1/3/5; units 36/128/256/512; lookback 1/15/30/70; CNN/AM/SA/ours at lookback
10-50. Plus a `levers` suite (what makes ours dance: feedback, losses, noise).
Results go into a markdown report beside the paper's own statements."""
from __future__ import annotations

import json
import logging
import pathlib
import time

import numpy as np

from trainer.config import TrainConfig, build_config

log = logging.getLogger(__name__)

# name -> (study, overrides). Every run: the default config with these fields changed.
PAPER_SUITE: dict[str, tuple[str, dict]] = {}
for n in (1, 3, 5):
    PAPER_SUITE[f"layers{n}"] = ("LSTM layers", {"layers": n})
for u in (36, 128, 256, 512):
    PAPER_SUITE[f"units{u}"] = ("LSTM units", {"units": u})
for lb in (1, 15, 30, 70):
    PAPER_SUITE[f"lookback{lb}"] = ("lookback", {"lookback": lb})
for lb in (10, 30, 50):
    for kind in ("cnn", "am", "sa", "ours"):
        PAPER_SUITE[f"{kind}_lb{lb}"] = ("model vs lookback", {"kind": kind, "lookback": lb})

LEVERS_SUITE: dict[str, tuple[str, dict]] = {
    "paper_literal": ("levers", {"feedback": False, "w_vel": 0.0, "w_acc": 0.0, "w_energy": 0.0}),
    "feedback_only": ("levers", {"w_vel": 0.0, "w_acc": 0.0, "w_energy": 0.0}),
    "feedback_vel": ("levers", {"w_acc": 0.0, "w_energy": 0.0}),
    "feedback_vel_acc": ("levers", {"w_energy": 0.0}),
    "default": ("levers", {}),
    "default_noise8": ("levers", {"noise_dims": 8}),
}

BASELINES_SUITE: dict[str, tuple[str, dict]] = {
    kind: ("baselines at lookback 15", {"kind": kind}) for kind in ("cnn", "am", "sa")}

SUITES = {"paper": PAPER_SUITE, "levers": LEVERS_SUITE, "baselines": BASELINES_SUITE}

# What the paper states (Wang 2023, PLoS ONE 18(5) e0285496). Only its abstract could be read
# here; its Tables 2-3 (loss per configuration) could not be retrieved, so no per-row numbers.
PAPER_NOTE = (
    "Wang (2023) reports only a loss value: its abstract states a lowest loss of 0.00026 and "
    "that the generated video looks best with 3 LSTM layers, 256 units and a lookback of 15. "
    "Its Tables 2-3 (loss per layers/units/lookback and CNN/AM/SA vs its model) could not be "
    "retrieved with the tools available here, so their per-row numbers are not reproduced.")

COLUMNS = [("mse", "MSE"), ("mse_meanpose", "MSE mean pose"), ("energy_ratio", "energy"),
           ("jitter_ratio", "jitter"), ("period_match", "period match"), ("bas", "BAS")]


def _row(name: str, run: pathlib.Path, as_trained: bool = True) -> dict | None:
    f = run / "metrics.json"
    if not f.exists():
        return None
    m = json.loads(f.read_text())
    vm = dict(m["val_mean"])
    if as_trained and m.get("calibration"):  # compare models as trained: before the output gain/smoothing fitted after training
        vm.update({k: v for k, v in m["calibration"]["val_uncalibrated"].items()
                   if k in ("mse", "energy_ratio", "jitter_ratio")})
    ev = m.get("evaluate_mean", {})
    for k in ("period_match", "period_match_gt", "bas", "bas_gt", "diversity", "diversity_gt"):
        if k in ev:
            vm[k] = ev[k]
    tr = m["training"]
    vm.update(params=tr["params"], epochs=tr["epochs"], s_per_epoch=tr["seconds_per_epoch"],
              minutes=tr["train_seconds"] / 60)
    vm["name"] = name
    return vm


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_report(suite: str, rows: dict[str, dict], studies: dict[str, list[str]], doc: pathlib.Path,
                 minutes_per_run: float, command: str, out_root: pathlib.Path, notes: str = "",
                 budget_clock: str = "cpu") -> None:
    budget = (f"{minutes_per_run:g} min of CPU time on one thread (the process's CPU clock, so runs get the "
              f"same work however busy the shared 2-core machine is; s/epoch below is wall time and varies "
              f"with the load)" if budget_clock == "cpu" else
              f"{minutes_per_run:g} min of wall-clock training time on this shared 2-core machine")
    lines = [f"# Experiments: suite `{suite}`", "",
             f"Produced by `{command}` ({time.strftime('%Y-%m-%d %H:%M')}). Every run trains the default "
             f"configuration (trainer/config.py) with one field changed, on the same split (by dance, "
             f"stratified by style), for the same training budget of {budget}, and is judged "
             f"free-running on the held-out dances. Runs are in "
             f"`{out_root}/`.", "",
             "Columns: MSE on the normalized keypoints (the paper's metric) and the frozen mean pose's MSE on "
             "the same dances; energy = joint-speed std ratio vs ground truth (target 0.8-1.25); jitter = "
             "mean-absolute-jerk ratio (target <= 1.5); period match = share of 9 s windows whose dominant "
             "motion period matches the song's beat/bar period (ground truth in the last row of each table); "
             "BAS = beat alignment score. For ours, MSE, energy and jitter are the model as trained (before the "
             "output low-pass and gain fitted after training; the baselines have none), period match and BAS are "
             "after it. Each run keeps its best epoch by the selection rule of its config (`selection`, see the "
             "command; trainer/train.py validate).",
             "", PAPER_NOTE, ""]
    for study, names in studies.items():
        lines += [f"## {study}", "",
                  "| run | " + " | ".join(c[1] for c in COLUMNS) + " | params | epochs | s/epoch |",
                  "|---" * (len(COLUMNS) + 4) + "|"]
        gt_pm = []
        for n in names:
            r = rows.get(n)
            if r is None:
                lines.append(f"| {n} | " + " | ".join("not run" for _ in COLUMNS) + " | | | |")
                continue
            if "period_match_gt" in r:
                gt_pm.append(r["period_match_gt"])
            label = f"{n} (= {r['same_as']})" if r.get("same_as") else n
            lines.append(f"| {label} | " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS)
                         + f" | {r['params']} | {r['epochs']} | {_fmt(r['s_per_epoch'])} |")
        if gt_pm:
            lines.append(f"| ground truth | - | - | 1 | 1 | {_fmt(sum(gt_pm) / len(gt_pm))} | - | | | |")
        lines.append("")
    if (doc.parent / f"experiments_{suite}.png").exists():
        lines += [f"![{suite}](experiments_{suite}.png)", ""]
    if notes:
        lines += [notes, ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")


def plot_suite(suite: str, rows: dict[str, dict], studies: dict[str, list[str]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = {s: [n for n in ns if n in rows] for s, ns in studies.items()}
    studies = {s: ns for s, ns in studies.items() if ns}
    if not studies:
        return
    fig, axes = plt.subplots(1, len(studies), figsize=(4.2 * len(studies), 3.4), squeeze=False)
    for ax, (study, names) in zip(axes[0], studies.items()):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [rows[n]["mse"] / rows[n]["mse_meanpose"] for n in names], 0.4,
               label="MSE / mean-pose MSE")
        ax.bar([i + 0.2 for i in x], [rows[n]["energy_ratio"] for n in names], 0.4, label="energy ratio")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(study, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_suite(suite: str, minutes_per_run: float = 4.0, out_root="runs/experiments",
              doc="docs/results/experiments.md", only=None, report_only: bool = False,
              base: TrainConfig | None = None, config_files=(), sets=(), notes: str = "") -> dict[str, dict]:
    from trainer.train import load_data, train

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    exps = SUITES[suite]
    if only:
        unknown = sorted(set(only) - set(exps))
        if unknown:
            raise ValueError(f"suite {suite!r} has no experiment(s) {unknown}; it has {sorted(exps)}")
        exps = {k: v for k, v in exps.items() if k in only}
    out_root = pathlib.Path(out_root) / suite
    base = build_config(config_files, ["threads=1", "budget_clock=cpu"] + list(sets)
                        + [f"minutes={minutes_per_run}", "epochs=1000"],
                        base=base or TrainConfig())
    data = None
    rows = {}
    done: dict[str, pathlib.Path] = {}  # effective config -> run folder (layers3 = units128 = ... share one)
    for name, (study, overrides) in exps.items():
        cfg = build_config([], [f"{k}={v}" for k, v in overrides.items()], base=base)
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key in done:
            r = _row(name, done[key])
            if r is not None:
                r["same_as"] = done[key].name
                rows[name] = r
            continue
        run = out_root / name
        done[key] = run
        if not report_only and not (run / "metrics.json").exists():
            if data is None:
                from device.contract import DEFAULT_FEATURES

                data = load_data(base, DEFAULT_FEATURES)
            if (run / "ckpt" / "state.json").exists():
                import shutil

                shutil.rmtree(run)  # an interrupted run: start it again with the same budget
            log.info("experiment %s: %s", name, overrides)
            train(cfg, run, train_dances=data[0], val_dances=data[1], progress=False)
        r = _row(name, run)
        if r is not None:
            rows[name] = r
    studies: dict[str, list[str]] = {}
    for name, (study, _) in SUITES[suite].items():
        studies.setdefault(study, []).append(name)
    doc = pathlib.Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    plot_suite(suite, rows, studies, doc.parent / f"experiments_{suite}.png")
    cmd = " ".join(["python -m trainer experiments", f"--suite {suite}", f"--minutes-per-run {minutes_per_run:g}"]
                   + ([f"--out {out_root.parent}"] if str(out_root.parent) != "runs/experiments" else [])
                   + [f"--config {c}" for c in config_files] + [f"--set {x}" for x in sets])
    write_report(suite, rows, studies, doc, minutes_per_run, cmd, out_root, notes, base.budget_clock)
    return rows


# --- the default model's report (docs/results/training.md) -------------------------------

TARGETS = {"energy_ratio": "0.8-1.25", "jitter_ratio": "<= 1.5", "diversity_ratio": ">= 0.8",
           "period_match": "~ ground truth, >> other song", "tempo_response": "pass (within 10%)"}


def tempo_responses(run_dir, val_dances, n: int = 3) -> list[dict]:
    """trainer.evaluate.tempo_response of a run's model on the first n held-out dances."""
    from trainer import evaluate
    from trainer.generate import Generator

    gen = Generator(run_dir)
    out = []
    for d in val_dances[:n]:
        r = evaluate.tempo_response(lambda pcm: gen.poses_for_pcm(pcm)[0], d)
        r["dance"] = d.name
        out.append(r)
    return out


def write_training_report(default_run, baseline_runs: dict, doc, command: str, tempo: list | None = None,
                          notes: str = "", matched: dict | None = None) -> None:
    """Held-out numbers of the shipped model vs mean pose, other song and the CNN/AM/SA baselines."""
    default_run = pathlib.Path(default_run)
    m = json.loads((default_run / "metrics.json").read_text())
    tr = m["training"]
    rows = {"ours (shipped: fitted low-pass, posture, gain)": _row("ours", default_run, as_trained=False)}
    if m.get("calibration"):  # only MSE, energy, jitter were measured before the fitted output stage
        un = m["calibration"]["val_uncalibrated"]
        rows["ours as trained (no low-pass, gain 1)"] = {k: un[k] for k in ("mse", "energy_ratio", "jitter_ratio")}
    for name, run in baseline_runs.items():
        r = _row(name, pathlib.Path(run))
        if r is not None:
            rows[name] = r
    b = m.get("baselines", {})
    ev = m.get("evaluate_mean", {})
    cols = [("mse", "MSE"), ("energy_ratio", "energy"), ("jitter_ratio", "jitter"), ("diversity_ratio", "diversity"),
            ("period_match", "period match"), ("bas", "BAS")]

    def with_ratio(r):
        r = dict(r)
        if "diversity" in r and ev.get("diversity_gt"):
            r["diversity_ratio"] = r["diversity"] / ev["diversity_gt"]
        return r

    lines = ["# Training: the shipped default model", "",
             f"Produced by `{command}`. Run folder: `{default_run}` (config, split, normalization, history, "
             "metrics and plots); the shipped copy is `models/default/keras/`.", "",
             f"- model: {json.loads((default_run / 'model_config.json').read_text())}",
             f"- {tr['train_dances']} training / {tr['val_dances']} held-out dances (split by dance, stratified by "
             f"style; `split.json`), {tr['frames_per_epoch']} training frames per epoch",
             f"- {tr['epochs']} epochs in {tr['train_seconds'] / 60:.1f} min of training "
             f"(median {tr['seconds_per_epoch']:.1f} s per epoch on this shared 2-core machine), stopped by "
             f"{tr['stop_reason']}; best held-out epoch {tr['best_epoch']}; {tr['params']} parameters", "",
             "## Held-out numbers against the targets", "",
             "All free-running on whole held-out dances (the model feeds back its own poses). "
             "energy = joint-speed std ratio vs ground truth; jitter = mean-absolute-jerk ratio; diversity = "
             "between-song diversity / ground truth's; period match = share of 9 s windows whose dominant motion "
             "period matches the song's beat or bar period.", "",
             "| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| target | - | 0.8-1.25 | <= 1.5 | >= 0.8 | ~ ground truth | (weak) |"]
    for name, r in rows.items():
        r = with_ratio(r)
        lines.append(f"| {name} | " + " | ".join(_fmt(r[k]) if k in r else "-" for k, _ in cols) + " |")
    if b:
        mp, os_ = b.get("mean_pose", {}), with_ratio(b.get("other_song", {}))
        lines.append(f"| mean pose | " + " | ".join(_fmt(mp.get(k)) for k, _ in cols[:3]) + " | 0 | "
                     + " | ".join(_fmt(mp.get(k)) for k, _ in cols[4:]) + " |")
        lines.append(f"| other song (real dance, wrong music) | " + " | ".join(_fmt(os_.get(k)) for k, _ in cols) + " |")
    if ev:
        lines.append(f"| ground truth | 0 | 1 | 1 | 1 | {_fmt(ev.get('period_match_gt'))} | {_fmt(ev.get('bas_gt'))} |")
    lines.append("")
    if tempo:
        lines += ["## Tempo response", "",
                  "The song time-stretched to 0.85x and 1.18x tempo; response = observed period ratio / expected "
                  "(1.0 = the motion follows the tempo exactly; pass within 10%).", "",
                  "| dance | period (s) | 0.85x response | 1.18x response | pass |", "|---|---|---|---|---|"]
        for t in tempo:
            rr = t["rates"]
            lines.append(f"| {t['dance']} | {_fmt(t['period_s'])} | {_fmt(rr['0.85']['response'])} | "
                         f"{_fmt(rr['1.18']['response'])} | {t['pass']} |")
        lines.append("")
    if matched:
        from trainer.train import JITTER_CAP
        lines += ["## MSE at equal motion energy", "",
                  "MSE rewards moving little: the frozen mean pose beats a real dance from another song. Here every "
                  "model, ours included, gets the same output stage fitted on the training dances (a causal "
                  "low-pass, a running posture, and a gain on the motion about it that brings the joint-speed std "
                  f"towards ground truth's, jitter capped at {JITTER_CAP:g}x, gain at most {MATCHED_MAX_GAIN:g}); then "
                  "every model that reaches at least "
                  f"{MATCHED_MIN_ENERGY:g} of a dancer's energy has its gain set to the lowest energy any of them "
                  "reached on the training dances, and all are measured on the whole held-out dances: the MSE of "
                  "models that move equally, about as much as a dancer.", "",
                  matched_energy_table(matched), ""]
    if notes:
        lines += [notes, ""]
    lines += ["## Plots", "", "![loss](training_loss.png)", "", "![strip](training_strip.png)", "",
              "![gif](training_val.gif)", ""]
    doc = pathlib.Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    import shutil

    for src, dst in (("loss.png", "training_loss.png"), ("strip.png", "training_strip.png"),
                     ("val.gif", "training_val.gif")):
        if (default_run / "plots" / src).exists():
            shutil.copy(default_run / "plots" / src, doc.parent / dst)
    doc.write_text("\n".join(lines) + "\n")


MATCHED_MAX_GAIN = 10.0  # lets even the stillest baseline (SA, energy ~0.1) reach ground truth's energy
MATCHED_MIN_ENERGY = 0.6  # a model its fitted stage cannot bring this close to a dancer's energy stays out of the common level


def gain_at_level(energy_of, gain: float, level: float, iters: int = 4) -> tuple[float, float]:
    """The gain whose output has motion energy `level`, from a first guess: energy is nearly
    proportional to the gain, so scale by level / energy a few times. (gain, energy reached)."""
    e = energy_of(gain)
    for _ in range(iters):
        gain *= level / max(e, 1e-6)
        e = energy_of(gain)
    return gain, e


def matched_energy(runs: dict[str, pathlib.Path], train_dances, val_dances, max_dances: int = 10,
                   max_frames: int = 1500) -> dict[str, dict]:
    """MSE at equal motion energy. MSE favours a model that moves little (the frozen mean pose
    beats a real dance from another song), so compare every model after the same output stage
    ours ships with: a causal low-pass, a running posture and a gain on the motion about it,
    fitted on TRAINING dances (trainer.train.fit_output_stage: energy towards ground truth's,
    jitter capped at trainer.train.JITTER_CAP, gain <= MATCHED_MAX_GAIN). The jitter cap stops some models short of
    a dancer's energy, and MSE grows with energy, so every model that reaches MATCHED_MIN_ENERGY
    then has its gain set to the lowest energy any of them reached (on the training dances):
    all are measured at one energy level, free-running on the whole held-out dances."""
    from trainer.model import N_POSE, load_run, reset_output_stage, run_free
    from trainer.train import apply_fit, dance_to_seq, fit_output_stage, quick_metrics

    tr = [dance_to_seq(d) for d in train_dances]
    tr = tr[:: max(1, len(tr) // max_dances)][:max_dances]
    va = [dance_to_seq(d) for d in val_dances]

    def train_energy(fit, mean, st, gain):
        return float(np.median([quick_metrics(apply_fit(r, mean, st, gain), gt, mean)["energy_ratio"] for r, gt in fit]))

    fitted = {}
    for name, run in runs.items():
        if not (pathlib.Path(run) / "model.weights.h5").exists():
            continue
        model, mcfg, _, norm = load_run(run)
        reset_output_stage(model, mcfg)
        mean = np.asarray(norm["pose_mean"], np.float32)
        fit = [(run_free(model, mcfg, s.x[:max_frames])[:, :N_POSE], s.pose[:max_frames]) for s in tr]
        st = fit_output_stage(fit, mean, MATCHED_MAX_GAIN, posture=True, smooth2=True)
        fitted[name] = (model, mcfg, mean, fit, st, train_energy(fit, mean, st, st["gain"]))
    reached = [f[5] for f in fitted.values() if f[5] >= MATCHED_MIN_ENERGY]
    level = min(reached) if reached else None
    out = {}
    for name, (model, mcfg, mean, fit, st, e) in fitted.items():
        gain = st["gain"]
        if level is not None and e >= MATCHED_MIN_ENERGY:
            gain, e = gain_at_level(lambda g: train_energy(fit, mean, st, g), gain, level)
        per = [quick_metrics(apply_fit(run_free(model, mcfg, s.x)[:, :N_POSE], mean, st, gain), s.pose, mean) for s in va]
        out[name] = {**{k: float(np.mean([p[k] for p in per])) for k in per[0]}, "gain": gain,
                     "alpha": st["alpha"], "alpha2": st["alpha2"], "beta": st["beta"], "posture_gain": st["posture_gain"],
                     "train_energy": e, "at_level": bool(level is not None and abs(e - level) < 0.02)}
        log.info("matched energy %s: %s", name, out[name])
    return out


def matched_energy_table(rows: dict[str, dict]) -> str:
    lines = ["| model | MSE | MSE mean pose | energy | jitter | energy on training dances | gain | low-pass alpha (poles) | "
             "posture time constant | posture gain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        beta = r.get("beta", 0.0)
        tau = f"{1.0 / (beta * 25.0):.0f} s" if beta > 0 else "off"
        level = "" if r.get("at_level", True) else " (cannot reach the level)"
        lines.append(f"| {name} | {r['mse']:.4f} | {r['mse_meanpose']:.4f} | {r['energy_ratio']:.2f} | "
                     f"{r['jitter_ratio']:.2f} | {r.get('train_energy', float('nan')):.2f}{level} | {r['gain']:.2f} | "
                     f"{r['alpha']:.2f} ({1 + (r.get('alpha2', 1.0) < 1.0)}) | {tau} | {r.get('posture_gain', 1.0):.2f} |")
    return "\n".join(lines)


def levers_table(runs: dict[str, tuple[str, str]]) -> str:
    """Markdown table of lever probes: label -> (run folder, what changed). Shows the held-out
    numbers before the output gain (the lever itself) and, where fitted, after it."""
    lines = ["| probe | what changed | MSE (mean pose) | energy | jitter | diversity / GT | period match (GT) | gain -> energy, jitter |",
             "|---|---|---|---|---|---|---|---|"]
    for label, (run, what) in runs.items():
        run = pathlib.Path(run)
        if not (run / "metrics.json").exists():
            lines.append(f"| {label} | {what} | not finished | | | | | |")
            continue
        m = json.loads((run / "metrics.json").read_text())
        ev, vm = m.get("evaluate_mean", {}), m["val_mean"]
        cal = m.get("calibration")
        if cal:  # metrics are after the gain; the lever's own numbers are the uncalibrated ones
            un = cal["val_uncalibrated"]
            mse, e, j = un["mse"], un["energy_ratio"], un["jitter_ratio"]
            after = f"{cal['gain']:.2f} -> {vm['energy_ratio']:.2f}, {vm['jitter_ratio']:.2f}"
        else:
            mse, e, j = vm["mse"], vm["energy_ratio"], vm["jitter_ratio"]
            after = "-"
        div = ev.get("diversity", float("nan")) / ev.get("diversity_gt", float("nan")) if ev else float("nan")
        lines.append(f"| {label} | {what} | {mse:.4f} ({vm['mse_meanpose']:.4f}) | {e:.2f} | {j:.2f} | {div:.2f} | "
                     f"{ev.get('period_match', float('nan')):.2f} ({ev.get('period_match_gt', float('nan')):.2f}) | {after} |")
    return "\n".join(lines)
