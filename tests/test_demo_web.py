"""The toy web over real HTTP on loopback: content, determinism, every fault, the eval sets, the CLI."""

from __future__ import annotations

import collections
import http.client
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import ftfy
import numpy as np
import langid
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipline.components.config import DEMO_FAULTS, DemoConfig
from clipline.components.demo.faults import INGEST_OUTCOME, object_mask
from clipline.components.demo import (
    ALL_COMBOS,
    COLORS,
    SHAPES,
    ToyStore,
    heldout_combos,
    seen_combos,
    serve_toy_web,
    write_heldout_set,
    write_seen_set,
)

N = 200


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    cfg = DemoConfig(n_images=N, seed=7, hang_seconds=20.0, warm_cache=False)
    with serve_toy_web(cfg, tmp_path_factory.mktemp("toyweb")) as web:
        yield web


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_plain = urllib.request.build_opener(_NoRedirect)


def get(url: str, follow: bool = True, timeout: float = 10.0):
    """(status, headers, body) of a GET, whatever the status."""
    opener = urllib.request.build_opener() if follow else _plain
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def one(toy, fault: str):
    items = toy.by_fault(fault)
    assert items, f"no item with fault {fault}"
    return items[0]


def share_near(img: Image.Image, rgb, tol: int = 70) -> float:
    """Share of pixels (at 64 x 64) within ``tol`` (L1) of the colour ``rgb``."""
    px = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int32)
    return float((np.abs(px - np.asarray(rgb)).sum(axis=2) < tol).mean())


