"""Training on long sequences: chunks of `chunk_frames` (one LSTM step per frame) cut from
every training dance at a random offset each epoch; scheduled sampling of the fed-back
pose; validation free-running on held-out dances; checkpoint every epoch; resume; early
stopping; a hard wall-clock budget. Everything needed to rebuild and judge the model goes
into the run folder:

  train_config.json  model_config.json  feature_config.json  feature_hash.txt
  split.json  normalization.json  history.json  metrics.json  model.weights.h5 (best)
  ckpt/last.weights.h5  ckpt/optimizer.npz  ckpt/state.json  plots/*.png, plots/*.gif
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import time

import numpy as np

from trainer.config import TrainConfig, from_dict
from trainer.model import (N_POSE, ModelConfig, build_sequence_model, make_noise, reset_output_stage, run_free,
                           set_normalization, set_output_stage, smooth_np)

log = logging.getLogger(__name__)

JITTER_CAP = 1.3  # the calibrated gain may raise jitter to this many times ground truth's on the TRAINING
# dances; held out it came out up to 10% higher (1.41 -> 1.54 on one run), and the target is <= 1.5
FRAME_RATE_HZ = 25.0  # pose frames per second (device.contract)
# Time constants tried for the output stage's running posture (ModelConfig.posture): at least 1 s
# (a one-pole cut-off of 1 / (2 pi tau) <= 0.16 Hz), below the slowest bar (a slow waltz's 3 beats,
# about 2.4 s = 0.4 Hz), so the posture follows the stance, not the motion the gain should amplify.
POSTURE_TAUS_S = (1.0, 2.0, 4.0)


def configure_threads(n: int) -> None:
    """TensorFlow on a small shared machine: n intra-op threads, one inter-op thread."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(n))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process (tests): keep what it has
        pass


# --- data ------------------------------------------------------------------------------

@dataclasses.dataclass
class Seq:
    """One dance as training arrays."""

    name: str
    x: np.ndarray  # (T, F) float32 features
    pose: np.ndarray  # (T, 28) float32
    dheading: np.ndarray  # (T,) float32 radians per frame (0 at frame 0)


def dance_to_seq(d) -> Seq:
    x = np.asarray(d.features.x, np.float32)
    T = min(len(x), len(d.poses))
    pose = np.asarray(d.poses[:T], np.float32).reshape(T, N_POSE)
    hd = np.asarray(d.heading[:T], np.float64)
    dh = np.zeros(T, np.float32)
    dh[1:] = np.angle(np.exp(1j * np.diff(hd)))  # wrapped to (-pi, pi]
    return Seq(d.name, x[:T], pose, dh)


def compute_normalization(train: list[Seq]) -> dict:
    X = np.concatenate([s.x for s in train])
    P = np.concatenate([s.pose for s in train])
    V = np.concatenate([np.diff(s.pose, axis=0) for s in train])
    A = np.concatenate([np.diff(s.pose, 2, axis=0) for s in train])
    DH = np.concatenate([s.dheading for s in train])
    return {
        "n_features": int(X.shape[1]),
        "feat_mean": X.mean(0).tolist(),
        "feat_std": np.maximum(X.std(0), 1e-3).tolist(),
        "pose_mean": P.mean(0).tolist(),
        "pose_var": float(P.var(0).mean()),
        "vel_var": float((V**2).mean()),
        "acc_ms": float((A**2).mean()),
        "dheading_std": float(max(DH.std(), 1e-4)),
    }


