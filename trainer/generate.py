"""Keras-side generation: an audio file -> poses (T, 14, 2) at the model's frame rate, free
running (the model feeds back its own poses), with the heading integrated from its changes."""
from __future__ import annotations

import logging
import pathlib

import numpy as np

from trainer.model import N_POSE, load_run, make_noise, run_free

log = logging.getLogger(__name__)

DEFAULT_MODEL = pathlib.Path(__file__).resolve().parent.parent / "models" / "default" / "keras"


class Generator:
    """Holds a loaded model; `poses_for_pcm` and `poses_for_file` generate with it."""

    def __init__(self, model_dir=None, seed: int = 0):
        self.model_dir = pathlib.Path(model_dir) if model_dir else DEFAULT_MODEL
        self.model, self.mcfg, self.fcfg, self.norm = load_run(self.model_dir)
        self.seed = seed

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        noise = None
        if self.mcfg.kind == "ours" and self.mcfg.noise_dims:
            noise = make_noise(len(x), self.mcfg.noise_dims, np.random.default_rng(self.seed))
        out = run_free(self.model, self.mcfg, x, noise)
        poses = out[:, :N_POSE].reshape(-1, 14, 2)
        heading = np.cumsum(out[:, N_POSE]).astype(np.float32)
        return poses.astype(np.float32), heading

    def features(self, pcm: np.ndarray):
        from device import features

        return features.extract(pcm, self.fcfg)

    def poses_for_pcm(self, pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int16 PCM at the feature config's rate -> (poses (T, 14, 2), heading (T,))."""
        ff = self.features(pcm)
        if len(ff.x) == 0:
            raise ValueError(f"audio too short: {len(pcm)} samples give no pose frame")
        return self._run(np.asarray(ff.x, np.float32))

    def poses_for_file(self, path) -> tuple[np.ndarray, np.ndarray]:
        from device.audio import load_file

        return self.poses_for_pcm(load_file(path, self.fcfg))


def generate_file(audio_path, out_path, model_dir=None, heading_out=None, seed: int = 0) -> np.ndarray:
    gen = Generator(model_dir, seed=seed)
    poses, heading = gen.poses_for_file(audio_path)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, poses)
    if heading_out:
        np.save(heading_out, heading)
    return poses
