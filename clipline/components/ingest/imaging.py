"""Image handling for ingest: sniff, guard, decode, normalise, resize, encode, hash.

One entry point, :func:`process_image`, turns the bytes of a download into a :class:`ProcessedImage`.
It never raises for bad input: every failure comes back with a machine-readable ``error_kind``
and a human-readable ``error_message``:

``not_an_image``        the bytes are not an image at all (HTML, JSON, empty body, ...)
``unsupported_format``  an image, but not JPEG/PNG/WebP/GIF/BMP (TIFF, AVIF, HEIC, SVG, ICO, ...)
``corrupt_image``       a supported format whose data is damaged or truncated
``decompression_bomb``  the header declares more than ``max_image_pixels`` pixels (capped by
                        Pillow's ``Image.MAX_IMAGE_PIXELS``); refused before any pixel is decoded
``processing_failed``   an unexpected error after decoding (a bug; the message says what)
``out_of_memory``       MemoryError while processing

Guarantees of a successful result:
- the format was sniffed from the bytes (magic numbers), never from a Content-Type;
- pixels were decoded only after the header size passed the bomb check;
- EXIF orientation is applied; CMYK (Adobe-inverted included), palette, 16-bit, grayscale and
  alpha images become 8-bit RGB, transparent areas composited onto white (as img2dataset does);
  embedded ICC profiles are not applied (pixels are taken as sRGB, as img2dataset does);
- ``original_width``/``original_height`` are the upright size of the source image,
  ``width``/``height`` the size of the stored image;
- ``sha256`` is the hex digest of the stored bytes; ``phash`` is a 64-bit DCT perceptual hash
  (:func:`phash64`) of the stored picture without border padding, as a signed int64.

Speed: JPEGs that will be shrunk are decoded at reduced scale (libjpeg DCT scaling through
``Image.draft``), the remaining shrink uses an area (box) filter like img2dataset's INTER_AREA,
and the perceptual hash is computed from the already-small image.

Everything here is top-level and picklable so a ``ProcessPoolExecutor`` can run it.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

ResizeMode = Literal["no", "center_crop", "keep_ratio", "border"]
EncodeFormat = Literal["jpg", "webp"]

ERR_NOT_AN_IMAGE = "not_an_image"
ERR_UNSUPPORTED = "unsupported_format"
ERR_CORRUPT = "corrupt_image"
ERR_BOMB = "decompression_bomb"
ERR_PROCESSING = "processing_failed"
ERR_OOM = "out_of_memory"

BORDER_COLOR = (255, 255, 255)  # img2dataset pads with white too
BACKGROUND = (255, 255, 255)  # what transparent pixels become

# Formats accepted, keyed by the Pillow plugin name used to open them.
SUPPORTED = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_BMP_DIB_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)


@dataclass(frozen=True)
class ImageSettings:
    """How to turn a downloaded image into a stored one (the image part of IngestConfig)."""

    image_size: int = 256
    resize_mode: ResizeMode = "border"
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = 95
    max_image_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if self.resize_mode not in ("no", "center_crop", "keep_ratio", "border"):
            raise ValueError(f"resize_mode must be no|center_crop|keep_ratio|border, not {self.resize_mode!r}")
        if self.encode_format not in ("jpg", "webp"):
            raise ValueError(f"encode_format must be jpg or webp, not {self.encode_format!r}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality must be in 1..100, not {self.encode_quality}")
        if self.image_size < 1 or self.max_image_pixels < 1:
            raise ValueError("image_size and max_image_pixels must be positive")

    @classmethod
    def from_config(cls, ingest_cfg: Any) -> "ImageSettings":
        """Take the fields from an ``IngestConfig`` (or anything with the same attributes)."""
        return cls(
            image_size=ingest_cfg.image_size,
            resize_mode=ingest_cfg.resize_mode,
            encode_format=ingest_cfg.encode_format,
            encode_quality=ingest_cfg.encode_quality,
            max_image_pixels=ingest_cfg.max_image_pixels,
        )


@dataclass
class ProcessedImage:
    """The outcome for one image. ``ok`` is False exactly when ``error_kind`` is set."""

    ok: bool
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    phash: int | None = None
    error_kind: str | None = None
    error_message: str | None = None
    source_format: str | None = None

    @property
    def status(self) -> str:
        """img2dataset's status value for this outcome (``success`` or ``failed_to_resize``)."""
        return "success" if self.ok else "failed_to_resize"

    def as_row(self) -> dict[str, Any]:
        """The raw-shard fields (RAW_SCHEMA names) this outcome fills: image, sizes, hashes,
        status, error_kind, error_message. Merge with key/url/caption/source for a full row."""
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "original_width": self.original_width,
            "original_height": self.original_height,
            "sha256": self.sha256,
            "phash": self.phash,
            "status": self.status,
            "error_kind": self.error_kind,
            "error_message": self.error_message,
        }


