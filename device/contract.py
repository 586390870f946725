"""The audio and pose contract shared by trainer, converter and device.

Everything that must agree between the cloud (training) and the Pi (inference)
lives here: the feature configuration, its stable hash, and the pose layout.
A model bundle carries `FeatureConfig.to_dict()`; the device rebuilds it with
`FeatureConfig.from_dict()` and refuses a bundle whose hash differs from its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json


def exact_div(x: int, y: int) -> int:
    assert x % y == 0, f"{x} is not a multiple of {y}"
    return x // y


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """What the model hears. Change a field and every trained model is invalid."""

    sample_rate_hz: int = 16000
    """The frontend's input rate; audio at 22.05/44.1/48 kHz is resampled to this first."""
    n_fft: int = 512
    """FFT size and analysis window length in samples (32 ms at 16 kHz)."""
    hop_length: int = 160
    """Samples between analysis frames (10 ms at 16 kHz): the beat tracker's rate."""
    n_mels: int = 40
    """Mel bands (HTK Mel scale, triangular filters)."""
    fmin_hz: float = 30.0
    """Lower edge of the lowest Mel band."""
    fmax_hz: float = 8000.0
    """Upper edge of the highest Mel band (Nyquist at 16 kHz)."""
    log_frac_bits: int = 8
    """log-Mel output is dB re full scale in Q7.8: int16 value / 2**8 = dB."""
    floor_db: float = -100.0
    """log-Mel floor (silence), dB re full scale."""
    pose_fps: int = 25
    """Pose (and model) frame rate: 40 ms per frame, 4 hops at 10 ms."""
    min_bpm: float = 60.0
    """Slowest tempo the beat tracker considers."""
    max_bpm: float = 200.0
    """Fastest tempo the beat tracker considers."""
    tempo_window_s: float = 8.0
    """Seconds of onset history the tempo estimate looks at."""
    version: int = 1
    """Bumped when an algorithm changes behind unchanged numbers."""

    def __post_init__(self):
        assert self.n_fft & (self.n_fft - 1) == 0, "n_fft must be a power of two"
        assert 0 < self.hop_length <= self.n_fft
        assert 0 <= self.fmin_hz < self.fmax_hz <= self.sample_rate_hz / 2
        exact_div(self.sample_rate_hz, self.pose_fps)
        exact_div(self.samples_per_pose_frame, self.hop_length)

    @property
    def hop_s(self) -> float:
        return self.hop_length / self.sample_rate_hz  # 0.01 s

    @property
    def frame_rate_hz(self) -> float:
        return self.sample_rate_hz / self.hop_length  # 100 analysis frames per second

    @property
    def samples_per_pose_frame(self) -> int:
        return self.sample_rate_hz // self.pose_fps  # 640 samples = 40 ms

    @property
    def hops_per_pose_frame(self) -> int:
        return exact_div(self.samples_per_pose_frame, self.hop_length)  # 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "feature config") -> "FeatureConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown feature-config key(s) {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**d)
        except (TypeError, AssertionError) as e:
            raise ValueError(f"{source}: invalid feature config {d}: {e}") from e

    def config_hash(self) -> str:
        """A stable 16-hex-digit hash of every field (sorted JSON, SHA-256)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_FEATURES = FeatureConfig()

# OpenPose BODY-14 order: the pose contract (T, 14, 2), body frame, root-relative, in [-1, 1].
KEYPOINTS = (
    "head", "neck",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
)
N_KEYPOINTS = len(KEYPOINTS)  # 14
KP = {name: i for i, name in enumerate(KEYPOINTS)}

# Bones for drawing a stick figure (index pairs into KEYPOINTS).
BONES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7),
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (8, 11),
)
