"""`python -m device selftest`: the on-device test harness, run on the Pi after install.

One line per check, `PASS`, `FAIL` or `SKIP`, and exit code 1 if anything failed:

- frontend: the golden vectors (the repository's tests/golden/frontend_seed1234.npy, by
  SHA-256) reproduced bit-exactly, in one call and streamed in odd-sized chunks;
- bundle: the configured bundle loads (manifest, SHA-256, feature hash) and reproduces its
  golden output (`golden.npz` written beside the model by `write_bundle_golden` at
  conversion time), or, for a bundle without one, runs deterministically and in range;
- broker: a round trip through the configured broker (CONNACK with the configured
  credentials, SUBACK for the device's cmd topic, PUBACK, and a full loopback when the ACL
  lets the device read its own topics), or through a private Mosquitto when none is
  configured and `mosquitto` is installed;
- microphone: when the audio source is `mic`, the configured device opens and delivers audio;
- realtime: a few seconds of a synthesized song through the whole pipeline at real-time
  pace: latency (capture -> hand-off) p99, CPU per second of audio, dropped frames.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import pathlib
import shutil
import tempfile
import threading
import time

import numpy as np

from device.contract import DEFAULT_FEATURES, FeatureConfig

log = logging.getLogger(__name__)

# SHA-256 of log_mel(golden_signal()) as little-endian int16, shape (50, 40): the content of
# tests/golden/frontend_seed1234.npy (tests/test_selftest.py keeps the two in step).
FRONTEND_GOLDEN_SHA256 = "4d0ef3a6c1df03fc3b7143503a42147ffdaa26ec5151b9623cf902ad15e331db"
FRONTEND_GOLDEN_SHAPE = (50, 40)
BUNDLE_GOLDEN = "golden.npz"
GOLDEN_FRAMES = 100


@dataclasses.dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def golden_signal(cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """0.5 s: two tones, a chirp and noise at moderate level, seed 1234 (as tests/test_frontend.py)."""
    rng = np.random.default_rng(1234)
    t = np.arange(8000) / cfg.sample_rate_hz
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)
         + 0.1 * np.sin(2 * np.pi * (100 + 4000 * t) * t) + 0.02 * rng.standard_normal(len(t)))
    return np.round(x * 32767).astype(np.int16)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).astype("<i2").tobytes()).hexdigest()


def check_frontend(cfg: FeatureConfig = DEFAULT_FEATURES) -> Result:
    from device.frontend import Frontend, log_mel
    x = golden_signal(cfg)
    batch = log_mel(x, cfg)
    fe = Frontend(cfg)
    parts, i, sizes = [], 0, (1, 159, 161, 333, 7, 1000)
    while i < len(x):
        n = sizes[len(parts) % len(sizes)]
        parts.append(fe.process(x[i:i + n]))
        i += n
    stream = np.concatenate(parts)
    if batch.shape != FRONTEND_GOLDEN_SHAPE:
        return Result("frontend", "FAIL", f"golden vectors have shape {batch.shape}, expected {FRONTEND_GOLDEN_SHAPE}")
    if _sha(batch) != FRONTEND_GOLDEN_SHA256:
        return Result("frontend", "FAIL", f"golden vectors differ (sha256 {_sha(batch)[:12]}.. vs "
                      f"{FRONTEND_GOLDEN_SHA256[:12]}..): this build computes other features than the one the "
                      "model was trained with")
    if not np.array_equal(stream, batch):
        return Result("frontend", "FAIL", f"streaming differs from batch in {int((stream != batch).sum())} values")
    return Result("frontend", "PASS", f"{batch.shape[0]} golden frames bit-exact, streaming == batch")


def _golden_features(n_features: int, frames: int = GOLDEN_FRAMES) -> np.ndarray:
    """Deterministic (T, F) features in the model's input range [-1, 1] (no RNG: same on every platform)."""
    t = np.arange(frames, dtype=np.float64)[:, None]
    j = np.arange(n_features, dtype=np.float64)[None, :]
    return (0.8 * np.sin(2 * np.pi * t / 12.5 + 0.7 * j) * np.cos(0.05 * t * (1 + j % 3))).astype(np.float32)


def write_bundle_golden(bundle_dir, frames: int = GOLDEN_FRAMES) -> pathlib.Path:
    """Run the bundle on deterministic features and store x, pose and heading as golden.npz
    beside the model (for the converter, at conversion time, on the build machine)."""
    from device.model import load_bundle
    b = load_bundle(bundle_dir)
    x = _golden_features(b.n_features, frames)
    with b.stepper() as s:
        poses, heading = s.run(x)
    out = pathlib.Path(bundle_dir) / BUNDLE_GOLDEN
    np.savez(out, x=x, pose=poses, heading=heading, model_sha256=np.array(b.manifest["model"]["sha256"]))
    return out


