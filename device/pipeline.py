"""The thin runner: audio source -> ring buffer -> features -> model step -> publish.

    capture thread:  source chunks (int16, capture time) -> ring buffer (bounded, `ring_s`)
    this thread:     ring -> features.FeatureExtractor -> Bundle.stepper().step -> Publisher

One pose frame per 640 samples (the bundle's 25 fps), as the audio arrives. The runner
measures itself: latency from the last audio sample of a frame being captured to its
message being handed to the network, CPU per stage (thread CPU time), and dropped frames
(audio the ring buffer had to throw away because processing fell behind, plus microphone
overflows). Ctrl-C / SIGTERM stop it cleanly; under systemd it sends READY/WATCHDOG/STOPPING
to $NOTIFY_SOCKET. `generate` is the same features + model path for a whole file, no broker.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time

import numpy as np

from device import features
from device.contract import DEFAULT_FEATURES, FeatureConfig

log = logging.getLogger(__name__)

STAGES = ("features", "model", "publish")
WATCHDOG_EVERY_S = 1.0  # the unit's WatchdogSec is 20 s: many keep-alives per period
STALL_S = 10.0  # a live source that delivers nothing this long is broken: exit non-zero, systemd restarts us
LATENCIES_KEPT = 25 * 3600  # RunStats keeps the last hour of per-frame latencies (a live run lasts for days)


def sd_notify(message: str) -> bool:
    """Send one sd_notify datagram ("READY=1", "WATCHDOG=1", ...) to $NOTIFY_SOCKET; False when unset."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", message, os.environ.get("NOTIFY_SOCKET"), e)
        return False


@dataclasses.dataclass
class RunStats:
    """What a run measured. Latencies in ms, CPU in seconds.

    `stage_cpu_s` is each stage's thread CPU; `loop_cpu_s` is the processing thread's whole CPU
    over the run (the stages plus the loop's own work: ring, chunk bookkeeping, clocks, metrics,
    commands); `capture_cpu_s` is the capture thread's. `process_cpu_s` adds every other thread
    of the process too (paho's network thread, ...)."""

    frames: int = 0
    published: int = 0
    beats: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    dropped_frames: int = 0
    overflows: int = 0
    stage_cpu_s: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    loop_cpu_s: float = 0.0
    capture_cpu_s: float = 0.0
    process_cpu_s: float = 0.0
    latency_ms: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LATENCIES_KEPT))
    error: str = ""

    def summary(self) -> dict:
        lat = np.asarray(self.latency_ms, np.float64)
        per_audio_s = max(self.audio_s, 1e-9)
        return {
            "frames": self.frames, "published": self.published, "beats": self.beats,
            "audio_s": round(self.audio_s, 3), "wall_s": round(self.wall_s, 3),
            "dropped_frames": self.dropped_frames, "overflows": self.overflows,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "latency_ms_max": round(float(lat.max()), 2) if len(lat) else None,
            "cpu_ms_per_audio_s": {k: round(1000 * v / per_audio_s, 3) for k, v in self.stage_cpu_s.items()},
            "cpu_ms_per_audio_s_total": round(1000 * sum(self.stage_cpu_s.values()) / per_audio_s, 3),
            "cpu_ms_per_audio_s_loop": round(1000 * self.loop_cpu_s / per_audio_s, 3),
            "cpu_ms_per_audio_s_capture": round(1000 * self.capture_cpu_s / per_audio_s, 3),
            "cpu_ms_per_audio_s_process": round(1000 * self.process_cpu_s / per_audio_s, 3),
            "process_cpu_percent": round(100 * self.process_cpu_s / max(self.wall_s, 1e-9), 2),
            "error": self.error,
        }


