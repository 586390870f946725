"""Frontend benchmark: fixed-point log-Mel vs librosa's float Mel, CPU and dB error.

    python -m bench.frontend [--songs 4] [--seconds 60] [--timing-seconds 30]

CPU time (time.process_time) per second of audio, side by side in one run:
- ours streaming: one hop (160 samples) per call, and the device's 640-sample chunks;
- ours batch: `log_mel` on the whole signal;
- librosa streaming: `melspectrogram` + `power_to_db` on one 512-sample frame per call;
- librosa batch: the same on the whole signal (center=False, same n_fft/hop/Mel parameters).
dB error of the fixed-point frontend vs the float64 reference (device.frontend_ref) over bins
above -80 dBFS, on 60 s of each of a few real songs when EDGEDANCE_DATA is set.
"""
from __future__ import annotations

from bench import write_section
import argparse
import logging
import os
import pathlib
import sys
import time

import numpy as np

from device.contract import DEFAULT_FEATURES
from device.frontend import Frontend, log_mel
from device.frontend_ref import log_mel_ref

log = logging.getLogger(__name__)
REPO = pathlib.Path(__file__).resolve().parent.parent
CFG = DEFAULT_FEATURES
SONGS = ("DANCE_C_2", "DANCE_R_3", "DANCE_T_5", "DANCE_W_1", "DANCE_W_11")  # every style


def read_excerpt(path: pathlib.Path, start_s: float, seconds: float) -> np.ndarray:
    """int16 mono at the contract rate, `seconds` from `start_s` (or the song's start if it is short)."""
    import soundfile as sf

    from device.audio import resample, to_pcm16
    with sf.SoundFile(str(path)) as f:
        start = int(start_s * f.samplerate)
        if start + seconds * f.samplerate > f.frames:
            start = 0
        f.seek(start)
        x = f.read(int(seconds * f.samplerate), dtype="float32", always_2d=True).mean(axis=1)
        return to_pcm16(resample(x, f.samplerate, CFG.sample_rate_hz))