def _pose_tolerance(b) -> float:
    """Two quantization steps of the pose output (int8 kernels may round differently on ARM), as
    they reach the pose (through the read-out's scale and the output gain), at least 1e-4."""
    t = next(o for o in b.outputs.values() if o.role == "pose")
    if not t.scale:
        return 1e-4
    dec, post = b.manifest.get("pose_decode"), b.manifest.get("pose_post")
    k = max(dec["scale"]) if dec else 1.0
    k *= max(float(post["gain"]), float(post.get("posture_gain", 1.0))) if post else 1.0
    return max(2.0 * t.scale * k, 1e-4)


def check_bundle(bundle_path, cfg: FeatureConfig = DEFAULT_FEATURES) -> Result:
    from device.model import BundleError, load_bundle
    try:
        b = load_bundle(bundle_path, cfg)
    except BundleError as e:
        return Result("bundle", "FAIL", str(e))
    golden = pathlib.Path(bundle_path) / BUNDLE_GOLDEN
    with b.stepper() as s:
        if golden.is_file():
            try:
                g = np.load(golden)
                x, want_pose, want_head = g["x"], g["pose"], g["heading"]
                sha = str(g["model_sha256"])
            except (OSError, ValueError, KeyError) as e:
                return Result("bundle", "FAIL", f"{golden}: unreadable golden file ({e})")
            if sha != b.manifest["model"]["sha256"]:
                return Result("bundle", "FAIL", f"{golden} belongs to another model (sha256 {sha[:12]}..)")
            poses, head = s.run(x)
            tol = _pose_tolerance(b)
            err = float(np.abs(poses - want_pose).max())
            herr = float(np.abs(np.angle(np.exp(1j * (head - want_head)))).max())
            ok = err <= tol and herr <= max(tol, 1e-3) * len(x)
            return Result("bundle", "PASS" if ok else "FAIL",
                          f"{b.path.name} ({b.quantize}): golden output of {len(x)} frames, max |pose diff| "
                          f"{err:.2g} (tolerance {tol:.2g}), max heading diff {herr:.2g} rad")
        x = _golden_features(b.n_features)
        p1, h1 = s.run(x)
        p2, h2 = s.run(x)
    if not (np.array_equal(p1, p2) and np.array_equal(h1, h2)):
        return Result("bundle", "FAIL", f"{b.path.name}: two runs from reset differ (non-deterministic runtime)")
    if not (np.all(np.isfinite(p1)) and np.all(np.abs(p1) <= 1)):
        return Result("bundle", "FAIL", f"{b.path.name}: poses not finite or outside [-1, 1]")
    return Result("bundle", "PASS", f"{b.path.name} ({b.quantize}) loads and runs deterministically; it has no "
                  f"{BUNDLE_GOLDEN} to compare against (re-convert to add one)")