class _Ring:
    """Chunks between the capture thread and the processing loop, bounded in samples.

    A live source (microphone, real-time file, stdin) cannot wait: the oldest audio is
    dropped and counted. A file read as fast as possible (`block=True`) waits instead,
    so every sample is processed. The loop asks for the samples that complete its next pose
    frame and is woken once they are there (25 times a second, not once per 10 ms chunk)."""

    def __init__(self, max_samples: int, block: bool = False):
        self.max_samples = max_samples
        self.block = block
        self._q: collections.deque = collections.deque()
        self._n = 0
        self.dropped_samples = 0
        self._cv = threading.Condition()
        self._want = 1  # samples the waiting reader needs before a wake-up is worth it
        self._put_waiting = False  # a blocking put waits for room: the reader takes what there is
        self.closed = False

    def put(self, chunk):
        with self._cv:
            while self.block and self._q and self._n + len(chunk.pcm) > self.max_samples and not self.closed:
                self._put_waiting = True
                self._cv.notify_all()
                self._cv.wait(0.2)
            self._put_waiting = False
            self._q.append(chunk)
            self._n += len(chunk.pcm)
            while self._n > self.max_samples and len(self._q) > 1:
                old = self._q.popleft()
                self._n -= len(old.pcm)
                self.dropped_samples += len(old.pcm)
            if self._n >= self._want:
                self._cv.notify()

    def get(self, timeout: float, min_samples: int = 1) -> list | None:
        """Every chunk in the ring once it holds `min_samples`, is closed, or a blocking put waits
        for room; None when `timeout` passes first (the chunks stay for the next call)."""
        with self._cv:
            self._want = max(1, min_samples)
            ready = self._cv.wait_for(lambda: self._n >= self._want or self.closed or self._put_waiting, timeout)
            self._want = 1
            if not ready or not self._q:
                return None
            chunks = list(self._q)
            self._q.clear()
            self._n = 0
            self._cv.notify_all()  # a blocked put may go on
            return chunks

    def close(self):
        with self._cv:
            self.closed = True
            self._cv.notify_all()


