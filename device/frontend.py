"""Fixed-point log-Mel frontend: int16 PCM in, int16 log-Mel (dB re full scale, Q7.8) out.

Integer arithmetic (see "Implementation" for how numpy holds the integers), every stage
vectorised over a block of frames:

    int16 frame ─► Q15 Hann window ─► per-frame block exponent (leading-zero count)
                ─► radix-2 FFT (N/2-point complex, Q15 twiddles) ─► real-FFT split
                ─► power (int64) ─► Mel filterbank (Q15 weights, non-zero spans only)
                ─► log2 (leading-zero count + LUT) ─► dB in Q7.8 ─► floor

The float reference of exactly this definition (framing, window, filters, 0 dB) is
device.frontend_ref; its docstring says what 0 dB means. Frame i analyses samples
[(i + 1) * hop - n_fft, (i + 1) * hop), zeros before the stream starts.

Every frame carries its own exponent, so a frame's output depends on its own samples only:
streaming in any chunk sizes and batch (`log_mel`) are bit-identical. Setup precomputes every
table (window, gather index, twiddles, filter spans, log table) and a fixed sample buffer; the
work buffers for a block of k frames are made once per k (`_Plan`), so the device's 640-sample
chunks (4 frames) and the batch path's 128-frame blocks run the same vectorised code.

Numbers, for the default config (n_fft N = 512 = 2**9, M = N / 2 = 256 complex points):

  window   x (int16, |x| <= 2**15) times w_q15 = round(w * 2**15) (the centre tap is exactly 2**15, so
           the table is int32, not int16): |x * w_q15| <= 2**30.
  exponent e = max(0, bitlen(max_n |x * w_q15|)); the frame becomes v = round(x * w_q15 * 2**V / 2**e),
           so |v| <= 2**V with V = DATA_BITS = 30 - log2(N) = 21. Quiet frames are shifted up (up to
           21 bits), loud ones down (at most 10 bits: 21 bits of a 16-bit input survive).
  FFT      z_n = v_2n + j v_2n+1, Z = DFT_M(z) by radix-2 decimation in time (bit reversal folded into
           the framing gather, no per-stage shift needed: the V-bit start leaves log2(N) bits headroom).
           Butterfly values stay below M * sqrt(2) * 2**V < 2**30 (int32 data); products with Q15
           twiddles are 31 x 16 -> 47 bits, rounded back by >> 15 (an ARM SMULL + shift).
  split    F_k = (Z_k + Z*_{M-k}) - j W_N^k (Z_k - Z*_{M-k}) = 2 X_k, k = 0 .. M, |F_k| <= 2 * N * 2**V = 2**31.
  power    P_k = Re(F_k)**2 + Im(F_k)**2 <= 2**62 (int64). Parseval: sum_k P_k <= 2**62 too.
  Mel      mel_m = sum_k w_q15[m, k] * (P_k >> 15): each bin feeds at most two adjacent bands with
           weights r and 2**15 - r, so every partial sum <= 2**15 * sum_k (P_k >> 15) <= 2**62 (int64).
  scale    v = x_f * w * 2**(30 + V - e) with x_f = x / 2**15, so P_k = 2**(62 + 2V - 2e) |X_f,k|**2 and
           mel_m = 2**(62 + 2V - 2e) * Mel_f,m. With P_REF = (N / 4)**2 = 2**(2 log2 N - 4):
           log2(Mel_f / P_REF) = log2(mel_m) - LOG2_OFFSET + 2e,  LOG2_OFFSET = 58 + 2V + 2 log2 N = 118.
  log2/dB  b = bitlen(mel) (binary search over the 63 powers of two: a leading-zero count); the
           mantissa mel >> (b - 13) lies in [2**12, 2**13), its top 12 fraction bits index a table of
           LUT_DB[i] = round(DB_PER_LOG2 * log2((i + 0.5) / 2**12)), the midpoint of each 1/4096 step,
           so |table error| <= 0.5 / 4096 / ln 2 = 1.8e-4 in log2 = 5.3e-4 dB, well below the output
           step (1/256 dB). DB_PER_LOG2 = round(10 log10(2) * 2**8 * 2**16) = 50504987: dB per octave
           of power in Q7.8, carrying 16 more bits until the final rounding shift:
           dB_q8 = ((b - 1 + 2e - LOG2_OFFSET) * DB_PER_LOG2 + LUT_DB[mant] + 2**15) >> 16.
           |b - 1 + 2e - 118| < 128, so the products stay below 2**33 (int64).
  floor    max(dB_q8, round(floor_db * 2**8)). Silence (Mel 0, clamped to 2**16) needs no special case.

Implementation. Up to the power, numpy holds these integers in float64 (complex128 in the FFT):
every value and product there has at most 48 significant bits (|x * w_q15| <= 2**30, butterflies
< 2**30 and split terms < 2**31 times a Q15 twiddle), so float64 arithmetic on them is exact, a
product with the twiddle (c - j s) / 2**15 is the Q15 product before its shift, and floor(y + 1/2)
is the rounding shift (y * 2**15 + 2**14) >> 15. Power, Mel and log are int64. The FFT runs in
constant geometry (Pease): every stage pairs the first half of its input with the second half
and writes a + t, a - t to the even and odd outputs, so each numpy call sees 1-D operands (the
fast path; a block of 4 frames is 1024 values and costs little more than the call itself). Its
values are those of the radix-2 decimation in time above, in a different memory order: stage s
(half-size h = 2**s) reads X_h[q, c] of frame f, the h-point DFT at q of z[c::M/h], at
(c * k + f) * h + bitrev_s(q) (stage 0: the windowed frames, in (f, c) order) and pairs c with
c + M / 2h; the output Z_q of frame f sits at f * M + bitrev(q).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from device.contract import DEFAULT_FEATURES, FeatureConfig
from device.frontend_ref import bin_hz, hann, mel_corners_hz

log = logging.getLogger(__name__)

Q15 = 15
ONE_Q15 = 1 << Q15
MEL_SHIFT = 15  # P_k >> 15 before the Q15 filterbank MAC: keeps every Mel sum below 2**62
LUT_BITS = 12  # log2 table: the mantissa's top 12 fraction bits index it (4096 entries)
DB_PER_LOG2 = round(10.0 * math.log10(2.0) * (1 << 24))  # 50504987: dB per octave of power, Q7.8 * 2**16
MEL_MIN = 1 << 16  # Mel values are clamped up to this before the log (all below the floor, see setup)
BLOCK_FRAMES = 32  # frames per vectorised block in batch use: about 60 kB of tables and buffers per frame
_POW2 = np.array([1 << i for i in range(63)], dtype=np.int64)  # bitlen(x) = searchsorted(_POW2, x, 'right')
_HALF = np.array(0.5)  # 0-d: numpy converts a Python float operand on every call


def _bitlen(x: np.ndarray) -> np.ndarray:
    """Number of significant bits of non-negative int64 values (0 for 0): 64 - leading zeros."""
    return np.searchsorted(_POW2, x, side="right")


def _bitrev(n_bits: int) -> np.ndarray:
    i = np.arange(1 << n_bits)
    r = np.zeros_like(i)
    for b in range(n_bits):
        r |= ((i >> b) & 1) << (n_bits - 1 - b)
    return r


def _q15(x: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(x) * ONE_Q15).astype(np.int64)


class _Plan:
    """Tables and work buffers for a block of k frames, made once per k: `Frontend._frames` only fills them."""

    def __init__(self, fe: "Frontend", k: int):
        n_fft, m, n_used, n_mels = fe.n_fft, fe.m, fe._n_used, fe.n_mels
        n = m * k  # complex values in the block
        # Frame f is buf[f * hop : f * hop + n_fft]: a strided view, z_c = x_2c + j x_2c+1 in natural order.
        step = fe._buf.strides[0]
        self.frames = np.lib.stride_tricks.as_strided(fe._buf, (k, n_fft), (fe.hop * step, step), writeable=False)
        self.win = np.tile(fe.window_q15.astype(np.float64), (k, 1))  # (k, N)
        self.x = np.empty((k, n_fft))
        self.absx = np.empty((k, n_fft))
        self.peak = np.empty(k)  # max |x| per frame
        self.frac, self.e = np.empty(k), np.empty(k, np.int32)  # frexp: peak = frac * 2**e, e = bitlen
        self.scale = np.empty(k)  # 2**(V - e)
        self.scale2 = self.scale[:, None]
        self.ce = np.empty(k, np.int64)  # the dB sum's per-frame constant, from e
        self.ce2 = self.ce[:, None]
        # FFT stages (see the module docstring): (a, b, twiddles or None for W = 1, rounded?, even out, odd out).
        # The first reads the frames in (f, c) order; its outputs, and all later ones, are in (c, f, ...) order.
        self.t = np.empty(n // 2, np.complex128)
        self.t_f = self.t.view(np.float64)
        xc = self.x.view(np.complex128)  # (k, M)
        pingpong = [np.empty(n, np.complex128) for _ in range(2)]
        y = pingpong[0].reshape(m // 2, k, 2).transpose(2, 1, 0)  # [u, f, c]
        self.stages = [(xc[:, : m // 2], xc[:, m // 2:], None, False, y[0], y[1])]
        src = pingpong[0]
        for i, (w, rounded) in enumerate(fe._twiddles[1:], 1):
            dst = pingpong[i % 2]
            self.stages.append((src[: n // 2], src[n // 2:], None if w is None else w[: n // 2], rounded,
                                dst[0::2], dst[1::2]))
            src = dst
        self.z = src  # Z_q of frame f at f * M + bitrev(q)
        # Real-FFT split over the used bins k0 .. k1 - 1: gather Z_k and Z_{M-k} in (k, n_used) order.
        self.za_idx = np.arange(k)[:, None] * m + fe._za_pos  # (k, n_used)
        self.zr_idx = np.arange(k)[:, None] * m + fe._zr_pos
        self.za = np.empty((k, n_used), np.complex128)
        self.zb = np.empty((k, n_used), np.complex128)  # Z_{M-k}, then conj(Z_{M-k})
        self.d = np.empty((k, n_used), np.complex128)
        self.d_f = self.d.view(np.float64)
        self.f = np.empty((k, n_used), np.complex128)
        self.f_planes = self.f.view(np.float64).reshape(k, n_used, 2).transpose(2, 0, 1)  # [re, im]
        self.f_int = np.empty((2, k, n_used), np.int64)
        self.p = np.empty((k, n_used), np.int64)
        self.rise = np.tile(fe.rise_q15, (k, 1))  # (k, n_used)
        self.fall = np.tile(fe.fall_q15, (k, 1))
        self.p_rise = np.empty((k, n_used), np.int64)
        self.p_fall = np.empty((k, n_used), np.int64)
        self.mel_rise = np.empty((k, n_mels), np.int64)
        self.mel = np.empty((k, n_mels), np.int64)
        self.shift = np.empty((k, n_mels), np.int64)
        self.lut = np.empty((k, n_mels), np.int64)


class Frontend:
    """Streaming fixed-point log-Mel. `process` takes int16 chunks of any length.

    Returns the (k, n_mels) int16 frames (dB * 256) completed by each chunk; a remainder of
    less than a hop is kept for the next call. `reset` starts a new stream (zeros before it).
    """

    def __init__(self, cfg: FeatureConfig = DEFAULT_FEATURES, block_frames: int = BLOCK_FRAMES):
        self.cfg = cfg
        n, hop = cfg.n_fft, cfg.hop_length
        self.n_fft, self.hop, self.n_mels = n, hop, cfg.n_mels
        self.log2_n = n.bit_length() - 1
        m = n // 2
        self.m = m
        self.data_bits = 30 - self.log2_n  # V: |v| <= 2**V keeps |F_k| <= 2**31
        assert self.data_bits >= 16, f"n_fft {n} too large for a 16-bit input with 31-bit FFT data"
        assert m >= 2, f"n_fft {n} too small"
        self.log2_offset = 58 + 2 * self.data_bits + 2 * self.log2_n  # 118 for n_fft 512
        self.floor_q8 = int(round(cfg.floor_db * (1 << cfg.log_frac_bits)))
        assert cfg.log_frac_bits == 8, "the dB conversion below is derived for Q7.8 output"
        self.window_q15 = _q15(hann(n))  # (N,) <= 32768

        # Radix-2 stages: for half-size h the twiddles W_2h^q = c - j s, q < h, in Q15, held as
        # (c - j s) / 2**15 so that the product b * W is the Q15 product before its rounding shift.
        # Stage s (h = 2**s) reads position i of its second half with q = bitrev_s(i mod h): the
        # pattern repeats every h values, so one table of block_frames * M / 2 serves every block size.
        self._twiddles = []  # (twiddle per position, or None for W = 1; rounded?)
        h = 1
        while h < m:
            ang = np.pi * np.arange(h) / h
            w = _q15_twiddle(_q15(np.cos(ang)), _q15(np.sin(ang)))[_bitrev(h.bit_length() - 1)]  # (h,)
            if h == 1:
                w = None  # W = 1: t = b
            elif h == 2:
                w = np.array([1, -1j])  # W = 1, -j: exact, no rounding
            if w is not None:
                w = np.tile(w, block_frames * m // (2 * h))  # (block_frames * M / 2,)
            self._twiddles.append((w, h > 2))
            h *= 2

        self._setup_filterbank()
        self._setup_log()
        # Real-FFT split, k = k0 .. k1 - 1: F_k = Ze + W_N^k Zo with Zo = -j D, so W_N^k Zo = D (-s - j c).
        k = np.arange(self._k0, self._k1)
        ang = 2.0 * np.pi * k / n
        self._split_w = _q15_twiddle(-_q15(np.sin(ang)), _q15(np.cos(ang)))  # (n_used,)
        br = _bitrev(self.log2_n - 1)
        self._za_pos, self._zr_pos = br[k % m], br[(m - k) % m]  # where Z_k, Z_{M-k} sit in a frame's FFT output

        self.block_frames = block_frames
        self._keep = n - hop  # samples of history a new frame needs
        self._cap = self._keep + block_frames * hop
        self._buf = np.zeros(self._cap)  # int16 samples, as float64
        self._plans: dict[int, _Plan] = {}
        self.reset()

    def _setup_filterbank(self):
        """Each bin k between the first and last corner lies in one segment j (corner j <= f < corner j+1):
        it feeds band j with the rising weight r = (f - c_j) / (c_j+1 - c_j) and band j - 1 with 1 - r.
        Only those spans are stored: a bin range per segment and one Q15 weight per bin."""
        f = bin_hz(self.cfg)
        corners = mel_corners_hz(self.cfg)
        seg = np.searchsorted(corners, f, side="right") - 1  # (M+1,), -1 below, n_mels+1 at/after the top
        used = (seg >= 0) & (seg <= self.n_mels)
        self._k0 = int(np.argmax(used))
        self._k1 = int(len(f) - np.argmax(used[::-1]))
        assert used[self._k0:self._k1].all()
        seg_u = seg[self._k0:self._k1]
        f_u = f[self._k0:self._k1]
        r = (f_u - corners[seg_u]) / (corners[seg_u + 1] - corners[seg_u])
        self.rise_q15 = _q15(r)  # (n_used,) weight into band seg
        self.fall_q15 = ONE_Q15 - self.rise_q15  # (n_used,) weight into band seg - 1
        # Segment j spans used bins [lo_j, hi_j): band m = rise over segment m + fall over segment m + 1.
        j = np.arange(self.n_mels + 1)
        lo = np.searchsorted(seg_u, j, side="left")
        hi = np.searchsorted(seg_u, j, side="right")
        self._n_used = len(seg_u)
        self._seg_lo, self._seg_hi = lo, hi  # (n_mels + 1,)
        self._reduceat = bool(np.all(hi > lo))  # np.add.reduceat needs non-empty spans
        if self._reduceat:  # the segments tile the used bins (lo[j + 1] == hi[j]); the last ends at n_used
            self._rise_end = lo[-1]  # rise sums over segments 0 .. n_mels - 1: bins [0, lo[n_mels])
            self._rise_starts = lo[:-1]
            self._fall_start = lo[1]  # fall sums over segments 1 .. n_mels: bins [lo[1], n_used)
            self._fall_starts = lo[1:] - lo[1]
        else:
            log.warning("feature config %s: some Mel segments hold no FFT bin (bands too narrow for n_fft)",
                        self.cfg.config_hash())

    def _setup_log(self):
        i = np.arange(1 << LUT_BITS, 2 << LUT_BITS)  # mantissas with their leading one
        lut = np.round(DB_PER_LOG2 * np.log2((i + 0.5) / (1 << LUT_BITS))).astype(np.int64)
        self.lut_db = np.concatenate([np.zeros(1 << LUT_BITS, np.int64), lut])  # (8192,), indexed by mantissa
        # Mel values below MEL_MIN = 2**16 are clamped to it; log2 < 17 must fall below the floor
        # for the largest exponent (e = 31): 10 log10(2) (17 - 118 + 62) = -117 dB < -100 dB.
        worst_db = 10 * math.log10(2) * (math.log2(2 * MEL_MIN) - self.log2_offset + 2 * 31)
        assert worst_db < self.cfg.floor_db, "floor too low for the Mel resolution"
        # Per block exponent e = 0 .. 31 (|x * w_q15| <= 2**30): the frame's scale 2**(V - e) and the
        # constant of its dB sum, (2e - LOG2_OFFSET - 1) * DB_PER_LOG2 + 2**15 (rounding of the >> 16).
        e = np.arange(32)
        self._scale_of_e = np.ldexp(1.0, self.data_bits - e)  # (32,)
        self._db_of_e = (2 * e - (self.log2_offset + 1)) * DB_PER_LOG2 + (1 << 15)  # (32,) int64

    def __getstate__(self) -> dict:  # a copy or pickle rebuilds its plans: they hold views of _buf
        return {**self.__dict__, "_plans": {}}

    def reset(self) -> None:
        self._buf[: self._keep] = 0
        self._fill = self._keep

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """int16 samples (any length) -> (k, n_mels) int16 log-Mel of the k frames they complete."""
        pcm = _check_pcm(pcm)
        out = []
        pos, n_in = 0, len(pcm)
        while True:
            take = min(n_in - pos, self._cap - self._fill)
            self._buf[self._fill: self._fill + take] = pcm[pos: pos + take]
            self._fill += take
            pos += take
            if self._fill < self._cap and pos < n_in:
                continue
            k = (self._fill - self._keep) // self.hop
            if k:
                out.append(self._frames(k))
                used = k * self.hop
                rest = self._fill - used
                self._buf[:rest] = self._buf[used: self._fill]
                self._fill = rest
            if pos >= n_in:
                break
        if not out:
            return np.zeros((0, self.n_mels), dtype=np.int16)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _frames(self, k: int) -> np.ndarray:
        """log-Mel of the k frames in the buffer: (k, n_mels) int16 (exact integers in float64 up to
        the power, see the module docstring)."""
        pl = self._plans.get(k)
        if pl is None:
            pl = self._plans[k] = _Plan(self, k)
        x = pl.x
        np.multiply(pl.frames, pl.win, out=x)  # (k, N) x * w_q15, |.| <= 2**30
        np.abs(x, out=pl.absx)
        np.maximum.reduce(pl.absx, axis=1, out=pl.peak)
        np.frexp(pl.peak, out=(pl.frac, pl.e))  # block exponent e = bitlen(max |x * w_q15|)
        np.take(self._scale_of_e, pl.e, out=pl.scale)
        x *= pl.scale2  # x * w_q15 * 2**V / 2**e
        x += _HALF
        np.floor(x, out=x)  # |v| <= 2**V

        t, t_f = pl.t, pl.t_f
        for a, b, w, rounded, even, odd in pl.stages:  # butterflies: a, b -> a + t, a - t, t = round(b W)
            if w is None:  # W = 1
                np.add(a, b, out=even)
                np.subtract(a, b, out=odd)
                continue
            np.multiply(b, w, out=t)
            if rounded:  # not for W = 1, -j (exact)
                t_f += _HALF
                np.floor(t_f, out=t_f)
            np.add(a, t, out=even)
            np.subtract(a, t, out=odd)

        # Real-FFT split: F_k = Ze + W_N^k Zo with Ze = Z_k + Z*_{M-k}, Zo = -j (Z_k - Z*_{M-k}).
        np.take(pl.z, pl.za_idx, out=pl.za, mode="clip")
        np.take(pl.z, pl.zr_idx, out=pl.zb, mode="clip")
        np.conjugate(pl.zb, out=pl.zb)
        np.subtract(pl.za, pl.zb, out=pl.d)  # D
        np.add(pl.za, pl.zb, out=pl.f)  # Ze
        np.multiply(pl.d, self._split_w, out=pl.d)  # W_N^k Zo = D (-s - j c), rounded Q15
        pl.d_f += _HALF
        np.floor(pl.d_f, out=pl.d_f)
        pl.f += pl.d  # F = 2 X, |F| <= 2**31

        f = pl.f_int
        np.copyto(f, pl.f_planes, casting="unsafe")  # (2, k, n_used) int64 [re, im]
        f *= f
        p = pl.p
        np.add(f[0], f[1], out=p)  # (k, n_used) <= 2**62
        p >>= MEL_SHIFT

        mel = pl.mel
        np.multiply(p, pl.rise, out=pl.p_rise)
        np.multiply(p, pl.fall, out=pl.p_fall)
        if self._reduceat:  # span sums per segment: rise of segment m + fall of segment m + 1
            np.add.reduceat(pl.p_rise[:, : self._rise_end], self._rise_starts, axis=1, out=pl.mel_rise)
            np.add.reduceat(pl.p_fall[:, self._fall_start:], self._fall_starts, axis=1, out=mel)
            mel += pl.mel_rise  # (k, n_mels) <= 2**62
        else:  # the same sums from cumulative sums (handles empty segments)
            acc = np.zeros((2, k, self._n_used + 1), dtype=np.int64)
            np.cumsum(pl.p_rise, axis=1, out=acc[0, :, 1:])
            np.cumsum(pl.p_fall, axis=1, out=acc[1, :, 1:])
            lo, hi = self._seg_lo, self._seg_hi
            mel[:] = acc[0][:, hi[:-1]] - acc[0][:, lo[:-1]] + acc[1][:, hi[1:]] - acc[1][:, lo[1:]]

        np.maximum(mel, MEL_MIN, out=mel)  # below the floor anyway (setup checks it)
        b = _bitlen(mel)  # 17 .. 62: log2 mel = b - 1 + log2(mant / 2**12)
        np.subtract(b, LUT_BITS + 1, out=pl.shift)
        np.right_shift(mel, pl.shift, out=mel)  # mantissa in [2**12, 2**13)
        # dB_q8 = ((b - 1 + 2e - LOG2_OFFSET) * DB_PER_LOG2 + LUT_DB[mant] + 2**15) >> 16
        b *= DB_PER_LOG2
        np.take(self.lut_db, mel, out=pl.lut, mode="clip")
        b += pl.lut
        np.take(self._db_of_e, pl.e, out=pl.ce, mode="clip")
        b += pl.ce2
        b >>= 16  # dB in Q7.8
        np.maximum(b, self.floor_q8, out=b)
        return b.astype(np.int16)


def _q15_twiddle(re_q15: np.ndarray, im_neg_q15: np.ndarray) -> np.ndarray:
    """(re - j im) / 2**15 as complex128: exact, the Q15 integers scaled by a power of two."""
    w = np.empty(len(re_q15), np.complex128)
    w.real = re_q15 / ONE_Q15
    w.imag = -im_neg_q15 / ONE_Q15
    return w


def _check_pcm(pcm) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise TypeError(f"frontend input must be int16 PCM, got dtype {pcm.dtype}; "
                        "convert float audio in [-1, 1] with device.audio.to_pcm16")
    if pcm.ndim != 1:
        raise ValueError(f"frontend input must be mono, shape (N,), got shape {pcm.shape}; mix channels down first")
    return pcm


def log_mel(pcm: np.ndarray, cfg: FeatureConfig = DEFAULT_FEATURES) -> np.ndarray:
    """Batch log-Mel of a whole signal: (N // hop, n_mels) int16, bit-identical to streaming."""
    return Frontend(cfg).process(pcm)
