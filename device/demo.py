"""`make demo`: the whole system on one machine, dancing to a song the project synthesizes.

Starts the project's Mosquitto, the display page, the simulated robot and the device
(file source at real-time pace, shipped bundle); writes an animated GIF of the dance
and the robot's servo trace; stops everything on Ctrl-C.
"""
from __future__ import annotations

import numpy as np

from device.audio import to_pcm16

DEMO_SAMPLE_RATE_HZ = 22050


def synthesize_song(seconds: float = 40.0, bpm: float = 96.0, meter: int = 3, seed: int = 0,
                    sr: int = DEMO_SAMPLE_RATE_HZ) -> np.ndarray:
    """A small ballroom-like tune: kick on the downbeat, soft hits on the other beats,
    a bass line and bar-long chords. Float32 mono in [-1, 1] at `sr`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float32)
    beat_s = 60.0 / bpm
    t_beat = np.arange(int(0.25 * sr)) / sr

    kick = np.sin(2 * np.pi * (50 + 90 * np.exp(-t_beat * 30)) * t_beat) * np.exp(-t_beat * 14)
    hit = rng.standard_normal(len(t_beat)) * np.exp(-t_beat * 40) * 0.35
    roots = [220.0, 174.61, 196.0, 146.83]  # A3 F3 G3 D3: a four-bar progression
    for b in range(int(seconds / beat_s)):
        start = int(b * beat_s * sr)
        bar, pos = divmod(b, meter)
        root = roots[bar % len(roots)]
        sound = kick if pos == 0 else hit * (1.0 if pos % 2 else 0.7)
        end = min(n, start + len(sound))
        out[start:end] += sound[:end - start].astype(np.float32)
        # Bass on every beat, stronger on the downbeat.
        length = int(beat_s * 0.9 * sr)
        tb = np.arange(min(length, n - start)) / sr
        out[start:start + len(tb)] += (0.25 if pos == 0 else 0.12) * np.sin(2 * np.pi * root / 2 * tb) * np.exp(-tb * 3)
        if pos == 0:  # a bar-long chord: root, third, fifth
            length = int(beat_s * meter * sr)
            tc = np.arange(min(length, n - start)) / sr
            env = np.minimum(1.0, tc * 20) * np.exp(-tc * 1.2)
            chord = sum(np.sin(2 * np.pi * root * r * tc) for r in (1.0, 1.26, 1.5))
            out[start:start + len(tc)] += (0.06 * chord * env).astype(np.float32)
    return (0.8 * out / max(1e-9, float(np.abs(out).max()))).astype(np.float32)


def write_song(path, **kw) -> str:
    import soundfile as sf
    sr = kw.pop("sr", DEMO_SAMPLE_RATE_HZ)
    sf.write(path, to_pcm16(synthesize_song(sr=sr, **kw)), sr, subtype="PCM_16")
    return str(path)


# --- the demo: every part as its own process, as on a real installation ---------------------

DEVICE_ID = "demo"


def _python() -> str:
    import sys
    return sys.executable


class _Procs:
    """Child processes started for the demo; all stopped (SIGINT, then kill) on exit."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs = []

    def start(self, name: str, args: list[str]):
        import subprocess
        log = open(self.log_dir / f"{name}.log", "wb")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append((name, p, log))
        return p

    def stop(self):
        import signal
        import subprocess
        for name, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for name, p, log in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
        self.procs = []


def _record(broker, out_path, stop):
    """Subscribe as the display user and write every pose message (JSON lines) for the GIF."""
    import json
    from device import protocol
    c = broker.client("display", track=False)
    fh = open(out_path, "w")

    def on_message(client, userdata, m):
        try:
            msg = protocol.decode(m.payload, m.topic)
        except protocol.ProtocolError:
            return
        fh.write(json.dumps(msg) + "\n")

    c.on_message = on_message
    c.subscribe(f"edgedance/v1/{DEVICE_ID}/#", qos=1)
    return c, fh


