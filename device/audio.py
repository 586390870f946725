"""Audio in: files (WAV, MP3, FLAC) to int16 mono PCM at the contract's rate.

Live sources (microphone, stdin, paced file playback) live below the file loader.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np

from device.contract import DEFAULT_FEATURES, FeatureConfig

log = logging.getLogger(__name__)

SUPPORTED_RATES_HZ = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


class AudioError(RuntimeError):
    """An audio file or device that cannot be used; the text names it and says why."""


def load_file(path: str | os.PathLike, cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """Decode a WAV/MP3/FLAC file to int16 mono at cfg.sample_rate_hz, shape (N,)."""
    x, sr = read_float(path)
    return resample_pcm16(to_pcm16(x), sr, cfg.sample_rate_hz)


def read_float(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a file to float32 mono in [-1, 1] at its own rate: (samples (N,), rate)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"audio file {path!r} does not exist")
    if os.path.isdir(path):
        raise AudioError(f"audio file {path!r} is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"audio file {path!r} is empty (0 bytes)")
    try:
        import soundfile as sf
    except ImportError as e:
        raise AudioError("reading audio files needs the 'soundfile' package: pip install 'edgedance[device]'") from e
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt, truncated and unknown formats alike
        raise AudioError(f"audio file {path!r} cannot be decoded as WAV, MP3 or FLAC "
                         f"(corrupt, truncated or not audio): {e}") from e
    if x.shape[0] == 0:
        raise AudioError(f"audio file {path!r} holds no samples")
    if sr not in SUPPORTED_RATES_HZ:
        raise AudioError(f"audio file {path!r} has sample rate {sr} Hz; supported: {SUPPORTED_RATES_HZ}")
    mono = x.mean(axis=1, dtype=np.float32)  # (N,)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"audio file {path!r} contains non-finite samples")
    return mono, int(sr)


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1) -> int16, clipped. Scale 32768, soundfile's own, so int16 files round-trip exactly."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


TAP_FRAC_BITS = 15  # resampler taps in Q15: every |tap| <= cutoff < 1, so a tap fits int16


def sinc_kernel(sr_in: int, sr_out: int, taps_per_side: int = 16):
    """The resampler's polyphase kernel: (up, down, width, k (2w,), taps (up, 2w) int64 Q15).

    Kaiser-windowed sinc (beta 8), cutoff at 0.95 of the lower Nyquist. Output n sits at
    input position n * down / up; its fractional part cycles through `up` phases. The taps
    are integers so the result is bit-identical on every CPU (float sums are not: x86 and
    arm64 round them differently)."""
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    ratio = sr_out / sr_in
    cutoff = 0.95 * min(1.0, ratio)  # fraction of the input Nyquist
    width = math.ceil(taps_per_side / min(1.0, ratio))
    phases = np.arange(up) / up  # (up,)
    k = np.arange(-width + 1, width + 1)  # (2 * width,)
    d = k[None, :] - phases[:, None]  # (up, 2 * width) distance of each tap
    beta = 8.0
    win = np.i0(beta * np.sqrt(np.clip(1 - (d / width) ** 2, 0, 1))) / np.i0(beta)
    taps = np.round(cutoff * np.sinc(cutoff * d) * win * (1 << TAP_FRAC_BITS)).astype(np.int64)
    return up, down, width, k, taps


def polyphase(xq: np.ndarray, n: np.ndarray, first: int, up: int, down: int, k, taps) -> np.ndarray:
    """Integer resampler core: output samples n from int16 input xq, whose xq[0] is input index
    `first`. Sums of int16 x Q15 in int64 (at most 96 taps: no overflow), rounded back to int16."""
    base = (n * down) // up  # integer input index of each output
    idx = base[:, None] + k[None, :] - first  # (len(n), 2 * width)
    acc = (xq[idx].astype(np.int64) * taps[(n * down) % up]).sum(axis=1)
    return np.clip((acc + (1 << (TAP_FRAC_BITS - 1))) >> TAP_FRAC_BITS, -32768, 32767).astype(np.int16)


def resample_pcm16(pcm: np.ndarray, sr_in: int, sr_out: int, taps_per_side: int = 16) -> np.ndarray:
    """Band-limited resampling in integer arithmetic: int16 in, int16 out, (N * up // down,)."""
    pcm = np.asarray(pcm, np.int16)
    if sr_in == sr_out:
        return pcm.copy()
    up, down, width, k, taps = sinc_kernel(sr_in, sr_out, taps_per_side)
    n_out = int(len(pcm) * up // down)
    xp = np.concatenate([np.zeros(width, np.int16), pcm, np.zeros(width + 1, np.int16)])
    out = np.empty(n_out, np.int16)
    chunk = 65536
    for s in range(0, n_out, chunk):
        n = np.arange(s, min(n_out, s + chunk))
        out[s:s + len(n)] = polyphase(xp, n, -width, up, down, k, taps)
    return out


def resample(x: np.ndarray, sr_in: int, sr_out: int, taps_per_side: int = 16) -> np.ndarray:
    """Float in [-1, 1) -> float32: the integer resampler on the int16 version of x.

    Good to about -80 dB (the taps' Q15 rounding sits below the int16 floor), ample for Mel."""
    return resample_pcm16(to_pcm16(np.asarray(x)), sr_in, sr_out, taps_per_side).astype(np.float32) / 32768.0


# --- live sources ------------------------------------------------------------
# Every source is a context manager; iterating it yields `Chunk`s of int16 mono PCM at
# cfg.sample_rate_hz, each stamped with the wall-clock time its last sample arrived.
# `read(timeout)` returns one chunk or None ("nothing yet" is a return value); iteration
# ends when the source is exhausted or closed.

import collections  # noqa: E402  (live-source imports kept beside the code that uses them)
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Iterator, NamedTuple  # noqa: E402

MIC_RATES_HZ = (16000, 48000, 44100)  # tried in this order; 48 kHz decimates by 3 exactly
# One pose frame (25 fps) per chunk: the capture thread and the pipeline wake once per frame
# instead of four times (bench.pipeline: the capture thread's CPU at real-time pace 15.4 -> 4.6 ms
# per s of audio). Latency does not change: chunks and frames both start at sample 0, so a frame
# is complete when the chunk holding its last sample arrives, whatever the chunk length.
CHUNK_MS = 40


class Chunk(NamedTuple):
    pcm: np.ndarray  # (n,) int16 at the contract rate
    t_capture: float  # wall clock (Unix s) when the last sample of this chunk arrived
    start: int  # stream index of the first sample


class StreamResampler:
    """`resample` for a stream: the same integer kernel, state kept across chunks.

    Output sample n sits at input position n * down / up; it is computed once input up to
    that position + `width` taps has arrived, so the output lags the input by `width` input
    samples (16 at 16 kHz, 48 at 48 kHz: 1 ms).
    """

    def __init__(self, sr_in: int, sr_out: int, taps_per_side: int = 16):
        self.passthrough = sr_in == sr_out
        self.up, self.down, self.width, self.k, self.taps = sinc_kernel(sr_in, sr_out, taps_per_side)
        self.reset()

    def reset(self):
        self._buf = np.zeros(self.width, np.int16)  # zeros before the stream, as in `resample`
        self._buf_start = -self.width  # input index of _buf[0]
        self._n = 0  # next output index

    def process(self, x: np.ndarray) -> np.ndarray:
        """float input chunk (any length) -> float32 output samples that became computable."""
        y = self.process_pcm16(to_pcm16(np.asarray(x)))
        return y.astype(np.float32) / 32768.0

    def process_pcm16(self, x: np.ndarray) -> np.ndarray:
        """int16 input chunk (any length) -> int16 output samples that became computable."""
        if self.passthrough:
            return np.asarray(x, np.int16)
        self._buf = np.concatenate([self._buf, np.asarray(x, np.int16)])
        have = self._buf_start + len(self._buf)  # input samples [.., have) are known
        # output n needs input index base(n) + width, base(n) = n * down // up
        n_end = ((have - self.width - 1) * self.up) // self.down + 1
        if n_end <= self._n:
            return np.zeros(0, np.int16)
        n = np.arange(self._n, n_end)
        out = polyphase(self._buf, n, self._buf_start, self.up, self.down, self.k, self.taps)
        self._n = n_end
        keep_from = (n_end * self.down) // self.up - self.width + 1 - self._buf_start
        if keep_from > 0:
            self._buf = self._buf[keep_from:]
            self._buf_start += keep_from
        return out


class _Source:
    """Common shape: a queue of chunks filled by a producer, drained by iteration."""

    def __init__(self, cfg: FeatureConfig):
        self.cfg = cfg
        self.overflows = 0  # input overflows reported by the hardware / producer
        self.samples = 0  # samples delivered so far (at the contract rate)
        self._closed = threading.Event()

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        raise NotImplementedError

    def close(self):
        self._closed.set()

    def read(self, timeout: float | None = None) -> Chunk | None:
        raise NotImplementedError

    @property
    def exhausted(self) -> bool:
        return self._closed.is_set()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            c = self.read(timeout=0.1)
            if c is not None:
                yield c
            elif self.exhausted:
                return

    def _chunk(self, pcm: np.ndarray, t_capture: float) -> Chunk:
        c = Chunk(pcm, t_capture, self.samples)
        self.samples += len(pcm)
        return c


def _pyaudio():
    try:
        import pyaudio
    except ImportError as e:
        raise AudioError("the microphone needs PyAudio: apt install portaudio19-dev, then "
                         "pip install 'edgedance[device]'") from e
    return pyaudio


def list_devices() -> list[dict]:
    """Input devices PortAudio sees: [{index, name, channels, default_rate_hz, host_api}]."""
    pyaudio = _pyaudio()
    pa = pyaudio.PyAudio()
    try:
        return _input_devices(pa)
    finally:
        pa.terminate()


def _input_devices(pa) -> list[dict]:
    out = []
    for i in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(i)
        if info.get("maxInputChannels", 0) > 0:
            api = pa.get_host_api_info_by_index(info["hostApi"])["name"]
            out.append({"index": i, "name": info["name"], "channels": int(info["maxInputChannels"]),
                        "default_rate_hz": float(info["defaultSampleRate"]), "host_api": api})
    return out


def _describe(devices: list[dict]) -> str:
    if not devices:
        return "no input devices at all (is a microphone plugged in? is the user in group 'audio'?)"
    return "input devices: " + "; ".join(f"[{d['index']}] {d['name']!r} ({d['channels']} ch, "
                                         f"{d['default_rate_hz']:.0f} Hz)" for d in devices)


class MicSource(_Source):
    """A PyAudio (PortAudio) input stream, by device name or index (None: the default device).

    Opens the device at 16 kHz if it offers it, else 48 or 44.1 kHz (or its default rate) and
    resamples to the contract rate. PortAudio's input-overflow flag is counted in
    `overflows`, never raised; if the consumer falls behind, the oldest chunks are dropped
    and counted in `dropped_samples`.
    """

    def __init__(self, device: str | int | None = None, cfg: FeatureConfig = DEFAULT_FEATURES,
                 chunk_ms: int = CHUNK_MS, max_queue_s: float = 2.0, rates_hz: tuple = MIC_RATES_HZ):
        super().__init__(cfg)
        self.device = device
        self.rates_hz = tuple(rates_hz)
        self.chunk_ms = chunk_ms
        self.rate_hz: int | None = None  # the rate the hardware runs at
        self.channels = 1
        self.device_name = ""
        self.dropped_samples = 0
        self._q: collections.deque = collections.deque()
        self._max_queue = max(1, int(max_queue_s * 1000 / chunk_ms))
        self._ready = threading.Condition()
        self._pa = self._stream = None

    def _resolve(self, pa) -> dict:
        devices = _input_devices(pa)
        if self.device is None or self.device == "":
            try:
                info = pa.get_default_input_device_info()
            except (IOError, OSError) as e:
                raise AudioError(f"no default microphone: {e}; {_describe(devices)}") from e
            return next(d for d in devices if d["index"] == info["index"])
        if isinstance(self.device, int) or str(self.device).isdigit():
            idx = int(self.device)
            for d in devices:
                if d["index"] == idx:
                    return d
            raise AudioError(f"microphone index {idx} is not an input device; {_describe(devices)}")
        name = str(self.device)
        exact = [d for d in devices if d["name"] == name]
        if exact:
            return exact[0]
        partial = [d for d in devices if name.lower() in d["name"].lower()]
        if len(partial) == 1:
            return partial[0]
        if len(partial) > 1:
            raise AudioError(f"microphone name {name!r} matches {len(partial)} devices; use the full name "
                             f"or the index; {_describe(partial)}")
        raise AudioError(f"no microphone named {name!r}; {_describe(devices)}")

    def open(self):
        pyaudio = _pyaudio()
        self._pa = pyaudio.PyAudio()
        try:
            dev = self._resolve(self._pa)
            self.device_name = dev["name"]
            rates = list(self.rates_hz) + [int(dev["default_rate_hz"])]
            for channels in (1, min(2, dev["channels"])):
                for rate in rates:
                    try:
                        ok = self._pa.is_format_supported(rate, input_device=dev["index"], input_channels=channels,
                                                          input_format=pyaudio.paInt16)
                    except ValueError:
                        ok = False
                    if ok:
                        self.rate_hz, self.channels = rate, channels
                        break
                if self.rate_hz:
                    break
            if not self.rate_hz:
                raise AudioError(f"microphone [{dev['index']}] {dev['name']!r} offers none of {rates} Hz "
                                 f"as 16-bit input; {_describe(_input_devices(self._pa))}")
            self._resampler = StreamResampler(self.rate_hz, self.cfg.sample_rate_hz)
            self._flags = (pyaudio.paInputOverflow, pyaudio.paContinue, pyaudio.paAbort)
            try:
                self._stream = self._pa.open(format=pyaudio.paInt16, channels=self.channels, rate=self.rate_hz,
                                             input=True, input_device_index=dev["index"],
                                             frames_per_buffer=self.rate_hz * self.chunk_ms // 1000,
                                             stream_callback=self._callback)
            except (IOError, OSError) as e:
                raise AudioError(f"microphone [{dev['index']}] {dev['name']!r} cannot be opened (busy, unplugged "
                                 f"or no permission: is the user in group 'audio'?): {e}; "
                                 f"{_describe(_input_devices(self._pa))}") from e
            self._closed.clear()
            self._stream.start_stream()
            log.info("microphone [%d] %r open at %d Hz, %d channel(s)", dev["index"], dev["name"],
                     self.rate_hz, self.channels)
        except BaseException:
            self.close()
            raise

    def _callback(self, data, frame_count, time_info, status):
        t = time.time()
        overflow, cont, abort = self._flags
        if status & overflow:
            self.overflows += 1
        x = np.frombuffer(data, dtype=np.int16)
        if self.channels > 1:
            x = (x.reshape(-1, self.channels).astype(np.int32).sum(axis=1) // self.channels).astype(np.int16)
        if self._resampler.passthrough:
            pcm = x.astype(np.int16, copy=True)
        else:
            pcm = self._resampler.process_pcm16(x)
        with self._ready:
            if len(self._q) >= self._max_queue:
                self.dropped_samples += len(self._q.popleft().pcm)
            self._q.append(self._chunk(pcm, t))
            self._ready.notify()
        return None, (abort if self._closed.is_set() else cont)

    def read(self, timeout: float | None = None) -> Chunk | None:
        with self._ready:
            if not self._q and not self._closed.is_set():
                self._ready.wait(timeout)
            return self._q.popleft() if self._q else None

    @property
    def exhausted(self) -> bool:
        return self._closed.is_set() and not self._q

    def close(self):
        self._closed.set()
        with self._ready:
            self._ready.notify_all()
        if self._stream is not None:
            try:
                self._stream.stop_stream()
                self._stream.close()
            except (IOError, OSError) as e:
                log.warning("closing the microphone stream: %s", e)
            self._stream = None
        if self._pa is not None:
            self._pa.terminate()
            self._pa = None


class FileSource(_Source):
    """A decoded audio file delivered in chunks: at real-time pace, or as fast as the consumer reads."""

    def __init__(self, path: str | os.PathLike, cfg: FeatureConfig = DEFAULT_FEATURES, *, realtime: bool = True,
                 chunk_ms: int = CHUNK_MS, loop: bool = False, pcm: np.ndarray | None = None):
        super().__init__(cfg)
        self.path = os.fspath(path)
        self.realtime = realtime
        self.loop = loop
        self.chunk = cfg.sample_rate_hz * chunk_ms // 1000
        self._pcm = pcm
        self._pos = 0
        self._t0 = None

    def open(self):
        if self._pcm is None:
            self._pcm = load_file(self.path, self.cfg)
        self._closed.clear()
        self._pos = 0
        self._t0 = None

    def read(self, timeout: float | None = None) -> Chunk | None:
        if self._closed.is_set():
            return None
        if self._pos >= len(self._pcm):
            if not self.loop:
                self._closed.set()
                return None
            self._pos = 0
        end = min(self._pos + self.chunk, len(self._pcm))
        if self.realtime:
            if self._t0 is None:
                self._t0 = time.monotonic() - (self.samples / self.cfg.sample_rate_hz)
            due = self._t0 + (self.samples + end - self._pos) / self.cfg.sample_rate_hz
            wait = due - time.monotonic()
            if wait > 0:
                if timeout is not None and wait > timeout:
                    self._closed.wait(timeout)
                    return None
                if self._closed.wait(wait):
                    return None
        pcm = self._pcm[self._pos:end]
        self._pos = end
        return self._chunk(pcm, time.time())


class StdinSource(_Source):
    """Raw signed 16-bit little-endian mono PCM from a binary stream (default: stdin) at `rate_hz`.

    A reader thread fills a queue, so `read(timeout)` never blocks longer than asked; end of
    the stream ends the iteration.
    """

    def __init__(self, rate_hz: int = 16000, cfg: FeatureConfig = DEFAULT_FEATURES, *, stream=None,
                 chunk_ms: int = CHUNK_MS):
        super().__init__(cfg)
        if rate_hz not in SUPPORTED_RATES_HZ:
            raise AudioError(f"stdin sample rate {rate_hz} Hz is not supported; use one of {SUPPORTED_RATES_HZ}")
        self.rate_hz = rate_hz
        self.stream = stream
        self.chunk_bytes = 2 * (rate_hz * chunk_ms // 1000)
        self._q: queue.Queue = queue.Queue(maxsize=1000)
        self._thread = None
        self._eof = threading.Event()

    def open(self):
        if self.stream is None:
            self.stream = sys.stdin.buffer
        self._resampler = StreamResampler(self.rate_hz, self.cfg.sample_rate_hz)
        self._closed.clear()
        self._thread = threading.Thread(target=self._reader, name="stdin-audio", daemon=True)
        self._thread.start()

    def _reader(self):
        carry = b""
        try:
            while not self._closed.is_set():
                data = self.stream.read(self.chunk_bytes)
                if not data:
                    break
                data = carry + data
                n = len(data) // 2 * 2
                carry = data[n:]
                x = np.frombuffer(data[:n], dtype="<i2")
                if not self._resampler.passthrough:
                    x = self._resampler.process_pcm16(x)
                else:
                    x = x.astype(np.int16)
                if len(x):
                    try:
                        self._q.put_nowait(self._chunk(x, time.time()))
                    except queue.Full:
                        self.overflows += 1
        except (OSError, ValueError) as e:
            log.warning("stdin audio stopped: %s", e)
        finally:
            self._eof.set()

    def read(self, timeout: float | None = None) -> Chunk | None:
        try:
            return self._q.get(timeout=timeout) if timeout != 0 else self._q.get_nowait()
        except queue.Empty:
            return None

    @property
    def exhausted(self) -> bool:
        return (self._eof.is_set() or self._closed.is_set()) and self._q.empty()

    def close(self):
        self._closed.set()
        # a reader blocked in stream.read() ends at EOF; it is a daemon thread so it cannot hold up exit
        if self._thread is not None:
            self._thread.join(timeout=0.5)


def open_source(kind: str, cfg: FeatureConfig = DEFAULT_FEATURES, *, device=None, path=None, realtime=True,
                loop=False, rate_hz=16000, chunk_ms=CHUNK_MS) -> _Source:
    """The platform choice in one place: 'mic' | 'file' | 'stdin' -> an unopened source."""
    if kind == "mic":
        return MicSource(device, cfg, chunk_ms=chunk_ms)
    if kind == "file":
        if not path:
            raise AudioError("audio source 'file' needs a file path (settings key audio.file)")
        return FileSource(path, cfg, realtime=realtime, loop=loop, chunk_ms=chunk_ms)
    if kind == "stdin":
        return StdinSource(rate_hz, cfg, chunk_ms=chunk_ms)
    raise AudioError(f"audio source {kind!r}: use 'mic', 'file' or 'stdin'")
