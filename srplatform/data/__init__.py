"""The data plane: pack images into WebDataset shards, stream random-scale LR/HR pairs.

    from srplatform.data import pack, train_dataset, val_pairs

`pack` lives in `srplatform.data.pack`, the Ray Data pipeline in `srplatform.data.pipeline`,
the decoding rules both share in `srplatform.data.images`. Pipeline names are resolved lazily,
so `import srplatform.data` imports neither Ray nor pyarrow.

`pack` is imported eagerly on purpose: the submodule `srplatform.data.pack` has the same name,
and binding the function here after the submodule is loaded makes `srplatform.data.pack` the
function whatever was imported first.
"""

from __future__ import annotations

from typing import Any

from srplatform.data.pack import pack, read_manifest  # noqa: F401  (see above)

__all__ = ["pack", "read_manifest", "train_dataset", "epoch_datasets", "val_pairs",
           "make_pairs"]

_WHERE = {
    "train_dataset": "srplatform.data.pipeline",
    "epoch_datasets": "srplatform.data.pipeline",
    "val_pairs": "srplatform.data.pipeline",
    "make_pairs": "srplatform.data.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'srplatform.data' has no attribute {name!r}")
