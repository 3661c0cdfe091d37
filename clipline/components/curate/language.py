"""Language identification with langid.py's own model (it ships inside the package; nothing is
downloaded), in two interchangeable backends:

- ``langid``: ``langid``'s ``LanguageIdentifier.classify`` per caption (the reference);
- ``compiled`` (default): the same model as one compiled loop (numba) over the UTF-8 bytes of an Arrow
  string array, read in place (no Python string per caption), split over ``threads`` threads. Per
  caption it steps langid's DFA byte by byte and adds the state's row of ``W`` (below) to the 97
  language scores, then takes langid's arg-max and normalised probability. Falls back to
  ``vectorized`` where numba is not installed.
  The stage's question, "which texts are confidently in another language", is answered by a
  float32 variant of that loop (``other_language_mask_arrow``: half the memory traffic per byte)
  that re-scores in float64 every text whose verdict float32 rounding could change, so its
  verdicts are the float64 loop's (tested at thresholds equal to texts' own probabilities).
- ``vectorized``: the same naive-Bayes model evaluated for a whole batch with numpy. langid maps a
  text's bytes through a DFA and sums, for every state entered, the feature log-probabilities
  attached to that state, so ``log P(text, lang) = prior[lang] + sum_t W[state_t, lang]`` with
  ``W = (state -> features) @ nb_ptc`` precomputed once. The DFA is stepped for all captions of
  a batch at once and the state counts are multiplied by ``W`` as a sparse matrix. It returns the same language and probability as ``langid`` (tested).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse

try:  # the compiled backend; without numba the vectorized one is used
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency
    njit, prange = None, range


@functools.lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def _cache_path() -> Path:
    from langid.langid import model

    digest = hashlib.sha256(model if isinstance(model, bytes) else model.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "clipline" / f"langid-tables-{digest}.npz"


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(DFA transitions, W, class priors, class names). Unpacking langid's model string takes
    seconds (bz2 + pickle), so the derived tables are cached in ~/.cache/clipline (keyed on a hash
    of the model string, rebuilt when it changes or the cache is unreadable)."""
    path = _cache_path()
    try:
        with np.load(path) as z:
            return (z["nextmove"].astype(np.int64), z["w"], z["prior"], [str(c) for c in z["classes"]])
    except Exception:  # noqa: BLE001 - no cache yet (or a damaged one): rebuild it
        pass
    ident = _identifier()
    nextmove = np.frombuffer(ident.tk_nextmove, dtype=np.dtype(ident.tk_nextmove.typecode)).astype(np.int64)
    n_states = len(nextmove) // 256
    nb_ptc = np.asarray(ident.nb_ptc, dtype=np.float64)
    w = np.zeros((n_states, nb_ptc.shape[1]), dtype=np.float64)
    for state, feats in ident.tk_output.items():
        for f in feats:  # a feature listed twice counts twice, as in langid.instance2fv
            w[state] += nb_ptc[f]
    prior = np.asarray(ident.nb_pc, dtype=np.float64)
    classes = [str(c) for c in ident.nb_classes]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, nextmove=nextmove.astype(np.int32), w=w, prior=prior, classes=np.array(classes))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: work without the cache
    return nextmove, w, prior, classes


def classify_langid(texts: Sequence[str | None]) -> tuple[list[str | None], np.ndarray]:
    """(language, probability) per text with ``langid.classify``; None/"" give (None, 0)."""
    ident = _identifier()
    langs: list[str | None] = []
    probs = np.zeros(len(texts))
    for i, t in enumerate(texts):
        if not t:
            langs.append(None)
            continue
        lang, p = ident.classify(t)
        langs.append(lang)
        probs[i] = p
    return langs, probs


