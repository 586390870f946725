"""Fixed-point log-Mel frontend: int16 PCM in, int16 log-Mel (dB re full scale, Q7.8) out.

Integer arithmetic only, every stage vectorised over a block of frames:

    int16 frame ─► Q15 Hann window ─► per-frame block exponent (leading-zero count)
                ─► radix-2 FFT (N/2-point complex, Q15 twiddles) ─► real-FFT split
                ─► power (int64) ─► Mel filterbank (Q15 weights, non-zero spans only)
                ─► log2 (leading-zero count + LUT) ─► dB in Q7.8 ─► floor

The float reference of exactly this definition (framing, window, filters, 0 dB) is
device.frontend_ref; its docstring says what 0 dB means. Frame i analyses samples
[(i + 1) * hop - n_fft, (i + 1) * hop), zeros before the stream starts.

Every frame carries its own exponent, so a frame's output depends on its own samples only:
streaming in any chunk sizes and batch (`log_mel`) are bit-identical. Setup precomputes every
table (permuted window, gather index, twiddles, filter spans, log table) and a fixed sample
buffer; processing allocates only numpy's per-block temporaries. A block of k frames is one
(2, k, M) array (real/imaginary planes), so the device's 640-sample chunks (4 frames) and the
batch path's 128-frame blocks run the same vectorised code.

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
EARLY = 8  # the FFT's first log2(EARLY) stages run on a transposed layout (speed only)
BLOCK_FRAMES = 128  # frames per vectorised block in batch use: (128, 2, 256) int64 = 0.5 MB
_POW2 = np.array([1 << i for i in range(63)], dtype=np.int64)  # bitlen(x) = searchsorted(_POW2, x, 'right')


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
        self.log2_offset = 58 + 2 * self.data_bits + 2 * self.log2_n  # 118 for n_fft 512
        self.floor_q8 = int(round(cfg.floor_db * (1 << cfg.log_frac_bits)))
        assert cfg.log_frac_bits == 8, "the dB conversion below is derived for Q7.8 output"

        # Framing: frame j of a block gathers buf[j * hop + PERM]; PERM holds the even samples
        # (real parts of z) and the odd ones (imaginary parts) in bit-reversed order: a (2, k, M) layout.
        # The first stages (butterflies within 8-point groups) run on the transposed layout
        # (2, k, 8, M / 8) so numpy's inner loops are M / 8 long rather than 1, 2 or 4.
        assert m % EARLY == 0, f"n_fft {n} must be at least {2 * EARLY}"
        br = _bitrev(self.log2_n - 1)
        fft_order = np.stack([2 * br, 2 * br + 1])  # (2, M)
        self._perm = fft_order.reshape(2, m // EARLY, EARLY).transpose(0, 2, 1).reshape(2, 1, m)  # (2, 1, M)
        # Window in Q15, pre-shifted by V so one rounding right shift by e normalises the frame.
        self.window_q15 = _q15(hann(n))  # (N,) <= 32768
        self._win = (self.window_q15 << self.data_bits)[self._perm]  # (2, 1, M) permuted, Q(15 + V)

        # Radix-2 stages: for half-size h the twiddles W_2h^j = c - j s, j < h, in Q15.
        self._early_stages, self._stages = [], []
        h = 1
        while h < m:
            ang = np.pi * np.arange(h) / h
            c, s = _q15(np.cos(ang)), _q15(np.sin(ang))
            if h < EARLY:  # twiddles along the r axis of (2, k, g, h, M / 8)
                self._early_stages.append((h, c[:, None], np.stack([s, -s])[:, None, None, :, None]))
            else:
                self._stages.append((h, c, np.stack([s, -s])[:, None, :]))  # (h,), (2, 1, h)
            h *= 2
        # Real-FFT split, k = 0 .. M: W_N^k = c - j s.
        k = np.arange(m + 1)
        ang = 2.0 * np.pi * k / n
        c, s = _q15(np.cos(ang)), _q15(np.sin(ang))
        self._conj = np.array([1, -1], dtype=np.int64)[:, None, None]  # (2, 1, 1)
        self._split_c = np.stack([c, -c])[:, None, :]  # (2, 1, M+1): multiplies [D_im, D_re]
        self._split_s = np.stack([-s, -s])[:, None, :]  # (2, 1, M+1): multiplies [D_re, D_im]

        self._setup_filterbank()
        self._setup_log()

        self.block_frames = block_frames
        self._keep = n - hop  # samples of history a new frame needs
        self._cap = self._keep + block_frames * hop
        self._buf = np.zeros(self._cap, dtype=np.int16)
        self._idx = np.arange(block_frames)[None, :, None] * hop + self._perm  # (2, B, M)
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
        # Segment j spans used bins [lo_j, hi_j): cumulative-sum differences give the span sums.
        j = np.arange(self.n_mels + 1)
        lo = np.searchsorted(seg_u, j, side="left")
        hi = np.searchsorted(seg_u, j, side="right")
        n_used = len(seg_u)
        # Band m = rise over segment m + fall over segment m + 1. Both weighted spectra sit in one
        # cumulative array [0, cumsum(rise * P), cumsum(fall * P)] (offset n_used + 1 for the second).
        off = n_used + 1
        self._mel_idx = np.stack([hi[:-1], lo[:-1], off + hi[1:], off + lo[1:]])  # (4, n_mels)
        self._n_used = n_used
        self._seg_starts = lo  # (n_mels + 1,): segments tile the used bins, lo[j + 1] == hi[j]
        self._reduceat = bool(np.all(hi > lo))  # np.add.reduceat needs non-empty spans
        if not self._reduceat:
            log.warning("feature config %s: some Mel segments hold no FFT bin (bands too narrow for n_fft)",
                        self.cfg.config_hash())

    def _setup_log(self):
        i = np.arange(1 << LUT_BITS, 2 << LUT_BITS)  # mantissas with their leading one
        lut = np.round(DB_PER_LOG2 * np.log2((i + 0.5) / (1 << LUT_BITS))).astype(np.int64)
        self.lut_db = np.concatenate([np.zeros(1 << LUT_BITS, np.int64), lut])  # (8192,), indexed by mantissa
        # Indexed by the mantissa's top 9 bits (leading one included): entries 256 .. 511 used.
        # Mel values below MEL_MIN = 2**16 are clamped to it; log2 < 17 must fall below the floor
        # for the largest exponent (e = 31): 10 log10(2) (17 - 118 + 62) = -117 dB < -100 dB.
        worst_db = 10 * math.log10(2) * (math.log2(2 * MEL_MIN) - self.log2_offset + 2 * 31)
        assert worst_db < self.cfg.floor_db, "floor too low for the Mel resolution"

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
        """log-Mel of the k frames in the buffer: (k, n_mels) int16."""
        m = self.m
        x = self._buf[self._idx[:, :k]] * self._win  # (2, k, M) int64 [re, im] of z, |x| <= 2**(30 + V)
        e = _bitlen(np.abs(x).max(axis=(0, 2))) - self.data_bits  # (k,) block exponent
        np.maximum(e, 0, out=e)
        e = e[:, None]  # (k, 1)
        x += (1 << e) >> 1
        x >>= e  # |v| <= 2**V

        xt = x.reshape(2, k, EARLY, m // EARLY)  # (2, k, r, G): FFT position G * 8 + r
        for h, c, s2 in self._early_stages:
            v = xt.reshape(2, k, EARLY // (2 * h), 2, h, m // EARLY)
            a, b = v[:, :, :, 0], v[:, :, :, 1]  # (2, k, g, h, M / 8)
            if h == 1:  # W = 1
                t = b.copy()
            elif h == 2:  # W = 1, -j: exact, -j (b_re + j b_im) = b_im - j b_re
                t = b.copy()
                np.multiply(b[::-1, :, :, 1], self._conj[:, :, :, None], out=t[:, :, :, 1])
            else:  # t = b * (c - j s), rounded Q15, as below
                t = b * c
                t += b[::-1] * s2
                t += 1 << (Q15 - 1)
                t >>= Q15
            np.subtract(a, t, out=b)
            a += t
        x = xt.transpose(0, 1, 3, 2).reshape(2, k, m)  # a copy, back in FFT order

        for h, c, s2 in self._stages:
            v = x.reshape(2, k * m // (2 * h), 2, h)
            a, b = v[:, :, 0], v[:, :, 1]  # (2, k * g, h)
            t = b * c  # t = b * (c - j s) = [b_re c + b_im s, b_im c - b_re s], rounded Q15
            t += b[::-1] * s2
            t += 1 << (Q15 - 1)
            t >>= Q15
            np.subtract(a, t, out=b)
            a += t

        # Real-FFT split: F_k = Ze + W_N^k Zo with Ze = Z_k + Z*_{M-k}, Zo = -j (Z_k - Z*_{M-k}).
        za = np.empty((2, k, m + 1), dtype=np.int64)  # Z_k, k = 0 .. M (Z_M = Z_0)
        za[:, :, :m] = x
        za[:, :, m] = x[:, :, 0]
        zb = np.empty_like(za)  # conj(Z_{M-k}): Z_0, Z_{M-1}, ..., Z_1, Z_0
        zb[:, :, 0] = x[:, :, 0]
        zb[:, :, 1:] = x[:, :, ::-1]
        zb[1] *= -1
        d = za - zb
        za += zb  # Ze
        t = d[::-1] * self._split_c  # [D_im c, -D_re c]
        t += d * self._split_s  # [-D_re s, -D_im s]
        t += 1 << (Q15 - 1)
        t >>= Q15
        za += t  # F = 2 X, |F| <= 2**31

        za *= za
        p = za[0, :, self._k0: self._k1] + za[1, :, self._k0: self._k1]  # (k, n_used) <= 2**62
        p >>= MEL_SHIFT

        if self._reduceat:  # span sums per segment: rise of segment m + fall of segment m + 1
            mel = np.add.reduceat(p * self.rise_q15, self._seg_starts, axis=1)[:, :-1]  # (k, n_mels)
            mel += np.add.reduceat(p * self.fall_q15, self._seg_starts, axis=1)[:, 1:]  # <= 2**62
        else:  # the same sums from cumulative sums (handles empty segments)
            acc = np.zeros((k, 2 * (self._n_used + 1)), dtype=np.int64)
            np.cumsum(p * self.rise_q15, axis=1, out=acc[:, 1: self._n_used + 1])
            np.cumsum(p * self.fall_q15, axis=1, out=acc[:, self._n_used + 2:])
            g = acc[:, self._mel_idx]  # (k, 4, n_mels)
            mel = g[:, 0] - g[:, 1] + g[:, 2] - g[:, 3]  # (k, n_mels) <= 2**62

        np.maximum(mel, MEL_MIN, out=mel)  # below the floor anyway (setup checks it)
        b = _bitlen(mel)  # 17 .. 62: log2 mel = b - 1 + log2(mant / 2**12)
        mant = mel >> (b - (LUT_BITS + 1))  # [2**12, 2**13)
        b += 2 * e - (self.log2_offset + 1)  # integer part of log2(Mel / P_REF)
        b *= DB_PER_LOG2
        b += self.lut_db[mant]
        b += 1 << 15
        b >>= 16  # dB in Q7.8
        np.maximum(b, self.floor_q8, out=b)
        return b.astype(np.int16)


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