class Pipeline:
    """Runs until the source ends, `max_seconds` of audio, `stop()`, SIGINT or SIGTERM."""

    def __init__(self, source, bundle, publisher=None, cfg: FeatureConfig = DEFAULT_FEATURES, *,
                 latency_ms: float = 0.0, max_seconds: float = 0.0, ring_s: float = 2.0,
                 metrics_interval_s: float = 5.0, watchdog: bool = True, start_paused: bool = False,
                 live: bool = False, on_frame=None):
        self.source = source
        self.bundle = bundle
        self.publisher = publisher
        self.cfg = cfg
        self.latency_ms = float(latency_ms)
        self.max_seconds = max_seconds
        self.metrics_interval_s = metrics_interval_s
        self.watchdog = watchdog
        self.live = live  # a live source (mic/stdin): a long silence of the source is a failure
        self.on_frame = on_frame
        self.state = "paused" if start_paused else "online"
        self.spf = cfg.samples_per_pose_frame  # 640
        self.fps = float(cfg.pose_fps)
        self._ring = _Ring(max(self.spf, int(ring_s * cfg.sample_rate_hz)),
                           block=getattr(source, "realtime", True) is False)
        self._stop = threading.Event()
        self._commands: queue.Queue = queue.Queue()
        self._capture_error: BaseException | None = None
        self._source_done = threading.Event()
        self.stats = RunStats()
        self._recent = collections.deque(maxlen=2000)  # latencies for the metrics topic
        self._extractor = features.FeatureExtractor(cfg)
        self._stepper = bundle.stepper()
        self._warm_up()
        self._reset_stream()

    def _warm_up(self):
        """One frame through every stage before the clock starts: lazy set-up (interpreter
        delegates, first-call allocations) must not land on the first live frame's latency."""
        self._extractor.process(np.zeros(self.spf, np.int16))
        self._stepper.step(np.zeros(self.bundle.n_features, np.float32))
        np.percentile(np.zeros(2), (50, 99))  # the metrics' first call imports lazily: ~13 ms on a live frame

    # --- control (any thread) -------------------------------------------------------

    def stop(self, *_):
        self._stop.set()
        self._ring.close()

    def command(self, cmd: str, args: dict) -> None:
        """Queue a command (from publish's on_command); applied between chunks by the loop."""
        self._commands.put((cmd, dict(args)))

    # --- the loop ---------------------------------------------------------------------

    def _reset_stream(self):
        self._extractor.reset()
        self._stepper.reset()
        self._n_in = 0  # samples fed to the extractor since the reset
        self._pending: list = []  # chunks not yet fed (the current frame is incomplete)
        self._n_pending = 0
        self._chunk_ends: collections.deque = collections.deque()  # (end sample, capture time) per chunk
        self._frame = 0
        self._beat_index = 0

    def _capture(self):
        c0 = time.thread_time()
        try:
            for chunk in self.source:
                if self._stop.is_set():
                    break
                self._ring.put(chunk)
        except BaseException as e:  # reported by run(), never lost in a thread
            self._capture_error = e
        finally:
            self.stats.capture_cpu_s = time.thread_time() - c0
            self._source_done.set()
            self._ring.close()

    def run(self) -> RunStats:
        st = self.stats
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self.stop)
        cap = threading.Thread(target=self._capture, name="audio-capture", daemon=True)
        t0_wall, t0_cpu, t0_loop = time.monotonic(), time.process_time(), time.thread_time()
        last_dog = last_metrics = last_audio = time.monotonic()
        if self.publisher is not None:
            self.publisher.status(self.state, bundle=self.bundle.path.name, fps=self.fps,
                                  feature_hash=self.cfg.config_hash())
        cap.start()
        if self.watchdog:
            sd_notify("READY=1\nSTATUS=listening")
        try:
            while not self._stop.is_set():
                chunks = self._ring.get(timeout=0.2, min_samples=self._samples_to_next_frame())
                now = time.monotonic()
                if self.watchdog and now - last_dog >= WATCHDOG_EVERY_S:
                    sd_notify("WATCHDOG=1")
                    last_dog = now
                while not self._commands.empty():
                    self._apply(*self._commands.get_nowait())
                if self.publisher is not None and now - last_metrics >= self.metrics_interval_s:
                    self.publisher.metrics(self._metrics())
                    last_metrics = now
                if chunks is None:
                    if self._source_done.is_set():
                        break
                    if self.live and now - last_audio > STALL_S:
                        st.error = f"the audio source delivered nothing for {STALL_S:.0f} s"
                        log.error("%s; exiting so that systemd restarts the device", st.error)
                        break
                    continue
                last_audio = now
                if self.max_seconds:  # stop at the first chunk that reaches the limit
                    room = self.max_seconds - st.audio_s
                    for n, chunk in enumerate(chunks):
                        room -= len(chunk.pcm) / self.cfg.sample_rate_hz
                        if room <= 0:
                            chunks = chunks[:n + 1]
                            self._stop.set()
                            break
                self._process(chunks)
        finally:
            self.stop()
            if self.watchdog:
                sd_notify("STOPPING=1")
            cap.join(timeout=2.0)
            if cap.is_alive():
                log.warning("the capture thread did not end within 2 s")
            for sig, h in handlers.items():
                signal.signal(sig, h)
            st.wall_s = time.monotonic() - t0_wall
            st.loop_cpu_s = time.thread_time() - t0_loop
            st.process_cpu_s = time.process_time() - t0_cpu
            st.overflows = int(getattr(self.source, "overflows", 0))
            dropped = self._ring.dropped_samples + int(getattr(self.source, "dropped_samples", 0))
            st.dropped_frames = math.ceil(dropped / self.spf) + st.overflows
        if self._capture_error is not None:
            st.error = f"audio source failed: {self._capture_error}"
            raise self._capture_error
        return st

    def _samples_to_next_frame(self) -> int:
        return (self._frame + 1) * self.spf - self._n_in - self._n_pending

    def _process(self, chunks):
        """Collect chunks until the next pose frame is complete, then run the stages once.

        Waiting for the frame's last sample costs no latency (the frame cannot be made sooner)
        and one extractor call per frame instead of one per 10 ms chunk halves its CPU. Chunks
        that arrive together (a backlog) go through the extractor in one call: every frame in it
        is late already, and one call is cheaper than one per frame."""
        st, sr = self.stats, self.cfg.sample_rate_hz
        for chunk in chunks:
            st.audio_s += len(chunk.pcm) / sr
            if self.state == "stopped":
                continue
            self._pending.append(chunk.pcm)
            self._n_pending += len(chunk.pcm)
            self._chunk_ends.append((self._n_in + self._n_pending, chunk.t_capture))
        if self.state == "stopped" or self._n_in + self._n_pending < (self._frame + 1) * self.spf:
            return
        pcm = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        self._n_in += self._n_pending
        self._n_pending = 0
        c0 = time.thread_time()
        ff = self._extractor.process(pcm)
        c1 = time.thread_time()
        st.stage_cpu_s["features"] += c1 - c0
        for i in range(len(ff)):
            c1 = time.thread_time()
            pose, heading = self._stepper.step(ff.x[i])
            c2 = time.thread_time()
            st.stage_cpu_s["model"] += c2 - c1
            frame = self._frame
            self._frame += 1
            st.frames += 1
            end_sample = (frame + 1) * self.spf
            while self._chunk_ends[0][0] < end_sample:  # the chunk that holds the frame's last sample
                self._chunk_ends.popleft()
            chunk_end, t_chunk = self._chunk_ends[0]
            t_capture = t_chunk - (chunk_end - end_sample) / sr
            t_audio = end_sample / sr
            if self.on_frame is not None:
                self.on_frame(frame, pose, heading, ff, i)
            if self.state == "online" and self.publisher is not None:
                self._publish(frame, pose, heading, ff, i, t_audio, t_capture)
                st.published += 1
            lat = 1000 * (time.time() - t_capture)
            st.latency_ms.append(lat)
            self._recent.append(lat)
            st.stage_cpu_s["publish"] += time.thread_time() - c2

    def _publish(self, frame, pose, heading, ff, i, t_audio, t_capture):
        shift_s = self.latency_ms / 1000.0
        bpm = float(ff.bpm[i])
        phase = float(ff.phase[i])
        bar_phase = float(ff.bar_phase[i])
        if shift_s and bpm > 0:  # latency compensation: announce what will be true shift_s later
            phase = (phase + shift_s * bpm / 60.0) % 1.0
            meter = max(int(ff.meter[i]), 1)
            bar_phase = (bar_phase + shift_s * bpm / 60.0 / meter) % 1.0
        next_in = max(0.0, float(ff.next_beat_in[i]) - shift_s)
        beat = {"bpm": bpm, "phase": min(phase, 0.99999), "bar_phase": min(bar_phase, 0.99999),
                "meter": int(ff.meter[i]), "onset": max(0.0, float(ff.onset[i])), "is_beat": bool(ff.is_beat[i]),
                "next_beat_in": min(next_in, 60.0)}
        self.publisher.pose(frame=frame, t_audio=t_audio, t_capture=t_capture, fps=self.fps, kp=pose,
                            heading=float(heading), beat=beat)
        if ff.is_beat[i]:
            meter = int(ff.meter[i])
            in_bar = (int(round(float(ff.bar_phase[i]) * meter)) % meter + 1) if meter > 0 else 0
            self.publisher.beat(frame=frame, t_audio=t_audio, t_capture=t_capture, bpm=bpm, meter=meter,
                                beat_in_bar=in_bar, next_beat_in=min(next_in, 60.0), beat_index=self._beat_index)
            self._beat_index += 1
            self.stats.beats += 1

    def _metrics(self) -> dict:
        st = self.stats
        lat = np.asarray(self._recent, np.float64)
        per_frame = max(st.frames, 1)
        pub = self.publisher
        return {
            "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else 0.0,
            "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else 0.0,
            "cpu_percent": 100.0 * sum(st.stage_cpu_s.values()) / max(st.audio_s, 1e-9),
            "frames": st.frames,
            "dropped_frames": math.ceil(self._ring.dropped_samples / self.spf),
            "queued": pub.queued if pub else 0,
            "dropped_messages": int(pub.stats["dropped_pose"] + pub.stats["dropped_events"]) if pub else 0,
            "overflows": int(getattr(self.source, "overflows", 0)),
            "stage_ms": {k: 1000.0 * v / per_frame for k, v in st.stage_cpu_s.items()},
            "state": self.state,
        }

    def _apply(self, cmd: str, args: dict):
        pub = self.publisher
        if cmd in ("start", "stop", "pause"):
            new = {"start": "online", "stop": "stopped", "pause": "paused"}[cmd]
            if new == "online" and self.state == "stopped":
                self._reset_stream()  # a new stream: fresh features, model state and frame count
            self.state = new
            log.info("state -> %s", new)
            if pub:
                pub.status(new, reason=f"cmd {cmd}")
        elif cmd == "latency":
            self.latency_ms = float(args.get("ms", 0.0))
            log.info("latency compensation %.0f ms", self.latency_ms)
            if pub:
                pub.status(self.state, reason="cmd latency", latency_ms=self.latency_ms)
        elif cmd == "select_bundle":
            from device.model import BundleError, load_bundle
            path = args.get("path", "")
            try:
                b = load_bundle(path, self.cfg)
                stepper = b.stepper()
            except BundleError as e:
                log.error("select_bundle %r refused: %s", path, e)
                if pub:
                    pub.status(self.state, reason=f"select_bundle refused: {e}"[:500])
                return
            self.bundle, self._stepper = b, stepper
            self._stepper.step(np.zeros(b.n_features, np.float32))  # warm up before it meets live frames
            self._stepper.reset()
            log.info("bundle -> %s", b.path)
            if pub:
                pub.status(self.state, reason="cmd select_bundle", bundle=b.path.name)
        else:
            log.warning("unknown command %r ignored", cmd)