def gray16(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L").resize((16, 16)), dtype=np.float64)


def decode(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


# ------------------------------------------------------------------------------ URL list, content


def test_url_list_has_columns_and_every_fault(toy):
    table = pq.read_table(toy.url_list)
    assert table.column_names == ["url", "caption", "fault", "color", "shape", "mismatched"]
    assert not any(table.column("mismatched").to_pylist())  # none by default
    assert table.num_rows == N
    rows = table.to_pylist()
    assert len({r["url"] for r in rows}) == N
    assert all(r["url"].startswith(toy.base_url + "/") for r in rows)
    faults = {r["fault"] for r in rows}
    assert faults == set(DEMO_FAULTS) | {"none"}
    assert toy.allow_host == toy.base_url.removeprefix("http://")


def test_every_fault_has_a_documented_ingest_outcome():
    assert set(INGEST_OUTCOME) == set(DEMO_FAULTS) | {"none"}


def test_fault_share_follows_rate_and_weights():
    store = ToyStore(DemoConfig(n_images=1000, fault_rate=0.1, fault_weights={"http_404": 5, "timeout": 0}))
    faults = [it.fault for it in store.items]
    assert sum(f != "none" for f in faults) == 100
    assert "timeout" not in faults
    assert faults.count("http_404") > faults.count("http_500") >= 1
    clean = ToyStore(DemoConfig(n_images=100, fault_rate=0.0))
    assert {it.fault for it in clean.items} == {"none"}


def test_mismatched_pairs_carry_another_pictures_caption_at_the_asked_share():
    plain = ToyStore(DemoConfig(n_images=600, seed=2))
    store = ToyStore(DemoConfig(n_images=600, seed=2, mismatch_share=0.3))
    clean = [it for it in store.items if it.fault == "none"]
    bad = [it for it in clean if it.mismatched]
    assert 0.25 < len(bad) / len(clean) < 0.35
    assert not any(it.mismatched for it in store.items if it.fault != "none")
    for it in bad:  # the picture is the same; the caption names another colour or shape
        assert (it.color, it.shape) == (plain.items[it.item_id].color, plain.items[it.item_id].shape)
        named = {w for w in re.findall(r"[a-z]+", it.caption.lower())}
        assert not ({it.color, it.shape} <= named), it.caption
    for it in clean:
        if not it.mismatched:
            assert it.caption == plain.items[it.item_id].caption


def test_same_seed_same_bytes_and_other_seed_differs(toy):
    again = ToyStore(DemoConfig(n_images=N, seed=7))
    for it in [
        toy.items[0],
        toy.items[1],
        *(one(toy, f) for f in ("cmyk", "palette", "alpha", "animated", "near_duplicate")),
    ]:
        status, _, body = get(toy.url(it))
        assert status == 200
        assert body == again.body(it.item_id)[0], it.fault
        assert again.items[it.item_id].caption == it.caption
    other = ToyStore(DemoConfig(n_images=N, seed=8))
    assert other.body(0)[0] != again.body(0)[0]
    # an item's picture and caption do not depend on how many items there are
    longer = ToyStore(DemoConfig(n_images=3 * N, seed=7))
    assert all(longer.corpus(i) == again.corpus(i) for i in range(N))


def test_images_vary_and_mostly_survive_a_200px_rule():
    store = ToyStore(DemoConfig(n_images=400, fault_rate=0.0))
    specs = [store.corpus(i).spec for i in range(400)]
    short = [min(s.width, s.height) for s in specs]
    assert 0.02 < sum(x < 200 for x in short) / 400 < 0.1
    wide = sum(max(s.width, s.height) > 3 * min(s.width, s.height) for s in specs)
    assert 1 <= wide <= 0.05 * 400
    assert len({(s.width, s.height) for s in specs}) > 200
    assert len({s.background for s in specs}) == 6 and len({s.texture for s in specs}) == 5
    assert {s.size_word for s in specs} == {"small", "", "large"}
    im = decode(store.body(0)[0])
    assert im.mode == "RGB" and im.size == (specs[0].width, specs[0].height)
    # the object is there, in its colour, and the background never has that colour
    for i in range(20):
        spec = specs[i]
        share = share_near(decode(store.body(i)[0]), spec.rgb)
        mask_share = np.asarray(object_mask(spec).resize((64, 64))).astype(float).mean() / 255
        assert share > 0.6 * mask_share > 0.005, (i, share, mask_share)
        assert share < 1.3 * mask_share + 0.01, (i, share, mask_share)


def test_clean_captions_name_colour_and_shape_and_read_as_english(toy):
    rows = pq.read_table(toy.url_list).to_pylist()
    clean = [r for r in rows if not r["fault"].startswith("caption_")]
    for r in clean:
        words = re.findall(r"[a-z]+", r["caption"].lower())
        assert r["color"] in words and r["shape"] in words, r
        assert [w for w in words if w in COLORS] == [r["color"]], r
        assert [w for w in words if w in SHAPES] == [r["shape"]], r
        # the indefinite article agrees with the next word ("an orange star", never "a orange")
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou\W]", r["caption"].lower()), r
    english = sum(langid.classify(r["caption"])[0] == "en" for r in clean)
    assert english >= 0.95 * len(clean)
    assert len({r["caption"] for r in clean}) > 0.8 * len(clean)


@pytest.mark.parametrize("seed", [0, 7])
def test_heldout_combinations_never_in_the_corpus(seed):
    store = ToyStore(DemoConfig(n_images=3000, fault_rate=0.1, seed=seed))
    held = set(heldout_combos(seed))
    assert len(held) == 12 and len(seen_combos(seed)) == 36 and len(ALL_COMBOS) == 48
    for it in store.items:
        assert (it.color, it.shape) not in held
        words = set(re.findall(r"[a-z]+", it.caption.lower()))
        named = {(c, s) for c in COLORS if c in words for s in SHAPES if s in words}
        assert not (named & held), it
    # every colour and every shape is still seen, with several partners
    seen = {(it.color, it.shape) for it in store.items}
    assert seen == set(seen_combos(seed))


def test_the_heldout_split_is_drawn_from_the_seed_with_the_same_balance():
    splits = {seed: heldout_combos(seed) for seed in range(20)}
    assert len(set(splits.values())) == 20  # a different split per seed (not one fixed in code)
    assert heldout_combos(3) == splits[3]  # and the same one for the same seed
    for held in splits.values():
        per_shape = collections.Counter(s for _, s in held)
        per_color = collections.Counter(c for c, _ in held)
        assert set(per_shape) == set(SHAPES) and set(per_shape.values()) == {2}
        assert sorted(per_color.values()) == [1, 1, 1, 1, 2, 2, 2, 2] and set(per_color) == set(COLORS)


def test_caption_faults(toy):
    assert one(toy, "caption_empty").caption.strip() == ""
    junk = one(toy, "caption_junk").caption
    assert not set(re.findall(r"[a-z]+", junk.lower())) & (set(COLORS) | set(SHAPES))
    moji = one(toy, "caption_mojibake")
    assert "â€" in moji.caption or "Ã" in moji.caption or "Â" in moji.caption
    fixed = ftfy.fix_text(moji.caption)
    assert fixed != moji.caption
    assert moji.color in fixed and moji.shape in fixed and "â€" not in fixed
    foreign = one(toy, "caption_foreign")
    assert foreign.caption_lang in {"fr", "de", "es"}
    assert langid.classify(foreign.caption)[0] != "en"
    for it in (moji, foreign):  # the picture is still a good one
        status, _, body = get(toy.url(it))
        assert status == 200 and decode(body).mode == "RGB"


# ------------------------------------------------------------------------------------- HTTP faults


@pytest.mark.parametrize("fault,status", [("http_404", 404), ("http_500", 500)])
def test_persistent_errors(toy, fault, status):
    url = toy.url(one(toy, fault))
    assert get(url)[0] == status
    assert get(url)[0] == status


@pytest.mark.parametrize("fault,status", [("http_429", 429), ("http_503_retry_after", 503)])
def test_retry_after_then_success(toy, fault, status):
    url = toy.url(one(toy, fault))
    code, headers, _ = get(url)
    assert code == status and headers["Retry-After"] == "1"
    code, headers, body = get(url)
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert decode(body).format == "JPEG"
    assert toy.request_count(url) == 2


def test_slow_answers_late_but_answers(toy):
    t0 = time.monotonic()
    code, _, body = get(toy.url(one(toy, "slow")))
    assert time.monotonic() - t0 >= 1.4
    assert code == 200 and decode(body).format == "JPEG"


def test_timeout_hangs_without_blocking_the_server(toy):
    url = toy.url(one(toy, "timeout"))
    outcome = {}

    def hang():
        t0 = time.monotonic()
        try:
            get(url, timeout=3.0)
            outcome["err"] = None
        except Exception as e:  # noqa: BLE001
            outcome["err"] = e
        outcome["s"] = time.monotonic() - t0

    th = threading.Thread(target=hang)
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert get(toy.url(toy.by_fault("none")[0]))[0] == 200  # others are served meanwhile
    assert time.monotonic() - t0 < 5.0
    th.join()
    assert outcome["err"] is not None and "timed out" in str(outcome["err"])
    assert outcome["s"] >= 2.9


def test_redirect_on_same_server(toy):
    url = toy.url(one(toy, "redirect"))
    code, headers, _ = get(url, follow=False)
    assert code == 302
    loc = urllib.parse.urlsplit(headers["Location"])
    assert f"{loc.hostname}:{loc.port}" == toy.allow_host
    code, _, body = get(url)
    assert code == 200 and decode(body).format == "JPEG"


def test_redirect_to_internal_service_on_another_port(toy):
    url = toy.url(one(toy, "redirect_internal"))
    code, headers, _ = get(url, follow=False)
    assert code == 302
    loc = urllib.parse.urlsplit(headers["Location"])
    assert loc.hostname == "127.0.0.1" and f"{loc.hostname}:{loc.port}" != toy.allow_host
    assert toy.internal_hits == 0
    # it is a real service: a client without an SSRF guard gets an image from it, and it notices
    code, headers, body = get(url)
    assert code == 200 and headers["X-Internal-Service"] == "secret" and decode(body).format == "JPEG"
    assert toy.internal_hits == 1


def test_truncated_body_shorter_than_content_length(toy):
    u = urllib.parse.urlsplit(toy.url(one(toy, "truncated")))
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", u.path)
    resp = conn.getresponse()
    declared = int(resp.headers["Content-Length"])
    with pytest.raises(http.client.IncompleteRead) as exc:
        resp.read()
    assert 0 < len(exc.value.partial) < declared
    conn.close()


def test_not_image_behind_image_content_type(toy):
    code, headers, body = get(toy.url(one(toy, "not_image")))
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert body.lstrip().lower().startswith(b"<!doctype html")
    with pytest.raises(Image.UnidentifiedImageError):
        decode(body)


def test_oversized_is_streamed_without_length(toy):
    u = urllib.parse.urlsplit(toy.url(one(toy, "oversized")))
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    conn.request("GET", u.path)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Length"] is None
    assert resp.headers["Transfer-Encoding"] == "chunked"
    first = resp.read(4)
    total = len(first)
    while chunk := resp.read(1 << 20):
        total += len(chunk)
    conn.close()
    assert first[:3] == b"\xff\xd8\xff"  # a JPEG prefix, so only a size cap catches it
    assert total == 25_000_000


def test_bomb_declares_huge_size_in_a_small_file(toy):
    code, headers, body = get(toy.url(one(toy, "bomb")))
    assert code == 200 and headers["Content-Type"] == "image/png"
    assert len(body) < 200_000
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and body[12:16] == b"IHDR"
    assert struct.unpack(">II", body[16:24]) == (20_000, 20_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))