def _fail(kind: str, message: str, fmt: str | None = None, size: tuple[int, int] | None = None) -> ProcessedImage:
    ow, oh = size if size else (None, None)
    return ProcessedImage(
        ok=False, error_kind=kind, error_message=message, source_format=fmt, original_width=ow, original_height=oh
    )


# --------------------------------------------------------------------------------- sniffing
def sniff_format(data: bytes) -> tuple[str | None, str | None]:
    """Identify an image format from its leading bytes.

    Returns ``(supported_pillow_format, None)`` for JPEG/PNG/WEBP/GIF/BMP,
    ``(None, name)`` for a recognised but unsupported image format, and ``(None, None)`` when the
    bytes are not a recognisable image.
    """
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG", None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", None
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF", None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", None
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "BMP", None
    # recognised image formats we do not accept
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None, "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return None, "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
            return None, "HEIF"
        if brand in (b"jp2 ", b"jpx ", b"jpm "):
            return None, "JPEG 2000"
        return None, None
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return None, "JPEG 2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return None, "JPEG XL"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return None, "ICO/CUR"
    if head.startswith(b"8BPS"):
        return None, "PSD"
    if head.startswith(b"qoif"):
        return None, "QOI"
    text = data[:1024].lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return None, "SVG"
    return None, None


def _describe_head(data: bytes) -> str:
    if not data:
        return "the body is empty"
    head = data[:32]
    try:
        txt = head.decode("utf-8")
        if txt.isprintable() or all(c.isprintable() or c.isspace() for c in txt):
            return f"content starts with {txt.strip()[:32]!r}"
    except UnicodeDecodeError:
        pass
    return f"content starts with bytes {head[:12].hex(' ')}"


# ----------------------------------------------------------------------------- normalising
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    """EXIF orientation tag (1 when absent or unreadable)."""
    if "exif" not in im.info and im.format != "PNG":
        return 1
    try:
        o = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return 1
    return o if o in _TRANSPOSE else 1


