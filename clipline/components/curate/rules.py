"""The row rules: read ``rules.sql`` (readable, editable SQL), fill its placeholders from the
config, and turn it into one ``CASE`` expression that names the first rule dropping a row.

Later, multi-row rules (language, decontamination, deduplication) are listed in
:data:`STAGE_RULES`; :func:`rule_order` gives the full documented order used in every report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from clipline.components.config import CurateConfig

RULES_FILE = Path(str(resources.files("clipline.components.curate") / "rules.sql"))
DEFAULT_BLOCKLIST = Path(str(resources.files("clipline.components.curate") / "blocklist.txt"))

#: Rules applied after the SQL rules, in this order (see rules.sql's header).
STAGE_RULES = [
    "language",
    "eval_contamination",
    "dup_url",
    "dup_key",
    "dup_image",
    "dup_caption_image",
    "near_dup_image",
    "near_dup_caption",
    "clip_score",
]

_RULE_HEADER = re.compile(r"^--\s*rule:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")


@dataclass(frozen=True)
class Rule:
    name: str
    sql: str  # boolean expression, TRUE = drop


def parse_rules(text: str, source: str = "rules.sql") -> list[Rule]:
    """The rule blocks of a rules file, in file order. Raises ValueError naming the file and rule
    for an empty or duplicated rule."""
    rules: list[Rule] = []
    name: str | None = None
    body: list[str] = []

    def close() -> None:
        if name is None:
            return
        expr = "\n".join(body).strip()
        if not re.sub(r"--[^\n]*", "", expr).strip():
            raise ValueError(f"{source}: rule {name!r} has no SQL expression under its header")
        if any(r.name == name for r in rules):
            raise ValueError(f"{source}: rule {name!r} is defined twice; give each rule its own name")
        rules.append(Rule(name, expr))

    for line in text.splitlines():
        m = _RULE_HEADER.match(line.strip())
        if m:
            close()
            name, body = m.group(1), []
        elif name is not None:
            body.append(line)
    close()
    if not rules:
        raise ValueError(f"{source}: no '-- rule: NAME' blocks found")
    clash = {r.name for r in rules} & set(STAGE_RULES)
    if clash:
        raise ValueError(f"{source}: rule name(s) {sorted(clash)} are reserved for built-in stages")
    return rules


def load_blocklist(path: Path | None) -> list[str]:
    """Terms of a blocklist file (lower-cased, comments and blanks skipped); the packaged default
    when ``path`` is None. Raises FileNotFoundError naming the file."""
    path = Path(path) if path is not None else DEFAULT_BLOCKLIST
    if not path.exists():
        raise FileNotFoundError(f"blocklist file {path} does not exist: fix [curate] blocklist_file")
    terms = []
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.split("#", 1)[0].strip().lower()
        if term:
            terms.append(term)
    return sorted(set(terms))


def _sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def blocklist_regex(terms: list[str]) -> str:
    """A SQL string literal of an RE2 pattern matching any term as a whole word, ignoring case, or a
    pattern that never matches when the list is empty."""
    if not terms:
        return _sql_literal(r"$.^")
    alternatives = "|".join(re.escape(t).replace(r"\ ", r"\s+") for t in terms)
    return _sql_literal(rf"(?i)(^|\W)({alternatives})($|\W)")


def sql_rules(cfg: CurateConfig, rules_file: Path | None = None) -> list[Rule]:
    """The SQL rules with placeholders filled from ``cfg``."""
    path = Path(rules_file) if rules_file is not None else RULES_FILE
    rules = parse_rules(path.read_text(encoding="utf-8"), str(path))
    values = {
        "min_image_side": str(int(cfg.min_image_side)),
        "max_aspect_ratio": repr(float(cfg.max_aspect_ratio)),
        "min_caption_words": str(int(cfg.min_caption_words)),
        "min_words_like": _sql_literal("%" + " %" * max(int(cfg.min_caption_words) - 1, 0)),
        "min_caption_chars": str(int(cfg.min_caption_chars)),
        "max_caption_chars": str(int(cfg.max_caption_chars)),
        "blocklist_regex": blocklist_regex(load_blocklist(cfg.blocklist_file)),
    }
    out = []
    for r in rules:
        try:
            out.append(Rule(r.name, re.sub(r"\{([a-z_][a-z0-9_]*)\}", lambda m: values[m.group(1)], r.sql)))
        except KeyError as e:
            raise ValueError(
                f"{path}: rule {r.name!r} uses unknown placeholder {{{e.args[0]}}}; known: {sorted(values)}"
            ) from None
    return out


def case_expression(rules: list[Rule]) -> str:
    """``CASE WHEN <rule 1> THEN 'name1' ... END``: the first rule that drops the row, or NULL."""
    whens = "\n".join(f"  WHEN (\n{r.sql}\n  ) THEN {_sql_literal(r.name)}" for r in rules)
    return f"CASE\n{whens}\n  ELSE NULL\nEND"


def rule_order(rules: list[Rule]) -> list[str]:
    """Every rule name in the order a dropped row is attributed."""
    return [r.name for r in rules] + STAGE_RULES
