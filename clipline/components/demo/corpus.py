"""The toy web's content: coloured shapes on neutral, unevenly lit backgrounds, with captions that name them.

Everything is a pure function of ``(seed, stream, item id)``: the same seed gives the same item
specs, the same captions and the same image bytes on every machine and every run, and an item's
content never depends on how many items are asked for (``n``), so a longer corpus extends a
shorter one.

Colours x shapes: 8 x 6 = 48 combinations. ``heldout_combos(seed)`` (12 of them, drawn from the
toy web's seed) never appear in the training corpus of that seed, in any item, faulty or clean;
they exist only in the evaluation set written by
:func:`clipline.components.demo.heldout.write_heldout_set` with the same seed. Every colour and
every shape still appears in training with other partners (each colour with at least 4 shapes,
each shape with 6 colours), so a model that composes "colour" and "shape" can name the held-out
pairs; a figure over several seeds measures that, not one lucky split.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Object colours: saturated and far apart, so that a small model at 64 px can tell them apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (125, 45, 170),
    "orange": (245, 135, 25),
    "pink": (245, 125, 190),
    "cyan": (40, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)


@functools.lru_cache(maxsize=64)
def heldout_combos(seed: int) -> tuple[tuple[str, str], ...]:
    """The 12 colour x shape pairs the corpus of ``seed`` never shows: colours and shapes are
    shuffled by the seed, then shape j is held out with colours j and j+6. So every shape is held
    out with exactly 2 colours, every colour with 1 or 2 shapes (each colour still trains with 4
    or more shapes, each shape with 6 colours), whichever the seed."""
    rng = random.Random(hashlib.blake2b(f"{seed}/heldout-split".encode(), digest_size=8).digest())
    colors, shapes = list(COLORS), list(SHAPES)
    rng.shuffle(colors)
    rng.shuffle(shapes)
    n = len(colors)
    return tuple((colors[c], shapes[s]) for s in range(len(shapes)) for c in (s % n, (s + 6) % n))


@functools.lru_cache(maxsize=64)
def seen_combos(seed: int) -> tuple[tuple[str, str], ...]:
    """The 36 pairs the corpus of ``seed`` shows, in :data:`ALL_COMBOS` order."""
    held = set(heldout_combos(seed))
    return tuple(x for x in ALL_COMBOS if x not in held)


# Backgrounds: neutral (unsaturated) so that the object's colour is the only colour in the image.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (244, 244, 242),
    "light grey": (200, 200, 198),
    "grey": (128, 128, 128),
    "dark grey": (62, 62, 64),
    "black": (16, 16, 18),
    "beige": (222, 208, 182),
}
TEXTURES: tuple[str, ...] = ("plain", "plain", "gradient", "noise", "stripes", "checker")
_TEXTURE_WORDS = {
    "plain": ("plain", "flat", "solid"),
    "gradient": ("gradient", "shaded"),
    "noise": ("grainy", "noisy", "speckled"),
    "stripes": ("striped",),
    "checker": ("checkered", "chequered"),
}

# Size classes (object diameter as a share of the image's short side).
_SMALL, _LARGE = 0.42, 0.66


def _rng(seed: int, stream: str, item_id: int) -> random.Random:
    h = hashlib.blake2b(f"{seed}/{stream}/{item_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one image and to describe it truthfully."""

    color: str
    shape: str
    width: int
    height: int
    rgb: tuple[int, int, int]
    background: str
    bg_rgb: tuple[int, int, int]
    texture: str
    cx: float
    cy: float
    radius: float
    angle: float
    outline: bool
    quality: int
    render_seed: int

    @property
    def size_word(self) -> str:
        """ "small", "large" or "" (medium), from the object's size relative to the image."""
        rel = 2 * self.radius / min(self.width, self.height)
        return "small" if rel < _SMALL else "large" if rel > _LARGE else ""

    @property
    def position_phrase(self) -> str:
        """Where the object's centre lies in a 3 x 3 grid, in words."""
        col = min(2, int(3 * self.cx / self.width))
        row = min(2, int(3 * self.cy / self.height))
        if (row, col) == (1, 1):
            return "in the center"
        vert = ("top", "middle", "bottom")[row]
        horiz = ("left", "center", "right")[col]
        if row == 1:
            return f"on the {horiz}"
        if col == 1:
            return f"at the {vert}"
        return f"in the {vert} {horiz} corner"