def generate(audio, bundle_path, cfg: FeatureConfig = DEFAULT_FEATURES, seed: int = 0):
    """A whole file (path or int16 PCM) -> (poses (T, 14, 2) float32, heading (T,) float64, FeatureFrames).

    The same features and model step as the live pipeline, without a broker or pacing."""
    from device.audio import load_file
    from device.model import load_bundle

    bundle = load_bundle(bundle_path, cfg)
    pcm = load_file(audio, cfg) if isinstance(audio, (str, os.PathLike)) else np.asarray(audio)
    ff = features.extract(pcm, cfg)
    with bundle.stepper(seed=seed) as stepper:
        if len(ff) == 0:
            return np.zeros((0, 14, 2), np.float32), np.zeros(0), ff
        poses, heading = stepper.run(ff.x)
    return poses, heading, ff


def run_from_settings(s, cfg: FeatureConfig = DEFAULT_FEATURES) -> RunStats:
    """`python -m device run`: build source, bundle and publisher from Settings and run."""
    from device.audio import open_source
    from device.model import load_bundle
    from device.publish import Publisher

    bundle = load_bundle(s.device.bundle, cfg)
    a = s.audio
    source = open_source(a.source, cfg, device=(a.device or None), path=a.file, realtime=a.realtime, loop=a.loop,
                         rate_hz=a.stdin_rate_hz, chunk_ms=a.chunk_ms)
    pipe_holder = {}

    def on_command(cmd, args):
        pipe_holder["p"].command(cmd, args)

    publisher = None
    if s.mqtt.enabled:
        publisher = Publisher.from_settings(s, on_command=on_command,
                                            status_info={"bundle": bundle.path.name, "fps": float(cfg.pose_fps),
                                                         "feature_hash": cfg.config_hash()})
    with source:
        pipe = Pipeline(source, bundle, publisher, cfg, latency_ms=s.device.latency_ms,
                        max_seconds=s.runtime.max_seconds, ring_s=a.ring_s,
                        metrics_interval_s=s.mqtt.metrics_interval_s, watchdog=s.runtime.watchdog,
                        start_paused=s.runtime.start_paused, live=a.source in ("mic", "stdin"))
        pipe_holder["p"] = pipe
        if publisher is not None:
            publisher.start()
        try:
            stats = pipe.run()
        finally:
            if publisher is not None:
                publisher.close("stopped", reason=pipe.stats.error or "")
    return stats


