"""curate stage: raw shards -> rules (rules.sql) -> dedup -> versioned snapshot.

Modules: normalize (caption text), language (langid, vectorised), rules (SQL rules), phash,
evalset (decontamination set), dedup (pHash LSH + keep-first rule), sources (reading shards),
report (table, contact sheet, MLflow), stage (:func:`curate`, the entry point).
"""

from clipline.components.curate.stage import CurateError, CurateResult, curate

__all__ = ["curate", "CurateResult", "CurateError"]
