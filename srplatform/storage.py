"""Object storage by URI: `file://`, `s3://` and plain local paths.

    parse_uri("s3://bucket/runs/a")      -> URI(scheme="s3", bucket="bucket", key="runs/a")
    fs, path = filesystem("s3://bucket/shards", settings)   # pyarrow FileSystem + its path
    write_bytes("file:///tmp/x/manifest.json", b"{}")         # atomic: old or new, never half
    list_files("s3://bucket/images", suffixes=(".png",))     # sorted FileEntry list

S3 settings (endpoint, credentials, region) are resolved field by field, first match wins:
explicit arguments > environment (`C2D_S3_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`,
`AWS_ENDPOINT_URL`; `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY`; `AWS_REGION`,
`AWS_DEFAULT_REGION`) > the local stack (`srplatform.stack.read_state()`, when that exists and
the stack is up). The access key and secret always come from the same source, so a key from
the environment is never paired with a secret from the stack. pyarrow does not read
`AWS_ENDPOINT_URL`, so the endpoint is always passed to it explicitly.

Errors the user can fix (unknown scheme, missing bucket, rejected credentials, unreachable
endpoint, missing path) raise `UserError` naming the URI and what to do. Secrets never appear
in reprs, messages or logs.

pyarrow and boto3 are imported inside the functions that need them, so importing this module
is cheap (the CLI imports it for `--help`-level work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from srplatform.errors import UserError

SUPPORTED = "file://, s3:// or a plain local path"
DEFAULT_REGION = "us-east-1"

# S3 bucket naming rules (the subset that matters for a clear early error).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


# --------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class URI:
    """A parsed storage location.

    scheme: "file" or "s3".
    bucket: the S3 bucket ("" for files).
    key:    for S3 the object key or prefix without a leading slash; for files the absolute
            local path.
    """

    scheme: str
    bucket: str
    key: str

    @property
    def fs_path(self) -> str:
        """The path pyarrow filesystems take: `bucket/key` for S3, the local path for files."""
        if self.scheme == "s3":
            return f"{self.bucket}/{self.key}".rstrip("/") if self.key else self.bucket
        return self.key

    @property
    def name(self) -> str:
        """The last path component ("" for a bucket root)."""
        return posixpath.basename(self.key.rstrip("/"))

    def join(self, *parts: str) -> URI:
        """This location with relative parts appended (`/` separated)."""
        clean = [p.strip("/") for p in parts if p and p.strip("/")]
        if self.scheme == "s3":
            key = "/".join([self.key.rstrip("/")] * bool(self.key.rstrip("/")) + clean)
            return URI("s3", self.bucket, key)
        return URI("file", "", os.path.join(self.key, *clean))

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return "file://" + self.key


def parse_uri(uri: str | os.PathLike[str] | URI) -> URI:
    """Parse `file:///abs/path`, `s3://bucket/prefix` or a plain local path.

    Plain paths and `file://` paths are made absolute (`~` expanded). `file://localhost/p` is
    `/p`; `file://data/x` (no leading slash) is read as the relative path `data/x`.
    An unknown scheme raises `UserError` naming it and the supported ones.
    """
    if isinstance(uri, URI):
        return uri
    text = os.fspath(uri)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"empty storage location {uri!r}: give {SUPPORTED}")
    text = text.strip()
    if "://" not in text:
        return URI("file", "", str(Path(text).expanduser().absolute()))
    scheme, rest = text.split("://", 1)
    scheme_l = scheme.lower()
    if scheme_l == "file":
        host, _, path = rest.partition("/")
        if host in ("", "localhost"):
            local = "/" + path
        else:  # file://relative/path: be forgiving, it is what people type
            local = rest
        return URI("file", "", str(Path(local).expanduser().absolute()))
    if scheme_l == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise UserError(f"{text!r} names no bucket: write s3://BUCKET/PREFIX")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise UserError(
                f"{text!r}: {bucket!r} is not a valid S3 bucket name (3-63 characters: "
                "lower-case letters, digits, '.', '-')"
            )
        key = re.sub(r"/{2,}", "/", key)
        return URI("s3", bucket, key)
    raise UserError(f"unknown URI scheme {scheme!r} in {text!r}: supported are {SUPPORTED}")


def join(uri: str | URI, *parts: str) -> str:
    """`join("s3://b/p", "shard-000000.tar") == "s3://b/p/shard-000000.tar"` (same for file)."""
    return str(parse_uri(uri).join(*parts))


def is_remote(uri: str | URI) -> bool:
    """True for object storage (`s3://`), False for local files."""
    return parse_uri(uri).scheme == "s3"


# --------------------------------------------------------------------------------------
# S3 settings
# --------------------------------------------------------------------------------------


def mask(value: str | None) -> str:
    """A credential shown safely: its first 4 characters, then "***" ("(none)" when unset)."""
    if not value:
        return "(none)"
    return value[:4] + "***" if len(value) > 8 else "***"


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    """Where an S3-compatible store is and how to sign requests.

    endpoint_url: e.g. "http://127.0.0.1:9000"; None means AWS S3 itself.
    access_key / secret_key: None means the SDKs' own lookup (profiles, instance roles).
    region: the signing region.
    source: where the values came from ("explicit", "env", "stack", "default"; per field,
        joined by "+"), for error messages.
    The secret never appears in `repr` or `str`.
    """

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    region: str = DEFAULT_REGION
    source: str = "default"

    def __repr__(self) -> str:
        secret = "***" if self.secret_key else None
        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, access_key={mask(self.access_key)!r}, "
            f"secret_key={secret!r}, region={self.region!r}, source={self.source!r})"
        )

    __str__ = __repr__

    def describe(self) -> str:
        """One line for error messages: endpoint, key id and where they came from."""
        where = self.endpoint_url or "AWS S3 (no endpoint override)"
        return f"endpoint {where}, access key {mask(self.access_key)} [{self.source}]"

    def to_kwargs(self) -> dict[str, Any]:
        """The constructor arguments (secret included: do not log this)."""
        return {
            "endpoint_url": self.endpoint_url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
        }

    def pyarrow_kwargs(self) -> dict[str, Any]:
        """Arguments for `pyarrow.fs.S3FileSystem` (secret included: do not log this)."""
        kw: dict[str, Any] = {"region": self.region}
        if self.access_key and self.secret_key:
            kw["access_key"] = self.access_key
            kw["secret_key"] = self.secret_key
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            kw["scheme"] = parts.scheme
            kw["endpoint_override"] = parts.netloc
        return kw


_FIELDS = ("endpoint_url", "access_key", "secret_key", "region")


def _env_settings() -> dict[str, str]:
    env = os.environ
    out: dict[str, str] = {}
    for name in ("C2D_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if env.get(name):
            out["endpoint_url"] = env[name]
            break
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        out["access_key"] = env["AWS_ACCESS_KEY_ID"]
        out["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        out["region"] = region
    return out


def _stack_settings() -> dict[str, str]:
    """S3 settings of the local stack when it is up; {} when the stack module or state is absent."""
    try:
        from srplatform import stack
    except ImportError:
        return {}
    read_state = getattr(stack, "read_state", None)
    if read_state is None:
        return {}
    try:
        state = read_state()
    except Exception:  # a broken state file must not break explicit/env configurations
        return {}
    s3 = (state or {}).get("s3") or {}
    out = {k: s3[k] for k in _FIELDS if s3.get(k)}
    if not (out.get("access_key") and out.get("secret_key")):
        out.pop("access_key", None)
        out.pop("secret_key", None)
    return out


def resolve_settings(
    settings: S3Settings | Mapping[str, Any] | None = None,
    *,
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
) -> S3Settings:
    """Resolve S3 settings: explicit (`settings` and keyword arguments) > env > local stack.

    `settings` may be an `S3Settings` (taken as complete: returned as is unless keyword
    arguments override fields) or a mapping with the same field names, resolved field by field
    (unknown keys raise `UserError`). Keyword arguments override `settings`.
    """
    explicit: dict[str, Any] = {}
    if isinstance(settings, S3Settings):
        overrides = {
            k: v
            for k, v in (
                ("endpoint_url", endpoint_url),
                ("access_key", access_key),
                ("secret_key", secret_key),
                ("region", region),
            )
            if v
        }
        if not overrides:
            return settings
        return dataclasses.replace(settings, **overrides, source=settings.source + "+explicit")
    if settings is not None:
        unknown = set(settings) - set(_FIELDS)
        if unknown:
            raise UserError(
                f"unknown S3 setting(s) {sorted(unknown)}: expected some of {list(_FIELDS)}"
            )
        explicit = {k: v for k, v in settings.items() if v}
    for name, value in (
        ("endpoint_url", endpoint_url),
        ("access_key", access_key),
        ("secret_key", secret_key),
        ("region", region),
    ):
        if value:
            explicit[name] = value
    if bool(explicit.get("access_key")) != bool(explicit.get("secret_key")):
        raise UserError("S3 credentials need both an access key and a secret key (one was given)")

    sources = [("explicit", explicit)]
    if not all(k in explicit for k in _FIELDS):
        sources.append(("env", _env_settings()))
        if not all(k in explicit or k in sources[1][1] for k in _FIELDS):
            sources.append(("stack", _stack_settings()))
    chosen: dict[str, Any] = {}
    used: list[str] = []
    for src_name, values in sources:
        for k in _FIELDS:
            if k not in chosen and values.get(k):
                chosen[k] = values[k]
                if src_name not in used:
                    used.append(src_name)
    endpoint = chosen.get("endpoint_url")
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(
                f"S3 endpoint {endpoint!r} must look like http://HOST:PORT or https://HOST"
            )
        endpoint = endpoint.rstrip("/")
    return S3Settings(
        endpoint_url=endpoint,
        access_key=chosen.get("access_key"),
        secret_key=chosen.get("secret_key"),
        region=chosen.get("region") or DEFAULT_REGION,
        source="+".join(used) or "default",
    )


# --------------------------------------------------------------------------------------
# Clients and filesystems
# --------------------------------------------------------------------------------------

_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def _s3_filesystem(settings: S3Settings):
    import pyarrow.fs as pafs

    key = tuple(sorted(settings.pyarrow_kwargs().items()))
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = pafs.S3FileSystem(
                **settings.pyarrow_kwargs(),
                # Fail in seconds, not minutes, when the endpoint is down or wrong.
                connect_timeout=5,
                request_timeout=60,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
            )
            _FS_CACHE[key] = fs
        return fs


def filesystem(uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None):
    """`(pyarrow.fs.FileSystem, path)` for a URI.

    S3 gets an `S3FileSystem` with the resolved endpoint (`endpoint_override` + `scheme`),
    credentials and region; files get `LocalFileSystem` and the absolute path.
    The filesystem object pickles (Ray ships it to read tasks).
    """
    import pyarrow.fs as pafs

    u = parse_uri(uri)
    if u.scheme == "s3":
        return _s3_filesystem(resolve_settings(settings)), u.fs_path
    return pafs.LocalFileSystem(), u.fs_path


def boto3_client(settings: S3Settings | Mapping[str, Any] | None = None):
    """A boto3 S3 client for the resolved settings (path-style addressing, quick timeouts)."""
    import boto3
    from botocore.config import Config

    s = resolve_settings(settings)
    return boto3.client(
        "s3",
        endpoint_url=s.endpoint_url,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        region_name=s.region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

_CRED_MARKERS = (
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "ACCESS_DENIED",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "Forbidden",
)
_BUCKET_MARKERS = ("NO_SUCH_BUCKET", "NoSuchBucket")
_CONNECT_MARKERS = (
    "curlCode: 7",
    "Couldn't connect",
    "Could not connect",
    "Connection refused",
    "NETWORK_CONNECTION",
    "Failed to connect",
    "EndpointConnectionError",
)


def explain_error(exc: BaseException, uri: str | URI, settings: S3Settings | None, action: str):
    """Turn a storage exception into a `UserError` naming the object and the fix, or return
    None when it is not one the user can fix (then re-raise the original)."""
    text = f"{type(exc).__name__}: {exc}"
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code", ""))
        text += " " + code
    u = parse_uri(uri)
    where = settings.describe() if settings else ""
    if u.scheme == "s3":
        if any(m in text for m in _BUCKET_MARKERS) or (
            code in ("404", "NoSuchBucket") and action == "check bucket"
        ):
            return UserError(
                f"cannot {action} {u}: bucket {u.bucket!r} does not exist ({where}). "
                "Create it first (e.g. `aws s3 mb`, or pass --create-bucket where offered) "
                "or fix the URI."
            )
        if any(m in text for m in _CRED_MARKERS) or code == "403":
            return UserError(
                f"cannot {action} {u}: the S3 server rejected the credentials or denied access "
                f"({where}). Check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the local "
                "stack's credentials: `c2d stack status`) and the bucket's permissions."
            )
        if any(m in text for m in _CONNECT_MARKERS):
            return UserError(
                f"cannot {action} {u}: the S3 endpoint did not answer ({where}). Start it "
                "(`c2d stack up`) or set C2D_S3_ENDPOINT_URL to a reachable endpoint."
            )
    if isinstance(exc, FileNotFoundError):
        return UserError(f"cannot {action} {u}: it does not exist. Check the path.")
    if isinstance(exc, PermissionError):
        return UserError(f"cannot {action} {u}: permission denied ({exc.strerror or exc}).")
    return None


@contextlib.contextmanager
def storage_errors(uri: str | URI, action: str, settings: S3Settings | None = None):
    """Context manager: storage exceptions inside become `UserError`s naming `uri`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # pyarrow raises OSError subclasses, boto3 ClientError
        err = explain_error(exc, uri, settings, action)
        if err is None:
            raise
        raise err from exc


