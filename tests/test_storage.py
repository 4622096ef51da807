"""srplatform.storage: URIs, S3 settings resolution, file:// operations (unit) and the same
operations against a real S3 endpoint (moto server with auth; integration)."""

from __future__ import annotations

import os
import uuid

import pytest

from srplatform import storage
from srplatform.errors import UserError

S3_ENV = (
    "C2D_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


@pytest.fixture
def clean_env(monkeypatch):
    """No S3 settings from the environment or from a running stack."""
    for name in S3_ENV:
        monkeypatch.delenv(name, raising=False)
    from srplatform import stack

    monkeypatch.setattr(stack, "read_state", lambda *a, **k: None)
    return monkeypatch


# --------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------


def test_parse_uri_forms(tmp_path):
    u = storage.parse_uri("s3://my-bucket/a//b/c.tar")
    assert (u.scheme, u.bucket, u.key) == ("s3", "my-bucket", "a/b/c.tar")
    assert u.fs_path == "my-bucket/a/b/c.tar" and str(u) == "s3://my-bucket/a/b/c.tar"
    assert storage.parse_uri("s3://my-bucket").fs_path == "my-bucket"
    assert storage.parse_uri(f"file://{tmp_path}/x").key == f"{tmp_path}/x"
    assert storage.parse_uri(f"file://localhost{tmp_path}").key == str(tmp_path)
    assert storage.parse_uri(str(tmp_path)).scheme == "file"
    assert storage.parse_uri(tmp_path / "y").key == str(tmp_path / "y")
    rel = storage.parse_uri("some/rel")
    assert rel.key == os.path.join(os.getcwd(), "some/rel")
    assert storage.join("s3://b-1/p", "x", "y.tar") == "s3://b-1/p/x/y.tar"
    assert storage.join("s3://b-1", "y.tar") == "s3://b-1/y.tar"
    assert storage.join(str(tmp_path), "m.json") == f"file://{tmp_path}/m.json"
    assert storage.is_remote("s3://b-1/x") and not storage.is_remote(tmp_path)


@pytest.mark.parametrize("bad", ["gs://bucket/x", "http://host/x", "hdfs://nn/p", "s3a://b/x"])
def test_unknown_scheme_names_it_and_the_supported_ones(bad):
    with pytest.raises(UserError) as e:
        storage.parse_uri(bad)
    msg = str(e.value)
    assert repr(bad.split("://")[0]) in msg and "file://" in msg and "s3://" in msg


@pytest.mark.parametrize("bad", ["s3://", "s3:///key", "s3://UPPER/x", "s3://ab/x", ""])
def test_bad_s3_uris(bad):
    with pytest.raises(UserError):
        storage.parse_uri(bad)


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def test_settings_precedence_explicit_env_stack(clean_env):
    from srplatform import stack

    clean_env.setattr(stack, "read_state", lambda *a, **k: {"s3": {
        "endpoint_url": "http://127.0.0.1:7001", "access_key": "STACKKEY1234",
        "secret_key": "stack-secret", "region": "eu-west-1"}})
    s = storage.resolve_settings()
    assert (s.endpoint_url, s.access_key, s.region, s.source) == (
        "http://127.0.0.1:7001", "STACKKEY1234", "eu-west-1", "stack")

    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:7002")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "ENVKEY123456")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    s = storage.resolve_settings()
    assert (s.endpoint_url, s.access_key, s.secret_key) == (
        "http://127.0.0.1:7002", "ENVKEY123456", "env-secret")
    assert s.region == "eu-west-1"  # not in env: falls through to the stack
    clean_env.setenv("C2D_S3_ENDPOINT_URL", "http://127.0.0.1:7003/")
    assert storage.resolve_settings().endpoint_url == "http://127.0.0.1:7003"

    s = storage.resolve_settings({"endpoint_url": "http://127.0.0.1:7004"}, region="ap-south-1")
    assert (s.endpoint_url, s.access_key, s.region) == (
        "http://127.0.0.1:7004", "ENVKEY123456", "ap-south-1")
    assert s.source.startswith("explicit")
    # A resolved S3Settings is taken as is.
    assert storage.resolve_settings(s) is s


def test_settings_credentials_come_in_pairs(clean_env):
    from srplatform import stack

    clean_env.setattr(stack, "read_state", lambda *a, **k: {"s3": {
        "access_key": "STACKKEY1234", "secret_key": "stack-secret"}})
    clean_env.setenv("AWS_ACCESS_KEY_ID", "ENVKEY-ONLY")  # secret missing: not used
    s = storage.resolve_settings()
    assert (s.access_key, s.secret_key) == ("STACKKEY1234", "stack-secret")
    with pytest.raises(UserError, match="both"):
        storage.resolve_settings({"access_key": "A"})
    with pytest.raises(UserError, match="unknown S3 setting"):
        storage.resolve_settings({"endpoint": "http://x"})
    with pytest.raises(UserError, match="http://HOST"):
        storage.resolve_settings({"endpoint_url": "127.0.0.1:9000"})


def test_settings_without_stack_module_function(clean_env):
    from srplatform import stack

    clean_env.delattr(stack, "read_state")
    s = storage.resolve_settings()
    assert s.endpoint_url is None and s.region == "us-east-1" and s.source == "default"


def test_secret_never_in_repr_or_messages(clean_env):
    s = storage.resolve_settings({"endpoint_url": "http://127.0.0.1:9", "access_key":
                                  "AKIAVERYSECRETID", "secret_key": "TOPSECRET-VALUE"})
    for text in (repr(s), str(s), s.describe(), f"{s}"):
        assert "TOPSECRET" not in text and "VERYSECRETID" not in text
    assert "TOPSECRET" not in repr(storage.explain_error(
        OSError("AWS Error ACCESS_DENIED"), "s3://bucket-a/x", s, "read"))


def test_s3_filesystem_gets_explicit_endpoint(clean_env):
    fs, path = storage.filesystem("s3://bucket-a/p/x.tar", {
        "endpoint_url": "http://127.0.0.1:9", "access_key": "AK1234567890",
        "secret_key": "sk", "region": "us-east-1"})
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket-a/p/x.tar"
    # pyarrow reports the override it was given (it ignores AWS_ENDPOINT_URL by itself).
    assert "127.0.0.1:9" in repr(fs.__reduce__())


# --------------------------------------------------------------------------------------
# file:// operations
# --------------------------------------------------------------------------------------


def test_local_write_read_list_delete(tmp_path):
    base = f"file://{tmp_path}/store"
    storage.write_bytes(storage.join(base, "a/one.bin"), b"1")
    storage.write_bytes(storage.join(base, "two.bin"), b"22")
    storage.write_bytes(storage.join(base, ".hidden"), b"h")
    storage.write_bytes(storage.join(base, "two.bin"), b"222")  # replace
    assert storage.read_bytes(storage.join(base, "two.bin")) == b"222"
    names = [(e.name, e.size) for e in storage.list_files(base)]
    assert names == [("one.bin", 1), ("two.bin", 3)]
    assert [e.name for e in storage.list_files(base, recursive=False)] == ["two.bin"]
    assert storage.exists(storage.join(base, "a/one.bin"))
    assert storage.stat(storage.join(base, "nope")) is None
    assert storage.is_file(storage.join(base, "two.bin")) and not storage.is_file(base)
    # atomic writes leave no temporary files behind
    assert sorted(os.listdir(tmp_path / "store")) == [".hidden", "a", "two.bin"]
    assert oct(os.stat(tmp_path / "store" / "two.bin").st_mode & 0o777) != oct(0o600)
    with storage.atomic_output(storage.join(base, "three.bin")) as f:
        f.write(b"333")
    assert storage.read_bytes(storage.join(base, "three.bin")) == b"333"
    with pytest.raises(RuntimeError), storage.atomic_output(storage.join(base, "four.bin")) as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert not storage.exists(storage.join(base, "four.bin"))
    storage.delete(storage.join(base, "two.bin"))
    storage.delete(storage.join(base, "two.bin"))  # missing_ok
    assert not storage.exists(storage.join(base, "two.bin"))


def test_local_missing_and_empty(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        storage.list_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty or missing"):
        storage.list_files(tmp_path / "empty")
    assert storage.list_files(tmp_path / "empty", allow_empty=True) == []
    with pytest.raises(UserError, match="does not exist"):
        storage.read_bytes(tmp_path / "missing.bin")


# --------------------------------------------------------------------------------------
# Real S3 endpoint
# --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_roundtrip(s3_server):
    st = s3_server.settings()
    base = f"s3://{s3_server.bucket}/test-storage-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(storage.join(base, "x/a.bin"), b"abc", st)
    storage.write_bytes(storage.join(base, "b.bin"), b"de", st)
    assert storage.read_bytes(storage.join(base, "x/a.bin"), st) == b"abc"
    assert [(e.name, e.size) for e in storage.list_files(base, st)] == [("b.bin", 2),
                                                                       ("a.bin", 3)]
    assert storage.exists(storage.join(base, "b.bin"), st)
    assert not storage.exists(storage.join(base, "zzz"), st)
    with storage.open_input(storage.join(base, "b.bin"), st) as f:
        assert f.read() == b"de"
    c = storage.boto3_client(st)
    assert c.get_object(Bucket=s3_server.bucket, Key=storage.parse_uri(
        storage.join(base, "b.bin")).key)["Body"].read() == b"de"
    storage.delete(storage.join(base, "b.bin"), st)
    assert not storage.exists(storage.join(base, "b.bin"), st)
    with pytest.raises(UserError, match="no such object"):
        storage.read_bytes(storage.join(base, "b.bin"), st)


@pytest.mark.integration
def test_s3_env_settings_are_used(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3_server.bucket}/test-env-{uuid.uuid4().hex[:8]}/x.bin"
    storage.write_bytes(uri, b"env")
    assert storage.read_bytes(uri) == b"env"


@pytest.mark.integration
def test_s3_errors_are_user_errors(s3_server):
    st = s3_server.settings()
    with pytest.raises(UserError, match="does not exist") as e:
        storage.list_files("s3://no-such-bucket-c2d/x", st)
    assert "no-such-bucket-c2d" in str(e.value)
    with pytest.raises(UserError, match="empty or missing prefix"):
        storage.list_files(f"s3://{s3_server.bucket}/no/such/prefix", st)
    ak, sk = s3_server.bad_credentials()
    bad = dict(st, access_key=ak, secret_key=sk)
    with pytest.raises(UserError, match="rejected the credentials") as e:
        storage.list_files(f"s3://{s3_server.bucket}/x", bad)
    assert sk not in str(e.value) and s3_server.secret_key not in str(e.value)
    with pytest.raises(UserError, match="rejected the credentials"):
        storage.write_bytes(f"s3://{s3_server.bucket}/x/y.bin", b"1", bad)
    with pytest.raises(UserError, match="rejected the credentials"):
        storage.list_files(f"s3://{s3_server.bucket}/x", dict(st, access_key="AKIAUNKNOWN00000"))
    with pytest.raises(UserError, match="did not answer"):
        storage.list_files(f"s3://{s3_server.bucket}/x", dict(st,
                           endpoint_url="http://127.0.0.1:9"))
    name = f"c2d-new-{uuid.uuid4().hex[:8]}"
    assert storage.create_bucket(f"s3://{name}/p", st) is True
    assert storage.create_bucket(f"s3://{name}/p", st) is False
    storage.check_bucket(f"s3://{name}", st)
