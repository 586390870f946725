"""The training configuration: one flat, explicit dataclass; overrides from JSON or INI files
(`configs/*.json`, `configs/*.ini`) and `--set key=value`; unknown keys are an error."""
from __future__ import annotations

import configparser
import dataclasses
import json
import os
import pathlib

from trainer.model import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # --- data ---
    data_root: str = ""
    """Music-to-Dance folder (DANCE_*/); empty = the EDGEDANCE_DATA environment variable."""
    cache_dir: str = "cache"
    """Where extracted features are cached (keyed by the feature-config hash)."""
    val_fraction: float = 0.2
    """Share of dances held out for validation (split by dance, stratified by style)."""
    split_seed: int = 0
    """Seed of the train/validation split."""
    max_dances: int = 0
    """Use only the first N dances (0 = all); for quick experiments."""
    # --- model (copied into ModelConfig) ---
    kind: str = "ours"
    """'ours', or a paper baseline: 'cnn', 'am', 'sa'."""
    layers: int = 3
    """Encoder LSTM layers (conv layers for cnn, blocks for sa)."""
    units: int = 256
    """Encoder width."""
    lookback: int = 15
    """Encoder states the causal attention sees."""
    attention: bool = True
    """Attention over the last `lookback` encoder states."""
    feedback: bool = True
    """Previous-pose feedback into the decoder (scheduled sampling)."""
    dec_units: int = 256
    """Decoder LSTM cell units."""
    skip_features: bool = True
    """Feed the normalised music features straight to the decoder too (beat/bar phase)."""
    output_gain: bool = True
    """Calibrated output gain about the mean pose (fitted on training dances after training)."""
    max_gain: float = 4.0
    """Upper bound of that gain."""
    smooth: bool = True
    """Causal one-pole low-pass on the output pose, its coefficient fitted with the gain."""
    smooth2: bool = True
    """A second pole for that low-pass (ModelConfig.smooth2), fitted with it (it may stay off)."""
    posture: bool = True
    """The gain amplifies the motion about the model's running posture, not about the mean pose
    (ModelConfig.posture); its time constant and the posture's own gain are fitted with the gain."""
    noise_dims: int = 0
    """Slowly varying noise input size (0 = none)."""
    noise_smooth_frames: float = 25.0
    """Time constant of the noise, frames (25 = 1 s)."""
    dropout: float = 0.1
    """Dropout (encoder outputs, decoder input)."""
    state_noise: float = 0.0
    """Gaussian noise on the decoder LSTM's h and c while training (ModelConfig.state_noise)."""
    heads: int = 4
    """Attention heads (sa baseline)."""
    # --- optimisation ---
    chunk_frames: int = 250
    """Training sequence length in frames (250 = 10 s); random offsets each epoch."""
    batch_size: int = 16
    """Chunks per step."""
    lr: float = 2e-3
    """Adam learning rate (cosine-decayed to lr_final over `epochs`)."""
    lr_final: float = 2e-4
    """Learning rate at the last epoch."""
    clipnorm: float = 1.0
    """Gradient norm clip."""
    epochs: int = 60
    """Maximum epochs (the wall-clock budget may stop earlier)."""
    minutes: float = 35.0
    """Hard budget for training, minutes (checked after every step), on the `budget_clock`."""
    budget_clock: str = "wall"
    """What `minutes` counts: 'wall' (elapsed training time) or 'cpu' (the process's CPU time:
    fair between runs on a shared machine; the experiment suites use it with threads=1)."""
    patience: int = 12
    """Early stopping: epochs without a better validation score (counted after annealing)."""
    seed: int = 0
    """Seed of initialisation, chunk offsets and teacher-forcing masks."""
    init_from: str = ""
    """A run folder to start from instead of a random initialisation (fine-tuning, e.g. on new
    dances): its model.weights.h5, the same architecture, its fitted output stage off."""
    threads: int = 2
    """TensorFlow intra-op threads (inter-op is 1); the machine has 2 cores."""
    # --- losses ---
    w_pose: float = 1.0
    """Weight of the pose MSE (scaled by 1/pose variance, so 1.0 = the mean pose's error)."""
    w_vel: float = 0.1
    """Weight of the velocity MSE (frame differences vs ground truth), scaled by 1/vel variance."""
    w_acc: float = 0.1
    """Weight of the acceleration penalty: mean squared second difference, relative to ground truth's."""
    w_energy: float = 0.5
    """Weight of the motion-energy loss: (log mean speed generated - log mean speed ground truth)^2."""
    energy_stat: str = "mean_abs"
    """What the energy loss compares per chunk: 'mean_abs' (mean |velocity| per coordinate) or
    'std' (std of joint speed over time and keypoints, as trainer.evaluate's energy)."""
    w_heading: float = 0.1
    """Weight of the heading-change MSE (in units of its training std)."""
    w_posture: float = 0.0
    """Weight of the posture loss: each training chunk's mean pose against the dancer's, squared,
    in units of the pose variance (the stance of the style; the pose MSE holds it with weight 1)."""
    # --- scheduled sampling (feedback only) ---
    ss_start: float = 1.0
    """Teacher-forcing probability at epoch 0."""
    ss_end: float = 0.0
    """Teacher-forcing probability after annealing."""
    ss_epochs: int = 20
    """Epochs over which the probability falls linearly from ss_start to ss_end."""
    # --- validation ---
    val_every: int = 1
    """Validate (free-running on the held-out dances) every N epochs."""
    val_max_frames: int = 1500
    """Frames per held-out dance used for per-epoch validation (0 = whole dance)."""
    selection: str = "raw"
    """Which epoch is kept (trainer.train.validate): 'raw' scores the output as trained (the shipped
    model's rule); 'calibrated' scores it after a low-pass and gain fitted to that epoch's output
    (what ships). 'calibrated' ranks epochs by how well their amplified motion lines up with the
    dancer's, which varies a lot from epoch to epoch: in a full default run it kept epoch 2 (energy
    0.72, diversity 0.58 of ground truth), so it is not the default (docs/results/training.md)."""

    eval_baselines: bool = True
    """Also evaluate the mean-pose and other-song baselines on the held-out dances (metrics.json)."""
    gif_frames: int = 250
    """Frames of the held-out generated-vs-ground-truth GIF in plots/ (0 = no GIF)."""

    def model_config(self) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def resolved_data_root(self) -> str:
        return self.data_root or os.environ.get("EDGEDANCE_DATA", "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value, source: str):
    """Convert a value (string from INI/--set, or JSON) to the field's type."""
    default = FIELDS[key].default
    typ = type(default)
    try:
        if isinstance(value, str) and typ is not str:
            v = value.strip()
            if typ is bool:
                if v.lower() in ("1", "true", "yes", "on"):
                    return True
                if v.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"not a boolean: {value!r}")
            return typ(float(v)) if typ is int and "." in v else typ(v)
        if typ is bool and not isinstance(value, bool):
            raise ValueError(f"not a boolean: {value!r}")
        if typ is float and isinstance(value, int):
            return float(value)
        if typ is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, typ):
            raise ValueError(f"expected {typ.__name__}, got {type(value).__name__}")
        return value
    except ValueError as e:
        raise ValueError(f"{source}: bad value for {key!r} ({value!r}): {e}") from e