def _score_batch(encoded: list[bytes], idx: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best class index, its probability) for the texts ``idx`` (sorted by length ``lens``)."""
    nextmove, w, prior, _ = _tables()
    maxlen = int(lens[-1])
    # the batch's bytes as a (rows x maxlen) matrix, laid out without a per-row Python loop
    data = np.frombuffer(b"".join(encoded[i] for i in idx), dtype=np.uint8)
    rows = np.repeat(np.arange(len(idx)), lens)
    offsets = np.concatenate(([0], np.cumsum(lens)[:-1]))
    cols = np.arange(len(data)) - np.repeat(offsets, lens)
    buf = np.zeros((len(idx), maxlen), dtype=np.int64)
    buf[rows, cols] = data
    # step the DFA for every row at once; record the state entered at each position
    states = np.zeros((len(idx), maxlen), dtype=np.int64)
    state = np.zeros(len(idx), dtype=np.int64)
    for p in range(maxlen):
        state = nextmove[(state << 8) + buf[:, p]]
        states[:, p] = state
    # count (row, state) entries over the real bytes only, then score = counts @ W
    counts = sparse.csr_matrix((np.ones(len(data)), (rows, states[rows, cols])), shape=(len(idx), w.shape[0]))
    score = counts @ w + prior
    best = np.argmax(score, axis=1)
    # langid's norm_probs: P(best) = 1 / sum_l exp(score_l - score_best)
    with np.errstate(over="ignore"):
        p_best = 1.0 / np.exp(score - score[np.arange(len(idx)), best][:, None]).sum(axis=1)
    return best, p_best


def classify_vectorized(texts: Sequence[str | None], batch: int = 4096, max_bytes: int = 2048,
                        threads: int = 2) -> tuple[list[str | None], np.ndarray]:
    """(language, probability) per text, batch-evaluated on ``threads`` threads (numpy and scipy
    release the GIL); same answers as :func:`classify_langid` for texts up to ``max_bytes`` UTF-8
    bytes (longer ones are judged on their first max_bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    classes = _tables()[3]
    n = len(texts)
    best_all = np.full(n, -1, dtype=np.int64)
    probs = np.zeros(n)
    encoded = [(t or "").encode("utf-8")[:max_bytes] for t in texts]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=n)
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    batches = [order[s:s + batch] for s in range(0, len(order), batch)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for idx, (best, p_best) in zip(batches, pool.map(lambda ix: _score_batch(encoded, ix, lengths[ix]), batches)):
            best_all[idx] = best
            probs[idx] = p_best
    return [classes[j] if j >= 0 else None for j in best_all.tolist()], probs


def classify(texts: Sequence[str | None], backend: str = "compiled",
             threads: int = 2) -> tuple[list[str | None], np.ndarray]:
    if backend == "compiled":
        classes = _tables()[3]
        best, probs = classify_arrow(pa.array(list(texts), pa.string()), threads=threads)
        return [classes[j] if j >= 0 else None for j in best.tolist()], probs
    if backend == "vectorized":
        return classify_vectorized(texts, threads=threads)
    if backend == "langid":
        return classify_langid(texts)
    raise ValueError(f"unknown language backend {backend!r}: use 'compiled', 'vectorized' or 'langid'")


def other_language_mask(texts: Sequence[str | None], language: str, min_confidence: float,
                        backend: str = "compiled", threads: int = 2) -> np.ndarray:
    """True where a text is confidently (probability >= min_confidence) in a language other than
    ``language``. Empty texts are never flagged (other rules deal with them)."""
    langs, probs = classify(texts, backend, threads)
    lang_arr = np.array([lg if lg is not None else language for lg in langs], dtype=object)
    return (lang_arr != language) & (probs >= min_confidence)


# ---- compiled backend -------------------------------------------------------------------------

def _score_text(data, a, b, nextmove, w, has_w, prior, acc):  # pragma: no cover - compiled
    """langid's float64 scores of ``data[a:b]`` into ``acc`` (the prior plus, per byte, the DFA
    state's row of W); returns the best class (the first of equal ones)."""
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


def _p_best(acc, best):  # pragma: no cover - compiled
    """langid's normalised probability of class ``best``: 1 / sum_l exp(score_l - score_best)."""
    tot = 0.0
    for k in range(acc.shape[0]):
        tot += np.exp(acc[k] - acc[best])
    return 1.0 / tot


if njit is not None:  # compiled into the loops below (inlined: a call per text cost 40% here)
    _score_text = njit(cache=True, nogil=True, inline="always")(_score_text)
    _p_best = njit(cache=True, nogil=True, inline="always")(_p_best)


def _score_loop(data, starts, ends, nextmove, w, has_w, prior, skip_class, out_best, out_p):  # pragma: no cover - compiled
    """langid's scores for strings ``data[starts[i]:ends[i]]``: DFA step per byte, add the state's
    row of W, then arg-max and langid's normalised probability of the best class. Where the best
    class is ``skip_class`` the probability is not computed (set to -1): a caller asking "which
    texts are in another language" needs no probability for texts in its own."""
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
            if best == skip_class:
                out_p[i] = -1.0
                continue
            out_p[i] = _p_best(acc, best)


#: width of the float32 score rows of :func:`_mask_loop`: langid's 97 classes padded with zero
#: columns to a multiple of 8 (one AVX2 register holds 8 float32), so that the per-byte add has a
#: trip count known when it is compiled; LLVM then emits it without a remainder loop (0.93 -> 0.6 s
#: for 1M captions on one thread). A model with more classes uses :func:`_score_loop` instead.
LANES = 104


#: captions whose DFA walks :func:`_mask_loop` interleaves in one thread. Each walk is a chain of
#: dependent table loads (the next state needs the previous one), so one walk leaves the core
#: waiting on memory; G independent walks overlap their loads (1M captions on one thread:
#: 0.68 -> 0.45 s with the pairwise adds below). The interleaved walk is written out for 4 texts,
#: their states and counts in scalars that stay in registers (0.44 -> 0.38 s)
GROUP = 4
#: bytes of a text the language rule reads (langid's verdict on its first 2048 bytes)
MASK_MAX_BYTES = 2048


def _mask_loop(data, starts, ends, nextmove, w32, has_w, rowmax, prior32, prior_abs, lead, lead_prior,
               nextmove_full, w, prior, target, min_conf, log_min, out):  # pragma: no cover - compiled
    """``out[i]`` = text i is confidently (probability >= min_conf) in another class than
    ``target``: the verdict of :func:`_score_loop` (float64), computed more cheaply where that is
    provably the same. Per group of :data:`GROUP` texts, the DFA is first walked for all of them
    at once, recording the states that carry weights. Then, per text:

    1. ``lead[s]`` (:func:`_target_lead`) is the least lead of ``target`` over any other class in
       state s's row of W, so the sum of ``lead`` over the text's states (plus the prior's) bounds
       target's lead in the text's scores from below. When that bound exceeds 2E (below), target is
       the best class and the text is not flagged, without computing a score: one scalar add per
       state instead of a row of 97 (85% of 1M synthetic captions; 1M captions on one thread:
       0.60 -> 0.42 s).
    2. Otherwise its float32 scores add the states' rows of W, two rows at a time. The float32
       scores differ from the float64 ones by at most ``E = (m + 2) u / (1 - (m + 2) u) * S``
       (m rows added, u = 2^-24, S = the sum of the largest |weight| of each row added and of the
       prior: the standard bound for a rounded sum in any order, with the rounding of the weights
       to float32 included; it bounds the float64 sums' own rounding too, and step 1's).
    3. A text whose target score leads every other class by more than 2E is not flagged; the
       largest other score is found by a vectorised maximum (0.74 -> 0.61 s before step 1).
    4. Otherwise the verdict is kept when the best class leads the second by more than 2E and, for
       another class than ``target``, log P is farther than 2E from log(min_conf); else the text is
       scored again in float64 (rare: none in 1M synthetic captions)."""
    n, n_lang = starts.shape[0], w.shape[1]
    n_chunks = min(n, 64)
    u = 2.0 ** -24
    for c in prange(n_chunks):
        acc = np.empty(LANES, np.float32)  # classes n_lang.. are padding (zero weights), never read
        acc64 = np.empty(n_lang)
        lane_max = np.empty(8, np.float32)
        seen = np.empty((GROUP, MASK_MAX_BYTES), np.int32)  # states with weights, per text of the group
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
                best = _score_text(data, a, b, nextmove_full, w, has_w, prior, acc64)
                out[i] = best != target and _p_best(acc64, best) >= min_conf


@functools.lru_cache(maxsize=1)
def _mask_kernel():
    if njit is None or _kernel_tables()[1].shape[1] > LANES:
        return None
    return njit(parallel=True, cache=True, nogil=True)(_mask_loop)


@functools.lru_cache(maxsize=1)
def _mask_tables() -> tuple:
    """The float32 tables of :func:`_mask_loop`: W and the prior padded with zero columns to
    :data:`LANES` classes."""
    nextmove, w, has_w, prior = _kernel_tables()
    small = nextmove.astype(np.uint16) if int(nextmove.max()) < 2**16 else nextmove
    w32 = np.zeros((w.shape[0], LANES), np.float32)
    w32[:, :w.shape[1]] = w
    prior32 = np.zeros(LANES, np.float32)
    prior32[:len(prior)] = prior
    return small, w32, has_w, np.abs(w).max(axis=1), prior32, float(np.abs(prior).max())


@functools.lru_cache(maxsize=8)
def _target_lead(target: int) -> tuple[np.ndarray, float]:
    """Per DFA state, the least lead ``W[s, target] - W[s, k]`` of ``target`` over any other class
    k, and the same for the prior: their sum over a text's states bounds target's lead in its scores
    from below (see :func:`_mask_loop`). For no target (-2), a bound that never holds."""
    _, w, _, prior = _kernel_tables()
    if not 0 <= target < w.shape[1]:
        return np.zeros(w.shape[0]), -np.inf
    others = np.arange(w.shape[1]) != target
    lead = (w[:, target:target + 1] - w[:, others]).min(axis=1)
    return np.ascontiguousarray(lead), float((prior[target] - prior[others]).min())


@functools.lru_cache(maxsize=1)
def _kernel():
    """The compiled scoring loop, or None where numba is not installed (compiled once per
    machine: ``cache=True`` keeps the machine code in ``__pycache__`` or numba's user cache)."""
    if njit is None:
        return None
    return njit(parallel=True, cache=True, nogil=True)(_score_loop)


@functools.lru_cache(maxsize=1)
def _kernel_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    nextmove, w, prior, _ = _tables()
    w = np.ascontiguousarray(w, dtype=np.float64)
    return nextmove.astype(np.int32), w, np.abs(w).sum(axis=1) > 0, np.ascontiguousarray(prior, dtype=np.float64)


def string_buffers(texts: pa.Array, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(UTF-8 bytes, start, end) of each string of an Arrow string array, read in place (no copy
    unless there are nulls, which become empty strings, or another string type); ends are cut at
    ``max_bytes`` after the start (not at all for None)."""
    n = len(texts)
    arr = texts if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) \
        else texts.cast(pa.large_string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    width = np.int32 if pa.types.is_string(arr.type) else np.int64
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = (np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None
            else np.zeros(1, np.uint8))
    data.flags.writeable = False  # one compiled signature, whoever made the buffer (DuckDB's is read-only)
    starts = offsets[:-1]
    return data, starts, offsets[1:] if max_bytes is None else np.minimum(offsets[1:], starts + int(max_bytes))


def classify_arrow(texts: pa.Array | pa.ChunkedArray, max_bytes: int = 2048,
                   threads: int = 2, skip_class: int = -3) -> tuple[np.ndarray, np.ndarray]:
    """(class index, probability) per string of an Arrow string array, computed on its UTF-8
    buffer in place; -1 and 0 for null/empty strings. Same answers as :func:`classify_langid` for
    texts up to ``max_bytes`` bytes (longer ones are judged on their first ``max_bytes``). Uses the
    compiled loop, or :func:`classify_vectorized` where numba is missing. Texts whose best class is
    ``skip_class`` get probability -1 instead of theirs (compiled loop only; saves the softmax)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    n = len(texts)
    kernel = _kernel()
    if kernel is None:
        classes = _tables()[3]
        langs, probs = classify_vectorized(texts.to_pylist(), max_bytes=max_bytes, threads=threads)
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[x] if x is not None else -1 for x in langs], dtype=np.int64), probs
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    data, starts, ends = string_buffers(texts, max_bytes)
    best = np.empty(n, dtype=np.int64)
    probs = np.empty(n, dtype=np.float64)
    import numba

    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    nextmove, w, has_w, prior = _kernel_tables()
    kernel(data, starts, ends, nextmove, w, has_w, prior, int(skip_class), best, probs)
    return best, probs