def check_broker(settings, mode: str = "auto", timeout: float = 5.0) -> Result:
    """mode: 'configured' (the settings' broker), 'local' (a private Mosquitto), 'auto'
    (configured if a config file / env names one, else local if mosquitto is installed), 'none'."""
    if mode == "none" or (settings is not None and not settings.mqtt.enabled and mode == "auto"):
        return Result("broker", "SKIP", "no broker check asked for (mqtt.enabled = false or --broker none)")
    configured = settings is not None and settings.sources.get("mqtt.host", "default") != "default"
    if mode == "configured" or (mode == "auto" and configured):
        return _round_trip(settings.device.id, settings.mqtt.host, settings.mqtt.port, settings, timeout)
    from broker.launcher import Broker, BrokerError, mosquitto_path
    try:
        mosquitto_path()
    except BrokerError as e:
        return Result("broker", "SKIP", f"no broker configured and no local mosquitto to test with ({e})")
    work = tempfile.mkdtemp(prefix="edgedance-selftest-")
    dev = settings.device.id if settings is not None else "selftest"
    try:
        with Broker(work, devices=(dev,), tls=False, websockets=False) as b:
            r = _round_trip(dev, b.host, b.port, None, timeout, user=f"device-{dev}",
                            password=b.credentials[f"device-{dev}"], loop_user=("admin", b.credentials["admin"]))
            r.detail = "private mosquitto: " + r.detail
            return r
    except BrokerError as e:
        return Result("broker", "FAIL", f"could not start a private mosquitto: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _round_trip(dev, host, port, settings, timeout, user=None, password=None, loop_user=None) -> Result:
    """CONNACK with the device's credentials, a QoS 1 publish on its metrics topic with the
    broker's PUBACK reason code (MQTT 5 says 'Not authorized' for an ACL refusal), and the
    message read back by a listener when the ACL lets that listener read."""
    from device import protocol
    from device.publish import Publisher
    if settings is not None:
        pub = Publisher.from_settings(settings)
        user, password = settings.mqtt.username, settings.mqtt_password()
    else:
        pub = Publisher(dev, host, port, username=user or "", password=password or "")
    where = f"{host}:{port}"
    topic = protocol.topic(dev, "metrics")
    ev = {k: threading.Event() for k in ("connack", "suback", "puback", "message")}
    res: dict = {}

    def on_connect(c, u, f, rc, p):
        res["connack"] = rc
        ev["connack"].set()

    def on_subscribe(c, u, mid, rcs, p):
        ev["suback"].set()

    def on_publish(c, u, mid, rc, p):
        res["puback"], res["t_ack"] = rc, time.time()
        ev["puback"].set()

    def on_message(c, u, m):
        with contextlib.suppress(protocol.ProtocolError):
            if protocol.decode(m.payload, m.topic).get("selftest"):
                res["t_msg"] = time.time()
                ev["message"].set()

    dev_c = pub._make_client()  # the device's own connection settings: credentials, TLS, will
    dev_c.on_disconnect = dev_c.on_message = None
    dev_c.on_connect, dev_c.on_publish = on_connect, on_publish
    listener = pub._make_client()
    listener._client_id = f"{pub.client_id}-listener".encode()
    listener.will_clear()
    if loop_user:
        listener.username_pw_set(*loop_user)
    listener.on_connect = listener.on_disconnect = None
    listener.on_subscribe, listener.on_message = on_subscribe, on_message
    started = []
    try:
        for c in (dev_c, listener):
            try:
                c.connect(host, port, keepalive=30)
            except (OSError, ValueError) as e:
                return Result("broker", "FAIL", f"cannot reach {where}: {e}; check mqtt.host, mqtt.port and tls")
            c.loop_start()
            started.append(c)
        if not ev["connack"].wait(timeout):
            return Result("broker", "FAIL", f"{where}: no CONNACK within {timeout:.0f} s")
        if res["connack"].is_failure:
            return Result("broker", "FAIL", f"{where}: connection refused ({res['connack']}) for user {user!r}; "
                          "check mqtt.username and the password")
        listener.subscribe(topic, qos=1)
        ev["suback"].wait(timeout)
        t0 = time.time()
        dev_c.publish(topic, protocol.encode_json({"v": 1, "type": "metrics", "device": dev, "seq": 0, "t": t0,
                                                   "selftest": True}), qos=1)
        if not ev["puback"].wait(timeout):
            return Result("broker", "FAIL", f"{where}: no PUBACK within {timeout:.0f} s")
        rc = res["puback"]
        if rc.is_failure:
            return Result("broker", "FAIL", f"{where}: the broker refused the device's publish on {topic} ({rc}); "
                          "check the ACL (the device user must write edgedance/v1/<id>/#)")
        if ev["message"].wait(min(timeout, 2.0)):
            return Result("broker", "PASS", f"{where}: message round trip in {1000 * (res['t_msg'] - t0):.1f} ms "
                          "(device publish -> broker -> subscriber)")
        return Result("broker", "PASS", f"{where}: connected as {user!r}, publish acknowledged ({rc}) in "
                      f"{1000 * (res['t_ack'] - t0):.1f} ms; no read-back (the ACL lets the device write, not read)")
    finally:
        for c in started:
            with contextlib.suppress(Exception):
                c.disconnect()
            c.loop_stop()


def check_microphone(settings, seconds: float = 0.5) -> Result:
    if settings is None or settings.audio.source != "mic":
        return Result("microphone", "SKIP", "audio.source is not 'mic'")
    from device.audio import AudioError, MicSource
    try:
        with MicSource(settings.audio.device or None, chunk_ms=settings.audio.chunk_ms) as mic:
            n, end = 0, time.monotonic() + seconds + 1.0
            while n < seconds * DEFAULT_FEATURES.sample_rate_hz and time.monotonic() < end:
                c = mic.read(timeout=0.2)
                n += 0 if c is None else len(c.pcm)
            name, rate = mic.device_name, mic.rate_hz
    except AudioError as e:
        return Result("microphone", "FAIL", str(e))
    if n == 0:
        return Result("microphone", "FAIL", f"{name!r} opened at {rate} Hz but delivered no audio")
    return Result("microphone", "PASS", f"{name!r} at {rate} Hz delivered {n / 16000:.2f} s of audio")


def check_realtime(bundle_path, seconds: float = 4.0, max_p99_ms: float = 100.0, max_cpu_ms: float = 250.0,
                   cfg: FeatureConfig = DEFAULT_FEATURES) -> Result:
    from device.audio import FileSource, resample, to_pcm16
    from device.demo import DEMO_SAMPLE_RATE_HZ, synthesize_song
    from device.model import BundleError, load_bundle
    from device.pipeline import Pipeline
    try:
        b = load_bundle(bundle_path, cfg)
    except BundleError as e:
        return Result("realtime", "FAIL", f"no bundle to run: {e}")
    song = to_pcm16(resample(synthesize_song(seconds), DEMO_SAMPLE_RATE_HZ, cfg.sample_rate_hz))
    with FileSource("synthesized song", cfg, realtime=True, pcm=song) as src:
        st = Pipeline(src, b, None, cfg, watchdog=False).run()
    s = st.summary()
    ok = (s["frames"] == len(song) // cfg.samples_per_pose_frame and s["dropped_frames"] == 0
          and s["latency_ms_p99"] is not None and s["latency_ms_p99"] <= max_p99_ms
          and s["cpu_ms_per_audio_s_total"] <= max_cpu_ms)
    return Result("realtime", "PASS" if ok else "FAIL",
                  f"{s['frames']} frames in {s['audio_s']:.1f} s: latency p50 {s['latency_ms_p50']} ms, "
                  f"p99 {s['latency_ms_p99']} ms (limit {max_p99_ms:g}), CPU {s['cpu_ms_per_audio_s_total']:.2f} ms "
                  f"per s of audio (limit {max_cpu_ms:g}; features {s['cpu_ms_per_audio_s']['features']:.2f}, "
                  f"model {s['cpu_ms_per_audio_s']['model']:.2f}; whole process, all threads "
                  f"{s['cpu_ms_per_audio_s_process']:.2f}), dropped frames {s['dropped_frames']}")


def run_checks(settings=None, bundle=None, broker: str = "auto", seconds: float = 4.0, max_p99_ms: float = 100.0,
               max_cpu_ms: float = 250.0, emit=None) -> list[Result]:
    bundle = bundle or (settings.device.bundle if settings is not None else None)
    checks = [
        ("frontend", lambda: check_frontend()),
        ("bundle", lambda: check_bundle(bundle)),
        ("broker", lambda: check_broker(settings, broker)),
        ("microphone", lambda: check_microphone(settings)),
        ("realtime", lambda: check_realtime(bundle, seconds, max_p99_ms, max_cpu_ms)),
    ]
    results = []
    for name, fn in checks:
        try:
            r = fn()
        except Exception as e:  # a check that crashes is a failed check, and the others still run
            log.debug("check %s crashed", name, exc_info=True)
            r = Result(name, "FAIL", f"crashed: {type(e).__name__}: {e}")
        results.append(r)
        if emit:
            emit(r)
    return results


# --- command line ---------------------------------------------------------------------

def add_selftest(p):
    p.add_argument("--config", metavar="FILE", help="INI settings file (default /etc/edgedance/device.ini if present)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", default=[], help="override a setting")
    p.add_argument("--model", metavar="DIR", help="bundle to check (default: device.bundle from the settings)")
    p.add_argument("--broker", choices=("auto", "configured", "local", "none"), default="auto",
                   help="auto: the configured broker if the settings name one, else a private mosquitto if installed")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the real-time run")
    p.add_argument("--max-p99-ms", type=float, default=100.0, help="latency limit of the real-time run")
    p.add_argument("--max-cpu-ms", type=float, default=250.0,
                   help="CPU limit, ms per second of audio (250 = a quarter of one core; ~15 here)")


def cmd_selftest(args) -> int:
    from device import settings as S
    from device.cli import CliError
    try:
        s = S.load(args.config, overrides=S.parse_set(args.set))
    except S.SettingsError as e:
        raise CliError(str(e)) from e
    results = run_checks(s, args.model, args.broker, args.seconds, args.max_p99_ms, args.max_cpu_ms,
                         emit=lambda r: print(r.line(), flush=True))
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"selftest: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":  # python -m device.selftest == python -m device selftest
    import sys

    from device.cli import main
    sys.exit(main(["selftest", *sys.argv[1:]]))
