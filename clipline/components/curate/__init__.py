"""curate stage: raw shards -> rules (rules.sql) -> dedup -> versioned snapshot.

Modules: stage (:func:`curate`, the entry point, and the driver), steps (the named steps over one
run context), db (the DuckDB connection and its memory limit), sources (reading shards), normalize
(caption text), rules (SQL rules), language (langid's model), evalset and phash (decontamination
set), near (pHash pairs within a distance), dedup (keep-first rule), hashing (split, shuffle,
content hash), arrays (NumPy views of Arrow arrays), kernels (the compiled loops of language and
dedup), report (table, contact sheet, MLflow).
"""

from clipline.components.curate.stage import CurateError, CurateResult, curate

__all__ = ["curate", "CurateResult", "CurateError"]
