"""Language identification with langid.py's own model (it ships inside the package; nothing is
downloaded).

Public operations, each with its contract in its docstring and its plain reference beside it
(``langid``'s ``LanguageIdentifier.classify`` per text; the tests compare them):

- :func:`other_language_mask`: which texts are confidently in another language than the one kept
  (the stage's language rule); reference :func:`other_language_mask_langid`;
- :func:`classify`: langid's language and probability per text; reference :func:`classify_langid`.

Both run the same model as compiled loops (:mod:`clipline.components.curate.kernels.language`)
over the UTF-8 bytes of an Arrow string array, read in place (no Python string per text), on
``threads`` threads. langid maps a text's bytes through a DFA and sums, for every state entered,
the feature log-probabilities attached to that state, so ``log P(text, lang) = prior[lang] +
sum_t W[state_t, lang]`` with ``W = (state -> features) @ nb_ptc`` precomputed once
(:func:`_tables`). :func:`classify` computes that in float64; :func:`other_language_mask` in
float32, re-scoring in float64 every text whose verdict float32 rounding could change, so its
verdicts are the float64 ones (tested at thresholds equal to texts' own probabilities).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from clipline.components.curate.arrays import combined, string_buffers
from clipline.components.curate.kernels import language as kernels

#: bytes of a text the language rule reads (langid's verdict on its first 2048 bytes)
MAX_BYTES = kernels.MAX_BYTES

Texts = pa.Array | pa.ChunkedArray | Sequence[str | None]


# ---------------------------------------------------------------- the language rule


def other_language_mask(texts: Texts, language: str, min_confidence: float, threads: int = 2) -> np.ndarray:
    """True where a text is confidently (langid's probability >= ``min_confidence``) in another
    language than ``language`` (a language langid does not know: every confident answer is another
    one); judged on its first :data:`MAX_BYTES` bytes. Null and empty texts are never flagged (other
    rules deal with them). The answer of :func:`other_language_mask_langid`."""
    arr = _as_arrow(texts)
    classes = _tables()[3]
    target = classes.index(language) if language in classes else -2
    data, starts, ends = string_buffers(arr, MAX_BYTES)
    return kernels.other_language(
        (data, starts, ends), _exact(), _fast(), _lead(target), target, float(min_confidence), threads
    )


def other_language_mask_langid(texts: Texts, language: str, min_confidence: float) -> np.ndarray:
    """The reference of :func:`other_language_mask`, with ``langid.classify`` per text."""
    langs, probs = classify_langid(_as_list(texts))
    lang_arr = np.array([lg if lg is not None else language for lg in langs], dtype=object)
    return (lang_arr != language) & (probs >= min_confidence)


# ---------------------------------------------------------------- language and probability


def classes() -> list[str]:
    """The model's language codes; :func:`classify` returns indices into this list."""
    return _tables()[3]


def classify(texts: Texts, threads: int = 2, max_bytes: int = MAX_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(index into :func:`classes`, probability) per text, -1 and 0 for null or empty ones: the
    language and probability :func:`classify_langid` gives for the text's first ``max_bytes`` UTF-8
    bytes (None for any length)."""
    arr = _as_arrow(texts)
    return kernels.score(string_buffers(arr, max_bytes), _exact(), threads)


def classify_langid(texts: Sequence[str | None]) -> tuple[list[str | None], np.ndarray]:
    """The reference: (language, probability) per text with ``langid.classify``; None/"" give
    (None, 0)."""
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


def warm_up() -> None:
    """Load langid's tables and the compiled loops (from numba's cache) before the first batch."""
    other_language_mask(pa.array(["a photo of a cat", "un chat noir"]), "en", 0.9, 1)


# ---------------------------------------------------------------- the model's tables


def _as_arrow(texts: Texts) -> pa.Array:
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return combined(texts)
    return pa.array(list(texts), pa.string())


def _as_list(texts: Texts) -> list[str | None]:
    return combined(texts).to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else list(texts)


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


@functools.lru_cache(maxsize=1)
def _exact() -> kernels.ExactTables:
    nextmove, w, prior, _ = _tables()
    return kernels.exact_tables(nextmove, w, prior)


@functools.lru_cache(maxsize=1)
def _fast() -> kernels.FastTables:
    return kernels.fast_tables(_exact())


@functools.lru_cache(maxsize=8)
def _lead(target: int) -> tuple[np.ndarray, float]:
    return kernels.target_lead(_exact(), target)
