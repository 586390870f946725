"""Model input at the pose rate (25 fps): pooled log-Mel + beat features, causal.

Pose frame t covers samples [t * 640, (t + 1) * 640) = hops 4t .. 4t + 3 and uses audio up
to (t + 1) * 640 only. Per frame:

    pcm int16 ─► device.frontend (4 hops of Q7.8 log-Mel) ─► device.beat (per hop)
              ─► pool the 4 hops ─► x (F,) float32 by the fixed affine maps below

Every column of x is a fixed affine map of a causal quantity, clipped to [-1, 1], so an int8
model can take x with one fixed quantization (scale 1/127). The maps (x = (raw - offset) / scale):

| columns | raw quantity | offset | scale | raw range -> x |
| --- | --- | --- | --- | --- |
| mel_00 .. mel_39 | mean of the 4 hops' Q7.8 log-Mel in dB (int / 256), minus the running loudness R | 0 | 40 dB | R -40 dB .. R +40 dB -> -1 .. 1 |
| onset | max over the 4 hops of the normalized onset strength (standard deviations) | 2 | 2 | 0 .. 4 sd -> -1 .. 1 |
| beat_sin, beat_cos | sin, cos of 2 pi * beat phase | 0 | 1 | |
| bar_sin, bar_cos | sin, cos of 2 pi * bar phase | 0 | 1 | |
| tempo | log2(bpm / 110), 0 while unknown | 0 | 1 | 55 .. 220 BPM -> -1 .. 1 |
| beat | 1 if a beat falls in the frame, else 0 | 0 | 1 | {0, 1} |
| meter | beats per bar (3 or 4), 3.5 while unknown | 3.5 | 0.5 | 3 -> -1, 4 -> 1, unknown -> 0 |

R, the running loudness, makes the Mel level-invariant (microphone gain is unknown): the
frame loudness L_t = mean over bands of the pooled dB; R is its exponential mean with time
constant `LOUDNESS_S` seconds, bias-corrected (R is the plain mean of what was heard while
fewer than LOUDNESS_S seconds have passed), updated only on frames louder than
`cfg.floor_db + SILENCE_DB` (digital silence does not drag it down).

`FeatureExtractor(cfg).process(pcm chunk)` streams; `extract(pcm)` runs the very same code on
a whole signal, so both are identical for any chunking.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from device.audio import load_file
from device.beat import BeatTracker
from device.contract import DEFAULT_FEATURES, FeatureConfig
from device.frontend import Frontend

LOUDNESS_S = 5.0  # time constant of the running loudness R (seconds)
SILENCE_DB = 10.0  # frames whose loudness is below floor_db + 10 dB do not update R
TEMPO_REF_BPM = 110.0

_BEAT_NAMES = ("onset", "beat_sin", "beat_cos", "bar_sin", "bar_cos", "tempo", "beat", "meter")


def feature_names(cfg: FeatureConfig = DEFAULT_FEATURES) -> tuple[str, ...]:
    return tuple(f"mel_{i:02d}" for i in range(cfg.n_mels)) + _BEAT_NAMES


FEATURE_NAMES = feature_names(DEFAULT_FEATURES)  # 48 names for the default config


def n_features(cfg: FeatureConfig = DEFAULT_FEATURES) -> int:
    return cfg.n_mels + len(_BEAT_NAMES)  # 48


# x = clip((raw - offset) / scale, -1, 1); "mel" applies to every mel_* column.
FEATURE_SCALE = {
    "mel": (0.0, 40.0),
    "onset": (2.0, 2.0),
    "beat_sin": (0.0, 1.0),
    "beat_cos": (0.0, 1.0),
    "bar_sin": (0.0, 1.0),
    "bar_cos": (0.0, 1.0),
    "tempo": (0.0, 1.0),
    "beat": (0.0, 1.0),
    "meter": (3.5, 0.5),
}


@dataclasses.dataclass
class FeatureFrames:
    """T pose frames of model input and the beat state behind it."""

    x: np.ndarray             # (T, F) float32 model input, every column in [-1, 1]
    bpm: np.ndarray           # (T,) float32, 0 while unknown
    phase: np.ndarray         # (T,) float32 beat phase in [0, 1) at the end of the frame
    bar_phase: np.ndarray     # (T,) float32 bar phase in [0, 1)
    meter: np.ndarray         # (T,) int8: 3, 4, 0 while unknown
    onset: np.ndarray         # (T,) float32 max normalized onset strength over the frame's hops
    is_beat: np.ndarray       # (T,) bool
    next_beat_in: np.ndarray  # (T,) float32 seconds from the end of the frame to the next beat
    beat_times: np.ndarray    # (n_beats,) float64 seconds, the tracker's beats in these frames
    mel: np.ndarray           # (T, n_mels) float32 pooled log-Mel, dB re full scale

    def __len__(self) -> int:
        return self.x.shape[0]

    @classmethod
    def empty(cls, cfg: FeatureConfig = DEFAULT_FEATURES) -> "FeatureFrames":
        z = np.zeros(0, np.float32)
        return cls(np.zeros((0, n_features(cfg)), np.float32), z, z.copy(), z.copy(), np.zeros(0, np.int8),
                   z.copy(), np.zeros(0, bool), z.copy(), np.zeros(0, np.float64),
                   np.zeros((0, cfg.n_mels), np.float32))

    @staticmethod
    def concat(parts: list["FeatureFrames"]) -> "FeatureFrames":
        assert parts, "concat needs at least one FeatureFrames"
        return FeatureFrames(*[np.concatenate([getattr(p, f.name) for p in parts])
                               for f in dataclasses.fields(FeatureFrames)])


class FeatureExtractor:
    """Streaming: PCM chunks of any length in, the pose frames they complete out."""

    def __init__(self, cfg: FeatureConfig = DEFAULT_FEATURES):
        self.cfg = cfg
        self.hops = cfg.hops_per_pose_frame  # 4
        self.frontend = Frontend(cfg)
        self.tracker = BeatTracker(cfg)
        self.loud_a = 1.0 / (LOUDNESS_S * cfg.pose_fps)
        self.silence_db = cfg.floor_db + SILENCE_DB
        self.n_feat = n_features(cfg)
        self.q78_mean = 1.0 / (self.hops * (1 << cfg.log_frac_bits))  # sum of 4 Q7.8 values -> mean dB
        self.beat_scale = [FEATURE_SCALE[name] for name in _BEAT_NAMES]
        self.mel_off, self.mel_inv_scale = FEATURE_SCALE["mel"][0], 1.0 / FEATURE_SCALE["mel"][1]
        self.inv_mels = 1.0 / cfg.n_mels
        self.reset()

    def reset(self) -> None:
        self.frontend.reset()
        self.tracker.reset()
        self.hop_in_frame = 0  # hops of the current pose frame seen so far
        self.mel_sum = np.zeros(self.cfg.n_mels)  # (n_mels,) sum of its hops' Q7.8 values
        self.onset_max = 0.0
        self.any_beat = False
        self.loud_sum = 0.0  # bias-corrected EMA: R = loud_sum / loud_weight
        self.loud_weight = 0.0

    def process(self, pcm: np.ndarray) -> FeatureFrames:
        mel = self.frontend.process(pcm)  # (k, n_mels) int16
        k = mel.shape[0]
        n = (self.hop_in_frame + k) // self.hops  # pose frames completed by this chunk
        if n == 0 and k == 0:
            return FeatureFrames.empty(self.cfg)
        m = self.cfg.n_mels
        x = np.empty((n, self.n_feat), np.float32)
        pooled = np.empty((n, m), np.float32)
        cols = np.empty((5, n), np.float32)  # bpm, phase, bar_phase, onset, next_beat_in
        meters = np.empty(n, np.int8)
        is_beat = np.empty(n, bool)
        beats = []
        mel64 = mel.astype(np.float64)
        i = j = 0
        while j < k:  # the hops of the current pose frame that this chunk holds
            part = mel64[j: j + self.hops - self.hop_in_frame]
            onsets, raised = self.tracker.advance(part)
            self.mel_sum += part.sum(axis=0)  # integers: exact in any order
            self.onset_max = max(self.onset_max, *onsets)
            if raised:
                self.any_beat = True
                beats += raised
            self.hop_in_frame += len(part)
            j += len(part)
            if self.hop_in_frame == self.hops:
                bpm, ph, bar, meter, nxt = self.tracker.state()
                cols[:, i] = (bpm, ph, bar, self.onset_max, nxt)
                meters[i], is_beat[i] = meter, self.any_beat
                self._frame(x[i], pooled[i], bpm, ph, bar, meter)
                self.hop_in_frame = 0
                self.mel_sum[:] = 0.0
                self.onset_max = 0.0
                self.any_beat = False
                i += 1
        assert i == n
        return FeatureFrames(x, cols[0], cols[1], cols[2], meters, cols[3], is_beat, cols[4],
                             np.asarray(beats, np.float64), pooled)

    def _frame(self, x: np.ndarray, pooled: np.ndarray, bpm: float, ph: float, bar: float, meter: int) -> None:
        """Fill one row of x (F,) and of the pooled Mel (n_mels,) from the finished frame."""
        m = self.cfg.n_mels
        mel_db = self.mel_sum * self.q78_mean  # (n_mels,) mean of the hops, dB
        pooled[:] = mel_db
        loud = float(mel_db.sum()) * self.inv_mels
        if loud > self.silence_db:
            self.loud_sum = (1 - self.loud_a) * self.loud_sum + self.loud_a * loud
            self.loud_weight = (1 - self.loud_a) * self.loud_weight + self.loud_a
        ref = self.loud_sum / self.loud_weight if self.loud_weight > 0 else loud
        mel_db -= ref + self.mel_off
        mel_db *= self.mel_inv_scale
        np.maximum(mel_db, -1.0, out=mel_db)  # clip to [-1, 1]
        np.minimum(mel_db, 1.0, out=mel_db)
        x[:m] = mel_db
        raw = (self.onset_max,
               math.sin(2 * math.pi * ph), math.cos(2 * math.pi * ph),
               math.sin(2 * math.pi * bar), math.cos(2 * math.pi * bar),
               math.log2(bpm / TEMPO_REF_BPM) if bpm > 0 else 0.0,
               1.0 if self.any_beat else 0.0,
               float(meter) if meter > 0 else 3.5)
        x[m:] = [min(1.0, max(-1.0, (v - off) / sc)) for v, (off, sc) in zip(raw, self.beat_scale)]


def extract(pcm: np.ndarray, cfg: FeatureConfig = DEFAULT_FEATURES) -> FeatureFrames:
    """A whole int16 signal -> its FeatureFrames (T = len(pcm) // 640): the streaming code, one chunk."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1 or pcm.dtype != np.int16:
        raise ValueError(f"features.extract wants 1-D int16 PCM at {cfg.sample_rate_hz} Hz, "
                         f"got {pcm.dtype} {pcm.shape}; convert with device.audio.to_pcm16")
    return FeatureExtractor(cfg).process(pcm)


def extract_file(path: str | os.PathLike, cfg: FeatureConfig = DEFAULT_FEATURES) -> FeatureFrames:
    """Decode an audio file (device.audio.load_file; AudioError names a bad file) and extract."""
    return extract(load_file(path, cfg), cfg)