@pytest.mark.parametrize(
    "fault,fmt,mode",
    [
        ("cmyk", "JPEG", "CMYK"),
        ("palette", "PNG", "P"),
        ("alpha", "PNG", "RGBA"),
        ("animated", "GIF", "P"),
    ],
)
def test_image_modes(toy, fault, fmt, mode):
    it = one(toy, fault)
    code, _, body = get(toy.url(it))
    assert code == 200
    im = decode(body)
    assert (im.format, im.mode) == (fmt, mode)
    spec = toy.store.corpus(it.item_id).spec
    expected = np.asarray(object_mask(spec).resize((64, 64))).astype(float).mean() / 255
    # the image (the first frame, for the GIF) shows the object in its colour
    assert (
        share_near(im.convert("RGBA").convert("RGB") if fault != "alpha" else im.convert("RGB"), spec.rgb)
        > 0.6 * expected
    )
    if fault == "alpha":
        assert im.getchannel("A").getextrema() == (0, 255)
    if fault == "animated":
        assert getattr(im, "n_frames", 1) >= 2
        im.seek(1)
        assert share_near(im, spec.rgb) < 0.1 * expected  # later frames are background only


def test_optout_header(toy):
    code, headers, body = get(toy.url(one(toy, "optout")))
    assert code == 200 and headers["X-Robots-Tag"] == "noai" and decode(body).format == "JPEG"