# --- command line: `python -m device run | generate | devices` (registered in device.cli.COMMANDS) ---------

def add_run(p):
    p.add_argument("--config", metavar="FILE",
                   help="INI settings file (default /etc/edgedance/device.ini if it exists; see deploy/device.ini)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", default=[],
                   help="override one setting, e.g. --set mqtt.host=broker.local (repeatable; beats env and file)")
    p.add_argument("--id", dest="device.id", metavar="ID", help="device id (device.id)")
    p.add_argument("--model", dest="device.bundle", metavar="DIR", help="model bundle folder (device.bundle)")
    p.add_argument("--format", dest="device.format", choices=("json", "binary"), help="pose payload (device.format)")
    p.add_argument("--source", dest="audio.source", choices=("mic", "file", "stdin"), help="audio source")
    p.add_argument("--file", dest="audio.file", metavar="AUDIO", help="audio file (implies --source file)")
    p.add_argument("--mic", dest="audio.device", metavar="NAME|INDEX", help="microphone (see `devices`)")
    p.add_argument("--host", dest="mqtt.host", metavar="HOST", help="MQTT broker host (mqtt.host)")
    p.add_argument("--port", dest="mqtt.port", metavar="PORT", help="MQTT broker port (mqtt.port)")
    p.add_argument("--max-seconds", dest="runtime.max_seconds", metavar="S", help="stop after S s of audio")
    p.add_argument("--print-config", action="store_true", help="print the merged settings and where each came from")