def sample_spec(
    rng: random.Random,
    color: str,
    shape: str,
    *,
    min_side: int = 224,
    max_side: int = 384,
    small_share: float = 0.0,
    wide_share: float = 0.0,
    large_share: float = 0.08,
) -> ShapeSpec:
    """Draw random but valid parameters for one image of ``color`` ``shape``.

    The object stays fully inside the frame. Most images have a short side in
    [``min_side``, ``max_side``] and an aspect ratio up to 1.6; ``large_share`` of them a short side
    up to 1.6 x ``max_side``; ``small_share`` a short side below 200 px and ``wide_share`` an aspect
    ratio above 3 (banners), which minimum-side and aspect-ratio rules should drop. No side
    exceeds 1024 px."""
    u = rng.random()
    aspect = None
    if u < small_share:
        short = rng.randint(96, 190)
    elif u < small_share + wide_share:
        short = rng.randint(min_side, 300)
        aspect = rng.uniform(3.1, 3.4)
    elif u > 1.0 - large_share:
        short = rng.randint(max_side, int(1.6 * max_side))
    else:
        short = rng.randint(min_side, max_side)
    if aspect is None:
        aspect = 1.0 if rng.random() < 0.4 else rng.uniform(1.05, 1.6)
    long_ = min(1024, int(round(short * aspect)))
    width, height = (long_, short) if rng.random() < 0.6 else (short, long_)
    rel = rng.uniform(0.30, 0.80)  # diameter / short side
    radius = rel * short / 2
    margin = radius * 1.02
    cx = rng.uniform(margin, width - margin)
    cy = rng.uniform(margin, height - margin)
    angle = rng.uniform(-35, 35) if shape == "heart" else rng.uniform(0, 360)
    base = COLORS[color]
    jitter = rng.uniform(0.88, 1.08)
    rgb = tuple(int(max(0, min(255, v * jitter + rng.randint(-10, 10)))) for v in base)
    background = rng.choice(list(BACKGROUNDS))
    bj = rng.randint(-10, 10)
    bg_rgb = tuple(int(max(0, min(255, v + bj))) for v in BACKGROUNDS[background])
    return ShapeSpec(
        color=color,
        shape=shape,
        width=width,
        height=height,
        rgb=rgb,  # type: ignore[arg-type]
        background=background,
        bg_rgb=bg_rgb,
        texture=rng.choice(TEXTURES),  # type: ignore[arg-type]
        cx=cx,
        cy=cy,
        radius=radius,
        angle=angle,
        outline=rng.random() < 0.25,
        quality=rng.randint(80, 95),
        render_seed=rng.getrandbits(32),
    )


# ---------------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy), fitting in radius r, rotated by angle degrees."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.0 if k % 2 == 0 else 0.42
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w = 0.34
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
        pts = [(x * 0.95, y * 0.95) for x, y in pts]
    elif shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 17.0, (y + 2.5) / 17.0))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


_NOISE_SIDE = 1024  # larger than any image side drawn


@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """Fixed grain around 128 (std 12 levels on the 0..255 blend scale), cropped at a per-image
    offset: cheap and deterministic."""
    g = np.random.default_rng(12345).normal(128.0, 40.0, size=(_NOISE_SIDE, _NOISE_SIDE))
    return np.clip(g, 0, 255).astype(np.uint8)


_LIGHT_AMPLITUDE = 25.0  # grey levels, peak