def _flatten_alpha(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, BACKGROUND)
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _to_8bit(im: Image.Image) -> Image.Image:
    """Integer/float grayscale (16-bit PNG, 32-bit I, F) scaled to 8-bit L, not clipped."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a8 = (a.astype(np.uint32) + 128) // 257
    elif a.dtype.kind in "iu":
        hi = int(a.max()) if a.size else 0
        a8 = (a.astype(np.int64).clip(0, 65535) + 128) // 257 if hi > 255 else a.clip(0, 255)
    else:  # float: assume 0..1 when it looks normalised, else 0..255
        a8 = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
        a8 = np.nan_to_num(a8).clip(0, 255).round()
    return Image.fromarray(np.ascontiguousarray(a8, dtype=np.uint8), mode="L")


def normalise_mode(im: Image.Image) -> Image.Image:
    """Return an 8-bit ``RGB`` or ``L`` image with the same picture.

    Transparency (alpha channel, palette or tRNS transparency) is composited onto white; CMYK
    goes through Pillow's CMYK->RGB (Pillow already undid Adobe inversion while decoding);
    16-bit and 32-bit grayscale are scaled, not clipped.
    """
    mode = im.mode
    if mode in ("RGB", "L"):
        if "transparency" in im.info:
            return _flatten_alpha(im)
        return im
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im)
    if mode == "P":
        return im.convert("RGB")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I") or mode == "F":
        return _to_8bit(im)
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


# ------------------------------------------------------------------------------- resizing
def _target_scale(w: int, h: int, s: ImageSettings) -> float:
    """The uniform scale factor the resize mode applies to a w x h (upright) image."""
    if s.resize_mode == "no":
        return 1.0
    if s.resize_mode == "border":
        return s.image_size / max(w, h)
    return s.image_size / min(w, h)  # keep_ratio, center_crop


def _resize(
    im: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> Image.Image:
    src_w = (box[2] - box[0]) if box else im.width
    if size == im.size and box is None:
        return im
    if size[0] <= src_w:  # shrinking: area averaging (img2dataset: INTER_AREA)
        return im.resize(size, Image.Resampling.BOX, box=box, reducing_gap=3.0)
    return im.resize(size, Image.Resampling.BICUBIC, box=box)  # enlarging


def _apply_resize(im: Image.Image, s: ImageSettings) -> tuple[Image.Image, tuple[int, int] | None]:
    """Resize ``im`` (already upright, reduced by draft maybe) per the mode.

    Returns the content image and, for ``border``, the (left, top) offset at which it goes on
    the square canvas (None otherwise).
    """
    w, h = im.size
    n = s.image_size
    if s.resize_mode == "no":
        return im, None
    if s.resize_mode == "border":
        r = n / max(w, h)
        size = (max(1, min(n, round(w * r))), max(1, min(n, round(h * r))))
        return _resize(im, size), ((n - size[0]) // 2, (n - size[1]) // 2)
    r = n / min(w, h)
    size = (max(n, round(w * r)), max(n, round(h * r)))
    if s.resize_mode == "keep_ratio":
        return _resize(im, size), None
    # center_crop: resize only the central region that survives the crop
    cw, ch = n / r, n / r
    left, top = (w - cw) / 2, (h - ch) / 2
    return _resize(im, (n, n), box=(left, top, left + cw, top + ch)), None


# -------------------------------------------------------------------------------- hashing
_DCT_N = 32
_k = np.arange(_DCT_N)
# rows 0..7 of the (unnormalised) DCT-II matrix; scale does not matter for a median threshold
_DCT8 = np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:8, None] / (2 * _DCT_N))


def phash64(img: Image.Image) -> int:
    """64-bit DCT perceptual hash of ``img`` as a signed int64 (imagehash.phash's algorithm).

    Grayscale, 32x32 (area-averaged), 2-D DCT-II, top-left 8x8 coefficients, each bit = coefficient >
    median; bits packed row-major, most significant first, then reinterpreted as int64 so that
    DuckDB's ``bit_count(xor(a, b))`` gives the Hamming distance.
    """
    if img.mode != "L":
        img = img if img.mode == "RGB" else normalise_mode(img)
    g = img if img.mode == "L" else img.convert("L")
    # area averaging down to 32x32 is the anti-aliased shrink; Lanczos when enlarging tiny images
    resample = Image.Resampling.BOX if min(g.size) >= _DCT_N else Image.Resampling.LANCZOS
    px = np.asarray(g.resize((_DCT_N, _DCT_N), resample), dtype=np.float64)
    coeffs = (_DCT8 @ px @ _DCT8.T).ravel()
    part = np.partition(coeffs, (31, 32))
    bits = coeffs > (part[31] + part[32]) / 2  # the median of 64 values
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return value - (1 << 64) if value >= (1 << 63) else value


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes (signed or unsigned views)."""
    return ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()


# -------------------------------------------------------------------------------- encoding
def _encode(im: Image.Image, s: ImageSettings) -> bytes:
    out = io.BytesIO()
    if s.encode_format == "jpg":
        im.save(out, format="JPEG", quality=s.encode_quality)
    else:
        im.save(out, format="WEBP", quality=s.encode_quality)
    return out.getvalue()


# ------------------------------------------------------------------------------ the entry
def process_image(data: bytes, settings: ImageSettings) -> ProcessedImage:
    """Decode, check, normalise, resize, encode and hash one downloaded image.

    Never raises for bad input; see the module docstring for the error kinds.
    """
    try:
        return _process(data, settings)
    except MemoryError:
        return _fail(ERR_OOM, "ran out of memory while processing the image")
    except Exception as e:  # noqa: BLE001 - a bad image must never crash a run
        return _fail(ERR_PROCESSING, f"unexpected {type(e).__name__} while processing: {e}")


def process_batch(items: list[bytes], settings: ImageSettings) -> list[ProcessedImage]:
    """:func:`process_image` over a list, for sending work to a process pool in chunks."""
    return [process_image(d, settings) for d in items]


def _pixel_limit(s: ImageSettings) -> tuple[int, str]:
    """The effective bomb limit: ours, capped by Pillow's own ``Image.MAX_IMAGE_PIXELS`` (above
    which Pillow would only warn, then refuse at twice as many). Checked without the warnings
    machinery, so it is safe to call from threads too."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and pil < s.max_image_pixels:
        return int(pil), "Pillow's Image.MAX_IMAGE_PIXELS"
    return s.max_image_pixels, "ingest.max_image_pixels"


def _process(data: bytes, s: ImageSettings) -> ProcessedImage:
    if data is None:
        return _fail(ERR_NOT_AN_IMAGE, "no content")
    data = bytes(data) if not isinstance(data, bytes) else data
    fmt, other = sniff_format(data)
    if fmt is None:
        if other is not None:
            return _fail(ERR_UNSUPPORTED, f"{other} images are not accepted (JPEG, PNG, WebP, GIF, BMP are)", other)
        return _fail(ERR_NOT_AN_IMAGE, f"not an image: {_describe_head(data)}")

    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _fail(ERR_BOMB, f"{fmt} refused before decoding: {e}", fmt)
    except UnidentifiedImageError:
        return _fail(ERR_CORRUPT, f"{fmt} signature but an unreadable header", fmt)
    except Exception as e:  # noqa: BLE001
        return _fail(ERR_CORRUPT, f"{fmt} header unreadable: {type(e).__name__}: {e}", fmt)

    w, h = im.size
    if w <= 0 or h <= 0:
        return _fail(ERR_CORRUPT, f"{fmt} declares an empty size {w}x{h}", fmt)
    limit, limit_name = _pixel_limit(s)
    if w * h > limit:
        return _fail(
            ERR_BOMB,
            f"{fmt} declares {w}x{h} = {w * h:,} pixels, over the limit of "
            f"{limit:,} ({limit_name}); refused before decoding",
            fmt,
            (w, h),
        )

    try:
        orient = _orientation(im) if fmt != "PNG" else 1
        if fmt == "JPEG":
            r = _target_scale(w, h, s)
            if r < 1.0:  # decode at reduced scale, never below the size we need
                im.draft(
                    im.mode if im.mode in ("RGB", "L") else None, (max(1, math.ceil(w * r)), max(1, math.ceil(h * r)))
                )
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _fail(ERR_BOMB, f"{fmt} refused: {e}", fmt, (w, h))
    except Exception as e:  # noqa: BLE001 - truncated, damaged streams
        return _fail(ERR_CORRUPT, f"{fmt} data is damaged: {type(e).__name__}: {e}", fmt, (w, h))
    if fmt == "PNG":
        orient = _orientation(im)  # PNG's eXIf chunk may follow the image data

    ow, oh = (h, w) if orient in (5, 6, 7, 8) else (w, h)
    im = normalise_mode(im)
    if orient != 1:
        im = im.transpose(_TRANSPOSE[orient])
    content, offset = _apply_resize(im, s)
    phash = phash64(content)
    if content.mode != "RGB":
        content = content.convert("RGB")
    if offset is not None:
        canvas = Image.new("RGB", (s.image_size, s.image_size), BORDER_COLOR)
        canvas.paste(content, offset)
        stored = canvas
    else:
        stored = content
    out = _encode(stored, s)
    return ProcessedImage(
        ok=True,
        image=out,
        width=stored.width,
        height=stored.height,
        original_width=ow,
        original_height=oh,
        sha256=hashlib.sha256(out).hexdigest(),
        phash=phash,
        source_format=fmt,
    )
