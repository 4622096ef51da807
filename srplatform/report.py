"""Pieces of the demo's report: sample photographs, curves from MLflow, comparison crops.

Kept apart from the orchestration in `srplatform.demo` so each piece can be tested alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

# Colour photographs that scikit-image ships inside its wheel (no download at run time).
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina")


def sample_images(dest: Path, names: Iterable[str] = SAMPLE_PHOTOS) -> list[Path]:
    """Write scikit-image's bundled colour photographs as PNG files into `dest` (idempotent).

    Returns the written paths. Photographs that this scikit-image build would have to
    download (none of the defaults) are skipped with a message rather than fetched.
    """
    import numpy as np
    from PIL import Image
    import skimage.data as skd

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        path = dest / f"{name}.png"
        if path.is_file() and path.stat().st_size > 0:
            out.append(path)
            continue
        try:
            arr = getattr(skd, name)()
        except Exception as exc:  # noqa: BLE001 - a missing bundled file must not stop the demo
            print(f"  sample {name}: not available in this scikit-image ({exc}); skipped")
            continue
        arr = np.asarray(arr)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(arr.astype(np.uint8)).save(tmp)
        tmp.replace(path)
        out.append(path)
    if not out:
        raise RuntimeError("no sample photographs could be written; pass --images DIR")
    return out


def metric_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of one run, sorted by step; [] when absent."""
    try:
        hist = client.get_metric_history(run_id, key)
    except Exception:  # noqa: BLE001 - a report must not fail on a missing metric
        return []
    return sorted((m.step, m.value) for m in hist)


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path, *, title: str, ylabel: str) -> Path | None:
    """One line per named series; returns None when there is nothing to plot."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def comparison_strip(lr, bicubic, sr, hr, path: Path, *, crop: int = 96) -> Path:
    """Save LR (nearest) | bicubic | SR | HR crops side by side as one PNG.

    All inputs are (3,H,W) float [0,1] RGB tensors; `lr` at low resolution, the others at HR
    size. The crop is taken around the HR image's centre.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    h, w = hr.shape[-2:]
    c = min(crop, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    lr_up = F.interpolate(lr[None], size=(h, w), mode="nearest")[0]
    tiles = [t[:, top:top + c, left:left + c] for t in (lr_up, bicubic, sr, hr)]
    gap = torch.ones(3, c, 4)
    row = torch.cat([tiles[0], gap, tiles[1], gap, tiles[2], gap, tiles[3]], dim=2)
    arr = (row.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 2 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
