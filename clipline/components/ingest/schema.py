"""The raw-shard contract (DESIGN.md): one Parquet file per shard.

Column names follow img2dataset's Parquet output so shards it wrote can be curated too
(img2dataset stores the image bytes in a column named after the format, ``jpg``/``webp``/``png``;
readers map that to ``image``). Failed rows are kept, with ``status`` and ``error_message`` and
no image bytes.

status values (img2dataset's): ``success``, ``failed_to_download``, ``failed_to_resize``.
error_kind (ours, machine-readable): for example ``http_404``, ``timeout``, ``ssrf_blocked``,
``too_large``, ``not_an_image``, ``decompression_bomb``, ``opted_out``, ``truncated``.
phash: the 64 bits of the perceptual hash reinterpreted as a signed int64, so DuckDB's
``bit_count(xor(a, b))`` gives the Hamming distance.
"""

import pyarrow as pa

STATUS_SUCCESS = "success"
STATUS_FAILED_DOWNLOAD = "failed_to_download"
STATUS_FAILED_RESIZE = "failed_to_resize"

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.int64()),
        ("status", pa.string()),
        ("error_kind", pa.string()),
        ("error_message", pa.string()),
        ("source", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)
