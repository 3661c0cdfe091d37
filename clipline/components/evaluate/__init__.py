"""evaluate stage: zero-shot classification, retrieval, reports (see stage.evaluate)."""
