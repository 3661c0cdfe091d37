"""The real web's faults, for the toy web: which items get which fault, and the bodies and
captions that carry them.

What each fault does at the HTTP level (served by :mod:`clipline.components.demo.server`):

============================ ===================================================================
``http_404`` / ``http_500``  that status, every time
``http_429``                 first request: 429 with ``Retry-After: 1``; later requests: the image
``http_503_retry_after``     the same with 503
``slow``                     the image after ``slow_seconds`` (1.5 s): should still succeed
``timeout``                  no answer for ``hang_seconds`` (60 s); never blocks other requests
``redirect``                 302 to another path on the same server, which serves the image
``redirect_internal``        302 to the second ("internal") server on another loopback port; an
                             SSRF guard must refuse it (the internal server counts its hits)
``truncated``                Content-Length of the whole JPEG, half of it sent, connection closed
``not_image``                an HTML page served as ``Content-Type: image/jpeg``
``oversized``                ``oversized_bytes`` (25 MB) streamed in chunks, no Content-Length;
                             it starts with the item's JPEG, so only a size cap catches it
``bomb``                     a ~50 KB PNG declaring ``bomb_side`` x ``bomb_side`` (20000 x 20000)
                             1-bit pixels: a real decompression bomb (400 Mpx)
``cmyk``                     the image as a CMYK JPEG
``palette``                  the image as a P-mode (palette) PNG
``alpha``                    an RGBA PNG: the object opaque, the background fully transparent
                             (RGB under it is black, as many real PNGs store it)
``animated``                 an animated GIF whose first frame is the image (later frames: the
                             background only)
``optout``                   the image with ``X-Robots-Tag: noai``
``exact_duplicate``          the same bytes as another (clean) item, under its own URL
``near_duplicate``           another clean item re-encoded at low quality, resized or slightly
                             cropped
``caption_empty``            empty or blank caption
``caption_junk``             a caption that names nothing ("IMG_4032.JPG", "click here", ...)
``caption_mojibake``         a true English caption, UTF-8 bytes decoded as Windows-1252
                             ("â€œa red circleâ€\x9d"); ftfy repairs it
``caption_foreign``          a true caption in French, German or Spanish
============================ ===================================================================

Items with a caption fault, and every fault that still serves a picture, show the item's own
colour x shape; the ``color``/``shape`` columns of the URL list always say what is in the picture
(for duplicates: the source's content).
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw

from clipline.components.config import DEMO_FAULTS
from clipline.components.demo.corpus import ShapeSpec, _background, _polygon, _rng, encode_jpeg

NONE = "none"

#: Whether a correct ingest stores an image for a URL with this fault (True) or records it as
#: failed (False), with the error kind it should name. Caption faults and duplicates are stored by
#: ingest and are curation's business; mojibake can be repaired (ftfy), the others dropped.
INGEST_OUTCOME: dict[str, tuple[bool, str]] = {
    NONE: (True, ""),
    "http_404": (False, "http_404"),
    "http_500": (False, "http_500 (after retries)"),
    "http_429": (True, "succeeds on retry after Retry-After"),
    "http_503_retry_after": (True, "succeeds on retry after Retry-After"),
    "slow": (True, "answers within any sane read timeout"),
    "timeout": (False, "timeout"),
    "redirect": (True, "redirect followed on an allowed host"),
    "redirect_internal": (False, "ssrf_blocked (redirect to a non-allowed loopback port)"),
    "truncated": (False, "truncated"),
    "not_image": (False, "not_an_image"),
    "oversized": (False, "too_large"),
    "bomb": (False, "decompression_bomb"),
    "cmyk": (True, "converted to RGB"),
    "palette": (True, "converted to RGB"),
    "alpha": (True, "composited to RGB"),
    "animated": (True, "first frame"),
    "optout": (False, "opted_out"),
    "exact_duplicate": (True, "same sha256 as its source; curate drops one"),
    "near_duplicate": (True, "phash close to its source; curate drops one"),
    "caption_empty": (True, "curate drops it"),
    "caption_junk": (True, "curate drops it"),
    "caption_mojibake": (True, "curate repairs the caption"),
    "caption_foreign": (True, "curate's language rule drops it"),
}


def plan_faults(n: int, seed: int, rate: float, weight: Callable[[str], float]) -> list[str]:
    """The fault of each of ``n`` items (``"none"`` for clean ones); deterministic in its inputs.

    ``round(rate * n)`` items are faulty, split between the faults in proportion to their
    weights, except that every fault with a weight above 0 appears at least once when
    ``rate > 0`` (so even n = 200 exercises them all) while at least half the items stay clean
    (they are the sources of the duplicates)."""
    active = [f for f in DEMO_FAULTS if weight(f) > 0]
    faults = [NONE] * n
    if rate <= 0 or not active or n < 2:
        return faults
    total = min(max(round(rate * n), len(active)), n // 2)
    rng = _rng(seed, "faults", n)
    if total < len(active):
        chosen = rng.sample(active, total)
    else:
        # one of each, then the rest by largest remainder on the weights
        extra = total - len(active)
        wsum = sum(weight(f) for f in active)
        shares = {f: extra * weight(f) / wsum for f in active}
        counts = {f: 1 + int(shares[f]) for f in active}
        left = total - sum(counts.values())
        for f in sorted(active, key=lambda f: shares[f] - int(shares[f]), reverse=True)[:left]:
            counts[f] += 1
        chosen = [f for f in active for _ in range(counts[f])]
    rng.shuffle(chosen)
    for item_id, fault in zip(rng.sample(range(n), len(chosen)), chosen):
        faults[item_id] = fault
    return faults


# ------------------------------------------------------------------------------------ captions

_JUNK = (
    "IMG_{d4}.JPG",
    "DSC{d5}",
    "click here",
    "asdf qwer zxcv",
    "untitled",
    "image",
    "!!!! ####",
    "{d5}",
    "thumbnail",
    "null",
    "undefined",
    "photo.jpg",
    "Screenshot {d4}-{d2}-{d2}",
    "lorem ipsum",
    ">> more <<",
    "img src",
    "___",
    "download now",
    "jpg",
    "...",
)


def junk_caption(rng: random.Random) -> str:
    """A caption that describes nothing (file names, UI text, keyboard mash)."""
    return rng.choice(_JUNK).format(
        d2=f"{rng.randint(1, 28):02d}", d4=f"{rng.randint(0, 9999):04d}", d5=f"{rng.randint(0, 99999):05d}"
    )


def empty_caption(rng: random.Random) -> str:
    return rng.choice(("", "", " ", "\n", "  \t"))


_CP1252_HOLES = {0x81, 0x8D, 0x8F, 0x90, 0x9D}


def mojibake(text: str) -> str:
    """``text`` as UTF-8 bytes misread as Windows-1252 (bytes it leaves undefined read as Latin-1),
    the commonest mojibake on the web."""
    out = []
    for b in text.encode("utf-8"):
        out.append(chr(b) if b in _CP1252_HOLES else bytes([b]).decode("cp1252"))
    return "".join(out)


_MOJIBAKE_FORMS = ("“{}”", "{}…", "{} – my favourite", "‘{}’ — nice", "{} ©", "{} · naïve drawing")


def mojibake_caption(caption: str, rng: random.Random) -> str:
    """A true caption dressed with typographic characters, then garbled by :func:`mojibake`."""
    return mojibake(rng.choice(_MOJIBAKE_FORMS).format(caption))


_FOREIGN = {
    # French: colour agrees with the noun's gender (m, f)
    "fr": {
        "colors": {
            "red": ("rouge", "rouge"),
            "green": ("vert", "verte"),
            "blue": ("bleu", "bleue"),
            "yellow": ("jaune", "jaune"),
            "purple": ("violet", "violette"),
            "orange": ("orange", "orange"),
            "pink": ("rose", "rose"),
            "cyan": ("cyan", "cyan"),
        },
        "shapes": {
            "circle": ("cercle", "m"),
            "square": ("carré", "m"),
            "triangle": ("triangle", "m"),
            "star": ("étoile", "f"),
            "cross": ("croix", "f"),
            "heart": ("cœur", "m"),
        },
        "templates": (
            "{art} {shape} {color} sur un fond uni",
            "Voici {art} {shape} {color} dessiné à la main",
            "une image avec {art} {shape} {color} au milieu",
        ),
        "art": {"m": "un", "f": "une"},
    },
    # German: "in <Farbe>" avoids adjective endings; every noun here takes "ein"
    "de": {
        "colors": {
            "red": "Rot",
            "green": "Grün",
            "blue": "Blau",
            "yellow": "Gelb",
            "purple": "Lila",
            "orange": "Orange",
            "pink": "Rosa",
            "cyan": "Türkis",
        },
        "shapes": {
            "circle": "Kreis",
            "square": "Quadrat",
            "triangle": "Dreieck",
            "star": "Stern",
            "cross": "Kreuz",
            "heart": "Herz",
        },
        "templates": (
            "Ein {shape} in {color} auf einem einfarbigen Hintergrund",
            "Hier sieht man ein {shape} in der Farbe {color}",
            "Meine Zeichnung: ein {shape} in {color}, sonst nichts",
        ),
    },
    # Spanish: colour agrees with the noun's gender (m, f)
    "es": {
        "colors": {
            "red": ("rojo", "roja"),
            "green": ("verde", "verde"),
            "blue": ("azul", "azul"),
            "yellow": ("amarillo", "amarilla"),
            "purple": ("morado", "morada"),
            "orange": ("naranja", "naranja"),
            "pink": ("rosa", "rosa"),
            "cyan": ("cian", "cian"),
        },
        "shapes": {
            "circle": ("círculo", "m"),
            "square": ("cuadrado", "m"),
            "triangle": ("triángulo", "m"),
            "star": ("estrella", "f"),
            "cross": ("cruz", "f"),
            "heart": ("corazón", "m"),
        },
        "templates": (
            "{art} {shape} {color} sobre un fondo liso",
            "Aquí hay {art} {shape} {color} dibujado a mano",
            "una imagen con {art} {shape} {color} en el centro",
        ),
        "art": {"m": "un", "f": "una"},
    },
}


def foreign_caption(color: str, shape: str, rng: random.Random) -> tuple[str, str]:
    """A true caption in French, German or Spanish; returns (language code, caption)."""
    lang = rng.choice(sorted(_FOREIGN))
    table = _FOREIGN[lang]
    template = rng.choice(table["templates"])
    if lang == "de":
        text = template.format(shape=table["shapes"][shape], color=table["colors"][color])
    else:
        noun, gender = table["shapes"][shape]
        adj = table["colors"][color][0 if gender == "m" else 1]
        text = template.format(art=table["art"][gender], shape=noun, color=adj)
        if gender == "f":  # participles agree too
            text = text.replace("dessiné", "dessinée").replace("dibujado", "dibujada")
    return lang, text[0].upper() + text[1:]


# ---------------------------------------------------------------------------------------- bodies

JPEG, PNG, GIF, HTML = "image/jpeg", "image/png", "image/gif", "text/html; charset=utf-8"


def cmyk_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("CMYK").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def palette_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG")
    return buf.getvalue()


def object_mask(spec: ShapeSpec) -> Image.Image:
    """An "L" mask, 255 where the object is drawn."""
    mask = Image.new("L", (spec.width, spec.height), 0)
    draw = ImageDraw.Draw(mask)
    if spec.shape == "circle":
        r = spec.radius * 0.95
        draw.ellipse((spec.cx - r, spec.cy - r, spec.cx + r, spec.cy + r), fill=255)
    else:
        draw.polygon(_polygon(spec.shape, spec.cx, spec.cy, spec.radius, spec.angle), fill=255)
    return mask


def alpha_png(img: Image.Image, spec: ShapeSpec) -> bytes:
    """RGBA: the object opaque, everything else transparent black."""
    mask = object_mask(spec)
    rgba = Image.new("RGBA", img.size, (0, 0, 0, 0))
    rgba.paste(img, (0, 0), mask)
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    return buf.getvalue()


def animated_gif(img: Image.Image, spec: ShapeSpec) -> bytes:
    """Three frames: the image first, then the bare background twice."""
    bg = _background(spec)
    buf = io.BytesIO()
    img.save(buf, format="GIF", save_all=True, append_images=[bg, bg.copy()], duration=300, loop=0)
    return buf.getvalue()


def not_image_html(item_id: int) -> bytes:
    return (
        "<!DOCTYPE html><html><head><title>Access denied</title></head><body>"
        f"<h1>Please enable JavaScript</h1><p>Request {item_id} could not be served. "
        '<a href="/">Home</a></p></body></html>'
    ).encode()


@functools.lru_cache(maxsize=4)
def bomb_png(side: int) -> bytes:
    """A valid PNG declaring ``side`` x ``side`` 1-bit grey pixels, all black: a few dozen KB that
    decode to side^2 pixels. Built row by row, never holding the raw pixels in memory."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    chunks = []
    block = row * 256
    done = 0
    while done < side:
        k = min(256, side - done)
        chunks.append(comp.compress(block if k == 256 else row * k))
        done += k
    chunks.append(comp.flush())
    idat = b"".join(chunks)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def near_duplicate_jpeg(img: Image.Image, quality: int, rng: random.Random) -> tuple[str, bytes]:
    """A near copy of ``img``: re-encoded at low quality, resized, or cropped by a few percent.
    Returns (what was done, JPEG bytes)."""
    how = rng.choice(("reencoded", "resized", "cropped"))
    if how == "reencoded":
        return how, encode_jpeg(img, rng.randint(35, 65))
    w, h = img.size
    if how == "resized":
        f = rng.uniform(0.6, 0.85)
        return how, encode_jpeg(img.resize((max(1, int(w * f)), max(1, int(h * f))), Image.Resampling.LANCZOS), quality)
    dx, dy = int(w * rng.uniform(0.02, 0.06)), int(h * rng.uniform(0.02, 0.06))
    return how, encode_jpeg(img.crop((dx, dy, w - dx, h - dy)), quality)


def pick_sources(faults: Sequence[str], seed: int) -> dict[int, int]:
    """For each duplicate item, the clean item whose picture it copies."""
    clean = [i for i, f in enumerate(faults) if f == NONE]
    rng = _rng(seed, "dup-sources", len(faults))
    return {i: rng.choice(clean) for i, f in enumerate(faults) if f in ("exact_duplicate", "near_duplicate") and clean}
