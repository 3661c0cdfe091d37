"""URL-list readers over real files in every supported format and filesystem."""

from __future__ import annotations

import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipline.components.ingest.sources import UrlListError, read_url_list, read_url_lists

ROWS = [
    {"url": "http://a.example/1.jpg", "caption": "a red circle, on grass", "score": 0.9, "lang": "en"},
    {"url": "", "caption": "an empty url is kept", "score": 0.1, "lang": "en"},
    {"url": "http://a.example/3.png", "caption": 'he said "hi"\tthere', "score": 0.5, "lang": "de"},
]


def test_csv_keeps_every_row_in_order_with_carried_columns(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text(
        "url,caption,score,lang\n"
        'http://a.example/1.jpg,"a red circle, on grass",0.9,en\n'
        ",an empty url is kept,0.1,en\n"
        'http://a.example/3.png,"line one\nline two",0.5,de\n'
    )
    t = read_url_list(str(p))
    assert t.column_names == ["url", "caption", "source", "score", "lang"]
    assert t.column("url").to_pylist() == ["http://a.example/1.jpg", "", "http://a.example/3.png"]
    assert t.column("caption").to_pylist()[0] == "a red circle, on grass"
    assert t.column("caption").to_pylist()[2] == "line one\nline two"
    assert t.column("score").to_pylist() == [0.9, 0.1, 0.5]
    assert set(t.column("source").to_pylist()) == {str(p)}
    assert t.schema.field("url").type == pa.string()


def test_tsv_and_carried_columns_off(tmp_path):
    p = tmp_path / "list.tsv"
    p.write_text("caption\turl\textra\nfirst caption, with comma\thttp://x/1\t7\nsecond\thttp://x/2\t8\n")
    t = read_url_list(str(p), save_additional_columns=False)
    assert t.column_names == ["url", "caption", "source"]
    assert t.column("caption").to_pylist() == ["first caption, with comma", "second"]


def test_parquet_laion_style_column_names_and_a_column_subset(tmp_path):
    p = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": ["http://x/1", None],
                "TEXT": ["one", "two"],
                "NSFW": ["UNLIKELY", "NSFW"],
                "similarity": [0.3, 0.2],
            }
        ),
        p,
    )
    t = read_url_list(str(p), url_col="URL", caption_col="TEXT", save_additional_columns=["similarity"])
    assert t.column_names == ["url", "caption", "source", "similarity"]
    assert t.column("url").to_pylist() == ["http://x/1", None]  # a null URL is kept, not dropped
    with pytest.raises(UrlListError, match="LICENSE"):
        read_url_list(str(p), url_col="URL", caption_col="TEXT", save_additional_columns=["LICENSE"])


def test_config_accepts_a_column_list():
    from clipline.components.config import IngestConfig

    assert IngestConfig(save_additional_columns=["similarity"]).save_additional_columns == ["similarity"]
    assert IngestConfig(save_additional_columns=False).save_additional_columns is False


def test_jsonl_json_array_and_txt(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    t = read_url_list(str(jl))
    assert t.column("caption").to_pylist() == [r["caption"] for r in ROWS]
    assert t.column("lang").to_pylist() == ["en", "en", "de"]
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps(ROWS))
    assert read_url_list(str(arr)).column("url").to_pylist() == [r["url"] for r in ROWS]
    txt = tmp_path / "c.txt"
    txt.write_text("http://x/1\n\n  http://x/2  \nhttp://x/3")
    t = read_url_list(str(txt))
    assert t.column("url").to_pylist() == ["http://x/1", "http://x/2", "http://x/3"]
    assert t.column("caption").null_count == 3


def test_compressed_list_and_explicit_format(tmp_path):
    gz = tmp_path / "list.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("url,caption\nhttp://x/1,one\nhttp://x/2,two\n")
    assert read_url_list(str(gz)).num_rows == 2
    odd = tmp_path / "list.dat"
    odd.write_text("url,caption\nhttp://x/1,one\n")
    with pytest.raises(UrlListError, match="input_format"):
        read_url_list(str(odd))
    assert read_url_list(str(odd), input_format="csv").column("caption").to_pylist() == ["one"]


def test_directory_glob_memory_and_file_uris(tmp_path):
    d = tmp_path / "lists"
    d.mkdir()
    (d / "b.csv").write_text("url,caption\nhttp://x/b,bee\n")
    (d / "a.txt").write_text("http://x/a\n")
    (d / "_SUCCESS").write_text("")
    (d / "notes.md").write_text("# not a list")
    t = read_url_list(str(d))
    assert t.column("url").to_pylist() == ["http://x/a", "http://x/b"]
    assert read_url_list(str(d / "*.csv")).num_rows == 1
    assert read_url_list(f"file://{d / 'b.csv'}").column("caption").to_pylist() == ["bee"]

    mem = fsspec.filesystem("memory")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"url": ["http://m/1", "http://m/2"], "caption": ["x", "y"]}), buf)
    mem.pipe("/clipline-test/list.parquet", buf.getvalue().to_pybytes())
    try:
        t = read_url_list("memory://clipline-test/list.parquet")
        assert t.column("url").to_pylist() == ["http://m/1", "http://m/2"]
        assert t.column("source")[0].as_py().startswith("memory://")
    finally:
        mem.rm("/clipline-test", recursive=True)


def test_missing_url_column_says_what_to_do(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("URL,TEXT\nhttp://x/1,one\n")
    with pytest.raises(ValueError) as e:
        read_url_list(str(p))
    msg = str(e.value)
    assert str(p) in msg and "'url'" in msg and "['URL', 'TEXT']" in msg and "url_col" in msg
    assert "did you mean 'URL'" in msg


def test_captions_missing_default_vs_explicit(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("url,alt\nhttp://x/1,one\n")
    assert read_url_list(str(p)).column("caption").to_pylist() == [None]
    with pytest.raises(UrlListError, match="'TEXT'"):
        read_url_list(str(p), caption_col="TEXT")
    assert read_url_list(str(p), caption_col="alt").column("caption").to_pylist() == ["one"]


def test_carried_names_never_clobber_raw_columns(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("url,caption,key,status\nhttp://x/1,one,k1,ok\n")
    t = read_url_list(str(p))
    assert t.column_names == ["url", "caption", "source", "src_key", "src_status"]


def test_many_lists_concatenate_with_type_promotion(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.jsonl"
    a.write_text("url,caption,id\nhttp://x/1,one,1\n")
    b.write_text(json.dumps({"url": "http://x/2", "caption": "two", "id": "b-7", "more": 1}) + "\n")
    t = read_url_lists([str(a), str(b)])
    assert t.column("url").to_pylist() == ["http://x/1", "http://x/2"]
    assert t.column("id").to_pylist() == ["1", "b-7"]  # int vs text across files -> text
    assert t.column("more").to_pylist() == [None, 1]
    assert t.column("source").to_pylist() == [str(a), str(b)]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_url_list(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("url,caption\nhttp://x/1,one,extra,fields\n")
    with pytest.raises(UrlListError, match="bad.csv"):
        read_url_list(str(bad))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UrlListError, match="no csv/tsv/parquet/jsonl/txt files"):
        read_url_list(str(empty_dir))
