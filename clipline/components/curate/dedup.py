"""The keep-first deduplication rule, and the exact grouping it runs on.

Keep rule (deterministic, documented): rows are visited in a fixed order (parent snapshot rows
first, then shards in catalog order, then the largest original image, then the smallest key). A
row is dropped when it duplicates a row already KEPT (same URL, same key, same image sha256, same
caption and image, phash within d, or similar caption); the reason is the first of those relations
that holds. Because a row's fate depends only on rows kept before it, building a snapshot in two
steps (parent, then new shards against the parent's rows) keeps exactly the rows that building it
at once would.

Public operations, each with its contract in its docstring and its plain reference beside it (the
tests compare them; the compiled loops are in :mod:`clipline.components.curate.kernels.dedup`):

============================  ======================================  ===========================
operation                     what                                    reference
============================  ======================================  ===========================
:func:`keep_first_codes`      drop reason per row, as a code          :func:`keep_first`
:func:`keep_first_table`      the same for the stage's fetched rows   (composes the ones here)
:func:`candidates`            rows that share a value with another    :func:`repeated_reference`
:func:`repeated`              positions whose 64-bit value repeats    :func:`repeated_reference`
:func:`first_ids`             first position of each 64-bit value     :func:`first_ids_reference`
:func:`group_ids`             exact group id of each string           :func:`exact_group_ids`
============================  ======================================  ===========================

The pairs of pHashes within the distance come from :mod:`clipline.components.curate.near`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipline.components.curate import arrays
from clipline.components.curate.kernels import dedup as kernels

REASONS = ["dup_url", "dup_key", "dup_image", "dup_caption_image", "near_dup_image", "near_dup_caption"]
"""Drop reasons of the keep-first rule; :func:`keep_first_codes` returns ``index + 1`` (0 = kept)."""


@dataclass
class DedupInput:
    """One entry per row, in visiting order (see the module docstring). Group ids identify rows
    sharing a URL / sha256 / (caption, sha256) / phash value; a row alone in its group may carry
    any id not shared with another row."""

    is_parent: np.ndarray  # bool: rows of the parent snapshot (always kept)
    url_g: np.ndarray  # int64
    key_g: np.ndarray
    sha_g: np.ndarray
    capimg_g: np.ndarray
    ph_g: np.ndarray  # id of the row's distinct phash value (-1: no phash)
    ph_pairs: np.ndarray  # (k, 2) near pairs of ph_g values (unordered)
    captions: list[str] | None = None  # for the optional caption MinHash rule


@dataclass(frozen=True)
class DedupOptions:
    same_image: bool = True  # dup_image on; else only dup_caption_image
    near_image: bool = True
    near_caption: bool = False
    minhash_threshold: float = 0.8
    minhash_perm: int = 64
    shingle_chars: int = 5


# ---------------------------------------------------------------- the keep-first rule


def keep_first_codes(inp: DedupInput, opts: DedupOptions, compiled: bool = True) -> np.ndarray:
    """The drop reason of every row as an int8 code (0 = kept, else ``REASONS[code - 1]``) under
    the keep-first rule: :func:`keep_first`'s answer. Parent rows are always kept. Group ids may
    be any int64 (renumbered when they are not small and non-negative); pairs may name pHash ids
    no row has. Without the caption rule the visit is one compiled loop over dense group ids
    (``compiled=False``: the same loop in Python); with it, :func:`keep_first` itself."""
    n = len(inp.is_parent)
    if n == 0:
        return np.zeros(0, np.int8)
    if opts.near_caption and inp.captions is not None:
        names = keep_first(inp, opts)
        codes = np.zeros(n, np.int8)
        for k, name in enumerate(REASONS, 1):
            codes[names == name] = k
        return codes
    ph_dense, indptr, nbr = _phash_neighbours(
        np.asarray(inp.ph_g, np.int64), np.asarray(inp.ph_pairs, np.int64).reshape(-1, 2), n, opts.near_image
    )
    out = np.zeros(n, np.int8)
    visit = kernels.keep_first_visit if compiled else kernels.keep_first_visit.py_func
    visit(
        np.asarray(inp.is_parent, np.bool_),
        _dense(inp.url_g),
        _dense(inp.key_g),
        _dense(inp.sha_g),
        _dense(inp.capimg_g),
        ph_dense,
        indptr,
        nbr,
        bool(opts.same_image),
        bool(opts.near_image),
        out,
    )
    return out


def keep_first(inp: DedupInput, opts: DedupOptions) -> np.ndarray:
    """The reference: the drop reason name of every row (None = kept) under the keep-first rule,
    with Python sets, and the caption MinHash rule (datasketch) when ``opts.near_caption``."""
    n = len(inp.is_parent)
    reasons = np.full(n, None, dtype=object)
    if n == 0:
        return reasons
    nbrs: dict[int, list[int]] = {}
    involved = _involved(inp.url_g) | _involved(inp.key_g) | _involved(inp.capimg_g)
    if opts.same_image:
        involved |= _involved(inp.sha_g)
    if opts.near_image:
        ph_valid = inp.ph_g >= 0
        involved |= _involved(np.where(ph_valid, inp.ph_g, -np.arange(1, n + 1))) & ph_valid
        for a, b in inp.ph_pairs.tolist():
            nbrs.setdefault(a, []).append(b)
            nbrs.setdefault(b, []).append(a)
        if nbrs:
            involved |= np.isin(inp.ph_g, np.fromiter(nbrs.keys(), dtype=np.int64))
    lsh = minhashes = None
    if opts.near_caption and inp.captions is not None:
        from datasketch import MinHash, MinHashLSH

        involved[:] = True
        lsh = MinHashLSH(threshold=opts.minhash_threshold, num_perm=opts.minhash_perm)
        minhashes = MinHash.bulk(
            [_shingles(c or "", opts.shingle_chars) for c in inp.captions], num_perm=opts.minhash_perm, seed=1
        )
    kept_url: set[int] = set()
    kept_key: set[int] = set()
    kept_sha: set[int] = set()
    kept_ci: set[int] = set()
    kept_ph: set[int] = set()
    url_g, key_g, sha_g = inp.url_g.tolist(), inp.key_g.tolist(), inp.sha_g.tolist()
    ci_g, ph_g = inp.capimg_g.tolist(), inp.ph_g.tolist()
    parent = inp.is_parent.tolist()
    for i in np.flatnonzero(involved).tolist():
        if not parent[i]:
            reason = None
            if url_g[i] in kept_url:
                reason = "dup_url"
            elif key_g[i] in kept_key:
                reason = "dup_key"
            elif opts.same_image and sha_g[i] in kept_sha:
                reason = "dup_image"
            elif ci_g[i] in kept_ci:
                reason = "dup_caption_image"
            elif (
                opts.near_image
                and ph_g[i] >= 0
                and (ph_g[i] in kept_ph or any(x in kept_ph for x in nbrs.get(ph_g[i], ())))
            ):
                reason = "near_dup_image"
            elif lsh is not None:
                mh = minhashes[i]
                if any(mh.jaccard(minhashes[j]) >= opts.minhash_threshold for j in lsh.query(mh)):
                    reason = "near_dup_caption"
            if reason is not None:
                reasons[i] = reason
                continue
        kept_url.add(url_g[i])
        kept_key.add(key_g[i])
        kept_sha.add(sha_g[i])
        kept_ci.add(ci_g[i])
        if ph_g[i] >= 0:
            kept_ph.add(ph_g[i])
        if lsh is not None:
            lsh.insert(i, minhashes[i], check_duplication=False)
    return reasons


def keep_first_table(tab: pa.Table, pairs: np.ndarray, opts: DedupOptions) -> np.ndarray:
    """:func:`keep_first_codes` for rows fetched in visiting order, with columns ``is_parent``,
    ``url``, ``key``, ``sha256``, ``phash`` (int64, null: none), ``h_url``, ``h_key``,
    ``h_sha256`` (each value's 64-bit hash, as DuckDB's ``hash()``), and ``caption`` when the
    caption rule is on or ``opts.same_image`` is off; ``pairs``: the (k, 2) pHash values within
    the distance of each other (:func:`clipline.components.curate.near.near_pairs`). Group ids
    come from the values themselves (:func:`group_ids`), so a hash collision never merges two
    different values."""
    n = tab.num_rows
    ph_col = tab.column("phash")
    ph_valid = arrays.valid_mask(ph_col) if n else np.zeros(0, np.bool_)
    ph_vals = np.asarray(pc.fill_null(ph_col, 0).to_numpy(), np.int64) if n else np.zeros(0, np.int64)
    # one id per distinct pHash value, rows' and pairs' alike: the position of its first occurrence
    ph_ids = first_ids(
        np.concatenate([ph_vals, pairs.reshape(-1)]), np.concatenate([ph_valid, np.ones(pairs.size, np.bool_)])
    )
    alone = np.arange(n, dtype=np.int64)
    return keep_first_codes(
        DedupInput(
            is_parent=np.asarray(tab.column("is_parent").to_numpy(zero_copy_only=False), bool),
            url_g=group_ids(tab.column("url"), tab.column("h_url")),
            key_g=group_ids(tab.column("key"), tab.column("h_key")),
            sha_g=group_ids(tab.column("sha256"), tab.column("h_sha256")),
            capimg_g=alone if opts.same_image else exact_group_ids(tab.column("caption"), tab.column("sha256")),
            ph_g=ph_ids[:n],
            ph_pairs=ph_ids[n:].reshape(-1, 2),
            captions=tab.column("caption").to_pylist() if opts.near_caption else None,
        ),
        opts,
    )


def _phash_neighbours(
    ph: np.ndarray, pairs: np.ndarray, n: int, near_image: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense pHash id per row, -1 for none; CSR ``indptr`` and ``nbr`` of each id's neighbours)."""
    bound = 4 * (n + len(pairs)) + 16
    if not near_image:
        ph_dense, pairs, k = np.full(n, -1, np.int64), pairs[:0], 0
    elif ph.max() < bound and pairs.min(initial=0) >= 0 and pairs.max(initial=-1) < bound:
        # small non-negative ids (the stage passes positions): used as they are; an id of a pair
        # that no row has is simply never kept
        ph_dense = np.where(ph >= 0, ph, -1)
        k = int(max(ph.max(), pairs.max(initial=-1))) + 1
    else:  # any other ids: renumbered 0..k-1
        valid = ph >= 0
        ph_ids = arrays.unique_sorted(ph[valid])
        ph_dense = np.full(n, -1, np.int64)
        ph_dense[valid] = np.searchsorted(ph_ids, ph[valid])
        k = len(ph_ids)
        if len(pairs) and k:
            a = np.searchsorted(ph_ids, pairs[:, 0]).clip(0, k - 1)
            b = np.searchsorted(ph_ids, pairs[:, 1]).clip(0, k - 1)
            ok = (ph_ids[a] == pairs[:, 0]) & (ph_ids[b] == pairs[:, 1])  # pairs of phashes no row has: irrelevant
            pairs = np.stack([a[ok], b[ok]], axis=1)
        else:
            pairs = pairs[:0]
    both = np.concatenate([pairs, pairs[:, ::-1]])
    nbr = both[np.argsort(both[:, 0], kind="stable"), 1]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(both[:, 0], minlength=k))])
    return ph_dense, indptr.astype(np.int64), nbr


