"""The toy web's items (URL path, caption, fault, content) and their response bodies.

A :class:`ToyStore` is cheap to build (no image is drawn); a body is rendered the first time it is
asked for and kept in memory, so a server starts at once and answers repeated requests from the
cache. :meth:`ToyStore.warm` renders everything ahead of time (the server runs it in a background
thread). Bodies are deterministic: same config, same bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from PIL import Image

from clipline.components.config import DemoConfig
from clipline.components.demo import faults as F
from clipline.components.demo.corpus import CorpusItem, _rng, caption_for, corpus_item, encode_jpeg, render

# faults whose body is the item's own plain JPEG (the behaviour is in the HTTP exchange)
_PLAIN_BODY = {
    F.NONE,
    "http_429",
    "http_503_retry_after",
    "slow",
    "timeout",
    "redirect",
    "redirect_internal",
    "truncated",
    "optout",
    "caption_empty",
    "caption_junk",
    "caption_mojibake",
    "caption_foreign",
}
_EXT = {"bomb": "png", "palette": "png", "alpha": "png", "animated": "gif"}


@dataclass(frozen=True)
class ToyItem:
    """One URL of the toy web. ``color``/``shape`` say what the served picture shows (for
    duplicates: the source's picture); ``source_id`` is the copied item for duplicates."""

    item_id: int
    path: str
    caption: str
    fault: str
    color: str
    shape: str
    source_id: int | None = None
    caption_lang: str = "en"
    mismatched: bool = False  # the caption describes another picture (DemoConfig.mismatch_share)


class ToyStore:
    """The items of one toy web and a thread-safe cache of their bodies."""

    def __init__(self, cfg: DemoConfig, n: int | None = None) -> None:
        self.cfg = cfg
        self.n = n if n is not None else cfg.n_images
        self.seed = cfg.seed
        faults = F.plan_faults(self.n, cfg.seed, cfg.fault_rate, cfg.fault_weight)
        self._sources = F.pick_sources(faults, cfg.seed)
        self._corpus: list[CorpusItem] = [
            corpus_item(cfg.seed, i, small_share=cfg.small_image_share, wide_share=cfg.wide_image_share)
            for i in range(self.n)
        ]
        self.items: list[ToyItem] = [self._make_item(i, f) for i, f in enumerate(faults)]
        self._by_path = {it.path: it for it in self.items}
        self._cache: dict[int, tuple[bytes, str]] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- items
    def _make_item(self, i: int, fault: str) -> ToyItem:
        base = self._corpus[i]
        ext = _EXT.get(fault, "jpg")
        path = f"/images/{i:06d}.{ext}"
        rng = _rng(self.seed, f"fault-caption/{fault}", i)
        lang = "en"
        src = self._sources.get(i)
        if src is not None:
            content = self._corpus[src]
            caption = caption_for(content.spec, rng)  # a fresh description of the copied picture
            return ToyItem(i, path, caption, fault, content.color, content.shape, src)
        caption = base.caption
        if fault == F.NONE and self.cfg.mismatch_share > 0:
            other = self._mismatch(i)
            if other is not None:
                caption = caption_for(self._corpus[other].spec, _rng(self.seed, "mismatch-caption", i))
                return ToyItem(i, path, caption, fault, base.color, base.shape, mismatched=True)
        if fault == "caption_empty":
            caption = F.empty_caption(rng)
        elif fault == "caption_junk":
            caption = F.junk_caption(rng)
        elif fault == "caption_mojibake":
            caption = F.mojibake_caption(base.caption, rng)
        elif fault == "caption_foreign":
            lang, caption = F.foreign_caption(base.color, base.shape, rng)
        return ToyItem(i, path, caption, fault, base.color, base.shape, None, lang)

    def _mismatch(self, i: int) -> int | None:
        """For a share ``mismatch_share`` of the items (drawn per item from the seed): another item
        whose picture differs in colour or shape, whose caption item ``i`` will carry."""
        rng = _rng(self.seed, "mismatch", i)
        if rng.random() >= self.cfg.mismatch_share or self.n < 2:
            return None
        mine = (self._corpus[i].color, self._corpus[i].shape)
        for _ in range(64):
            j = rng.randrange(self.n)
            if (self._corpus[j].color, self._corpus[j].shape) != mine:
                return j
        return None

    def by_path(self, path: str) -> ToyItem | None:
        return self._by_path.get(path)

    def corpus(self, item_id: int) -> CorpusItem:
        return self._corpus[item_id]

    # ----------------------------------------------------------------------------- bodies
    def image(self, item_id: int) -> Image.Image:
        """The item's own picture, drawn fresh."""
        return render(self._corpus[item_id].spec)

    def clean_jpeg(self, item_id: int) -> bytes:
        """The item's own picture as JPEG: what a clean URL serves."""
        spec = self._corpus[item_id].spec
        if self.items[item_id].fault in _PLAIN_BODY:
            return self.body(item_id)[0]
        return encode_jpeg(render(spec), spec.quality)

    def cached(self, item_id: int) -> tuple[bytes, str] | None:
        """The body if it was built already, else None (never draws)."""
        return self._cache.get(item_id)

    def body(self, item_id: int) -> tuple[bytes, str]:
        """(bytes, content type) that the item's URL serves when it serves a body at all.
        Built on first use, then cached. ``oversized`` returns only its JPEG prefix (the server
        streams the padding), ``http_404``/``http_500`` a short text."""
        hit = self._cache.get(item_id)
        if hit is not None:
            return hit
        out = self._build(item_id)
        with self._lock:
            self._cache.setdefault(item_id, out)
        return out

    def _build(self, i: int) -> tuple[bytes, str]:
        item = self.items[i]
        f = item.fault
        spec = self._corpus[i].spec
        if f in ("http_404", "http_500"):
            return (b"Not Found" if f == "http_404" else b"Internal Server Error"), "text/plain"
        if f == "not_image":
            return F.not_image_html(i), F.JPEG  # the lie is the point
        if f == "bomb":
            return F.bomb_png(self.cfg.bomb_side), F.PNG
        if f == "exact_duplicate" and item.source_id is not None:
            return self.clean_jpeg(item.source_id), F.JPEG
        if f == "near_duplicate" and item.source_id is not None:
            src = self._corpus[item.source_id].spec
            _, data = F.near_duplicate_jpeg(render(src), src.quality, _rng(self.seed, "near-dup", i))
            return data, F.JPEG
        img = render(spec)
        if f == "cmyk":
            return F.cmyk_jpeg(img, spec.quality), F.JPEG
        if f == "palette":
            return F.palette_png(img), F.PNG
        if f == "alpha":
            return F.alpha_png(img, spec), F.PNG
        if f == "animated":
            return F.animated_gif(img, spec), F.GIF
        return encode_jpeg(img, spec.quality), F.JPEG  # clean, and every HTTP-level fault

    def warm(self, stop: threading.Event | None = None) -> int:
        """Build every body not yet cached (in item order); returns how many were built.
        Stops early when ``stop`` is set."""
        built = 0
        for i in range(self.n):
            if stop is not None and stop.is_set():
                break
            if i not in self._cache:
                self.body(i)
                built += 1
        return built