def synth(seconds: float, seed: int = 0) -> np.ndarray:
    """Music-like test audio: a drum-ish pulse, two tones with vibrato and noise, about -20 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * CFG.sample_rate_hz)) / CFG.sample_rate_hz
    pulse = np.exp(-30 * (t % 0.5)) * rng.standard_normal(len(t))
    tones = np.sin(2 * np.pi * 220 * t + 2 * np.sin(2 * np.pi * 5 * t)) + 0.5 * np.sin(2 * np.pi * 1320 * t)
    return np.round(np.clip(0.1 * (pulse + tones), -1, 1) * 32767).astype(np.int16)


def cpu_ms_per_s(fn, seconds_of_audio: float, min_cpu_s: float = 1.0) -> float:
    """CPU ms per second of audio; repeats fn until it has used at least min_cpu_s."""
    fn()  # warm up (caches, imports)
    reps, t0 = 0, time.process_time()
    while True:
        fn()
        reps += 1
        used = time.process_time() - t0
        if used >= min_cpu_s:
            return 1e3 * used / (reps * seconds_of_audio)


def librosa_mel_db(y: np.ndarray) -> np.ndarray:
    import librosa
    s = librosa.feature.melspectrogram(y=y, sr=CFG.sample_rate_hz, n_fft=CFG.n_fft, hop_length=CFG.hop_length,
                                       window="hann", center=False, power=2.0, n_mels=CFG.n_mels,
                                       fmin=CFG.fmin_hz, fmax=CFG.fmax_hz, htk=True, norm=None)
    return librosa.power_to_db(s, ref=(CFG.n_fft / 4) ** 2, amin=1e-10 * (CFG.n_fft / 4) ** 2, top_db=None)


def timing(pcm: np.ndarray) -> dict[str, float]:
    seconds = len(pcm) / CFG.sample_rate_hz
    hop = CFG.hop_length
    chunk = CFG.samples_per_pose_frame  # 640
    n_frames = len(pcm) // hop
    y = pcm.astype(np.float32) / 32768.0
    y_padded = np.concatenate([np.zeros(CFG.n_fft - hop, np.float32), y])  # the causal framing
    fe = Frontend()

    def ours_stream(step):
        def run():
            fe.reset()
            for i in range(0, len(pcm), step):
                fe.process(pcm[i: i + step])
        return run

    def librosa_stream():
        for i in range(n_frames):
            librosa_mel_db(y_padded[i * hop: i * hop + CFG.n_fft])

    return {
        "ours_hop": cpu_ms_per_s(ours_stream(hop), seconds),
        "ours_640": cpu_ms_per_s(ours_stream(chunk), seconds),
        "ours_batch": cpu_ms_per_s(lambda: log_mel(pcm), seconds),
        "librosa_hop": cpu_ms_per_s(librosa_stream, seconds),
        "librosa_batch": cpu_ms_per_s(lambda: librosa_mel_db(y_padded), seconds),
    }


def errors(pcm: np.ndarray) -> dict[str, float]:
    fixed = log_mel(pcm).astype(np.float64) / 256.0
    ref = log_mel_ref(pcm, CFG)
    mask = ref > -80.0
    e = np.abs(fixed - ref)[mask]
    return {"mean": float(e.mean()), "p99": float(np.percentile(e, 99)), "max": float(e.max()),
            "bins": int(mask.sum()), "share": float(mask.mean())}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--songs", type=int, default=4, help="real songs for the error table (3-5 keeps it bounded)")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of each song for the error table")
    ap.add_argument("--timing-seconds", type=float, default=30.0, help="seconds of audio the CPU timing runs on")
    ap.add_argument("--out", default=str(REPO / "docs" / "bench" / "frontend.md"))
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])

    data = os.environ.get("EDGEDANCE_DATA")
    songs = []
    if data:
        for name in SONGS[: args.songs]:
            path = pathlib.Path(data) / name / "audio.mp3"
            log.info("reading %s", path)
            songs.append((name, read_excerpt(path, 30.0, args.seconds)))
    timing_pcm = songs[0][1][: int(args.timing_seconds * CFG.sample_rate_hz)] if songs else synth(args.timing_seconds)
    timing_src = f"{songs[0][0]}, {args.timing_seconds:.0f} s" if songs else f"synthesized, {args.timing_seconds:.0f} s"

    log.info("timing on %s", timing_src)
    t = timing(timing_pcm)
    lines = [
        "## Frontend: fixed-point log-Mel",
        "",
        f"Command: `python -m bench.frontend` (also run by `python -m bench.run`). Config: {CFG.sample_rate_hz} Hz, "
        f"n_fft {CFG.n_fft}, hop {CFG.hop_length}, {CFG.n_mels} HTK Mel bands {CFG.fmin_hz:g}-{CFG.fmax_hz:g} Hz, "
        f"config hash {CFG.config_hash()}.",
        "",
        f"CPU time per second of audio (time.process_time, one core, audio: {timing_src}); "
        "librosa: `melspectrogram(center=False, htk=True, norm=None)` + `power_to_db`, float32 input.",
        "",
        "| mode | edgedance fixed-point (ms/s) | librosa float (ms/s) | librosa / ours | x real time (ours) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| streaming, one hop (160 samples) per call | {t['ours_hop']:.2f} | {t['librosa_hop']:.2f} | "
        f"{t['librosa_hop'] / t['ours_hop']:.1f}x | {1000 / t['ours_hop']:.0f} |",
        f"| streaming, 640-sample chunks (the device) | {t['ours_640']:.2f} | {t['librosa_hop']:.2f} (per hop) | "
        f"{t['librosa_hop'] / t['ours_640']:.1f}x | {1000 / t['ours_640']:.0f} |",
        f"| batch, whole signal | {t['ours_batch']:.2f} | {t['librosa_batch']:.2f} | "
        f"{t['librosa_batch'] / t['ours_batch']:.2f}x | {1000 / t['ours_batch']:.0f} |",
        "",
        "Targets: streaming CPU at least 3x lower than librosa's streaming "
        f"({'met' if t['librosa_hop'] / t['ours_hop'] >= 3 else 'NOT met'} one hop per call, "
        f"{'met' if t['librosa_hop'] / t['ours_640'] >= 3 else 'NOT met'} in 640-sample chunks); "
        "aim for about 3 ms per second of audio or less in 640-sample chunks, so that the whole DSP path "
        f"(frontend + beat + features) runs 100x faster than real time ({'met' if t['ours_640'] <= 3 else 'not reached'}: "
        f"{t['ours_640']:.1f} ms, leaving {10 - t['ours_640']:.1f} ms per second of audio for beat + features).",
        "",
    ]
    if songs:
        lines += [
            f"dB error of the fixed-point frontend vs the float64 reference (device.frontend_ref), bins above -80 dBFS, "
            f"{args.seconds:.0f} s of each song (from 0:30). Target: mean <= 0.5 dB (TFLite-Micro's frontend: about 0.35 dB).",
            "",
            "| song | mean abs (dB) | p99 (dB) | max (dB) | bins above -80 dBFS |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        all_e = []
        for name, pcm in songs:
            e = errors(pcm)
            all_e.append(e)
            lines.append(f"| {name} | {e['mean']:.4f} | {e['p99']:.4f} | {e['max']:.4f} | {e['bins']} ({100 * e['share']:.0f} %) |")
        w = np.array([e["bins"] for e in all_e], dtype=float)
        mean = float(np.sum([e["mean"] for e in all_e] * w) / w.sum())
        lines += [f"| all | {mean:.4f} | {max(e['p99'] for e in all_e):.4f} | {max(e['max'] for e in all_e):.4f} | {int(w.sum())} |", ""]
    else:
        e = errors(synth(args.seconds, seed=1))
        lines += ["EDGEDANCE_DATA is unset: the dB error is on synthesized audio only "
                  f"(mean {e['mean']:.4f} dB, p99 {e['p99']:.4f} dB, max {e['max']:.4f} dB over bins above -80 dBFS).", ""]
    return write_section("\n".join(lines), args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(main())
