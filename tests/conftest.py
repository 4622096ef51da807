"""Shared fixtures.

- Every test session gets its own C2D_HOME (a temp dir), so tests never touch a user's ./.c2d
  nor a stack the user has running.
- `stack` starts the real embedded stack (MLflow server + moto S3 with auth) once per session
  and stops it at the end; `s3_server` and `mlflow_uri` are views of it.
- `shared_dir` finds ../shared (or $C2D_SHARED); tests that need it skip with a reason.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="c2d-test-home-"))
os.environ["C2D_HOME"] = str(_SESSION_HOME)
# Tests must not log to a tracking server of the user's environment by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# One intra-op thread in the test process: Ray workers and servers run beside it on 2 cores,
# and oversubscribed torch threads made tiny forwards ~100x slower under load.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass


def shared_path() -> Path:
    return Path(os.environ.get("C2D_SHARED", REPO.parent / "shared"))


def link_images(src: Path, dst: Path, *, count: int, min_side: int) -> Path:
    """Symlink the first `count` images of `src` (sorted) whose sides are all >= `min_side` into
    the new folder `dst` (a small training set without copying)."""
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    linked = 0
    for f in sorted(src.glob("*.png")):
        if linked == count:
            break
        with Image.open(f) as im:
            if min(im.size) >= min_side:
                (dst / f.name).symlink_to(f)
                linked += 1
    return dst


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def shared_data(shared_dir) -> Path:
    data = shared_dir / "data"
    if not (data / "Set5").is_dir():
        pytest.skip(f"benchmark images not found at {data} (set C2D_SHARED to the shared folder)")
    return data


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def bad_credentials(self) -> tuple[str, str]:
        """A key pair the server rejects (the real access key id with a wrong secret)."""
        return self.access_key, "not-the-secret-" + self.secret_key[:4]

    def settings(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url, "access_key": self.access_key,
                "secret_key": self.secret_key, "region": self.region}

    def env(self) -> dict[str, str]:
        return {"C2D_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}


@pytest.fixture(scope="session")
def stack():
    """The real embedded stack for this test session (started once, stopped at the end)."""
    from srplatform import stack as stack_mod

    root = _SESSION_HOME
    state = stack_mod.up(root=root, s3=True, quiet=True)
    yield state
    stack_mod.down(root=root, quiet=True)


@pytest.fixture(scope="session")
def s3_server(stack) -> S3Server:
    s = stack["s3"]
    return S3Server(s["endpoint_url"], s["access_key"], s["secret_key"], s["region"], s["bucket"])


@pytest.fixture(scope="session")
def mlflow_uri(stack) -> str:
    return stack["mlflow"]["tracking_uri"]
