"""The embedded default: a generated "toy web" of coloured shapes with captions, served over real
HTTP on loopback with the faults of the real web, plus the held-out zero-shot evaluation set.

- :func:`serve_toy_web` (server.py): run it and write its URL list;
- :func:`write_heldout_set` / :func:`write_seen_set` (heldout.py): evaluation sets;
- corpus.py (what the pictures and captions are), faults.py (the faults), store.py (items, bodies).
"""

from clipline.components.demo.corpus import ALL_COMBOS, COLORS, SHAPES, heldout_combos, seen_combos
from clipline.components.demo.heldout import EvalSet, write_heldout_set, write_seen_set
from clipline.components.demo.server import ToyWeb, serve_toy_web
from clipline.components.demo.store import ToyItem, ToyStore

__all__ = [
    "ALL_COMBOS",
    "COLORS",
    "SHAPES",
    "EvalSet",
    "ToyItem",
    "ToyStore",
    "ToyWeb",
    "heldout_combos",
    "seen_combos",
    "serve_toy_web",
    "write_heldout_set",
    "write_seen_set",
]