def _settings_from_args(args):
    from device import settings
    over = settings.parse_set(args.set)
    for dest in ("device.id", "device.bundle", "device.format", "audio.source", "audio.file", "audio.device",
                 "mqtt.host", "mqtt.port", "runtime.max_seconds"):
        v = getattr(args, dest, None)
        if v is not None:
            over[dest] = str(v)
    if "audio.file" in over and "audio.source" not in over:
        over["audio.source"] = "file"
    return settings.load(args.config, overrides=over)


def cmd_run(args) -> int:
    from device.audio import AudioError
    from device.cli import CliError
    from device.model import BundleError
    from device.publish import PublishError
    from device.settings import SettingsError
    try:
        s = _settings_from_args(args)
        if args.print_config:
            print(s.as_ini())
            return 0
        logging.getLogger().setLevel(s.runtime.log_level.upper())
        stats = run_from_settings(s)
    except (SettingsError, AudioError, BundleError, PublishError) as e:
        raise CliError(str(e)) from e
    summ = stats.summary()
    log.info("run ended: %s", summ)
    try:  # a full disk behind stderr (the journal, a log file) must not turn a clean run into a failure
        print(f"frames {summ['frames']}, audio {summ['audio_s']:.1f} s, latency p50 {summ['latency_ms_p50']} ms "
              f"p99 {summ['latency_ms_p99']} ms, CPU {summ['cpu_ms_per_audio_s_total']:.2f} ms per s of audio, "
              f"dropped frames {summ['dropped_frames']}", file=sys.stderr, flush=True)
    except OSError:
        pass
    return 1 if stats.error else 0


def add_generate(p):
    p.add_argument("audio", metavar="AUDIO", help="WAV, MP3 or FLAC file")
    p.add_argument("--out", required=True, metavar="P.npy",
                   help="poses (T, 14, 2) float32 .npy; the heading (T,) goes beside it as P.heading.npy")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="model bundle folder (default: device.bundle from the settings, "
                        "/opt/edgedance/models/default)")
    p.add_argument("--seed", type=int, default=0, help="the model's noise seed (for bundles with a noise input)")


def cmd_generate(args) -> int:
    from device.audio import AudioError
    from device.cli import CliError
    from device.model import BundleError
    from device.settings import SCHEMA
    model = args.model or SCHEMA["device"]["bundle"].default
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    try:
        poses, heading, ff = generate(args.audio, model, seed=args.seed)
    except (AudioError, BundleError) as e:
        raise CliError(str(e)) from e
    try:
        np.save(out, poses)
        np.save(out[:-4] + ".heading.npy", heading)
    except OSError as e:
        raise CliError(f"generate: cannot write {out!r}: {e.strerror or e}") from e
    print(f"{out}: {poses.shape[0]} frames ({poses.shape[0] / DEFAULT_FEATURES.pose_fps:.1f} s), "
          f"heading in {out[:-4]}.heading.npy")
    return 0


def add_devices(p):
    p.add_argument("--json", action="store_true", help="print as JSON")


def cmd_devices(args) -> int:
    import json

    from device.audio import AudioError, list_devices
    from device.cli import CliError
    try:
        devs = list_devices()
    except AudioError as e:
        raise CliError(str(e)) from e
    if args.json:
        print(json.dumps(devs, indent=1))
    elif not devs:
        print("no input devices (is a microphone plugged in? is this user in group 'audio'?)")
    for d in devs if not args.json else []:
        print(f"[{d['index']}] {d['name']}  ({d['channels']} ch, {d['default_rate_hz']:.0f} Hz, {d['host_api']})")
    return 0
