"""Every fault of the toy web reaches the recorded status a user would expect."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipline.components.config import DEMO_FAULTS, load_config
from clipline.components.demo import serve_toy_web
from clipline.components.ingest.runner import ingest

# fault -> (status, error_kind) that the raw shard must record; None kind = success
EXPECTED = {
    "none": ("success", None),
    "http_404": ("failed_to_download", "http_404"),
    "http_500": ("failed_to_download", "http_500"),
    "http_429": ("success", None),
    "http_503_retry_after": ("success", None),
    "slow": ("success", None),
    "timeout": ("failed_to_download", {"timeout", "deadline_exceeded"}),
    "redirect": ("success", None),
    "redirect_internal": ("failed_to_download", "ssrf_blocked"),
    "truncated": ("failed_to_download", "truncated"),
    "not_image": ("failed_to_resize", "not_an_image"),
    "oversized": ("failed_to_download", "too_large"),
    "bomb": ("failed_to_resize", "decompression_bomb"),
    "cmyk": ("success", None),
    "palette": ("success", None),
    "alpha": ("success", None),
    "animated": ("success", None),
    "optout": ("failed_to_download", "opted_out"),
    "exact_duplicate": ("success", None),
    "near_duplicate": ("success", None),
    "caption_empty": ("success", None),
    "caption_junk": ("success", None),
    "caption_mojibake": ("success", None),
    "caption_foreign": ("success", None),
}


def test_expectations_cover_every_fault():
    assert set(EXPECTED) - {"none"} == set(DEMO_FAULTS)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toyweb")
    demo_cfg = load_config(None, {"demo": {"n_images": 200, "seed": 3}}).demo
    with serve_toy_web(demo_cfg, tmp / "web") as web:
        web.store.warm()  # draw every picture first: the timeouts below then measure only the faults
        cfg = load_config(
            None,
            {
                "data_dir": tmp / "data",
                "ingest": {
                    "allow_hosts": [web.allow_host],
                    "read_timeout": 3.0,
                    "total_timeout": 6.0,
                    "retries": 2,
                    "processes": 1,
                    "shard_size": 64,
                },
            },
        )
        result = ingest(cfg, [str(web.url_list)])
        rows = pa.concat_tables([pq.read_table(f) for f in sorted(cfg.raw_dir.glob("*.parquet"))])
        yield web, result, rows


@pytest.mark.slow
def test_each_fault_is_recorded_with_its_reason(ingested):
    web, result, rows = ingested
    assert rows.num_rows == len(web.items) == result.n_fetched
    by_url = {r["url"]: r for r in rows.select(["url", "status", "error_kind", "error_message", "fault"]).to_pylist()}
    seen_faults = set()
    for item in web.items:
        rec = by_url[web.url(item)]
        status, kind = EXPECTED[item.fault]
        seen_faults.add(item.fault)
        assert rec["status"] == status, (item.fault, rec)
        if kind is None:
            assert rec["error_kind"] is None
        elif isinstance(kind, set):
            assert rec["error_kind"] in kind, (item.fault, rec)
        else:
            assert rec["error_kind"] == kind, (item.fault, rec)
        if status != "success":
            assert rec["error_message"], item.fault
    assert seen_faults >= set(DEMO_FAULTS)


def test_ssrf_guard_kept_the_internal_service_untouched(ingested):
    web, _, _ = ingested
    assert web.internal_hits == 0


def test_odd_image_modes_are_stored_as_plain_rgb_jpeg(ingested):
    web, _, rows = ingested
    for fault in ("cmyk", "palette", "alpha", "animated"):
        t = rows.filter(pc.equal(rows["fault"], fault))
        assert t.num_rows >= 1
        for data in t.column("image").to_pylist():
            img = Image.open(io.BytesIO(data))
            assert img.format == "JPEG" and img.mode == "RGB", fault


def test_retry_after_was_honoured_with_a_second_request(ingested):
    web, _, _ = ingested
    for item in web.by_fault("http_429") + web.by_fault("http_503_retry_after"):
        assert web.request_count(web.url(item)) == 2
    for item in web.by_fault("http_404"):
        assert web.request_count(web.url(item)) == 1
