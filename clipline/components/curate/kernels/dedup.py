"""Compiled loops of :mod:`clipline.components.curate.dedup` (the public functions and their
references are there; see the package docstring).

The hash maps are open addressing with linear probing, at most half full, slots chosen by
splitmix64's finaliser (:func:`mix`) so that hashes whose low bits agree still spread.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def mix(x):  # pragma: no cover - compiled
    """splitmix64's finaliser: a 64-bit value's bits spread over all 64 (slot and fingerprint)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def keep_first_visit(is_parent, url, key, sha, ci, ph, indptr, nbr, same_image, near_image, out):  # pragma: no cover
    """The keep-first visit over dense group ids (ph: -1 = no phash; nbr[indptr[p]:indptr[p+1]]:
    phash ids within the distance of p). Writes reason codes (0 = kept) into ``out``.
    ``keep_first_visit.py_func`` is the same loop in Python."""
    kept_url = np.zeros(url.max() + 1 if len(url) else 1, np.bool_)
    kept_key = np.zeros(key.max() + 1 if len(key) else 1, np.bool_)
    kept_sha = np.zeros(sha.max() + 1 if len(sha) else 1, np.bool_)
    kept_ci = np.zeros(ci.max() + 1 if len(ci) else 1, np.bool_)
    kept_ph = np.zeros(len(indptr), np.bool_)
    for i in range(len(is_parent)):
        if not is_parent[i]:
            r = 0
            if kept_url[url[i]]:
                r = 1
            elif kept_key[key[i]]:
                r = 2
            elif same_image and kept_sha[sha[i]]:
                r = 3
            elif kept_ci[ci[i]]:
                r = 4
            elif near_image and ph[i] >= 0:
                p = ph[i]
                if kept_ph[p]:
                    r = 5
                else:
                    for j in range(indptr[p], indptr[p + 1]):
                        if kept_ph[nbr[j]]:
                            r = 5
                            break
            if r:
                out[i] = r
                continue
        kept_url[url[i]] = True
        kept_key[key[i]] = True
        kept_sha[sha[i]] = True
        kept_ci[ci[i]] = True
        if ph[i] >= 0:
            kept_ph[ph[i]] = True


@njit(cache=True, nogil=True)
def mark_members(members, h, valid, out):  # pragma: no cover - compiled
    """out[i] = True where valid row i's 64-bit value ``h[i]`` is one of ``members``: they go into
    a hash set, and each row looks its value up there. The caller passes only the values that
    repeat, so the set stays in the cache, where a table of every value would not."""
    size = 2
    while size < 2 * len(members):
        size *= 2
    mask = np.uint64(size - 1)
    keys = np.empty(size, np.uint64)
    used = np.zeros(size, np.bool_)
    for i in range(len(members)):
        x = np.uint64(members[i])
        j = np.int64(mix(x) & mask)
        while used[j] and keys[j] != x:
            j = (j + 1) & (size - 1)
        keys[j] = x
        used[j] = True
    for i in range(len(h)):
        if not valid[i]:
            continue
        x = np.uint64(h[i])
        j = np.int64(mix(x) & mask)
        while used[j]:
            if keys[j] == x:
                out[i] = True
                break
            j = (j + 1) & (size - 1)


@njit(cache=True, nogil=True)
def same_strings(ids, data, starts, ends):  # pragma: no cover - compiled
    """True when every row i with ids[i] = f >= 0 holds the same bytes as row f."""
    for i in range(len(ids)):
        f = ids[i]
        if f < 0 or f == i:
            continue
        a, b, fa = starts[i], ends[i], starts[f]
        if b - a != ends[f] - fa:
            return False
        for k in range(b - a):
            if data[a + k] != data[fa + k]:
                return False
    return True


@njit(cache=True, nogil=True)
def first_positions(h, valid, ids):  # pragma: no cover - compiled
    """ids[i] = the first valid position holding the 64-bit value ``h[i]``, -1 where invalid: a
    hash map whose 8-byte slots pack a 32-bit fingerprint of the value with the position (so
    positions must be below 2^32), so that the map of a few hundred thousand values stays within
    the cache."""
    n = len(h)
    size = 2
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    slots = np.zeros(size, np.uint64)  # 0: empty; else fingerprint << 32 | (position + 1)
    low = np.uint64(0xFFFFFFFF)
    for i in range(n):
        if not valid[i]:
            ids[i] = -1
            continue
        x = np.uint64(h[i])
        z = mix(x)
        fp = z >> np.uint64(32)
        j = np.int64(z & mask)
        f = -1
        while slots[j] != 0:
            e = slots[j]
            if (e >> np.uint64(32)) == fp:
                g = np.int64(e & low) - 1
                if np.uint64(h[g]) == x:
                    f = g
                    break
            j = (j + 1) & (size - 1)
        if f < 0:
            slots[j] = (fp << np.uint64(32)) | np.uint64(i + 1)
            f = i
        ids[i] = f
