"""Image handling: real images made with PIL, real bytes, real decoding."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipline.components.config import IngestConfig
from clipline.components.ingest.imaging import (
    ImageSettings,
    ProcessedImage,
    hamming,
    phash64,
    process_batch,
    process_image,
    sniff_format,
)

BORDER = ImageSettings(image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def scene(seed: int, size=(640, 480)) -> Image.Image:
    """A photo-like toy picture: gradient background, a few filled shapes, mild noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    base = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    base = (base + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return im


def decoded(p: ProcessedImage) -> Image.Image:
    assert p.ok, (p.error_kind, p.error_message)
    im = Image.open(io.BytesIO(p.image))
    im.load()
    return im


def px(im: Image.Image, xy) -> tuple[int, int, int]:
    return im.convert("RGB").getpixel(xy)


def close(c, ref, tol=40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(c, ref))


# ------------------------------------------------------------------------- the main path
def test_border_resize_jpeg_records_sizes_and_hashes():
    data = encode(scene(1), "JPEG", quality=85)
    p = process_image(data, BORDER)
    im = decoded(p)
    assert im.format == "JPEG" and im.mode == "RGB"
    assert (p.width, p.height) == (256, 256) == im.size
    assert (p.original_width, p.original_height) == (640, 480)
    assert p.sha256 == hashlib.sha256(p.image).hexdigest()
    assert -(2**63) <= p.phash < 2**63
    # 640x480 -> 256x192 content centred, 32 px white bars above and below
    assert close(px(im, (128, 5)), (255, 255, 255), 8) and close(px(im, (128, 250)), (255, 255, 255), 8)
    assert p.error_kind is None and p.status == "success"


def test_resize_modes_sizes_and_crop_position():
    # left 10% green, then red | blue halves: center_crop must cut the green strip away
    im = Image.new("RGB", (640, 480), (255, 0, 0))
    im.paste((0, 0, 255), (320, 0, 640, 480))
    im.paste((0, 255, 0), (0, 0, 64, 480))
    data = encode(im, "PNG")
    sizes = {}
    for mode in ("no", "center_crop", "keep_ratio", "border"):
        p = process_image(data, ImageSettings(image_size=256, resize_mode=mode))
        sizes[mode] = (p.width, p.height)
        assert decoded(p).size == sizes[mode]
    assert sizes == {"no": (640, 480), "center_crop": (256, 256), "keep_ratio": (341, 256), "border": (256, 256)}
    cc = decoded(process_image(data, ImageSettings(image_size=256, resize_mode="center_crop")))
    assert close(px(cc, (2, 128)), (255, 0, 0)) and close(px(cc, (253, 128)), (0, 0, 255))
    kr = decoded(process_image(data, ImageSettings(image_size=256, resize_mode="keep_ratio")))
    assert close(px(kr, (2, 128)), (0, 255, 0))


def test_small_images_are_enlarged_and_tall_ones_padded_sideways():
    im = Image.new("RGB", (50, 100), (10, 200, 10))
    p = process_image(encode(im, "PNG"), BORDER)
    out = decoded(p)
    assert out.size == (256, 256) and (p.original_width, p.original_height) == (50, 100)
    assert close(px(out, (128, 128)), (10, 200, 10)) and close(px(out, (5, 128)), (255, 255, 255), 8)


def test_webp_encoding_and_quality():
    data = encode(scene(2), "JPEG", quality=90)
    w = process_image(data, ImageSettings(encode_format="webp", encode_quality=80))
    assert decoded(w).format == "WEBP"
    lo = process_image(data, ImageSettings(encode_quality=30))
    hi = process_image(data, ImageSettings(encode_quality=95))
    assert len(lo.image) < len(hi.image)


# --------------------------------------------------------------------- formats & errors
@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {})])
def test_accepted_formats(fmt, kw):
    im = Image.new("RGB", (300, 200), (200, 30, 30))
    data = encode(im if fmt != "GIF" else im.convert("P"), fmt, **kw)
    p = process_image(data, BORDER)
    assert p.ok and p.source_format == fmt
    assert close(px(decoded(p), (128, 128)), (200, 30, 30))


def test_gif_takes_first_frame():
    frames = [Image.new("RGB", (120, 80), c).convert("P") for c in [(250, 0, 0), (0, 0, 250)]]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = decoded(process_image(b.getvalue(), BORDER))
    assert close(px(out, (128, 128)), (250, 0, 0))


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_webp_and_apng_take_first_frame(fmt):
    frames = [Image.new("RGB", (120, 80), c) for c in [(250, 0, 0), (0, 0, 250)]]
    b = io.BytesIO()
    frames[0].save(b, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(b.getvalue())), "n_frames", 1) == 2
    out = decoded(process_image(b.getvalue(), BORDER))
    assert close(px(out, (128, 128)), (250, 0, 0))


def test_format_is_sniffed_from_bytes_not_names():
    png = encode(Image.new("RGB", (64, 64), "white"), "PNG")
    assert sniff_format(png) == ("PNG", None)
    # an HTML error page (served with image/jpeg by a broken server) is not an image
    html = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    p = process_image(html, BORDER)
    assert (p.ok, p.error_kind) == (False, "not_an_image") and "<!DOCTYPE html>" in p.error_message
    for body in (b"", b'{"error": "nope"}', bytes(range(256)) * 4):
        assert process_image(body, BORDER).error_kind == "not_an_image"


