"""Live progress lines on the driver, one per report, prefixed with the run's name.

Rank 0 of every training run pushes small dicts to a `ray.util.queue.Queue` owned by the driver
(an actor with no CPU reservation); a thread on the driver prints them. Concurrent fine-tuning
runs share one printer, so their lines interleave whole and readable:

    [tiny/pretrain] step 20/60  loss 0.0821  lr 4.6e-04  38.2 img/s  data-wait 12%  ETA 0:41
    [tiny/x2] val @40: x2 29.81 dB / 0.8712 (ema 29.95 dB)

The printer also keeps the latest events per run (the driver builds results from them) and
calls `on_event(event)` for each, which is how a Ray Tune trial can follow a run.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # NaN or negative
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_event(ev: dict[str, Any]) -> str | None:
    """The line for one progress event (None: nothing to print)."""
    run = ev.get("run", "?")
    kind = ev.get("kind")
    if kind == "train":
        return (f"[{run}] step {ev['step']}/{ev['total']}  loss {ev['loss']:.4f}  "
                f"lr {ev['lr']:.1e}  {ev['images_per_s']:.1f} img/s  "
                f"data-wait {ev['data_wait_frac']:.0%}  ETA {fmt_duration(ev.get('eta_s', float('nan')))}"
                + (f"  skipped {int(ev['skipped_samples'])}" if ev.get("skipped_samples") else ""))
    if kind == "val":
        m = ev.get("metrics", {})
        scales = sorted({int(k.split("_")[1][1:]) for k in m if k.startswith("val_x")})
        parts = []
        for s in scales:
            txt = f"x{s} {m.get(f'val_x{s}_psnr', float('nan')):.2f} dB / {m.get(f'val_x{s}_ssim', float('nan')):.4f}"
            if f"val_x{s}_psnr_ema" in m:
                txt += f" (ema {m[f'val_x{s}_psnr_ema']:.2f} dB)"
            if f"val_x{s}_psnr_bicubic" in m:
                gain = m.get(f"val_x{s}_gain_db_ema", m.get(f"val_x{s}_gain_db", float("nan")))
                txt += f" [bicubic {m[f'val_x{s}_psnr_bicubic']:.2f}, gain {gain:+.2f}]"
            parts.append(txt)
        return f"[{run}] val @{ev['step']}: " + ", ".join(parts)
    if kind == "start":
        where = f"{ev.get('world', '?')} worker(s) on {ev.get('nodes', '?')} node(s), {ev.get('device', '?')}"
        if ev.get("resumed_from") is not None:
            return f"[{run}] resuming at step {ev['step']}/{ev['total']} from its latest checkpoint ({where})"
        return f"[{run}] training {ev['total']} steps ({where})"
    if kind == "checkpoint":
        return f"[{run}] checkpoint {ev.get('name', '')} saved"
    if kind == "warning":
        return f"[{run}] {ev.get('message', '')}"
    if kind == "end":
        extra = f" ({ev['tracking']})" if ev.get("tracking") else ""
        return f"[{run}] finished at step {ev['step']}{extra}"
    if kind == "message":
        return f"[{run}] {ev.get('message', '')}"
    return None


class ProgressPrinter:
    """Owns the queue and the printing thread; use as a context manager on the driver."""

    def __init__(self, *, stream: TextIO | None = None, on_event: Callable[[dict], None] | None = None,
                 quiet: bool = False):
        self.stream = stream or sys.stdout
        self.on_event = on_event
        self.quiet = quiet
        self.queue = None
        self.events: dict[str, dict[str, dict[str, Any]]] = {}  # run -> kind -> latest event
        self.resumes: dict[str, list[int]] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}  # run -> train events
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "ProgressPrinter":
        from ray.util.queue import Queue

        # No CPU reservation: on a 2-core machine every fraction is spoken for by training.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._drain, name="c2d-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def say(self, run: str, message: str) -> None:
        """A driver-side line in the same format."""
        self._handle({"run": run, "kind": "message", "message": message, "time": time.time()})

    def _handle(self, ev: dict[str, Any]) -> None:
        run = ev.get("run", "?")
        with self._lock:
            self.events.setdefault(run, {})[ev.get("kind", "?")] = ev
            if ev.get("kind") == "resumed":
                self.resumes.setdefault(run, []).append(int(ev["step"]))
            if ev.get("kind") == "train":
                self.history.setdefault(run, []).append(ev)
        line = format_event(ev)
        if line and not self.quiet:
            print(line, file=self.stream, flush=True)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception as exc:  # noqa: BLE001 - a hook must not stop the printer
                print(f"progress hook failed: {exc}", file=sys.stderr)

    def _drain(self, final: bool = False) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set() or final:
            try:
                items = self.queue.get_nowait_batch(self.queue.qsize()) if self.queue.qsize() else []
            except Empty:
                items = []
            except Exception:  # noqa: BLE001 - the queue actor is gone (Ray shutting down)
                return
            for ev in items:
                self._handle(ev)
            if final:
                return
            if not items:
                self._stop.wait(0.25)

    def latest(self, run: str, kind: str) -> dict[str, Any] | None:
        with self._lock:
            return self.events.get(run, {}).get(kind)

    def close(self) -> None:
        if self.queue is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._drain(final=True)
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self.queue = None
