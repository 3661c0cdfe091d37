"""Caption normalisation, applied before any rule or comparison.

Guarantees, in this order: mojibake and HTML entities repaired by ftfy, Unicode NFC, control
characters turned into spaces and zero-width characters removed, runs of whitespace collapsed
into one space, leading/trailing whitespace trimmed. Nulls stay null.

The pass is vectorised with pyarrow compute. A caption that is printable ASCII with no ``&``, no
double space and no leading/trailing space is already in normal form (ftfy, NFC and the
whitespace rules leave it unchanged), so only the other captions go through the pipeline.
"""

from __future__ import annotations

import re
import unicodedata

import ftfy
import pyarrow as pa
import pyarrow.compute as pc

#: captions NOT matching this (RE2/Python syntax) are already in normal form and are left alone
MAYBE_DIRTY = r"[^\x20-\x7E]|&|  |^ | $"
_MAYBE_DIRTY = MAYBE_DIRTY
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str | None) -> str | None:
    """One caption, exactly as :func:`normalize_captions` treats it."""
    if text is None:
        return None
    return normalize_captions(pa.array([text], pa.string()))[0].as_py()


def _one(text: str) -> str:
    text = ftfy.fix_text(text)
    text = _ZERO_WIDTH.sub("", text)
    text = _CONTROL.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return _SPACES.sub(" ", text).strip()


def _full(captions: pa.Array) -> pa.Array:
    # per caption in Python: pyarrow's utf8_normalize is not used because some versions return
    # decomposed text for "NFC"
    return pa.array([None if t is None else _one(t) for t in captions.to_pylist()], pa.string())


def normalize_captions(captions: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The normalised form of every caption (same length and order, nulls kept)."""
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    captions = captions.cast(pa.string())
    if len(captions) == 0:
        return captions
    dirty = pc.fill_null(pc.match_substring_regex(captions, _MAYBE_DIRTY), False)
    n_dirty = pc.sum(dirty).as_py() or 0
    if n_dirty == 0:
        return captions
    if n_dirty == len(captions):
        return _full(captions)
    fixed = _full(pc.filter(captions, dirty))
    return pc.replace_with_mask(captions, dirty, fixed)