def test_other_image_formats_are_unsupported():
    tiff = encode(Image.new("RGB", (64, 64), "red"), "TIFF")
    ico = encode(Image.new("RGB", (64, 64), "red"), "ICO")
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    avif_head = b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40
    for data, name in [(tiff, "TIFF"), (ico, "ICO"), (svg, "SVG"), (avif_head, "AVIF")]:
        p = process_image(data, BORDER)
        assert p.error_kind == "unsupported_format" and name in p.error_message, (name, p)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_and_damaged_images_are_corrupt(fmt):
    im = scene(3, (320, 240))
    data = encode(im if fmt != "GIF" else im.convert("P"), fmt)
    truncated = process_image(data[: len(data) // 2], BORDER)
    assert truncated.error_kind == "corrupt_image", truncated
    if fmt != "GIF":  # zeroing GIF bytes 16..80 only blanks palette entries: still a valid GIF
        damaged = data[:16] + b"\x00" * 64 + data[80:]
        p = process_image(damaged, BORDER)
        assert p.error_kind == "corrupt_image", p


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def write_png_bomb(path: Path, side: int) -> None:
    """A valid side x side 1-bit grayscale PNG of zeros: a few hundred KB on disk, side**2 pixels."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = bytearray()
    block = row * 1000
    for i in range(0, side, 1000):
        idat += comp.compress(block if side - i >= 1000 else row * (side - i))
    idat += comp.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)))
        f.write(_png_chunk(b"IDAT", bytes(idat)))
        f.write(_png_chunk(b"IEND", b""))


BOMB_CHILD = textwrap.dedent("""
    import json, resource, sys
    from clipline.components.ingest.imaging import ImageSettings, process_image
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p = process_image(data, ImageSettings(max_image_pixels=int(sys.argv[2])))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": p.error_kind, "msg": p.error_message, "peak_delta_kb": after - before,
                      "ow": p.original_width, "oh": p.original_height}))
""")


@pytest.mark.parametrize(
    "side,limit,why",
    [
        (20_000, 64_000_000, "pixels"),  # 400 M pixels: over our default limit and Pillow's hard one
        (20_000, 10**12, "pixels"),  # our limit set absurdly high: Pillow's own guard still refuses
        (10_000, 10**12, "MAX_IMAGE_PIXELS"),  # 100 M: where Pillow would only warn, we refuse
    ],
)
def test_png_bomb_refused_before_decoding_with_low_memory(tmp_path, side, limit, why):
    """A side x side PNG bomb (hundreds of MB once decoded, ~100 KB on disk) is refused from its
    header: the process's peak memory barely moves."""
    bomb = tmp_path / "bomb.png"
    write_png_bomb(bomb, side)
    assert bomb.stat().st_size < 2_000_000
    out = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD, str(bomb), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kind"] == "decompression_bomb", r
    assert r["peak_delta_kb"] < 100 * 1024, r  # a decode would take side**2 bytes and more
    assert why in r["msg"], r


def test_bomb_limit_below_pillows_own_is_ours():
    # 3000x3000 = 9 M pixels: Pillow would decode it; our configured limit refuses it
    data = encode(Image.new("L", (3000, 3000), 0), "PNG")
    assert process_image(data, ImageSettings(max_image_pixels=8_000_000)).error_kind == "decompression_bomb"
    assert process_image(data, ImageSettings(max_image_pixels=9_000_000)).ok


# ---------------------------------------------------------------------- mode conversions
def test_cmyk_jpeg_with_adobe_marker_becomes_correct_rgb():
    rgb = Image.new("RGB", (200, 150), (220, 20, 20))
    data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None  # Adobe (inverted) CMYK
    out = decoded(process_image(data, BORDER))
    assert out.mode == "RGB" and close(px(out, (128, 128)), (220, 20, 20), 30)


@pytest.mark.parametrize("mode,color", [("L", 90), ("CMYK", (30, 200, 60)), ("RGB", (30, 200, 60))])
def test_large_jpegs_decoded_at_reduced_scale_keep_their_colours(mode, color):
    big = Image.new("RGB", (1600, 1200), color if mode != "L" else (color,) * 3).convert(mode)
    for rm in ("border", "center_crop", "keep_ratio"):
        p = process_image(encode(big, "JPEG", quality=92), ImageSettings(image_size=200, resize_mode=rm))
        out = decoded(p)
        assert (p.original_width, p.original_height) == (1600, 1200) and min(out.size) == 200
        want = (color,) * 3 if mode == "L" else color
        assert close(px(out, (100, 100)), want, 25), (mode, rm, px(out, (100, 100)))


def test_center_crop_enlarges_small_images():
    p = process_image(
        encode(Image.new("RGB", (40, 30), (0, 120, 0)), "PNG"), ImageSettings(image_size=64, resize_mode="center_crop")
    )
    assert (p.width, p.height) == (64, 64) and close(px(decoded(p), (32, 32)), (0, 120, 0), 10)