def _lighting(spec: ShapeSpec) -> np.ndarray:
    """A smooth, uneven illumination field (float32, h x w, within +-``_LIGHT_AMPLITUDE``): the sum
    of three plane waves of random direction and phase under one cycle per image side or so.

    Real photographs are never evenly lit, and without it two distinct toy pictures with the object
    in the same place have nearly the same perceptual hash (a pHash keeps only the lowest spatial
    frequencies of the grey image): about a quarter of 3,000 plain toy images had another within 6
    bits, so near-duplicate removal and eval decontamination dropped distinct pictures. A re-encoded,
    resized or slightly cropped copy keeps its field, so true near-duplicates still match."""
    g = np.random.default_rng([spec.render_seed, 1])
    w, h = spec.width, spec.height
    gw, gh = max(2, w // 8), max(2, h // 8)  # drawn coarse, then smoothed up: cheap
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    field = np.zeros((gh, gw), np.float32)
    for _ in range(3):
        fx, fy = g.uniform(-1.5, 1.5, 2)
        field += np.cos(2 * np.pi * (fx * xx / gw + fy * yy / gh) + g.uniform(0, 2 * np.pi)).astype(np.float32)
    small = Image.fromarray(field * (_LIGHT_AMPLITUDE / 3), "F")
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), np.float32)