def _dense(g: np.ndarray) -> np.ndarray:
    """Group ids renumbered 0..k-1 (same partition); ids already within [0, 4n) are kept as
    they are (the visit only needs small non-negative ids)."""
    g = np.asarray(g, np.int64).reshape(-1)
    if len(g) == 0 or (g.min() >= 0 and g.max() < 4 * len(g) + 16):
        return g
    return np.unique(g, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _involved(g: np.ndarray) -> np.ndarray:
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    return counts[inv] > 1


def _shingles(text: str, k: int) -> list[bytes]:
    s = text.lower()
    if len(s) <= k:
        return [s.encode("utf-8")]
    return list({s[i : i + k].encode("utf-8") for i in range(len(s) - k + 1)})


# ---------------------------------------------------------------- which rows can be duplicates


def candidates(
    tab: pa.Table, columns: list[str], also: dict[str, np.ndarray] | None = None, threads: int = 2
) -> np.ndarray:
    """True where a row's 64-bit value in any of ``columns`` (int64 or uint64; nulls never
    match) occurs in another row too, or is one of ``also[column]``: a superset of the rows the
    keep-first rule can drop or that can make another row a duplicate (equal values have equal
    hashes). The columns run on ``threads`` threads (the compiled pass releases the GIL)."""
    also = also or {}

    def one(col: str) -> np.ndarray:
        v = tab.column(col)
        if v.null_count == len(v):
            return np.zeros(len(v), np.bool_)
        values, valid = arrays.int64_values(v)
        return repeated(values, valid, also=also.get(col))

    with ThreadPoolExecutor(max(1, min(2, int(threads)))) as pool:
        return reduce(np.logical_or, pool.map(one, columns))


def repeated(values: np.ndarray, valid: np.ndarray | None = None, also: np.ndarray | None = None) -> np.ndarray:
    """True where a 64-bit value (e.g. a hash of a URL) occurs at more than one position among
    the ``valid`` positions (all by default; the others are False), or is one of ``also``: exactly
    :func:`repeated_reference`. NumPy's sort (it releases the GIL) finds the values that repeat,
    then one compiled pass marks the rows holding them."""
    values = arrays.as_uint64(values)
    all_valid = valid is None
    valid = np.ones(len(values), np.bool_) if valid is None else np.ascontiguousarray(valid, np.bool_)
    s = np.sort(values if all_valid else values[valid])
    members = s[1:][s[1:] == s[:-1]]
    if also is not None:
        members = np.concatenate([members, np.asarray(also).reshape(-1).astype(np.int64).view(np.uint64)])
    out = np.zeros(len(values), np.bool_)
    if len(members):
        kernels.mark_members(members, values, valid, out)
    return out


def repeated_reference(
    values: np.ndarray, valid: np.ndarray | None = None, also: np.ndarray | None = None
) -> np.ndarray:
    """The reference of :func:`repeated`, with ``np.unique`` and ``np.isin``."""
    values = arrays.as_uint64(values)
    valid = np.ones(len(values), np.bool_) if valid is None else np.asarray(valid, np.bool_)
    out = np.zeros(len(values), np.bool_)
    idx = np.flatnonzero(valid)
    if len(idx):
        _, inv, counts = np.unique(values[idx], return_inverse=True, return_counts=True)
        out[idx] = counts[inv.reshape(-1)] > 1
    if also is not None:
        out |= valid & np.isin(values, np.asarray(also).reshape(-1).astype(np.int64).view(np.uint64))
    return out


# ---------------------------------------------------------------- exact group ids


def first_ids(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """For each 64-bit value, the first position (among the ``valid`` ones) holding the same
    value; -1 at invalid positions. Equal values get equal ids, and ids are within [0, n):
    exactly :func:`first_ids_reference`, by one compiled pass over a hash map."""
    values = arrays.as_uint64(values)
    valid = np.ones(len(values), np.bool_) if valid is None else np.ascontiguousarray(valid, np.bool_)
    if len(values) >= 2**31:  # the map packs positions in 32 bits
        return first_ids_reference(values, valid)
    ids = np.empty(len(values), np.int64)
    kernels.first_positions(values, valid, ids)
    return ids


def first_ids_reference(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The reference of :func:`first_ids`, with ``np.unique``."""
    values = arrays.as_uint64(values)
    valid = np.ones(len(values), np.bool_) if valid is None else np.asarray(valid, np.bool_)
    ids = np.full(len(values), -1, np.int64)
    idx = np.flatnonzero(valid)
    _, first, inv = np.unique(values[idx], return_index=True, return_inverse=True)
    ids[idx] = idx[first][inv.reshape(-1)]
    return ids


def group_ids(values: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A group id per string, given each string's 64-bit hash: equal strings get equal ids,
    different strings different ones, and a null an id of its own; ids are within [0, 2n). The
    same partition as :func:`exact_group_ids`. One compiled pass groups the rows by hash
    (:func:`first_ids`) and another compares every row's bytes with its group's first; only if a
    hash collision put two different strings together (never seen, but possible) is the answer
    :func:`exact_group_ids`'s."""
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int64)
    vals = arrays.combined(values)
    h = arrays.combined(hashes)
    hv = np.asarray(pc.fill_null(h, 0).to_numpy() if h.null_count else h.to_numpy(), np.uint64)
    valid = arrays.valid_mask(vals)
    ids = first_ids(hv, valid)
    data, starts, ends = arrays.string_buffers(vals)
    if not kernels.same_strings(ids, data, starts, ends):
        return exact_group_ids(values)
    return np.where(valid, ids, n + np.arange(n, dtype=np.int64)) if vals.null_count else ids


def exact_group_ids(*cols: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The reference of :func:`group_ids`, for one or more columns: a group id per row, equal
    where all ``cols`` are equal and non-null; a row with a null gets an id of its own. Exact
    (Arrow's dictionary encoding compares the values)."""
    n = len(cols[0])
    ids = np.zeros(n, np.int64)
    null = np.zeros(n, np.bool_)
    for col in cols:
        enc = pc.dictionary_encode(arrays.combined(col))
        idx = enc.indices
        if idx.null_count:
            null |= np.asarray(idx.is_null().to_numpy(zero_copy_only=False), np.bool_)
            idx = pc.fill_null(idx, 0)
        k = idx.to_numpy().astype(np.int64)
        ids = (
            k if len(cols) == 1 else np.unique(ids * (len(enc.dictionary) + 1) + k, return_inverse=True)[1].reshape(-1)
        )
    base = int(ids.max()) + 1 if n else 0
    return np.where(null, base + np.arange(n, dtype=np.int64), ids)


def warm_up() -> None:
    """Load the compiled loops (from numba's cache) by running each once on a tiny input, with the
    argument types the stage passes: numba compiles (and caches) one machine-code version per
    signature, and an array read in place from an Arrow buffer (read-only) is another signature
    than one NumPy allocated."""
    keep_first_codes(DedupInput(*(np.zeros(3, bool), *[np.arange(3)] * 5, np.zeros((0, 2), np.int64))), DedupOptions())
    # a value that repeats (the compiled pass runs only then), read in place from Arrow
    candidates(pa.table({"h": pa.array([1, 1, 2], pa.int64())}), ["h"], threads=1)
    group_ids(pa.array(["a", "a"]), pa.array(np.zeros(2, np.uint64)))  # Arrow's hashes, and the byte comparison
    first_ids(np.zeros(2, np.int64))  # the pHash ids