def other_language_mask_arrow(texts: pa.Array | pa.ChunkedArray, language: str, min_confidence: float,
                              backend: str = "compiled", threads: int = 2) -> np.ndarray:
    """:func:`other_language_mask` for an Arrow string array (the compiled backend reads it in place)."""
    if backend != "compiled":
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        return other_language_mask(texts.to_pylist(), language, min_confidence, backend, threads)
    classes = _tables()[3]
    try:
        target = classes.index(language)
    except ValueError:
        target = -2  # a language langid does not know: every confident answer is another language
    kernel = _mask_kernel()
    if kernel is None:
        best, probs = classify_arrow(texts, threads=threads, skip_class=target)  # no softmax for `language` texts
        return (best >= 0) & (best != target) & (probs >= min_confidence)
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    out = np.zeros(len(texts), np.bool_)
    if len(texts) == 0:
        return out
    import math

    import numba

    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    data, starts, ends = string_buffers(texts, MASK_MAX_BYTES)
    small, w32, has_w, rowmax, prior32, prior_abs = _mask_tables()
    nextmove, w, _, prior = _kernel_tables()
    log_min = math.log(min_confidence) if min_confidence > 0 else -math.inf
    lead, lead_prior = _target_lead(int(target))
    kernel(data, starts, ends, small, w32, has_w, rowmax, prior32, prior_abs, lead, lead_prior, nextmove, w, prior,
           int(target), float(min_confidence), float(log_min), out)
    return out
