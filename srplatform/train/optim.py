"""Optimisation pieces of one training stage: parameter groups, the step-driven learning-rate
schedule with warm-up, and an exponential moving average (EMA) of the weights.

    groups = param_groups(model, weight_decay=1e-4)      # decay / no_decay, explicit
    opt = build_optimizer(model, cfg.pretrain)             # Adam or AdamW over those groups
    sched = build_scheduler(opt, cfg.pretrain)             # LambdaLR; call .step() once per step
    ema = EMA(model, decay=0.999)                          # ema.update(model) after each step

The schedule is a function of the optimizer step, never of epochs: with streamed data the number
of batches per epoch depends on the worker count and on skipped samples, so only the step count
means the same thing on every cluster.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The decay / no-decay split lives with the models (c2disr.models), so a plain PyTorch user of
# c2disr gets the same groups as the platform's training loop.
from c2disr.models import NO_DECAY_NAMES, no_decay, param_groups  # noqa: F401 - re-exported


HEAD_PREFIX = "head."


def split_head(groups: list[dict[str, Any]], lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """Give the head's parameters (names starting with `head.`) their own groups at
    `lr * head_lr_mult`, keeping the decay split; the backbone groups keep `lr`."""
    out = []
    for g in groups:
        for is_head in (False, True):
            pairs = [(n, p) for n, p in zip(g["names"], g["params"]) if n.startswith(HEAD_PREFIX) == is_head]
            if pairs:
                out.append({**g, "names": [n for n, _ in pairs], "params": [p for _, p in pairs],
                            "group": ("head_" if is_head else "") + g["group"],
                            "lr": lr * (head_lr_mult if is_head else 1.0)})
    return out


def build_optimizer(model: nn.Module, section, *, head_lr_mult: float | None = None) -> torch.optim.Optimizer:
    """Adam or AdamW (`section.optimizer`) over `param_groups`, lr `section.lr`.

    `section` is an `OptimSection` (pretrain or finetune). Plain Adam applies weight decay as an
    L2 term in the gradient, so `no_decay` matters for it too.

    `head_lr_mult` (default: `section.head_lr_mult` when the config has that field, else 1)
    scales the lr of the head's parameters. Fine-tuning starts from a pretrained backbone but a
    new pixel-shuffle head: from PyTorch's random init (`finetune.head_init: random`) the head
    needs hundreds of steps at the backbone's fine-tuning lr just to leave its start (measured on
    the tiny model, x2, 200 steps at lr 2e-4: Set5 29.0 dB with 1x, 32.6 dB with a 10x head lr).
    The default least-squares head init starts close to the continuous model and needs no
    multiplier."""
    groups = param_groups(model, section.weight_decay)
    mult = float(head_lr_mult if head_lr_mult is not None else getattr(section, "head_lr_mult", 1.0))
    if mult != 1.0:
        groups = split_head(groups, section.lr, mult)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[section.optimizer]
    betas = (float(section.betas[0]), float(section.betas[1]))
    return cls(groups, lr=section.lr, betas=betas)


def lr_factor(step: int, *, total: int, schedule: str, warmup: int = 0,
              milestones: list[int] | tuple[int, ...] = (), gamma: float = 0.5) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based).

    warm-up: linear from 1/warmup at step 0 to 1 at step warmup-1 (never exactly 0, so the first
    step already moves the weights); then
    cosine: half a cosine from 1 to 0 over the remaining `total - warmup` steps;
    multistep: times `gamma` for every milestone <= step (milestones are absolute steps);
    constant: 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return float(gamma ** sum(1 for m in milestones if step >= m))
    if schedule == "cosine":
        span = max(1, total - warmup)
        t = min(1.0, max(0.0, (step - warmup) / span))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}; use cosine, multistep or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, section) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; `scheduler.step()` once after every optimizer step, so
    the lr used at step k is `section.lr * lr_factor(k)`."""

    def factor(step: int) -> float:
        return lr_factor(step, total=section.steps, schedule=section.schedule,
                         warmup=section.warmup_steps, milestones=section.milestones,
                         gamma=section.gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stage_loss(pred: torch.Tensor, target: torch.Tensor, *, step: int, section
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training objective at optimizer step `step` (0-based), L2 for the first
    `section.l2_steps` steps, then `section.loss` (L1 or L2), in float32; and the batch's L1
    (detached), which is what progress lines and MLflow show as `loss` in every phase so the
    curve reads the same across the switch.

    Why an L2 start for the continuous stage: its head starts at exactly its bilinear base (a
    zero residual), where L1's gradient is the sign of the error at every query. Most query
    pixels lie in flat regions where the residual is small and unpredictable from the fresh
    features, so their signs are noise that outweighs the few edge pixels whose large residual
    the model could learn; a zero residual is the median of that noise, and training stayed
    there (measured on the demo's photographs: the rendered output stayed within 1e-4 of
    bilinear for 600 steps at lr 4e-4 and 1e-3, with the last MLP's hidden units dying). L2
    weighs each pixel by its error, so the edges drive the first steps and the residual grows
    (to ~0.01 mean absolute in 100 steps); L1 then takes over, as in the published recipe."""
    kind = "l2" if step < section.l2_steps else section.loss
    p, t = pred.float(), target.float()
    if kind == "l1":
        loss = F.l1_loss(p, t)
        return loss, loss.detach()
    return F.mse_loss(p, t), F.l1_loss(p.detach(), t)


class EMA:
    """Exponential moving average of a model's weights: `ema = d * ema + (1 - d) * weights`.

    The decay ramps up as `min(decay, (1 + n) / (10 + n))` after n updates, so the average is
    not dominated by the random initialisation in short runs (a plain 0.999 would still be 37%
    initial weights after 1000 steps). Buffers are copied, not averaged. `module` is a frozen
    copy in eval mode, used for validation and saved beside the raw weights.
    """

    def __init__(self, model: nn.Module, decay: float, *, ramp: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.ramp = ramp
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.ramp else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold `model`'s current weights into the average (call after `optimizer.step()`)."""
        d = self.current_decay()
        ema_p, new_p = [], []
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            if e.is_floating_point():
                ema_p.append(e)
                new_p.append(p.detach())
            else:
                e.copy_(p)
        if ema_p:
            torch._foreach_lerp_(ema_p, new_p, 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": torch.tensor(self.updates),
                "decay": torch.tensor(self.decay, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"], strict=True)
        self.updates = int(state["updates"])