def _background(spec: ShapeSpec) -> Image.Image:
    """A neutral background: the base grey, blended towards a lighter or darker grey by a texture
    mask (gradient, grain, stripes or checks), under uneven lighting (:func:`_lighting`). Stays
    unsaturated, so it never looks like an object colour."""
    arr = np.asarray(_texture(spec), np.float32) + _lighting(spec)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _texture(spec: ShapeSpec) -> Image.Image:
    """The evenly lit background: base grey, plain or blended with its texture."""
    w, h = spec.width, spec.height
    base = Image.new("RGB", (w, h), tuple(spec.bg_rgb))
    if spec.texture == "plain":
        return base
    gen = np.random.default_rng(spec.render_seed)
    # the other end of the blend: up to 40 levels lighter (dark bases) or darker (light bases)
    sign = 1 if sum(spec.bg_rgb) < 3 * 128 else -1
    if spec.texture == "noise":
        sign, span = 1, 30  # grain goes both ways around the base: other end = base +- 15
        lo = tuple(max(0, min(255, v - span // 2)) for v in spec.bg_rgb)
        base = Image.new("RGB", (w, h), lo)
    else:
        span = 40
    other = Image.new("RGB", (w, h), tuple(max(0, min(255, v + sign * span)) for v in base.getpixel((0, 0))))
    if spec.texture == "gradient":
        ramp = Image.linear_gradient("L")
        if gen.random() < 0.5:
            ramp = ramp.transpose(Image.Transpose.ROTATE_90)
        mask = ramp.resize((w, h), Image.Resampling.BILINEAR)
    elif spec.texture == "noise":
        tile = _noise_tile()
        y0 = int(gen.integers(0, _NOISE_SIDE - h + 1))
        x0 = int(gen.integers(0, _NOISE_SIDE - w + 1))
        mask = Image.fromarray(np.ascontiguousarray(tile[y0 : y0 + h, x0 : x0 + w]), "L")
    elif spec.texture == "stripes":
        period = int(gen.integers(8, 28))
        horizontal = bool(gen.integers(0, 2))
        idx = np.arange(h if horizontal else w)
        band = (((idx // period) % 2) * 128).astype(np.uint8)
        arr = np.broadcast_to(band[:, None], (h, w)) if horizontal else np.broadcast_to(band[None, :], (h, w))
        mask = Image.fromarray(np.ascontiguousarray(arr), "L")
    elif spec.texture == "checker":
        period = int(gen.integers(10, 32))
        yy = (np.arange(h) // period)[:, None]
        xx = (np.arange(w) // period)[None, :]
        mask = Image.fromarray((((yy + xx) % 2) * 128).astype(np.uint8), "L")
    else:
        raise ValueError(f"unknown texture {spec.texture!r}")
    return Image.composite(other, base, mask)


def render(spec: ShapeSpec) -> Image.Image:
    """Draw ``spec`` as an RGB image (deterministic)."""
    img = _background(spec)
    draw = ImageDraw.Draw(img)
    fill = tuple(spec.rgb)
    outline_rgb = tuple(int(v * 0.6) for v in spec.rgb) if spec.outline else None
    ow = max(2, int(spec.radius * 0.06)) if spec.outline else 0
    if spec.shape == "circle":
        r = spec.radius * 0.95
        box = (spec.cx - r, spec.cy - r, spec.cx + r, spec.cy + r)
        draw.ellipse(box, fill=fill, outline=outline_rgb, width=ow)
    else:
        pts = _polygon(spec.shape, spec.cx, spec.cy, spec.radius, spec.angle)
        draw.polygon(pts, fill=fill, outline=outline_rgb, width=ow)
    return img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------- captions

_TEMPLATES: tuple[str, ...] = (
    "{A_np} on a {bg} background",
    "a photo of {a_np} {pos}",
    "my drawing of {a} {color} {shape}",
    "{a} {color} {shape} in the picture",
    "{A_np} {pos} of the picture",
    "simple illustration of {a_np}",
    "clip art of {a} {color} {shape} on a {bg} background",
    "{a_shape} painted {color}",
    "the {shape} in this picture is {color}",
    "{color} {shape} icon on a {tex} {bg} backdrop",
    "close-up of {a_np} on {bg}",
    "{a_np} sitting {pos}",
    "a flat {color} {shape} shape over a {tex} background",
    "a sticker with {a} {color} {shape} on it",
    "just {a} {color} {shape}, nothing else",
    "this is {a} {color} {shape}",
    "picture of {a_np} against a {bg} background",
    "{A} {color} {shape} drawn on a {tex} {bg} surface",
    "there is {a_np} {pos}",
    "{A} {color} {shape} with a {bg} background",
    "an image showing {a_np}",
    "only one {color} {shape} on a {bg} background",
    "{a} {color} colored {shape} {pos}",
    "look at this {color} {shape}!",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(spec: ShapeSpec, rng: random.Random) -> str:
    """A natural English caption that names the colour and the shape (and nothing false)."""
    np_words = " ".join(w for w in (spec.size_word, spec.color, spec.shape) if w)
    a_np = f"{_article(np_words)} {np_words}"
    a = _article(spec.color)
    fields = {
        "np": np_words,
        "a_np": a_np,
        "A_np": a_np[0].upper() + a_np[1:],
        "a": a,
        "A": a.capitalize(),
        "a_shape": f"{_article(spec.shape)} {spec.shape}",
        "color": spec.color,
        "shape": spec.shape,
        "bg": spec.background,
        "tex": rng.choice(_TEXTURE_WORDS[spec.texture]),
        "pos": spec.position_phrase,
    }
    return rng.choice(_TEMPLATES).format(**fields)


# ---------------------------------------------------------------------------------- corpus items


@dataclass(frozen=True)
class CorpusItem:
    """One training-corpus entry before faults: what the image shows and how it is described."""

    item_id: int
    spec: ShapeSpec
    caption: str

    @property
    def color(self) -> str:
        return self.spec.color

    @property
    def shape(self) -> str:
        return self.spec.shape


@functools.lru_cache(maxsize=64)
def _deal(seed: int, rnd: int) -> tuple[int, ...]:
    order = list(range(len(seen_combos(seed))))
    _rng(seed, "deal", rnd).shuffle(order)
    return tuple(order)


def corpus_item(seed: int, item_id: int, *, small_share: float = 0.05, wide_share: float = 0.02) -> CorpusItem:
    """Item ``item_id`` of the training corpus for ``seed`` (a seen colour x shape combination).

    Combinations are dealt in shuffled rounds of all 36 seen pairs, so any 36 consecutive ids
    cover every seen pair once."""
    seen = seen_combos(seed)
    rnd, pos = divmod(item_id, len(seen))
    color, shape = seen[_deal(seed, rnd)[pos]]
    rng = _rng(seed, "item", item_id)
    spec = sample_spec(rng, color, shape, small_share=small_share, wide_share=wide_share)
    return CorpusItem(item_id=item_id, spec=spec, caption=caption_for(spec, rng))
