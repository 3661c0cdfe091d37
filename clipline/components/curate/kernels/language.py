"""Compiled loops of :mod:`clipline.components.curate.language`: langid's model over the UTF-8
bytes of an Arrow string array, read in place (no Python string per text), split over threads.

The model, as langid evaluates it: a text's bytes drive a DFA, and every state entered adds its
row of ``W`` (the log-probabilities of the features that state completes, per language) to the
language scores, which start at the prior; the answer is the arg-max and langid's normalised
probability ``1 / sum_l exp(score_l - score_best)``.

The API is three calls: :func:`exact_tables` and :func:`fast_tables` prepare the model's arrays
once, :func:`score` gives (class, probability) per text in float64, :func:`other_language` the
verdict "confidently in another class than ``target``" per text, in float32 where that provably
gives the float64 verdict. The tables travel as tuples (:class:`ExactTables`, :class:`FastTables`),
so the compiled functions take a handful of arguments.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

#: width of the float32 score rows of :func:`_other_loop`: langid's 97 classes padded with zero
#: columns to a multiple of 8 (one AVX2 register holds 8 float32), so that the per-byte add has a
#: trip count known when it is compiled and LLVM emits it without a remainder loop.
LANES = 104

#: texts whose DFA walks :func:`_other_loop` interleaves in one thread. Each walk is a chain of
#: dependent table loads (the next state needs the previous one), so one walk leaves the core
#: waiting on memory; independent walks overlap their loads. The interleaved walk is written out
#: for 4 texts, their states and counts in scalars that stay in registers (a loop over an array
#: of 4 states was measurably slower: compare with ``benchmarks/curate_scaling.py``)
GROUP = 4
#: the longest text :func:`other_language` takes, in bytes (langid's verdict on the first 2048
#: bytes is the language rule's): the size of the per-text state buffers of :func:`_other_loop`
MAX_BYTES = 2048


class ExactTables(NamedTuple):
    """The model as the float64 loop reads it."""

    nextmove: np.ndarray  # int32 (state << 8) + byte -> next state
    w: np.ndarray  # float64 (states, classes)
    has_w: np.ndarray  # bool: the state's row of W is not all zero
    prior: np.ndarray  # float64 (classes,)


class FastTables(NamedTuple):
    """The model as the float32 loop reads it: W and the prior padded to :data:`LANES` classes,
    and per state the largest |weight| (for the rounding bound)."""

    nextmove: np.ndarray  # uint16 where the states fit, else int32
    w32: np.ndarray  # float32 (states, LANES)
    has_w: np.ndarray
    rowmax: np.ndarray  # float64 (states,)
    prior32: np.ndarray  # float32 (LANES,)
    prior_abs: float


def exact_tables(nextmove: np.ndarray, w: np.ndarray, prior: np.ndarray) -> ExactTables:
    w = np.ascontiguousarray(w, dtype=np.float64)
    return ExactTables(
        nextmove.astype(np.int32), w, np.abs(w).sum(axis=1) > 0, np.ascontiguousarray(prior, dtype=np.float64)
    )


def fast_tables(t: ExactTables) -> FastTables:
    """The float32 tables (the model must have at most :data:`LANES` classes; langid's has 97)."""
    if t.w.shape[1] > LANES:
        raise ValueError(f"a model of {t.w.shape[1]} classes: raise LANES to a multiple of 8 at least that large")
    small = t.nextmove.astype(np.uint16) if int(t.nextmove.max()) < 2**16 else t.nextmove
    w32 = np.zeros((t.w.shape[0], LANES), np.float32)
    w32[:, : t.w.shape[1]] = t.w
    prior32 = np.zeros(LANES, np.float32)
    prior32[: len(t.prior)] = t.prior
    return FastTables(small, w32, t.has_w, np.abs(t.w).max(axis=1), prior32, float(np.abs(t.prior).max()))


def target_lead(t: ExactTables, target: int) -> tuple[np.ndarray, float]:
    """Per DFA state, the least lead ``W[s, target] - W[s, k]`` of ``target`` over any other class
    k, and the same for the prior: their sum over a text's states bounds target's lead in its scores
    from below (see :func:`_other_loop`). For no target (negative), a bound that never holds."""
    if not 0 <= target < t.w.shape[1]:
        return np.zeros(t.w.shape[0]), -np.inf
    others = np.arange(t.w.shape[1]) != target
    lead = (t.w[:, target : target + 1] - t.w[:, others]).min(axis=1)
    return np.ascontiguousarray(lead), float((t.prior[target] - t.prior[others]).min())


def _set_threads(threads: int) -> None:
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))