def epoch_chunks(seqs: list[Seq], C: int, B: int, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """Consecutive chunks of C frames from every dance at a random offset, shuffled, grouped
    into batches of exactly B (the last batch is filled with random chunks)."""
    items = []
    for i, s in enumerate(seqs):
        T = len(s.x)
        if T <= C:
            items.append((i, 0))
            continue
        off = int(rng.integers(0, C))
        starts = list(range(off, T - C + 1, C)) or [0]
        if off > 0 and off >= C // 2:
            starts.insert(0, 0)  # the song's start matters too (the device starts from silence)
        items += [(i, st) for st in starts]
    order = rng.permutation(len(items))
    items = [items[j] for j in order]
    while len(items) % B:
        items.append(items[int(rng.integers(0, len(items)))])
    return [items[k:k + B] for k in range(0, len(items), B)]


def make_batch(seqs, batch, C: int, p_tf: float, mcfg: ModelConfig, cfg: TrainConfig, rng):
    """Arrays for one batch: dict of model inputs + targets (pose (B,C,28), dheading (B,C), valid (B,C))."""
    B = len(batch)
    F = seqs[0].x.shape[1]
    x = np.zeros((B, C, F), np.float32)
    pose = np.zeros((B, C, N_POSE), np.float32)
    prev = np.zeros((B, C, N_POSE), np.float32)
    dh = np.zeros((B, C), np.float32)
    valid = np.zeros((B, C), np.float32)
    for b, (i, st) in enumerate(batch):
        s = seqs[i]
        n = min(C, len(s.x) - st)
        x[b, :n] = s.x[st:st + n]
        pose[b, :n] = s.pose[st:st + n]
        prev[b, 1:n] = s.pose[st:st + n - 1]
        prev[b, 0] = s.pose[st - 1] if st > 0 else s.pose[0]
        dh[b, :n] = s.dheading[st:st + n]
        valid[b, :n] = 1.0
        if n < C:  # pad by holding the last frame (masked out of the loss)
            x[b, n:] = s.x[st + n - 1]
            pose[b, n:] = pose[b, n - 1]
            prev[b, n:] = pose[b, n - 1]
    mask = (rng.random((B, C, 1)) < p_tf).astype(np.float32)
    feed = {"x": x, "prev": prev, "tf_mask": mask}
    if mcfg.kind == "ours" and mcfg.noise_dims:
        feed["noise"] = np.stack([make_noise(C, mcfg.noise_dims, rng, cfg.noise_smooth_frames) for _ in range(B)])
    return feed, {"pose": pose, "dheading": dh, "valid": valid}


def tf_prob(cfg: TrainConfig, epoch: int) -> float:
    """Teacher-forcing probability for an epoch (linear anneal)."""
    if cfg.ss_epochs <= 0:
        return cfg.ss_end
    f = min(1.0, epoch / cfg.ss_epochs)
    return float(cfg.ss_start + (cfg.ss_end - cfg.ss_start) * f)


# --- losses ----------------------------------------------------------------------------

def make_loss_fn(cfg: TrainConfig, norm: dict):
    import tensorflow as tf

    pose_var = max(norm["pose_var"], 1e-8)
    vel_var = max(norm["vel_var"], 1e-8)
    acc_ms = max(norm["acc_ms"], 1e-8)
    dh_var = max(norm["dheading_std"], 1e-4) ** 2

    def _speed_std(v, valid):
        """Per chunk: std of joint speed (norm of each keypoint's (dx, dy)) over valid frames and keypoints."""
        B = tf.shape(v)[0]
        sp = tf.sqrt(tf.reduce_sum(tf.square(tf.reshape(v, [B, -1, 14, 2])), axis=-1) + 1e-10)  # (B, T-1, 14)
        w = (valid[:, 1:] * valid[:, :-1])[..., None] * tf.ones_like(sp)
        n = tf.reduce_sum(w, axis=[1, 2]) + 1e-6
        mean = tf.reduce_sum(sp * w, axis=[1, 2]) / n
        var = tf.reduce_sum(tf.square(sp - mean[:, None, None]) * w, axis=[1, 2]) / n
        return tf.sqrt(var + 1e-12)

    def loss_fn(out, tgt):
        pose_p = out[..., :N_POSE]
        dh_p = out[..., N_POSE]
        pose_t, dh_t, valid = tgt["pose"], tgt["dheading"], tgt["valid"]
        vmask = valid[..., None]
        n = tf.reduce_sum(valid) * N_POSE + 1e-6
        l_pose = tf.reduce_sum(tf.square(pose_p - pose_t) * vmask) / n / pose_var
        vp = pose_p[:, 1:] - pose_p[:, :-1]
        vt = pose_t[:, 1:] - pose_t[:, :-1]
        vv = (valid[:, 1:] * valid[:, :-1])[..., None]
        nv = tf.reduce_sum(vv) * N_POSE + 1e-6
        l_vel = tf.reduce_sum(tf.square(vp - vt) * vv) / nv / vel_var
        ap = vp[:, 1:] - vp[:, :-1]
        va = vv[:, 1:] * vv[:, :-1]
        # Jitter: penalise only acceleration above ground truth's (per chunk), so it can still move.
        acc_p = tf.reduce_sum(tf.square(ap) * va, axis=[1, 2]) / (tf.reduce_sum(va, axis=[1, 2]) * N_POSE + 1e-6)
        at = vt[:, 1:] - vt[:, :-1]
        acc_t = tf.reduce_sum(tf.square(at) * va, axis=[1, 2]) / (tf.reduce_sum(va, axis=[1, 2]) * N_POSE + 1e-6)
        l_acc = tf.reduce_mean(tf.nn.relu(acc_p / (acc_t + 0.1 * acc_ms) - 1.0))
        # Energy: mean joint speed per chunk, generated vs ground truth, on a log scale.
        if cfg.energy_stat == "std":
            sp, st = _speed_std(vp, valid), _speed_std(vt, valid)
        else:
            sp = tf.reduce_sum(tf.abs(vp) * vv, axis=[1, 2]) / (tf.reduce_sum(vv, axis=[1, 2]) * N_POSE + 1e-6)
            st = tf.reduce_sum(tf.abs(vt) * vv, axis=[1, 2]) / (tf.reduce_sum(vv, axis=[1, 2]) * N_POSE + 1e-6)
        eps = 0.05 * math.sqrt(vel_var)
        l_energy = tf.reduce_mean(tf.square(tf.math.log(sp + eps) - tf.math.log(st + eps)))
        l_head = tf.reduce_sum(tf.square(dh_p - dh_t) * valid) / (tf.reduce_sum(valid) + 1e-6) / dh_var
        # Posture: each chunk's mean pose (10 s) against the dancer's: the stance of the style.
        nc = tf.reduce_sum(valid, axis=1)[:, None] + 1e-6
        l_posture = tf.reduce_mean(tf.square(tf.reduce_sum(pose_p * vmask, axis=1) / nc
                                             - tf.reduce_sum(pose_t * vmask, axis=1) / nc)) / pose_var
        total = (cfg.w_pose * l_pose + cfg.w_vel * l_vel + cfg.w_acc * l_acc + cfg.w_energy * l_energy
                 + cfg.w_heading * l_head + cfg.w_posture * l_posture)
        return total, {"loss": total, "pose": l_pose, "vel": l_vel, "acc": l_acc, "energy": l_energy,
                       "heading": l_head, "posture": l_posture}

    return loss_fn


# --- quick validation metrics (the full ones come from trainer.evaluate at the end) -----

def quick_metrics(pred: np.ndarray, gt: np.ndarray, pose_mean: np.ndarray) -> dict:
    """pred, gt (T, 28). MSE, MSE of the mean pose, energy ratio (joint-speed std), jitter ratio
    (mean absolute jerk)."""
    def speed(p):
        v = np.diff(p.reshape(len(p), 14, 2), axis=0)
        return np.linalg.norm(v, axis=-1)  # (T-1, 14)

    def jerk(p):
        return np.abs(np.diff(p, 3, axis=0)).mean()

    mse = float(np.mean((pred - gt) ** 2))
    mse_mean = float(np.mean((pose_mean[None] - gt) ** 2))
    e = float(speed(pred).std() / max(speed(gt).std(), 1e-9))
    j = float(jerk(pred) / max(jerk(gt), 1e-9))
    return {"mse": mse, "mse_meanpose": mse_mean, "energy_ratio": e, "jitter_ratio": j}


def selection_score(m: dict) -> float:
    """Lower is better: pose error relative to the mean pose, plus how far the motion energy is
    from ground truth's (log), plus jitter above 1.5x ground truth (log)."""
    return (m["mse"] / max(m["mse_meanpose"], 1e-9) + abs(math.log(max(m["energy_ratio"], 1e-3)))
            + max(0.0, math.log(max(m["jitter_ratio"], 1e-3) / 1.5)))


def fit_output_stage(pairs: list[tuple[np.ndarray, np.ndarray]], mean: np.ndarray, max_gain: float,
                     smooth: bool = True, gain: bool = True, posture: bool = False, smooth2: bool = False,
                     alphas: tuple | None = None) -> dict:
    """The output stage (one-pole low-pass, then a gain about `mean`) fitted to raw free-running
    poses and their ground truth, pairs of (T, 28). For each low-pass coefficient the reachable
    energy is min(1, e * max_gain, JITTER_CAP * e / j): the gain scales energy e and jitter j alike
    and may raise jitter to JITTER_CAP x ground truth's; with `smooth2` each coefficient is also
    tried as two poles (alpha2 = alpha); `alphas`: the coefficients tried (default ALPHAS). The
    best wins (ties: the least lag, (1 - a) / a frames per pole), then the gain that brings the
    joint-speed std to ground truth's within that cap, clipped to [1, max_gain]. With `posture`
    the gain then centres on a running posture (apply_output_stage): each time constant of POSTURE_TAUS_S (and none) gets its gain
    re-fitted the same way, and the one with the lowest mean pose MSE on these pairs wins; then
    the posture's own gain is the ratio of the spread of the dancers' postures between these
    songs (mean pairwise distance of each song's mean pose) to the spread of the model's, in
    [1, max_gain] (as the motion gain brings the motion's energy to the dancers')."""
    table = []
    for a in ((alphas or ALPHAS) if smooth else (1.0,)):
        for a2 in ((1.0, a) if smooth and smooth2 and a < 1.0 else (1.0,)):
            qs = [quick_metrics(apply_output_stage(r, mean, a, 1.0, alpha2=a2), gt, gt.mean(0)) for r, gt in pairs]
            e = float(np.median([q["energy_ratio"] for q in qs]))
            j = float(np.median([q["jitter_ratio"] for q in qs]))
            reach = min(1.0, e * max_gain, JITTER_CAP * e / max(j, 1e-6)) if gain else -abs(math.log(max(e, 1e-3)))
            lag = (1 - a) / a + (1 - a2) / a2
            table.append({"alpha": a, "alpha2": a2, "lag_frames": lag, "energy_ratio": e, "jitter_ratio": j, "reach": reach})
    best = max(table, key=lambda r: (round(r["reach"], 2), -r["lag_frames"]))
    e, j = best["energy_ratio"], best["jitter_ratio"]
    g = float(np.clip(min(1.0 / max(e, 1e-3), JITTER_CAP / max(j, 1e-3)), 1.0, max_gain)) if gain else 1.0
    out = {"gain": g, "alpha": best["alpha"], "alpha2": best["alpha2"], "beta": 0.0, "posture_gain": 1.0,
           "energy_ratio": e, "jitter_ratio": j, "alphas": table}
    if not (posture and gain):
        return out
    a, a2, postures = best["alpha"], best["alpha2"], []
    for tau in (None, *POSTURE_TAUS_S):
        b = 0.0 if tau is None else 1.0 / (tau * FRAME_RATE_HZ)
        qs = [quick_metrics(apply_output_stage(r, mean, a, g, b, alpha2=a2), gt, gt.mean(0)) for r, gt in pairs]
        k = min(1.0 / max(float(np.median([q["energy_ratio"] for q in qs])), 1e-3),
                JITTER_CAP / max(float(np.median([q["jitter_ratio"] for q in qs])), 1e-3))
        gb = float(np.clip(g * k, 1.0, max_gain))
        mse = float(np.mean([quick_metrics(apply_output_stage(r, mean, a, gb, b, alpha2=a2), gt, gt.mean(0))["mse"]
                             for r, gt in pairs]))
        postures.append({"tau_s": tau, "beta": b, "gain": gb, "mse": mse})
    pick = min(postures, key=lambda r: r["mse"])
    gp = 1.0
    if pick["beta"] > 0 and len(pairs) >= 2:
        # The posture's own gain: the model's postures differ between songs less than the
        # dancer's (a regressor shrinks them too); scale them to the dancer's spread.
        def spread(postures):
            P = np.stack(postures)
            return float(np.mean([np.linalg.norm(P[i] - P[j]) for i in range(len(P)) for j in range(i)]))

        model_p = [smooth_np(apply_output_stage(r, mean, a, 1.0, alpha2=a2), mean, pick["beta"]).mean(0) - mean
                   for r, _ in pairs]
        gp = float(np.clip(spread([gt.mean(0) - mean for _, gt in pairs]) / max(spread(model_p), 1e-9), 1.0, max_gain))
    return {**out, "gain": pick["gain"], "beta": pick["beta"], "posture_gain": gp, "postures": postures}


def apply_output_stage(raw: np.ndarray, mean: np.ndarray, alpha: float, gain: float, beta: float = 0.0,
                       posture_gain: float = 1.0, alpha2: float = 1.0) -> np.ndarray:
    """What the model's pose_smooth + pose_gain layers do, in numpy: (T, 28) -> (T, 28). The gain
    scales the low-passed pose s about the mean pose, or with beta > 0 about the running posture
    p (p += beta * (s - p), both from the mean pose), which is scaled by posture_gain:
    mean + posture_gain * (p - mean) + gain * (s - p). alpha2 < 1: a second low-pass pole on s.
    Unclipped."""
    s = smooth_np(raw, mean, alpha)
    if alpha2 < 1.0:
        s = smooth_np(s, mean, alpha2)
    if beta <= 0.0:
        return mean + gain * (s - mean)
    p = smooth_np(s, mean, beta)
    return mean + posture_gain * (p - mean) + gain * (s - p)


def apply_fit(raw: np.ndarray, mean: np.ndarray, st: dict, gain: float | None = None) -> np.ndarray:
    """apply_output_stage with a fit_output_stage result (its gain, or `gain`)."""
    return apply_output_stage(raw, mean, st["alpha"], st["gain"] if gain is None else gain, st["beta"],
                              st["posture_gain"], st["alpha2"])


def validate(model, mcfg, val: list[Seq], max_frames: int, pose_mean: np.ndarray,
             cfg: TrainConfig | None = None) -> dict:
    """Free-running metrics on the held-out dances, and the model-selection score. With
    cfg.selection == 'calibrated' (models with the fitted output stage) the score is that of the
    output as it would ship: the low-pass and gain fitted to this epoch's raw output (on these
    dances; it only ranks epochs, the shipped stage is fitted on training dances), so an epoch that
    moves little but in the dancer's phase beats one that moves more out of phase (a noisy ranking:
    see TrainConfig.selection)."""
    per, pairs = [], []
    for s in val:
        T = len(s.x) if max_frames <= 0 else min(len(s.x), max_frames)
        out = run_free(model, mcfg, s.x[:T])[:, :N_POSE]
        per.append(quick_metrics(out, s.pose[:T], pose_mean))
        pairs.append((out, s.pose[:T]))
    m = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    m["score"] = selection_score(m)
    if cfg is not None and cfg.selection == "calibrated" and mcfg.kind == "ours" and mcfg.output_gain:
        st = fit_output_stage(pairs, pose_mean, cfg.max_gain, mcfg.smooth, True, mcfg.has_posture, mcfg.has_smooth2)
        cal = [quick_metrics(apply_fit(o, pose_mean, st), gt, pose_mean) for o, gt in pairs]
        cm = {k: float(np.mean([c[k] for c in cal])) for k in cal[0]}
        m.update({f"cal_{k}": v for k, v in cm.items()}, cal_gain=st["gain"], cal_alpha=st["alpha"])
        m["raw_score"] = m["score"]
        m["score"] = selection_score(cm)
    return m


# --- the loop --------------------------------------------------------------------------

def _save_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    os.replace(tmp, path)


def load_data(cfg: TrainConfig, fcfg, run: pathlib.Path | None = None):
    """(train Dances, val Dances) by the config's split (or the run's split.json on resume)."""
    from trainer import dataset

    root = cfg.resolved_data_root()
    if not root:
        raise ValueError("no data: set data_root (--set data_root=DIR) or EDGEDANCE_DATA to the Music-to-Dance folder")
    dances = dataset.load_dataset(root, fcfg, cfg.cache_dir or None)
    if cfg.max_dances:
        dances = dances[: cfg.max_dances]
    split_file = run / "split.json" if run is not None else None
    if split_file is not None and split_file.exists():
        sp = json.loads(split_file.read_text())
        by = {d.name: d for d in dances}
        missing = sorted(set(sp["train"] + sp["val"]) - set(by))
        if missing:
            raise ValueError(f"{split_file}: dances {missing} are not in {root}")
        return [by[n] for n in sp["train"]], [by[n] for n in sp["val"]]
    return dataset.split_by_dance(dances, cfg.val_fraction, cfg.split_seed)


def train(cfg: TrainConfig, out_dir, *, resume: bool = False, train_dances=None, val_dances=None,
          fcfg=None, progress: bool = True) -> dict:
    """Train one model into `out_dir`. Dances may be passed in (tests, experiments) or are
    loaded from cfg.data_root. Returns the final metrics dict."""
    from device.contract import DEFAULT_FEATURES, FeatureConfig

    configure_threads(cfg.threads)
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    run = pathlib.Path(out_dir)
    ckpt = run / "ckpt"
    state_file = ckpt / "state.json"
    if resume:
        if not state_file.exists():
            raise FileNotFoundError(f"--resume: {state_file} does not exist (no checkpoint in {run})")
        saved = json.loads((run / "train_config.json").read_text())
        budget = dict(minutes=cfg.minutes, epochs=cfg.epochs)
        cfg = dataclasses.replace(from_dict(saved, str(run / "train_config.json")), **budget)
        fcfg = FeatureConfig.from_dict(json.loads((run / "feature_config.json").read_text()))
    elif state_file.exists():
        raise FileExistsError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    fcfg = fcfg or DEFAULT_FEATURES
    run.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(exist_ok=True)
    (run / "plots").mkdir(exist_ok=True)
    mcfg = cfg.model_config()

    if train_dances is None:
        train_dances, val_dances = load_data(cfg, fcfg, run if resume else None)
    train_seqs = [dance_to_seq(d) for d in train_dances]
    val_seqs = [dance_to_seq(d) for d in val_dances]
    norm = compute_normalization(train_seqs)
    pose_mean = np.asarray(norm["pose_mean"], np.float32)
    if not resume:
        _save_json(run / "train_config.json", cfg.to_dict())
        _save_json(run / "model_config.json", mcfg.to_dict())
        _save_json(run / "feature_config.json", fcfg.to_dict())
        (run / "feature_hash.txt").write_text(fcfg.config_hash() + "\n")
        try:  # the feature code's digest too: the config hash alone misses algorithm edits
            from trainer.dataset import feature_code_digest

            (run / "feature_code_digest.txt").write_text(feature_code_digest() + "\n")
        except (ImportError, AttributeError):
            pass
        _save_json(run / "split.json", {"seed": cfg.split_seed, "val_fraction": cfg.val_fraction,
                                        "train": [s.name for s in train_seqs], "val": [s.name for s in val_seqs]})
        _save_json(run / "normalization.json", norm)

    keras.utils.set_random_seed(cfg.seed)
    model = build_sequence_model(mcfg, norm["n_features"])
    if cfg.init_from and not resume:
        init_weights(model, mcfg, cfg.init_from)
    set_normalization(model, norm["feat_mean"], norm["feat_std"], pose_mean)
    n_params = int(model.count_params())
    epochs_total = max(1, cfg.epochs)
    C, B = cfg.chunk_frames, cfg.batch_size
    steps_per_epoch = len(epoch_chunks(train_seqs, C, B, np.random.default_rng(0)))
    schedule = keras.optimizers.schedules.CosineDecay(cfg.lr, epochs_total * steps_per_epoch,
                                                      alpha=cfg.lr_final / cfg.lr)
    opt = keras.optimizers.Adam(schedule, clipnorm=cfg.clipnorm)
    opt.build(model.trainable_variables)
    loss_fn = make_loss_fn(cfg, norm)

    state = {"epoch": 0, "best_score": None, "best_epoch": -1, "bad_epochs": 0, "train_seconds": 0.0,
             "history": []}
    if resume:
        state = json.loads(state_file.read_text())
        model.load_weights(str(ckpt / "last.weights.h5"))
        with np.load(ckpt / "optimizer.npz") as z:
            for i, v in enumerate(opt.variables):
                v.assign(z[f"v{i}"])
        log.info("resumed %s at epoch %d (%.0f s trained)", run, state["epoch"], state["train_seconds"])

    has_noise = mcfg.kind == "ours" and mcfg.noise_dims > 0
    spec = {"x": tf.TensorSpec((B, C, norm["n_features"]), tf.float32),
            "prev": tf.TensorSpec((B, C, N_POSE), tf.float32), "tf_mask": tf.TensorSpec((B, C, 1), tf.float32)}
    if has_noise:
        spec["noise"] = tf.TensorSpec((B, C, mcfg.noise_dims), tf.float32)
    tspec = {"pose": tf.TensorSpec((B, C, N_POSE), tf.float32), "dheading": tf.TensorSpec((B, C), tf.float32),
             "valid": tf.TensorSpec((B, C), tf.float32)}

    @tf.function(input_signature=[spec, tspec], reduce_retracing=True)
    def train_step(feed, tgt):
        with tf.GradientTape() as tape:
            out = model(feed, training=True)
            total, parts = loss_fn(out, tgt)
        grads = tape.gradient(total, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return parts

    budget_s = cfg.minutes * 60.0
    cpu_clock = cfg.budget_clock == "cpu"

    def spent() -> float:  # training time so far, on the clock the budget counts
        return state.get("train_cpu_seconds", 0.0) if cpu_clock else state["train_seconds"]

    history = state["history"]
    stop_reason = "epochs"
    log.info("training %s: %d params, %d train / %d val dances, %d steps of %dx%d frames per epoch",
             mcfg.kind, n_params, len(train_seqs), len(val_seqs), steps_per_epoch, B, C)
    while state["epoch"] < epochs_total:
        epoch = state["epoch"]
        if spent() >= budget_s:
            stop_reason = "time"
            break
        rng = np.random.default_rng([cfg.seed, epoch])
        p_tf = tf_prob(cfg, epoch) if (mcfg.kind == "ours" and mcfg.feedback) else 0.0
        batches = epoch_chunks(train_seqs, C, B, rng)
        t0, c0 = time.monotonic(), time.process_time()
        sums: dict[str, float] = {}
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs_total} tf={p_tf:.2f}", disable=not progress,
                   leave=False, mininterval=2.0)
        n_done = 0
        for batch in bar:
            feed, tgt = make_batch(train_seqs, batch, C, p_tf, mcfg, cfg, rng)
            parts = train_step(feed, tgt)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_done += 1
            bar.set_postfix(loss=f"{sums['loss'] / n_done:.4f}")
            if spent() + (time.process_time() - c0 if cpu_clock else time.monotonic() - t0) >= budget_s:
                break
        train_s = time.monotonic() - t0
        state["train_seconds"] += train_s
        state["train_cpu_seconds"] = state.get("train_cpu_seconds", 0.0) + time.process_time() - c0
        rec = {"epoch": epoch + 1, "tf_prob": p_tf, "seconds": train_s, "steps": n_done,
               **{f"train_{k}": v / max(n_done, 1) for k, v in sums.items()}}
        t1 = time.monotonic()
        annealed = epoch + 1 >= cfg.ss_epochs or not (mcfg.kind == "ours" and mcfg.feedback)
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == epochs_total:
            vm = validate(model, mcfg, val_seqs, cfg.val_max_frames, pose_mean, cfg)
            rec.update({f"val_{k}": v for k, v in vm.items()})
            rec["val_seconds"] = time.monotonic() - t1
            better = state["best_score"] is None or vm["score"] < state["best_score"]
            # Before annealing ends the model still leans on teacher forcing: keep the best,
            # but only count patience once it runs free.
            if better:
                state["best_score"], state["best_epoch"] = vm["score"], epoch + 1
                state["bad_epochs"] = 0
                model.save_weights(str(run / "model.weights.h5"))
            elif annealed:
                state["bad_epochs"] += 1
        history.append(rec)
        state["epoch"] = epoch + 1
        model.save_weights(str(ckpt / "last.weights.h5"))
        np.savez(ckpt / "optimizer.npz", **{f"v{i}": np.asarray(v) for i, v in enumerate(opt.variables)})
        _save_json(state_file, state)
        _save_json(run / "history.json", history)
        log.info("epoch %d: %s", epoch + 1, " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                                                     if isinstance(v, float) and k != "tf_prob"))
        if state["bad_epochs"] >= cfg.patience:
            stop_reason = "early stopping"
            break
        if spent() >= budget_s:
            stop_reason = "time"
            break
    if not (run / "model.weights.h5").exists():
        model.save_weights(str(run / "model.weights.h5"))
    model.load_weights(str(run / "model.weights.h5"))
    secs = [h["seconds"] for h in history if h.get("steps")]
    info = {"stop_reason": stop_reason, "epochs": state["epoch"], "best_epoch": state["best_epoch"],
            "train_seconds": state["train_seconds"], "train_cpu_seconds": state.get("train_cpu_seconds"),
            "budget_clock": cfg.budget_clock, "threads": cfg.threads, "params": n_params,
            "seconds_per_epoch": float(np.median(secs)) if secs else None,
            "frames_per_epoch": int(sum(len(s.x) for s in train_seqs)),
            "train_dances": len(train_seqs), "val_dances": len(val_seqs)}
    metrics = finish(run, cfg, model, mcfg, train_seqs, val_dances, val_seqs, pose_mean, fcfg, history, info)
    log.info("done (%s): best epoch %d, %.0f s", stop_reason, state["best_epoch"], state["train_seconds"])
    return metrics


def init_weights(model, mcfg, run_dir) -> None:
    """Start from a trained run's weights (TrainConfig.init_from) with its output stage off."""
    path = pathlib.Path(run_dir) / "model.weights.h5"
    if not path.exists():
        raise FileNotFoundError(f"TrainConfig.init_from={str(run_dir)!r}: {path} does not exist; "
                                "give a run folder that holds a trained model")
    try:
        model.load_weights(str(path))
    except ValueError as e:
        raise ValueError(f"TrainConfig.init_from={str(run_dir)!r}: its weights do not fit this model "
                         f"(the architecture fields must match the run's model_config.json): {e}") from e
    reset_output_stage(model, mcfg)
    log.info("starting from %s", path)


def finish(run, cfg, model, mcfg, train_seqs, val_dances, val_seqs, pose_mean, fcfg, history, info) -> dict:
    """After training (best weights loaded): calibrate the output gain on the training dances,
    held-out metrics (metrics.json) and plots."""
    calibration = None
    if mcfg.kind == "ours" and (mcfg.output_gain or mcfg.smooth):
        calibration = calibrate_gain(model, mcfg, train_seqs, cfg)  # leaves the stage off
        uncal = {"gain": 1.0, "alpha": 1.0, **validate(model, mcfg, val_seqs, 0, pose_mean)}
        set_output_stage(model, mcfg, calibration)
        model.save_weights(str(run / "model.weights.h5"))
        calibration["val_uncalibrated"] = uncal
    metrics = final_metrics(model, mcfg, val_dances, val_seqs, train_seqs, pose_mean, fcfg, cfg.eval_baselines)
    if calibration is not None:
        metrics["calibration"] = calibration
    metrics["training"] = info
    try:
        from trainer.dataset import feature_code_digest

        metrics["feature_code_digest"] = feature_code_digest()
    except (ImportError, AttributeError):
        pass
    _save_json(run / "metrics.json", metrics)
    try:
        make_plots(run, history, model, mcfg, val_dances, val_seqs, fcfg, cfg.gif_frames)
    except Exception as e:  # plots are a convenience; never lose a trained run to them
        log.warning("plots failed: %s", e)
    return metrics


def refinish(run_dir) -> dict:
    """Redo `finish` for a trained run folder with the current code and features: re-fit the
    gain, recompute metrics.json and plots (the training info is kept)."""
    from device.contract import FeatureConfig
    from trainer.model import load_run

    run = pathlib.Path(run_dir)
    model, mcfg, fcfg, norm = load_run(run)
    cfg = from_dict(json.loads((run / "train_config.json").read_text()), str(run / "train_config.json"))
    train_dances, val_dances = load_data(cfg, fcfg, run)
    train_seqs = [dance_to_seq(d) for d in train_dances]
    val_seqs = [dance_to_seq(d) for d in val_dances]
    history = json.loads((run / "history.json").read_text())
    info = json.loads((run / "metrics.json").read_text())["training"]
    return finish(run, cfg, model, mcfg, train_seqs, val_dances, val_seqs, np.asarray(norm["pose_mean"], np.float32),
                  fcfg, history, info)


ALPHAS = (1.0, 0.7, 0.5, 0.35, 0.25)  # output low-pass coefficients tried (1 = no smoothing)


def calibrate_gain(model, mcfg, train_seqs, cfg, max_dances: int = 10, max_frames: int = 1500) -> dict:
    """Fit the output stage (fit_output_stage) on TRAINING dances only, from the raw free-running
    poses generated once. The model is left with its stage off (trainer.model.reset_output_stage);
    the caller sets the fit (trainer.model.set_output_stage)."""
    reset_output_stage(model, mcfg)
    mean = model.get_layer("pose_gain").get_weights()[0] if mcfg.output_gain else None
    raws = []
    for s in train_seqs[:: max(1, len(train_seqs) // max_dances)][:max_dances]:
        T = min(len(s.x), max_frames)
        raws.append((run_free(model, mcfg, s.x[:T])[:, :N_POSE], s.pose[:T]))
    if mean is None:
        mean = np.mean([p.mean(0) for _, p in raws], axis=0)
    st = fit_output_stage(raws, mean, cfg.max_gain, mcfg.smooth, mcfg.output_gain, mcfg.has_posture, mcfg.has_smooth2)
    log.info("output calibrated on %d training dances: alpha %.2f, alpha2 %.2f (energy %.3f, jitter %.3f) -> gain %.3f, "
             "posture beta %.4f, posture gain %.3f", len(raws), st["alpha"], st["alpha2"], st["energy_ratio"],
             st["jitter_ratio"], st["gain"], st["beta"], st["posture_gain"])
    return {"gain": st["gain"], "alpha": st["alpha"], "alpha2": st["alpha2"], "beta": st["beta"],
            "posture_gain": st["posture_gain"],
            "train_energy_ratio_before": st["energy_ratio"],
            "train_jitter_ratio_before": st["jitter_ratio"], "alphas": st["alphas"],
            "postures": st.get("postures", []), "dances": len(raws)}


def upgrade_run(run_dir, **changes) -> None:
    """Rebuild a run's model with changed model-config flags (e.g. smooth=True for a run made
    before the output low-pass existed), copying the trained weights by layer name."""
    import dataclasses as dc

    from trainer.model import copy_weights, load_run

    run = pathlib.Path(run_dir)
    old, mcfg, _, norm = load_run(run)
    new_cfg = dc.replace(mcfg, **changes)
    new = build_sequence_model(new_cfg, int(norm["n_features"]))
    set_normalization(new, norm["feat_mean"], norm["feat_std"], np.asarray(norm["pose_mean"], np.float32))
    copy_weights(old, new, strict=False)
    new.save_weights(str(run / "model.weights.h5"))
    _save_json(run / "model_config.json", new_cfg.to_dict())
    tc = json.loads((run / "train_config.json").read_text())
    tc.update({k: v for k, v in changes.items() if k in tc or k in ("smooth",)})
    _save_json(run / "train_config.json", tc)


def _evaluate_module():
    try:
        from trainer import evaluate
        return evaluate
    except ImportError:
        return None


def final_metrics(model, mcfg, val_dances, val_seqs, train_seqs, pose_mean, fcfg, with_baselines=True) -> dict:
    """Held-out metrics on whole validation dances: quick ones always, and trainer.evaluate's
    (BAS, period match, diversity, ...) when available."""
    ev = _evaluate_module()
    per, full, preds = {}, {}, []
    for d, s in zip(val_dances, val_seqs):
        out = run_free(model, mcfg, s.x)
        pred = out[:, :N_POSE]
        preds.append(pred.reshape(-1, 14, 2))
        per[s.name] = quick_metrics(pred, s.pose, pose_mean)
        if ev is not None:
            try:
                full[s.name] = {k: v for k, v in ev.evaluate(pred.reshape(-1, 14, 2), d).items()
                                if isinstance(v, (int, float, bool, type(None)))}
            except Exception as e:
                log.warning("evaluate failed on %s: %s", s.name, e)
    out = {"val_mean": {k: float(np.mean([p[k] for p in per.values()])) for k in next(iter(per.values()))},
           "per_dance": per}
    if ev is not None and with_baselines:
        try:
            out["baselines"] = baseline_metrics(val_dances, train_seqs, pose_mean, ev)
        except Exception as e:
            log.warning("baselines failed: %s", e)
    out["val_mean"]["score"] = selection_score(out["val_mean"])
    if full:
        keys = sorted(set.intersection(*[set(v) for v in full.values()]))
        out["evaluate_mean"] = {k: float(np.nanmean([float(v[k]) if v[k] is not None else np.nan
                                                     for v in full.values()])) for k in keys}
        out["evaluate_per_dance"] = full
        try:
            out["evaluate_mean"]["diversity"] = float(ev.diversity(preds))
            out["evaluate_mean"]["diversity_gt"] = float(ev.diversity([d.poses for d in val_dances]))
        except Exception as e:
            log.warning("diversity failed: %s", e)
    return out


def _mean_of(rows: list[dict]) -> dict:
    keys = sorted(set.intersection(*[set(r) for r in rows]))
    return {k: float(np.nanmean([np.nan if r[k] is None else float(r[k]) for r in rows])) for k in keys
            if all(isinstance(r[k], (int, float, type(None))) for r in rows)}


def baseline_metrics(val_dances, train_seqs, pose_mean, ev) -> dict:
    """trainer.evaluate of the mean pose and of another song's real dance on the held-out dances."""
    from trainer import baselines

    class _D:  # the training dances as baselines.other_song needs them
        def __init__(self, s):
            self.name, self.poses, self.style = s.name, s.pose.reshape(-1, 14, 2), s.name.split("_")[1] if s.name.count("_") >= 2 else "?"
            self.n_frames = len(self.poses)

    pool = [_D(s) for s in train_seqs]
    mean_rows, other_rows, other_preds = [], [], []
    for i, d in enumerate(val_dances):
        mp = np.repeat(pose_mean.reshape(1, 14, 2), len(d.poses), axis=0)
        mean_rows.append(ev.evaluate(mp, d))
        op, _ = baselines.other_song(d, pool, seed=i)
        other_preds.append(op)
        other_rows.append(ev.evaluate(op, d))
    out = {"mean_pose": _mean_of(mean_rows), "other_song": _mean_of(other_rows)}
    if len(other_preds) >= 2:
        out["other_song"]["diversity"] = float(ev.diversity(other_preds))
    return out


def make_plots(run: pathlib.Path, history, model, mcfg, val_dances, val_seqs, fcfg, gif_frames: int = 250) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in ("train_loss", "train_pose", "train_vel", "train_energy"):
        if history and k in history[0]:
            ax[0].plot(ep, [h[k] for h in history], label=k)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("epoch")
    ax[0].legend(fontsize=7)
    for k in ("val_mse", "val_mse_meanpose", "val_energy_ratio", "val_jitter_ratio", "val_score"):
        pts = [(h["epoch"], h[k]) for h in history if k in h]
        if pts:
            ax[1].plot(*zip(*pts), label=k)
    ax[1].set_xlabel("epoch")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "plots" / "loss.png", dpi=90)
    plt.close(fig)
    if not val_seqs:
        return
    s, d = val_seqs[0], val_dances[0]
    T = min(len(s.x), 250)
    pred = run_free(model, mcfg, s.x[:T])[:, :N_POSE].reshape(-1, 14, 2)
    try:
        from trainer import plots
    except ImportError:
        return
    rows = {f"generated ({s.name}, held out)": pred, "ground truth": d.poses[:T]}
    plots.stick_strip(rows, run / "plots" / "strip.png", n=12)
    if gif_frames > 0:
        plots.animate_gif(rows, run / "plots" / "val.gif", max_frames=min(T, gif_frames))