def apply_overrides(cfg: TrainConfig, overrides: dict, source: str) -> TrainConfig:
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown training-config key(s) {unknown}; "
                         f"see trainer/config.py for the known keys")
    new = {k: _coerce(k, v, source) for k, v in overrides.items()}
    cfg = dataclasses.replace(cfg, **new)
    cfg.model_config()  # validates the model fields
    for key, allowed in (("energy_stat", ("mean_abs", "std")), ("budget_clock", ("wall", "cpu")),
                         ("selection", ("calibrated", "raw"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{source}: {key}={getattr(cfg, key)!r}: choose one of {list(allowed)}")
    return cfg


def load_file(path) -> dict:
    """Overrides from a JSON object or an INI file (keys in [train] or the default section)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a JSON object of key: value")
        d.pop("_comment", None)
        return d
    cp = configparser.ConfigParser()
    try:
        cp.read_string(text if text.lstrip().startswith("[") else "[train]\n" + text)
    except configparser.Error as e:
        raise ValueError(f"{p}: not a valid INI file: {e}") from e
    out = dict(cp.defaults())
    for sect in cp.sections():
        if sect != "train":
            raise ValueError(f"{p}: unknown section [{sect}]; put keys under [train]")
        out.update({k: v for k, v in cp.items(sect)})
    return out


def parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets or []:
        if "=" not in s:
            raise ValueError(f"--set {s!r}: expected key=value")
        k, v = s.split("=", 1)
        out[k.strip()] = v
    return out


def build_config(config_files=(), sets=(), base: TrainConfig | None = None) -> TrainConfig:
    cfg = base or TrainConfig()
    for f in config_files or ():
        cfg = apply_overrides(cfg, load_file(f), str(f))
    return apply_overrides(cfg, parse_sets(list(sets or ())), "--set")


def from_dict(d: dict, source: str = "train config") -> TrainConfig:
    return apply_overrides(TrainConfig(), d, source)