def score(
    texts: tuple[np.ndarray, np.ndarray, np.ndarray], t: ExactTables, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """(best class, its probability) per text ``data[starts[i]:ends[i]]`` of ``texts = (data,
    starts, ends)``; -1 and 0 for an empty text."""
    n = len(texts[1])
    best = np.empty(n, dtype=np.int64)
    probs = np.empty(n, dtype=np.float64)
    if n:
        _set_threads(threads)
        _score_loop(texts, t, best, probs)
    return best, probs


def other_language(
    texts: tuple[np.ndarray, np.ndarray, np.ndarray],
    t: ExactTables,
    fast: FastTables,
    lead: tuple[np.ndarray, float],
    target: int,
    min_confidence: float,
    threads: int,
) -> np.ndarray:
    """True where text i is confidently (probability >= ``min_confidence``) in another class than
    ``target`` (-2: a class the model lacks): :func:`score`'s verdict. ``lead``: :func:`target_lead`.
    Texts must be cut at :data:`MAX_BYTES`."""
    n = len(texts[1])
    out = np.zeros(n, np.bool_)
    if n:
        if int((texts[2] - texts[1]).max()) > MAX_BYTES:
            raise ValueError(f"texts longer than {MAX_BYTES} bytes: cut them first (arrays.string_buffers' max_bytes)")
        _set_threads(threads)
        log_min = math.log(min_confidence) if min_confidence > 0 else -math.inf
        _other_loop(texts, fast, t, (int(target), lead[0], float(lead[1]), float(min_confidence), float(log_min)), out)
    return out


@njit(cache=True, nogil=True, inline="always")
def _score_text(data, a, b, nextmove, w, has_w, prior, acc):  # pragma: no cover - compiled
    """langid's float64 scores of ``data[a:b]`` into ``acc`` (the prior plus, per byte, the DFA
    state's row of W); returns the best class (the first of equal ones). Inlined into both loops
    (a call per text is a measurable share of the loop)."""
    n_lang = acc.shape[0]
    acc[:] = prior
    s = 0
    for p in range(a, b):
        s = nextmove[(s << 8) + data[p]]
        if has_w[s]:
            ws = w[s]
            for k in range(n_lang):
                acc[k] += ws[k]
    best = 0
    for k in range(1, n_lang):
        if acc[k] > acc[best]:
            best = k
    return best


@njit(cache=True, nogil=True, inline="always")
def _p_best(acc, best):  # pragma: no cover - compiled
    """langid's normalised probability of class ``best``: 1 / sum_l exp(score_l - score_best)."""
    tot = 0.0
    for k in range(acc.shape[0]):
        tot += np.exp(acc[k] - acc[best])
    return 1.0 / tot


@njit(parallel=True, cache=True, nogil=True)
def _score_loop(texts, tables, out_best, out_p):  # pragma: no cover - compiled
    """langid's scores for strings ``data[starts[i]:ends[i]]``: arg-max and langid's normalised
    probability of the best class."""
    data, starts, ends = texts
    nextmove, w, has_w, prior = tables
    n, n_lang = starts.shape[0], w.shape[1]
    n_chunks = min(n, 64)
    for c in prange(n_chunks):  # contiguous chunks, one score buffer each
        acc = np.empty(n_lang)
        for i in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            a, b = starts[i], ends[i]
            if b <= a:
                out_best[i] = -1
                out_p[i] = 0.0
                continue
            best = _score_text(data, a, b, nextmove, w, has_w, prior, acc)
            out_best[i] = best
            out_p[i] = _p_best(acc, best)


@njit(parallel=True, cache=True, nogil=True)
def _other_loop(texts, fast, exact, query, out):  # pragma: no cover - compiled
    """``out[i]`` = text i is confidently (probability >= min_conf) in another class than
    ``target``: the verdict of :func:`_score_loop` (float64), computed more cheaply where that is
    provably the same. ``query = (target, lead, lead_prior, min_conf, log(min_conf))``. Per group of
    :data:`GROUP` texts, the DFA is first walked for all of them at once, recording the states that
    carry weights. Then, per text:

    1. ``lead[s]`` (:func:`target_lead`) is the least lead of ``target`` over any other class in
       state s's row of W, so the sum of ``lead`` over the text's states (plus the prior's) bounds
       target's lead in the text's scores from below. When that bound exceeds 2E (below), target is
       the best class and the text is not flagged, without computing a score: one scalar add per
       state instead of a row of 97 (most English captions end here).
    2. Otherwise its float32 scores add the states' rows of W, two rows at a time. The float32
       scores differ from the float64 ones by at most ``E = (m + 2) u / (1 - (m + 2) u) * S``
       (m rows added, u = 2^-24, S = the sum of the largest |weight| of each row added and of the
       prior: the standard bound for a rounded sum in any order, with the rounding of the weights
       to float32 included; it bounds the float64 sums' own rounding too, and step 1's).
    3. A text whose target score leads every other class by more than 2E is not flagged; the
       largest other score is found by a vectorised maximum.
    4. Otherwise the verdict is kept when the best class leads the second by more than 2E and, for
       another class than ``target``, log P is farther than 2E from log(min_conf); else the text is
       scored again in float64 (rare)."""
    data, starts, ends = texts
    nextmove, w32, has_w, rowmax, prior32, prior_abs = fast
    nextmove_full, w, has_w_full, prior = exact
    target, lead, lead_prior, min_conf, log_min = query
    n, n_lang = starts.shape[0], w.shape[1]
    n_chunks = min(n, 64)
    u = 2.0**-24
    for c in prange(n_chunks):
        acc = np.empty(LANES, np.float32)  # classes n_lang.. are padding (zero weights), never read
        acc64 = np.empty(n_lang)
        lane_max = np.empty(8, np.float32)
        seen = np.empty((GROUP, MAX_BYTES), np.int32)  # states with weights, per text of the group
        n_seen = np.zeros(GROUP, np.int64)
        state = np.zeros(GROUP, np.int64)
        lo, hi = c * n // n_chunks, (c + 1) * n // n_chunks
        for i0 in range(lo, hi, GROUP):
            g = min(GROUP, hi - i0)
            common = 0  # bytes every text of a full group has: walked interleaved
            if g == GROUP:
                common = ends[i0] - starts[i0]
                for q in range(1, GROUP):
                    common = min(common, ends[i0 + q] - starts[i0 + q])
                common = max(common, 0)
            for q in range(g):
                state[q] = 0
                n_seen[q] = 0
            if common > 0:  # GROUP = 4 texts, each in registers (s, k) rather than in the arrays
                s0 = 0
                s1 = 0
                s2 = 0
                s3 = 0
                k0 = 0
                k1 = 0
                k2 = 0
                k3 = 0
                p0 = starts[i0]
                p1 = starts[i0 + 1]
                p2 = starts[i0 + 2]
                p3 = starts[i0 + 3]
                for j in range(common):
                    s0 = nextmove[(s0 << 8) + data[p0 + j]]
                    s1 = nextmove[(s1 << 8) + data[p1 + j]]
                    s2 = nextmove[(s2 << 8) + data[p2 + j]]
                    s3 = nextmove[(s3 << 8) + data[p3 + j]]
                    seen[0, k0] = s0
                    seen[1, k1] = s1
                    seen[2, k2] = s2
                    seen[3, k3] = s3
                    k0 += has_w[s0]
                    k1 += has_w[s1]
                    k2 += has_w[s2]
                    k3 += has_w[s3]
                state[0] = s0
                state[1] = s1
                state[2] = s2
                state[3] = s3
                n_seen[0] = k0
                n_seen[1] = k1
                n_seen[2] = k2
                n_seen[3] = k3
            for q in range(g):  # the rest of each text on its own
                s = state[q]
                k_seen = n_seen[q]
                for p in range(starts[i0 + q] + common, ends[i0 + q]):
                    s = nextmove[(s << 8) + data[p]]
                    seen[q, k_seen] = s
                    k_seen += has_w[s]
                n_seen[q] = k_seen
            for q in range(g):
                i = i0 + q
                a, b = starts[i], ends[i]
                if b <= a:
                    out[i] = False
                    continue
                k_seen = n_seen[q]
                big = prior_abs
                low = lead_prior  # a lower bound of target's lead over every other class
                for j in range(k_seen):
                    s = seen[q, j]
                    big += rowmax[s]
                    low += lead[s]
                m = 1 + k_seen
                err = (m + 2) * u / (1.0 - (m + 2) * u) * big
                if low > 2.0 * err:  # target is the best class: no score needed
                    out[i] = False
                    continue
                for k in range(LANES):
                    acc[k] = prior32[k]
                j = 0
                while j + 1 < k_seen:
                    w1, w2 = w32[seen[q, j]], w32[seen[q, j + 1]]
                    for k in range(LANES):
                        acc[k] += w1[k] + w2[k]
                    j += 2
                if j < k_seen:
                    ws = w32[seen[q, j]]
                    for k in range(LANES):
                        acc[k] += ws[k]
                if target >= 0 and n_lang >= 8:
                    # most texts: `target` leads every other class by more than 2E. The largest
                    # other score is found 8 lanes at a time (vectorised), not by the two scalar
                    # arg-max loops below; the verdict is the one they would give
                    own = acc[target]
                    acc[target] = -np.inf
                    for t in range(8):
                        lane_max[t] = acc[t]
                    for kb in range(8, n_lang - 7, 8):
                        for t in range(8):
                            v = acc[kb + t]
                            lane_max[t] = v if v > lane_max[t] else lane_max[t]
                    other = lane_max[0]
                    for t in range(1, 8):
                        other = lane_max[t] if lane_max[t] > other else other
                    for k in range(n_lang - n_lang % 8, n_lang):
                        other = acc[k] if acc[k] > other else other
                    acc[target] = own
                    if float(own) - float(other) > 2.0 * err:
                        out[i] = False
                        continue
                best = 0
                for k in range(1, n_lang):
                    if acc[k] > acc[best]:
                        best = k
                second = -np.inf
                for k in range(n_lang):
                    if k != best and acc[k] > second:
                        second = acc[k]
                if float(acc[best]) - float(second) > 2.0 * err:
                    if best == target:
                        out[i] = False
                        continue
                    tot = 0.0
                    for k in range(n_lang):
                        tot += np.exp(float(acc[k]) - float(acc[best]))
                    log_p = -np.log(tot)
                    if abs(log_p - log_min) > 2.0 * err + 1e-9:
                        out[i] = log_p >= log_min
                        continue
                # too close to call in float32: _score_loop's float64 arithmetic, the same functions
                best = _score_text(data, a, b, nextmove_full, w, has_w_full, prior, acc64)
                out[i] = best != target and _p_best(acc64, best) >= min_conf
