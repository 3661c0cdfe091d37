"""Object storage failures, against a real S3-compatible server on loopback (moto's server mode,
with its IAM check on, so a wrong key is refused as AWS or MinIO would refuse it): a missing
bucket, a refused key and an unreachable endpoint each stop reading a URL list or the inbox with
one line that names the URL and what to set; a list that storage refused is not set aside as
unreadable."""

from __future__ import annotations

import json

import pytest

from clipline.components.storage import StorageError
from tests.pipelinekit import base_env, clipline, free_port, moto_server

LIST = b"url,caption\nhttp://example.test/a.jpg,a red circle\nhttp://example.test/b.jpg,a blue square\n"


@pytest.fixture(scope="module")
def s3():
    import boto3

    # the first 3 requests create an IAM user, its key and its policy; every later one is checked
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="3") as endpoint:
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b"
        )
        iam.create_user(UserName="clipline")
        key = iam.create_access_key(UserName="clipline")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="clipline", PolicyName="all", PolicyDocument=json.dumps(policy))
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        s3c = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", **{k.lower(): v for k, v in creds.items()}
        )
        s3c.create_bucket(Bucket="lists")
        s3c.put_object(Bucket="lists", Key="a.csv", Body=LIST)
        s3c.put_object(Bucket="lists", Key="inbox/new.csv", Body=LIST)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", **creds}


@pytest.fixture
def aws(s3, monkeypatch):
    """The server's endpoint and a valid key in the environment; s3fs's cached clients dropped, so
    each test's environment is the one read."""
    import s3fs

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the client's own retry setting: fail fast here
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def _new_clients() -> None:
    """s3fs caches a client per set of options, not per environment: drop them after a change."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def test_url_lists_on_object_storage_fail_in_one_line_naming_the_url_and_what_to_set(aws, s3):
    from clipline.components.ingest.sources import read_url_lists

    assert read_url_lists(["s3://lists/a.csv"]).column("caption").to_pylist() == ["a red circle", "a blue square"]
    with pytest.raises(FileNotFoundError, match="s3://lists/missing.csv' does not exist"):
        read_url_lists(["s3://lists/missing.csv"])
    with pytest.raises(StorageError) as e:
        read_url_lists(["s3://no-such-bucket/a.csv"])
    assert str(e.value) == (
        f"URL list s3://no-such-bucket/a.csv: bucket 'no-such-bucket' does not exist at {s3['AWS_ENDPOINT_URL']}: "
        "create it, or fix the bucket name and AWS_ENDPOINT_URL"
    )

    aws.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    _new_clients()
    with pytest.raises(StorageError) as e:
        read_url_lists(["s3://lists/a.csv"])
    msg = str(e.value)
    assert msg.startswith("URL list s3://lists/a.csv: access denied by " + s3["AWS_ENDPOINT_URL"])
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in msg and "not-the-secret" not in msg
    assert "\n" not in msg

    aws.setenv("AWS_SECRET_ACCESS_KEY", s3["AWS_SECRET_ACCESS_KEY"])
    aws.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    _new_clients()
    with pytest.raises(
        StorageError, match=r"URL list s3://lists/a.csv: cannot reach http://127.0.0.1:\d+ .*set AWS_ENDPOINT_URL"
    ):
        read_url_lists(["s3://lists/a.csv"])


def test_the_inbox_on_object_storage_names_a_missing_bucket_and_sets_aside_no_list_storage_refused(aws, s3, tmp_path):
    from clipline.components.config import load_config
    from clipline.components.refresh import Inbox
    from clipline.components.refresh.inbox import unreadable_lists

    cfg = load_config(None, {"data_dir": tmp_path, "refresh": {"inbox": "s3://lists/inbox"}})
    inbox = Inbox.from_config(cfg)
    assert inbox.pending() == ["s3://lists/inbox/new.csv"] and unreadable_lists(cfg, inbox.pending()) == {}
    missing = Inbox.from_config(load_config(None, {"data_dir": tmp_path, "refresh": {"inbox": "s3://gone/inbox"}}))
    with pytest.raises(StorageError, match="inbox s3://gone/inbox: bucket 'gone' does not exist"):
        missing.pending()  # not an empty inbox
    aws.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    _new_clients()
    with pytest.raises(StorageError, match="access denied"):
        unreadable_lists(cfg, ["s3://lists/inbox/new.csv"])  # not "unreadable": the list is fine


@pytest.mark.slow
def test_clipline_ingest_of_a_list_in_a_missing_bucket_stops_in_one_line(s3, tmp_path):
    env = base_env(**s3, AWS_MAX_ATTEMPTS="2")
    proc = clipline(["--data-dir", str(tmp_path / "data"), "ingest", "s3://no-such-bucket/a.csv"], env, cwd=tmp_path)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        f"error: URL list s3://no-such-bucket/a.csv: bucket 'no-such-bucket' does not exist at {s3['AWS_ENDPOINT_URL']}: "
        "create it, or fix the bucket name and AWS_ENDPOINT_URL"
    ], proc.stderr
