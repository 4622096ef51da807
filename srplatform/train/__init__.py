"""Ray Train for both C2D stages: `run_pretrain`, `run_finetune`, `run_pipeline`, `run_stage`.

    from srplatform.train import run_pipeline
    result = run_pipeline(load_config("jobs/configs/tiny.yaml"))

The driver side lives in `srplatform.train.api`, the per-worker loop in `srplatform.train.loop`,
optimiser pieces in `srplatform.train.optim`, live progress lines in `srplatform.train.progress`.
Names are resolved lazily so `import srplatform.train` imports neither Ray nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_stage", "run_pretrain", "run_finetune", "run_pipeline", "StageResult",
           "PipelineResult", "resolve_init"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from srplatform.train import api

        return getattr(api, name)
    raise AttributeError(f"module 'srplatform.train' has no attribute {name!r}")