def run_demo(args) -> int:
    """`python -m device demo`: broker, display, robot, device; GIF + servo trace at the end."""
    import json
    import pathlib
    import threading
    import time

    from broker.launcher import Broker, free_port

    out = pathlib.Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model = pathlib.Path(args.model).resolve()
    if not (model / "manifest.json").exists():
        raise RuntimeError(f"demo: no model bundle at {model} (manifest.json missing); "
                           "give --model DIR or regenerate models/default with `python -m converter convert`")
    if args.source == "file":
        song = pathlib.Path(args.audio) if args.audio else out / "demo_song.wav"
        if not args.audio:
            write_song(song, seconds=args.seconds, bpm=args.bpm, meter=args.meter)
            print(f"demo: synthesized a {args.seconds:.0f} s song at {args.bpm:g} BPM in {args.meter}/4: {song}")
    procs = _Procs(out / "logs")
    stop = threading.Event()
    with Broker(out / "broker", devices=(DEVICE_ID,), tls=False, websockets=True) as b:
        creds = out / "broker" / "credentials.json"
        creds.write_text(json.dumps(b.credentials))
        creds.chmod(0o600)
        pw_file = out / "broker" / "device.password"
        pw_file.write_text(b.credentials[f"device-{DEVICE_ID}"] + "\n")
        pw_file.chmod(0o600)
        ini = out / "device.ini"  # the demo's own settings, never /etc/edgedance/device.ini
        ini.write_text(f"# written by `python -m device demo`\n[device]\nid = {DEVICE_ID}\n")
        http_port = args.http_port or free_port()
        recorder, rec_fh = _record(b, out / "stream.jsonl", stop)
        try:
            procs.start("display", [_python(), "-m", "subscribers.display", "--port", str(http_port),
                                    "--broker-ws", f"ws://127.0.0.1:{b.ws_port}", "--password-file", str(creds),
                                    "--device", DEVICE_ID])
            procs.start("robot", [_python(), "-m", "subscribers.robot", "--device", DEVICE_ID,
                                  "--broker", f"{b.host}:{b.port}", "--password-file", str(creds),
                                  "--driver", "sim", "--trace", str(out / "robot_trace.png")])
            dev_args = [_python(), "-m", "device", "run", "--id", DEVICE_ID, "--model", str(model),
                        "--host", b.host, "--port", str(b.port), "--config", str(ini),
                        "--set", f"mqtt.username=device-{DEVICE_ID}", "--set", f"mqtt.password_file={pw_file}"]
            if args.source == "file":
                dev_args += ["--file", str(song)]
            else:
                dev_args += ["--source", "mic"] + (["--mic", args.mic] if args.mic else [])
            time.sleep(1.0)
            device = procs.start("device", dev_args)
            print(f"demo: open the display at http://127.0.0.1:{http_port}/  (broker mqtt :{b.port}, ws :{b.ws_port})")
            print("demo: dancing... Ctrl-C to stop" + ("" if args.source == "mic" else " early"))
            try:
                while device.poll() is None:
                    time.sleep(0.5)
                if device.returncode:
                    print(f"demo: the device exited with code {device.returncode}; see {out / 'logs' / 'device.log'}")
                time.sleep(1.0)
            except KeyboardInterrupt:
                print("\ndemo: stopping")
        finally:
            procs.stop()
            recorder.disconnect()
            rec_fh.close()
    frames = _write_gif(out / "stream.jsonl", out / "dance.gif")
    print(f"demo: {frames} pose frames received; dance: {out / 'dance.gif'}; "
          f"robot servo trace: {out / 'robot_trace.png'}; logs: {out / 'logs'}")
    return 0 if frames > 0 else 1


def _write_gif(stream, gif) -> int:
    import json
    from subscribers.display import render
    n = sum(1 for line in open(stream) if json.loads(line).get("type") == "pose")
    if n:
        render.main([str(stream), "--out", str(gif)])
    return n


def add_demo_args(p) -> None:
    p.add_argument("--source", choices=("file", "mic"), default="file",
                   help="file: a song the demo synthesizes (default); mic: dance to the room")
    p.add_argument("--audio", metavar="SONG", help="dance to this WAV/MP3/FLAC instead of the synthesized song")
    p.add_argument("--mic", metavar="NAME|INDEX", help="with --source mic: which microphone (see `devices`)")
    p.add_argument("--model", default=str(_default_model()), help="model bundle (default: the shipped one)")
    p.add_argument("--out", default="demo-out", help="folder for the song, GIF, servo trace and logs (default demo-out)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the synthesized song (default 30)")
    p.add_argument("--bpm", type=float, default=96.0, help="tempo of the synthesized song (default 96)")
    p.add_argument("--meter", type=int, choices=(3, 4), default=3, help="beats per bar of the synthesized song")
    p.add_argument("--http-port", type=int, default=0, help="port of the display page (default: a free one)")


def _default_model():
    import pathlib
    return pathlib.Path(__file__).resolve().parent.parent / "models" / "default"
