"""Language identification with langid.py's own model (it ships inside the package; nothing is
downloaded), in two interchangeable backends:

- ``langid``: ``langid``'s ``LanguageIdentifier.classify`` per caption (the reference);
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
from scipy import sparse


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


def classify(texts: Sequence[str | None], backend: str = "vectorized",
             threads: int = 2) -> tuple[list[str | None], np.ndarray]:
    if backend == "vectorized":
        return classify_vectorized(texts, threads=threads)
    if backend == "langid":
        return classify_langid(texts)
    raise ValueError(f"unknown language backend {backend!r}: use 'vectorized' or 'langid'")


def other_language_mask(texts: Sequence[str | None], language: str, min_confidence: float,
                        backend: str = "vectorized", threads: int = 2) -> np.ndarray:
    """True where a text is confidently (probability >= min_confidence) in a language other than
    ``language``. Empty texts are never flagged (other rules deal with them)."""
    langs, probs = classify(texts, backend, threads)
    lang_arr = np.array([lg if lg is not None else language for lg in langs], dtype=object)
    return (lang_arr != language) & (probs >= min_confidence)