def test_exact_and_near_duplicates(toy):
    ex = one(toy, "exact_duplicate")
    src = toy.items[ex.source_id]
    assert src.fault == "none" and toy.url(ex) != toy.url(src)
    assert get(toy.url(ex))[2] == get(toy.url(src))[2]
    assert (ex.color, ex.shape) == (src.color, src.shape)
    near = one(toy, "near_duplicate")
    nsrc = toy.items[near.source_id]
    a, b = decode(get(toy.url(near))[2]), decode(get(toy.url(nsrc))[2])
    assert get(toy.url(near))[2] != get(toy.url(nsrc))[2]
    assert np.abs(gray16(a) - gray16(b)).mean() < 12
    # unrelated clean images are far apart by the same measure
    others = [decode(get(toy.url(it))[2]) for it in toy.by_fault("none")[:10] if it.item_id != nsrc.item_id]
    assert min(np.abs(gray16(o) - gray16(b)).mean() for o in others) > 12


def test_unknown_path_is_404(toy):
    assert get(toy.base_url + "/images/999999.jpg")[0] == 404


# ---------------------------------------------------------------------------------- eval sets


def test_heldout_and_seen_sets_load(tmp_path):
    held = write_heldout_set(tmp_path, seed=3, n_per_class=2)
    seen = write_seen_set(tmp_path, seed=3, n_per_class=1)
    rows = pq.read_table(held.data).to_pylist()
    assert len(rows) == 24 == held.n_images
    names = json.loads(held.classnames_file.read_text())
    templates = json.loads(held.templates_file.read_text())
    assert list(names) == ["heldout"] and len(names["heldout"]) == 48
    assert all("{c}" in t for t in templates["heldout"])
    assert {r["label"] for r in rows} == {f"{c} {s}" for c, s in heldout_combos(3)} == set(held.labels)
    assert set(held.labels) <= set(names["heldout"])
    assert held.chance_acc1 == pytest.approx(1 / 48)
    for r in rows[:4]:
        im = decode(r["image"])
        assert im.mode == "RGB" and min(im.size) >= 224
    seen_rows = pq.read_table(seen.data).to_pylist()
    assert {r["label"] for r in seen_rows} == {f"{c} {s}" for c, s in seen_combos(3)}
    assert not {r["image"] for r in seen_rows} & {r["image"] for r in rows}
    again = write_heldout_set(tmp_path / "again", seed=3, n_per_class=2)
    assert [r["image"] for r in pq.read_table(again.data).to_pylist()] == [r["image"] for r in rows]


def test_eval_set_images_are_not_in_the_corpus(tmp_path):
    seen = write_seen_set(tmp_path, seed=0, n_per_class=1)
    store = ToyStore(DemoConfig(n_images=300, seed=0, fault_rate=0.0))
    corpus = {store.body(i)[0] for i in range(300)}
    assert not {r["image"] for r in pq.read_table(seen.data).to_pylist()} & corpus


# ---------------------------------------------------------------------------------------- CLI


def test_cli_demo_web_serves_until_interrupted(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "300"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clipline.flows.cli",
            "--data-dir",
            str(tmp_path / "d"),
            "demo-web",
            "--n",
            "60",
            "--no-eval-sets",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # Ctrl-C as in a terminal, even when this test runs in a background job, whose shell hands
        # its children SIGINT ignored (then Python never raises KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        command = None
        while time.monotonic() < deadline and command is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ingest " in line and "--allow-host" in line:
                command = line.strip()
        assert command, "".join(lines)
        m = re.search(r"ingest (\S+) --allow-host (127\.0\.0\.1:\d+)", command)
        assert m, command
        url_list, host = Path(m.group(1)), m.group(2)
        rows = pq.read_table(url_list).to_pylist()
        assert len(rows) == 60
        clean = next(r for r in rows if r["fault"] == "none")
        assert host in clean["url"]
        code, _, body = get(clean["url"])
        assert code == 200 and decode(body).format == "JPEG"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # a server that ignored Ctrl-C must not outlive the test
            out, _ = proc.communicate()
            pytest.fail(f"demo-web did not stop within 30 s of Ctrl-C:\n{out}")
    assert proc.returncode == 0, out
    assert "stopped" in out