def check_bucket(uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None) -> None:
    """Raise `UserError` unless the bucket of an `s3://` URI exists and the credentials work.
    A no-op for files."""
    u = parse_uri(uri)
    if u.scheme != "s3":
        return
    import pyarrow.fs as pafs

    s = resolve_settings(settings)
    fs = _s3_filesystem(s)
    with storage_errors(u, "check bucket", s):
        info = fs.get_file_info(u.bucket)
    if info.type == pafs.FileType.NotFound:
        raise UserError(
            f"bucket {u.bucket!r} of {u} does not exist ({s.describe()}). Create it first "
            "(e.g. `aws s3 mb`, or --create-bucket where offered) or fix the URI."
        )


def create_bucket(uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None) -> bool:
    """Create the bucket of an `s3://` URI when it is missing. True when it was created."""
    u = parse_uri(uri)
    if u.scheme != "s3":
        return False
    s = resolve_settings(settings)
    client = boto3_client(s)
    with storage_errors(u, "create bucket", s):
        try:
            client.head_bucket(Bucket=u.bucket)
            return False
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": u.bucket}
        if s.region and s.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": s.region}
        client.create_bucket(**kwargs)
    return True


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One listed object: its URI, size in bytes and modification time (ns since epoch, 0
    when the store does not say)."""

    uri: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return posixpath.basename(parse_uri(self.uri).key)


def _ctx(uri: str | URI, settings: Any) -> tuple[URI, S3Settings | None, Any, str]:
    u = parse_uri(uri)
    s = resolve_settings(settings) if u.scheme == "s3" else None
    fs, path = filesystem(u, s)
    return u, s, fs, path


def exists(uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None) -> bool:
    """True when a file/object (or a local folder) exists at `uri`."""
    import pyarrow.fs as pafs

    u, s, fs, path = _ctx(uri, settings)
    with storage_errors(u, "look up", s):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None) -> bool:
    """True when `uri` is a single file/object (not a folder or prefix)."""
    import pyarrow.fs as pafs

    u, s, fs, path = _ctx(uri, settings)
    if u.scheme == "s3" and not u.key:
        return False
    with storage_errors(u, "look up", s):
        return fs.get_file_info(path).type == pafs.FileType.File


def stat(
    uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None
) -> FileEntry | None:
    """The `FileEntry` of one file/object, or None when there is no file at `uri`."""
    import pyarrow.fs as pafs

    u, s, fs, path = _ctx(uri, settings)
    if u.scheme == "s3" and not u.key:
        return None
    with storage_errors(u, "look up", s):
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    return FileEntry(str(u), int(info.size or 0), int(info.mtime_ns or 0))


def list_files(
    uri: str | URI,
    settings: S3Settings | Mapping[str, Any] | None = None,
    *,
    suffixes: Sequence[str] | None = None,
    recursive: bool = True,
    allow_empty: bool = False,
) -> list[FileEntry]:
    """Files under a folder / S3 prefix (or the one file `uri` names), sorted by URI.

    suffixes: keep names ending in one of these (case-insensitive), e.g. (".png", ".jpg").
    Hidden names (starting with ".") are left out.
    Raises `UserError` for a missing bucket, rejected credentials, a missing local folder, and
    (unless `allow_empty`) when nothing matches ("empty or missing prefix").
    """
    import pyarrow.fs as pafs

    u, s, fs, path = _ctx(uri, settings)
    if u.scheme == "s3":
        check_bucket(u, s)
    with storage_errors(u, "list", s):
        top = fs.get_file_info(path) if (u.scheme == "file" or u.key) else None
        if top is not None and top.type == pafs.FileType.File:
            infos = [top]
        else:
            if u.scheme == "file" and (top is None or top.type == pafs.FileType.NotFound):
                raise UserError(f"folder {u.key} does not exist: check the path")
            sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
            infos = fs.get_file_info(sel)
    wanted = tuple(x.lower() for x in suffixes) if suffixes else None
    out: list[FileEntry] = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        base = posixpath.basename(info.path)
        if base.startswith("."):
            continue
        if wanted and not base.lower().endswith(wanted):
            continue
        full = f"s3://{info.path}" if u.scheme == "s3" else "file://" + info.path
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        out.append(FileEntry(full, int(info.size or 0), int(mtime)))
    out.sort(key=lambda e: e.uri)
    if not out and not allow_empty:
        what = f" matching {list(suffixes)}" if suffixes else ""
        raise UserError(
            f"nothing found under {u}{what} (empty or missing prefix): check the URI, or put "
            "data there first"
        )
    return out


def read_bytes(uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None) -> bytes:
    """The whole content of one file/object."""
    u, s, fs, path = _ctx(uri, settings)
    with storage_errors(u, "read", s):
        if u.scheme == "s3":
            import pyarrow.fs as pafs

            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                check_bucket(u, s)
                raise UserError(f"cannot read {u}: no such object. Check the URI.")
        with fs.open_input_stream(path) as f:
            return f.read()


@contextlib.contextmanager
def open_input(uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None):
    """A readable binary stream (pyarrow NativeFile) for one file/object."""
    u, s, fs, path = _ctx(uri, settings)
    with storage_errors(u, "open", s):
        stream = fs.open_input_stream(path)
    with stream:
        yield stream


def _default_mode() -> int:
    """0o666 minus the process umask: what `open()` would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _replace_local(path: str, fill: Callable[[BinaryIO], None]) -> None:
    """Write a local file atomically: `fill(f)` writes a temporary file in the same folder,
    which is fsynced, given the usual permissions and renamed over `path`."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def upload_file(
    local_path: str | os.PathLike[str],
    uri: str | URI,
    settings: S3Settings | Mapping[str, Any] | None = None,
) -> None:
    """Copy a local file to `uri` atomically: readers see the old object or the new one.

    file://: written to a temporary name in the same folder, then renamed (`os.replace`).
    s3://: one upload; S3 makes an object visible only once its upload completed.
    """
    u, s, fs, path = _ctx(uri, settings)

    def copy(out: BinaryIO, bufsize: int) -> None:
        with open(local_path, "rb") as src:
            shutil.copyfileobj(src, out, bufsize)

    with storage_errors(u, "write", s):
        if u.scheme == "file":
            _replace_local(path, lambda out: copy(out, 1 << 20))
        else:
            with fs.open_output_stream(path) as out:
                copy(out, 8 << 20)


def write_bytes(
    uri: str | URI, data: bytes, settings: S3Settings | Mapping[str, Any] | None = None
) -> None:
    """Write `data` to `uri` atomically (see `upload_file`); parent folders are created."""
    u, s, fs, path = _ctx(uri, settings)
    with storage_errors(u, "write", s):
        if u.scheme == "file":
            _replace_local(path, lambda out: out.write(data))
        else:
            with fs.open_output_stream(path) as out:
                out.write(data)


@contextlib.contextmanager
def atomic_output(
    uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None
) -> Iterator[BinaryIO]:
    """`with atomic_output(uri) as f: f.write(...)`: the object appears at `uri` only when the
    block ends without an exception (spooled through a local temporary file)."""
    with tempfile.NamedTemporaryFile(prefix="c2d-out-", suffix=".part", delete=True) as tmp:
        yield tmp  # type: ignore[misc]
        tmp.flush()
        upload_file(tmp.name, uri, settings)


def delete(
    uri: str | URI, settings: S3Settings | Mapping[str, Any] | None = None, *, missing_ok=True
) -> None:
    """Delete one file/object."""
    u, s, fs, path = _ctx(uri, settings)
    with storage_errors(u, "delete", s):
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def local_path(uri: str | URI) -> Path | None:
    """The local path of a `file://` URI or plain path; None for object storage."""
    u = parse_uri(uri)
    return Path(u.key) if u.scheme == "file" else None


def check_writable_folder(path: str | os.PathLike[str], what: str = "destination") -> None:
    """Raise `UserError` (one line) unless files can be written into the local folder `path`:
    it is a writable folder, or it does not exist yet and its nearest existing ancestor is a
    writable folder (so it can be created). Meant to run before any work, so that a bad
    destination fails at once instead of after the inputs were read."""
    target = Path(os.path.abspath(os.fspath(path)))
    anc = target
    while not os.path.lexists(anc) and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        if not anc.exists():  # a symbolic link to nothing
            raise UserError(f"{what} {path}: {anc} is a broken symbolic link")
        if anc == target:
            raise UserError(f"{what} {path} is a file, not a folder: choose a folder")
        raise UserError(f"{what} {path} is below {anc}, which is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        where = "" if anc == target else f" ({anc} exists and cannot be written into)"
        raise UserError(f"{what} {path} is not writable{where}: check its permissions")
