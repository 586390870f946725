"""Honest evaluation of generated dance: the paper's MSE, and what shows real dancing.

All measures take poses (T, 14, 2) in the contract's normalized body frame at `fps`.

- mse: mean squared error on the normalized keypoints (the paper's metric; a frozen mean pose does well).
- bas: Beat Alignment Score as FACT/Bailando: kinematic beats = local minima of the mean joint
  speed after Gaussian smoothing; for each music beat exp(-d^2 / (2 sigma^2)) with d the distance to
  the nearest kinematic beat, averaged. Bailando's constants are in frames at 60 fps (smoothing sigma
  5 frames, BAS sigma 3 frames); we keep them in seconds: 0.083 s and 0.05 s.
- energy_ratio: std of joint speed, generated / ground truth (1 = neither freezes nor flails).
- jitter_ratio: mean absolute jerk (third difference), generated / ground truth.
- period_match_clip: whether the whole clip's dominant motion period matches the song's beat/bar.
- period_match: over 9 s windows (hop 3 s), the dominant period of two motion signals (hip height
  above the ankles; summed joint speed), found by autocorrelation between 0.2 s and 3.2 s, is
  compared with the song's beat and bar period and their doubles and halves; a window matches
  when one is within PERIOD_TOL (relative). Fraction of matching windows, averaged over both signals.
- tempo_response: time-stretch the song to 0.85x and 1.18x tempo, generate, and compare the change
  of the motion's periods (the scale that best maps the motion's autocorrelation at 1.0x onto the
  stretched one) with the expected 1 / rate (pass within 10%).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import argrelextrema

from device.contract import KP

log = logging.getLogger(__name__)

FPS = 25
BAS_SIGMA_S = 3 / 60  # Bailando: 3 frames at 60 fps
SPEED_SMOOTH_S = 5 / 60  # Bailando: gaussian_filter(sigma=5) at 60 fps
WINDOW_S = 9.0
WINDOW_HOP_S = 3.0
MIN_PERIOD_S = 0.2
MAX_PERIOD_S = 3.2
PERIOD_TOL = 0.06
"""Relative tolerance of a period match: 6% is 1.5 frames at a 1 s period (25 fps); the
candidates (beat, bar, x2, x0.5) then cover about a third of the searched log-period range,
which is the chance level the other-song baseline measures."""
TEMPO_RATES = (0.85, 1.18)
TEMPO_TOL = 0.10


def _check(p, name="poses") -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != (14, 2):
        raise ValueError(f"{name}: expected shape (T, 14, 2), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name}: holds NaN or infinite values")
    return p


def joint_speed(poses: np.ndarray, fps: float = FPS) -> np.ndarray:
    """(T-1, 14) speed of each keypoint, normalized units per second."""
    return np.linalg.norm(np.diff(poses, axis=0), axis=-1) * fps


def mse(pred, gt) -> float:
    n = min(len(pred), len(gt))
    return float(np.mean((np.asarray(pred[:n], np.float64) - np.asarray(gt[:n], np.float64)) ** 2))


def energy(poses, fps: float = FPS) -> float:
    """std of joint speed over time and keypoints."""
    p = _check(poses)
    return float(np.std(joint_speed(p, fps))) if len(p) > 1 else 0.0


def jitter(poses, fps: float = FPS) -> float:
    """Mean absolute jerk: |third difference| per keypoint, normalized units per s^3."""
    p = _check(poses)
    if len(p) < 4:
        return 0.0
    return float(np.mean(np.linalg.norm(np.diff(p, n=3, axis=0), axis=-1)) * fps ** 3)


def kinematic_beats(poses, fps: float = FPS) -> np.ndarray:
    """Frame indices of local minima of the smoothed mean joint speed."""
    s = joint_speed(_check(poses), fps).mean(axis=1)
    s = gaussian_filter1d(s, SPEED_SMOOTH_S * fps)
    return argrelextrema(s, np.less)[0] + 1  # speed t is between frames t and t+1


def bas(poses, beat_times, fps: float = FPS) -> float:
    """Beat Alignment Score (FACT/Bailando), music beats in seconds."""
    kb = kinematic_beats(poses, fps) / fps
    bt = np.asarray(beat_times, np.float64)
    bt = bt[(bt >= 0) & (bt < len(poses) / fps)]
    if len(bt) == 0 or len(kb) == 0:
        return 0.0
    d = np.min(np.abs(bt[:, None] - kb[None, :]), axis=1)
    return float(np.mean(np.exp(-d ** 2 / (2 * BAS_SIGMA_S ** 2))))


# --- periods ------------------------------------------------------------------------------

def motion_signals(poses, fps: float = FPS) -> dict:
    """Two 1-D motion signals of length T-1: hip height above the ankles (rise and fall), summed joint speed."""
    p = _check(poses)
    hip_h = -(p[:, KP["l_ankle"], 1] + p[:, KP["r_ankle"], 1]) / 2  # hips are the origin
    return {"hip_height": hip_h[1:], "speed": joint_speed(p, fps).sum(axis=1)}


def autocorr(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64) - np.mean(x)
    n = len(x)
    f = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(f * np.conj(f))[:n]
    return ac / ac[0] if ac[0] > 1e-12 else np.zeros(n)


def _peak_lag(ac: np.ndarray, fps: float) -> float:
    """Lag (s) of the highest local maximum of an autocorrelation in [MIN_PERIOD_S, MAX_PERIOD_S],
    refined by parabolic interpolation; nan when there is none."""
    lo, hi = int(math.floor(MIN_PERIOD_S * fps)), min(len(ac) - 2, int(math.ceil(MAX_PERIOD_S * fps)))
    if hi <= lo + 1 or not np.any(ac):
        return float("nan")
    k = np.arange(max(lo, 1), hi + 1)
    peaks = k[(ac[k] > ac[k - 1]) & (ac[k] >= ac[k + 1])]
    if len(peaks) == 0:
        return float("nan")
    i = int(peaks[np.argmax(ac[peaks])])
    a, b, c = ac[i - 1], ac[i], ac[i + 1]
    den = a - 2 * b + c
    off = 0.5 * (a - c) / den if abs(den) > 1e-12 else 0.0
    return (i + float(np.clip(off, -0.5, 0.5))) / fps


def dominant_period(x: np.ndarray, fps: float = FPS) -> float:
    """Dominant period (s) of a signal by autocorrelation; nan when flat or aperiodic."""
    return _peak_lag(autocorr(x), fps)


def windows(n: int, fps: float = FPS):
    w, h = int(WINDOW_S * fps), int(WINDOW_HOP_S * fps)
    if n < w:
        return [(0, n)] if n >= int(2 * MAX_PERIOD_S * fps) else []
    return [(s, s + w) for s in range(0, n - w + 1, h)]


def music_periods(features, start: int, stop: int) -> tuple[float, float]:
    """(beat period s, bar period s) of the song in frames [start, stop) from the tracker's
    features: the median known bpm of the window and the last known meter (the causal tracker
    is best informed at the end; the song's last known meter if none in the window); nan when the tracker has no tempo there."""
    bpm = np.asarray(features.bpm, np.float64)[start:stop]
    bpm = bpm[np.isfinite(bpm) & (bpm > 0)]
    if len(bpm) == 0:
        return float("nan"), float("nan")
    meter_all = np.asarray(features.meter, np.float64)
    meter = meter_all[start:stop]
    meter = meter[np.isfinite(meter) & (meter > 0)]
    if len(meter) == 0:  # not known yet in this window: the song's last known meter (offline), else 4
        meter = meter_all[np.isfinite(meter_all) & (meter_all > 0)]
    beats_per_bar = float(meter[-1]) if len(meter) else 4.0
    beat = 60.0 / float(np.median(bpm))
    return beat, beat * round(beats_per_bar)


def period_matches(period: float, beat: float, bar: float, tol: float | None = None) -> bool:
    tol = PERIOD_TOL if tol is None else tol
    if not (np.isfinite(period) and np.isfinite(beat)):
        return False
    cands = [beat * m for m in (0.5, 1.0, 2.0)] + ([bar * m for m in (0.5, 1.0, 2.0)] if np.isfinite(bar) else [])
    return any(abs(period / c - 1.0) <= tol for c in cands)


def period_match(poses, features, fps: float = FPS, tol: float | None = None) -> dict:
    """Fraction of windows whose dominant motion period matches the song's beat or bar period."""
    sig = motion_signals(poses, fps)
    n = len(next(iter(sig.values())))
    out = {}
    for name, x in sig.items():
        hits, total = 0, 0
        for s, e in windows(n, fps):
            beat, bar = music_periods(features, s, e)
            if not np.isfinite(beat):
                continue
            total += 1
            hits += period_matches(dominant_period(x[s:e], fps), beat, bar, tol)
        out[name] = hits / total if total else float("nan")
    vals = [v for v in out.values() if np.isfinite(v)]
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


def clip_period_match(poses, features, fps: float = FPS, tol: float | None = None) -> float:
    """1.0 when the whole clip's dominant motion period (clip_period) matches the song's beat or
    bar period (median tracker bpm, last known meter; x2, x0.5) within tol, else 0.0. Averaged
    over dances it is the fraction of dances that move at the song's tempo; on the real data it
    separates ground truth from other songs' dances better than the per-window measure."""
    beat, bar = music_periods(features, 0, len(poses))
    return float(period_matches(clip_period(poses, fps), beat, bar, tol))


def clip_period(poses, fps: float = FPS) -> float:
    """One dominant motion period (s) for a whole clip: the peak of the autocorrelation of the
    summed joint speed and the hip height, averaged over windows and both signals."""
    sig = motion_signals(poses, fps)
    n = len(sig["speed"])
    ws = windows(n, fps) or [(0, n)]
    acs = [autocorr(x[s:e])[:int(MAX_PERIOD_S * fps) + 2] for x in sig.values() for s, e in ws]
    m = min(len(a) for a in acs)
    return _peak_lag(np.mean([a[:m] for a in acs], axis=0), fps)


def beat_phase_locking(poses, features, fps: float = FPS) -> float:
    """|mean of exp(2 pi i * beat phase)| at the kinematic beats (after the tracker has a tempo):
    1 = the motion stops at the same point of every beat, ~1/sqrt(n) = unrelated. On the
    Music-to-Dance data the ground truth barely locks (see docs/results/metrics_validation.md)."""
    kb = kinematic_beats(poses, fps)
    ph, bpm = np.asarray(features.phase, np.float64), np.asarray(features.bpm)
    kb = kb[kb < len(ph)]
    kb = kb[bpm[kb] > 0]
    if len(kb) < 4:
        return float("nan")
    return float(abs(np.mean(np.exp(2j * np.pi * ph[kb]))))


# --- the report -----------------------------------------------------------------------------

def evaluate(pred_poses, dance, fps: float = FPS) -> dict:
    """All per-dance metrics of a prediction against a `trainer.dataset.Dance`."""
    pred = _check(pred_poses, "pred_poses")
    gt = _check(dance.poses, f"{dance.name} poses")
    n = min(len(pred), len(gt))
    pred, gt = pred[:n], gt[:n]
    feats = dance.features
    e_gt, j_gt = energy(gt, fps), jitter(gt, fps)
    pm, pm_gt = period_match(pred, feats, fps), period_match(gt, feats, fps)
    return {
        "dance": dance.name,
        "frames": n,
        "mse": mse(pred, gt),
        "bas": bas(pred, feats.beat_times, fps),
        "bas_gt": bas(gt, feats.beat_times, fps),
        "energy": energy(pred, fps),
        "energy_ratio": energy(pred, fps) / e_gt if e_gt > 0 else float("nan"),
        "jitter_ratio": jitter(pred, fps) / j_gt if j_gt > 0 else float("nan"),
        "period_match": pm["mean"],
        "period_match_hip": pm["hip_height"],
        "period_match_speed": pm["speed"],
        "period_match_gt": pm_gt["mean"],
        "period_match_clip": clip_period_match(pred, feats, fps),
        "period_match_clip_gt": clip_period_match(gt, feats, fps),
        "phase_lock": beat_phase_locking(pred, feats, fps),
        "phase_lock_gt": beat_phase_locking(gt, feats, fps),
    }


def clip_features(poses, fps: float = FPS) -> np.ndarray:
    """A clip's pose feature vector: mean and std of each coordinate, mean speed of each keypoint (70,)."""
    p = _check(poses)
    return np.concatenate([p.mean(0).ravel(), p.std(0).ravel(), joint_speed(p, fps).mean(0) / fps])


def diversity(list_of_pose_arrays, fps: float = FPS) -> float:
    """Mean pairwise Euclidean distance between the clips' pose feature vectors (clips of
    different songs). Compare generated with ground truth of the same songs: a ratio near 1 means
    the model varies between songs as much as the dancer does."""
    feats = [clip_features(p, fps) for p in list_of_pose_arrays]
    if len(feats) < 2:
        raise ValueError("diversity needs at least two clips")
    f = np.stack(feats)
    d = np.linalg.norm(f[:, None] - f[None, :], axis=-1)
    iu = np.triu_indices(len(f), 1)
    return float(d[iu].mean())


def time_stretch_pcm(pcm: np.ndarray, rate: float) -> np.ndarray:
    """int16 PCM played `rate` times faster (tempo x rate), pitch kept (librosa phase vocoder)."""
    import librosa

    from device.audio import to_pcm16

    y = np.asarray(pcm, np.float32) / 32767.0
    return to_pcm16(librosa.effects.time_stretch(y, rate=rate))


def mean_autocorr(poses, fps: float = FPS, max_lag_s: float = 4.0) -> np.ndarray:
    """Autocorrelation of the motion signals (hip height, summed joint speed), averaged over 9 s
    windows and both signals, lags 0 .. max_lag_s."""
    sig = motion_signals(poses, fps)
    n = len(sig["speed"])
    ws = windows(n, fps) or [(0, n)]
    m = int(max_lag_s * fps) + 1
    acs = [autocorr(x[s:e])[:m] for x in sig.values() for s, e in ws]
    m = min(len(a) for a in acs)
    return np.mean([a[:m] for a in acs], axis=0)


def period_scale(poses_ref, poses, fps: float = FPS, lo: float = 0.6, hi: float = 1.6) -> float:
    """How much longer the motion periods of `poses` are than those of `poses_ref`: the factor s
    for which the autocorrelation of `poses` at lag l best matches that of `poses_ref` at l / s
    (correlation over lags MIN_PERIOD_S .. MAX_PERIOD_S). Uses the whole periodic structure, so it
    does not jump between the beat and its harmonics the way a single peak can."""
    a_ref, a = mean_autocorr(poses_ref, fps), mean_autocorr(poses, fps)
    lag_ref = np.arange(len(a_ref)) / fps
    lags = np.arange(int(MIN_PERIOD_S * fps), int(MAX_PERIOD_S * fps) + 1) / fps
    lags = lags[lags * fps < len(a)]
    y = a[(lags * fps).astype(int)]
    best, best_s = -np.inf, float("nan")
    for sc in np.exp(np.linspace(np.log(lo), np.log(hi), 241)):
        keep = lags / sc <= lag_ref[-1]
        if keep.sum() < 10:
            continue
        x = np.interp(lags[keep] / sc, lag_ref, a_ref)
        yy = y[keep]
        if np.std(x) < 1e-9 or np.std(yy) < 1e-9:
            continue
        c = float(np.corrcoef(x, yy)[0, 1])
        if c > best:
            best, best_s = c, float(sc)
    return best_s


def tempo_response(generate_fn, dance, rates=TEMPO_RATES, fps: float = FPS) -> dict:
    """generate_fn(pcm int16) -> poses (T, 14, 2). The song is time-stretched to each tempo rate;
    the motion's periods should scale by 1 / rate. response = rate * (observed period scale);
    1.0 = follows the tempo, = rate when deaf to it; pass when within TEMPO_TOL at every rate."""
    p0 = generate_fn(dance.pcm)
    out = {"period_s": clip_period(p0, fps), "rates": {}}
    ok = True
    for r in rates:
        pr = generate_fn(time_stretch_pcm(dance.pcm, r))
        scale = period_scale(p0, pr, fps)
        resp = r * scale if np.isfinite(scale) else float("nan")
        passed = bool(np.isfinite(resp) and abs(resp - 1.0) <= TEMPO_TOL)
        out["rates"][str(r)] = {"period_s": clip_period(pr, fps), "period_scale": scale, "response": resp,
                                "pass": passed}
        ok = ok and passed
    out["pass"] = bool(ok)
    return out


# --- validation of the period measures on real data -------------------------------------------

def validate(dances) -> dict:
    """Period match and BAS of each dance's ground truth vs the real motion of every other dance
    (looped/trimmed to length) against *this* song's beats: the other-song baseline, averaged over
    all same-style and all other-style sources; dances sharing captured motion are excluded.
    Returns {dance name: row}."""
    from trainer import baselines
    from trainer.dataset import shared_motion_groups

    groups = shared_motion_groups(dances)
    group_of = {n: set(g) for g in groups for n in g}
    rows = {}
    for d in dances:
        gt = period_match(d.poses, d.features)
        res = {"same": [], "cross": []}
        for o in dances:
            if o.name in group_of[d.name]:
                continue
            p = baselines.loop_to_length(o.poses, d.n_frames)
            res["same" if o.style == d.style else "cross"].append(
                (period_match(p, d.features), bas(p, d.features.beat_times), beat_phase_locking(p, d.features),
                 clip_period_match(p, d.features)))
        known = d.features.bpm > 0
        row = {"style": d.style, "frames": d.n_frames,
               "bpm": float(np.median(d.features.bpm[known])) if np.any(known) else float("nan"),
               "meter": int(d.features.meter[d.features.meter > 0][-1]) if np.any(d.features.meter > 0) else 0,
               "gt_hip": gt["hip_height"], "gt_speed": gt["speed"], "gt": gt["mean"],
               "bas_gt": bas(d.poses, d.features.beat_times), "lock_gt": beat_phase_locking(d.poses, d.features),
               "clip_gt": clip_period_match(d.poses, d.features)}
        for k, rs in res.items():
            row[f"n_{k}"] = len(rs)
            for sig in ("hip_height", "speed", "mean"):
                row[f"{k}_{sig}"] = float(np.nanmean([r[0][sig] for r in rs])) if rs else float("nan")
            row[f"bas_{k}"] = float(np.mean([r[1] for r in rs])) if rs else float("nan")
            row[f"lock_{k}"] = float(np.nanmean([r[2] for r in rs])) if rs else float("nan")
            row[f"clip_{k}"] = float(np.mean([r[3] for r in rs])) if rs else float("nan")
        rows[d.name] = row
    return rows


def validation_markdown(rows: dict, command: str) -> str:
    from trainer.dataset import STYLES

    def f(v, fmt=".2f"):
        return "-" if not np.isfinite(v) else format(v, fmt)

    lines = ["## Period match per style (mean over dances)", "",
             "Whole clip: fraction of dances whose dominant motion period (autocorrelation averaged over 9 s "
             "windows and both signals) matches this song's beat or bar period (or x2, x0.5) within "
             f"{PERIOD_TOL:.0%}. Per window: fraction of 9 s windows (hop 3 s) that match; hip = hip height "
             "above the ankles, speed = summed joint speed. Other song = every other dance's real motion "
             "(looped/trimmed) against this song's beats, dances sharing captured motion excluded.",
             "",
             "| style | dances | whole-clip period match GT | other song, same style | other song, other style | per-window GT (hip / speed / **mean**) | other song, same style | other song, other style | BAS GT | BAS other (same / other style) | beat-phase lock GT | lock other (same / other style) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    styles = sorted({r["style"] for r in rows.values()}) + ["all"]
    for st in styles:
        rs = [r for r in rows.values() if st == "all" or r["style"] == st]

        def m(k):
            return float(np.nanmean([r[k] for r in rs])) if any(np.isfinite(r[k]) for r in rs) else float("nan")
        lines.append(
            f"| {STYLES.get(st, st)} | {len(rs)} | **{f(m('clip_gt'))}** | **{f(m('clip_same'))}** | **{f(m('clip_cross'))}** "
            f"| {f(m('gt_hip'))} / "
            f"{f(m('gt_speed'))} / **{f(m('gt'))}** "
            f"| {f(m('same_hip_height'))} / {f(m('same_speed'))} / **{f(m('same_mean'))}** "
            f"| {f(m('cross_hip_height'))} / {f(m('cross_speed'))} / **{f(m('cross_mean'))}** "
            f"| {f(m('bas_gt'), '.3f')} | {f(m('bas_same'), '.3f')} / {f(m('bas_cross'), '.3f')} "
            f"| {f(m('lock_gt'))} | {f(m('lock_same'))} / {f(m('lock_cross'))} |")
    n_same = sum(np.isfinite(r["same_mean"]) for r in rows.values())
    gt_vs_same = sum(r["gt"] > r["same_mean"] for r in rows.values() if np.isfinite(r["same_mean"]))
    clip_vs_same = sum(r["clip_gt"] > r["clip_same"] for r in rows.values() if np.isfinite(r["clip_same"]))
    gt_vs_cross = sum(r["gt"] > r["cross_mean"] for r in rows.values() if np.isfinite(r["cross_mean"]))
    lines += ["", f"Per window, ground truth matches more often than the mean other-song dance of the same style in "
              f"{gt_vs_same} of {n_same} dances, than that of another style in {gt_vs_cross} of {len(rows)}. "
              f"Whole clip, ground truth beats the same-style other-song rate in {clip_vs_same} of {n_same}.",
              "", "## Per dance", "",
              "| dance | tracker bpm | meter | clip period match GT / same style / other style | per-window GT | other song same style (n) | other style (n) | BAS GT | BAS other same style |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {f(r['bpm'], '.1f')} | {r['meter']} | {f(r['clip_gt'], '.0f')} / {f(r['clip_same'])} / "
                     f"{f(r['clip_cross'])} | {f(r['gt'])} | {f(r['same_mean'])} ({r['n_same']}) "
                     f"| {f(r['cross_mean'])} ({r['n_cross']}) | {f(r['bas_gt'], '.3f')} | {f(r['bas_same'], '.3f')} |")
    lines += ["", f"Produced by: `{command}`", ""]
    return "\n".join(lines)


def validate_tempo(dances, names) -> dict:
    """tempo_response of two reference generators on real songs: a puppet bobbing on the device
    tracker's beats (listens: should pass) and another dance's real motion (deaf: should fail)."""
    from trainer import baselines

    from trainer.dataset import shared_motion_groups

    by_name = {d.name: d for d in dances}
    groups = shared_motion_groups(dances)
    out = {}
    for n in names:
        d = by_name[n]
        pose = baselines.mean_pose([d])
        puppet = tempo_response(lambda pcm: baselines.beat_puppet(pcm, pose), d)
        _, src_name = baselines.other_song(d, dances, groups=groups)
        src = by_name[src_name]
        deaf = tempo_response(lambda pcm: baselines.loop_to_length(src.poses, len(pcm) // 640), d)
        out[n] = {"puppet": puppet, "deaf": deaf, "deaf_source": src.name}
    return out


def tempo_markdown(res: dict) -> str:
    lines = ["## Tempo response (time-stretch to 0.85x and 1.18x tempo)", "",
             "response = rate x (scale of the motion's periods, from its autocorrelation); 1.0 = the motion follows the tempo, response = rate when deaf; "
             f"pass within {TEMPO_TOL:.0%} at both rates.", "",
             "| dance | beat puppet: period 1.0x | response 0.85x / 1.18x | pass | deaf (other dance's motion) response 0.85x / 1.18x | pass |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n, r in res.items():
        p, d = r["puppet"], r["deaf"]
        pr = " / ".join(f"{v['response']:.2f}" for v in p["rates"].values())
        dr = " / ".join(f"{v['response']:.2f}" for v in d["rates"].values())
        lines.append(f"| {n} | {p['period_s']:.2f} s | {pr} | {'yes' if p['pass'] else 'no'} | {dr} "
                     f"({r['deaf_source']}) | {'yes' if d['pass'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    from device.contract import DEFAULT_FEATURES
    from trainer.dataset import load_dataset

    ap = argparse.ArgumentParser(prog="python -m trainer.evaluate",
                                 description="Validate the period-match and BAS measures on real data: ground truth "
                                             "vs real dance taken from another song.")
    ap.add_argument("data", help="the Music-to-Dance folder (DANCE_*/ audio.mp3, config.json, skeletons.json)")
    ap.add_argument("--cache", default=".cache/features", help="feature cache folder (default: %(default)s)")
    ap.add_argument("--out", help="write a markdown table here (else print it)")
    ap.add_argument("--json", help="also write the per-dance rows as JSON here")
    ap.add_argument("--tempo", nargs="*", default=["DANCE_C_2", "DANCE_R_3", "DANCE_T_5", "DANCE_W_1"],
                    help="dances on which to validate tempo_response with a beat-following puppet and a deaf "
                         "other-song generator (default: %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dances = load_dataset(args.data, DEFAULT_FEATURES, args.cache)
    rows = validate(dances)
    cmd = "python -m trainer.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    md = validation_markdown(rows, cmd)
    if args.tempo:
        md = md.replace(f"Produced by: `{cmd}`", tempo_markdown(validate_tempo(dances, args.tempo)) +
                        f"\nProduced by: `{cmd}`")
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    else:
        print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