def test_transparency_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle([50, 50, 150, 150], fill=(0, 0, 200, 255))
    la = Image.new("LA", (200, 200), (0, 0))
    pal = Image.new("P", (200, 200), 0)
    pal.putpalette([0, 0, 0, 0, 0, 200] + [0] * 762)
    ImageDraw.Draw(pal).rectangle([50, 50, 150, 150], fill=1)
    pal.info["transparency"] = 0
    for src, fmt in [(rgba, "PNG"), (rgba, "WEBP"), (la, "PNG"), (pal, "PNG"), (pal, "GIF")]:
        kw = {"transparency": 0} if src is pal else {}
        out = decoded(process_image(encode(src, fmt, **kw), BORDER))
        assert close(px(out, (10, 10)), (255, 255, 255), 10), (src.mode, fmt, px(out, (10, 10)))
        if src is not la:
            assert close(px(out, (128, 128)), (0, 0, 200), 40), (src.mode, fmt)


def test_16bit_grayscale_is_scaled_not_clipped():
    a = np.full((100, 100), 32768, np.uint16)
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    out = decoded(process_image(encode(im, "PNG"), BORDER))
    r, g, b = px(out, (128, 128))
    assert abs(r - 128) <= 3 and r == g == b


def test_grayscale_and_bilevel_become_rgb():
    for im in (Image.new("L", (100, 80), 90), Image.new("1", (100, 80), 1)):
        out = decoded(process_image(encode(im, "PNG" if im.mode == "1" else "JPEG"), BORDER))
        assert out.mode == "RGB"


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (640, 480), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 320, 480))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise: the left half ends on top
    p = process_image(encode(im, "JPEG", exif=exif.tobytes()), BORDER)
    out = decoded(p)
    assert (p.original_width, p.original_height) == (480, 640)
    assert close(px(out, (128, 40)), (255, 0, 0)) and close(px(out, (128, 215)), (0, 0, 255))
    assert close(px(out, (5, 128)), (255, 255, 255), 8)  # pillar-boxed: bars left and right


# ------------------------------------------------------------------------------ phash
def _reference_phash(img: Image.Image) -> int:
    """imagehash.phash's algorithm written with scipy on the full-size image."""
    fft = pytest.importorskip("scipy.fft")
    g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    d = fft.dct(fft.dct(g, axis=0), axis=1)[:8, :8]
    bits = (d > np.median(d)).ravel()
    v = int("".join("1" if b else "0" for b in bits), 2)
    return v - (1 << 64) if v >= 1 << 63 else v


def test_phash_matches_reference_algorithm():
    for seed in range(4):
        im = scene(seed)
        assert hamming(phash64(im), _reference_phash(im)) <= 4


def test_phash_near_duplicates_close_distinct_images_far():
    ref_im = scene(7)
    base = process_image(encode(ref_im, "JPEG", quality=90), BORDER).phash
    w, h = ref_im.size
    variants = {
        "reencoded_q40": encode(ref_im, "JPEG", quality=40),
        "webp": encode(ref_im, "WEBP", quality=60),
        "resized_half": encode(ref_im.resize((w // 2, h // 2)), "JPEG", quality=85),
        "resized_up": encode(ref_im.resize((w * 3 // 2, h * 3 // 2)), "PNG"),
        "cropped_4pct": encode(ref_im.crop((w // 50, h // 50, w - w // 50, h - h // 50)), "JPEG"),
    }
    for name, data in variants.items():
        d = hamming(base, process_image(data, BORDER).phash)
        assert d <= 6, (name, d)
    others = [process_image(encode(scene(s), "JPEG"), BORDER).phash for s in range(20, 30)]
    dists = [hamming(base, o) for o in others]
    dists += [hamming(a, b) for i, a in enumerate(others) for b in others[i + 1 :]]
    assert min(dists) > 12, sorted(dists)[:5]


def test_hamming():
    assert hamming(-1, 0) == 64 and hamming(5, 5) == 0 and hamming(0b1010, 0b0110) == 2


# ------------------------------------------------------------------------ pool-friendly
def test_settings_from_config_and_pickling():
    cfg = IngestConfig(
        image_size=128, resize_mode="center_crop", encode_format="webp", encode_quality=80, max_image_pixels=1000
    )
    s = ImageSettings.from_config(cfg)
    assert s == ImageSettings(128, "center_crop", "webp", 80, 1000)
    assert pickle.loads(pickle.dumps(s)) == s
    with pytest.raises(ValueError):
        ImageSettings(resize_mode="stretch")


def test_process_batch_in_a_process_pool():
    items = [encode(scene(i, (320, 240)), "JPEG") for i in range(3)] + [b"junk"]
    local = process_batch(items, BORDER)
    with ProcessPoolExecutor(max_workers=1) as pool:
        remote = pool.submit(process_batch, items, BORDER).result(timeout=60)
    assert [r.ok for r in remote] == [True, True, True, False]
    assert [r.sha256 for r in remote] == [r.sha256 for r in local]
    assert remote[3].error_kind == "not_an_image"
