"""AdamW on FP32 master weights (moments FP32 or BF16) and the warm-up + cosine learning rate."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from dualflow.launcher.config import ConfigError, OneOf, Range, check_fields


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    moments_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_fields(self, "optim", lr=Range(gt=0), min_lr=Range(ge=0), warmup_steps=Range(ge=0),
                     weight_decay=Range(ge=0), beta1=Range(ge=0, lt=1), beta2=Range(ge=0, lt=1), eps=Range(gt=0),
                     grad_clip=Range(ge=0, note="0: no clipping"), moments_dtype=OneOf("float32", "bfloat16"))
        if self.min_lr > self.lr:
            raise ConfigError([f"optim.min_lr={self.min_lr} must not exceed optim.lr={self.lr}"],
                              "invalid optim config")


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over ``warmup_steps`` to ``lr``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class AdamW:
    """Decoupled-weight-decay Adam over named FP32 parameters.

    Only the parameters in ``owned`` (all by default) get optimizer state and updates: with ZeRO-1 each
    data-parallel rank owns a share and the owners broadcast the results. Matrices decay; vectors
    (norm weights) do not. State tensors are plain and named, so checkpoints address them directly.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: OptimConfig,
                 owned: Iterable[str] | None = None) -> None:
        self.cfg, self.params = cfg, params
        dtype = torch.bfloat16 if cfg.moments_dtype == "bfloat16" else torch.float32
        self.owned = list(params if owned is None else owned)
        for name in self.owned:
            if params[name].dtype != torch.float32:
                raise TypeError(f"{name}: master weights must be float32, got {params[name].dtype}")
        self.exp_avg = {n: torch.zeros_like(params[n], dtype=dtype) for n in self.owned}
        self.exp_avg_sq = {n: torch.zeros_like(params[n], dtype=dtype) for n in self.owned}
        self.steps = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def step(self, lr: float, grad_divisor: float | None = None) -> None:
        """One update at learning rate ``lr``, with every gradient divided by ``grad_divisor`` as it is read
        (gradient clipping, :func:`dualflow.train.parallel.clip_divisor`; None: as they are)."""
        self.steps += 1
        if self.fused_usable():
            self._fused_step(lr, grad_divisor)
        else:
            self.reference_step(lr, grad_divisor)

    def fused_usable(self) -> bool:
        """Whether :meth:`step` takes torch's fused AdamW kernel (FP32 moments: it has no BF16 ones)."""
        return self.cfg.moments_dtype == "float32" and hasattr(torch, "_fused_adamw_")

    def _fused_step(self, lr: float, grad_divisor: float | None) -> None:
        # one multi-tensor kernel per (device, decayed or not) group instead of ~10 passes per parameter;
        # the same update as reference_step (decoupled decay, bias corrections folded into the step size).
        # The clipping divisor is the kernel's grad_scale (it divides each gradient as it reads it, and
        # leaves the divided gradient behind): one pass over the gradients fewer than scaling them first
        c = self.cfg
        groups: dict[tuple[torch.device, bool], list[str]] = {}
        for name in self.owned:
            p = self.params[name]
            if p.grad is not None:
                groups.setdefault((p.device, p.ndim >= 2 and bool(c.weight_decay)), []).append(name)
        for (device, decay), names in groups.items():
            step = torch.full((), float(self.steps), dtype=torch.float32, device=device)
            divisor = None if grad_divisor is None else torch.full((), grad_divisor, dtype=torch.float32,
                                                                    device=device)
            torch._fused_adamw_([self.params[n] for n in names], [self.params[n].grad for n in names],
                                [self.exp_avg[n] for n in names], [self.exp_avg_sq[n] for n in names], [],
                                [step] * len(names), lr=lr, beta1=c.beta1, beta2=c.beta2,
                                weight_decay=c.weight_decay if decay else 0.0, eps=c.eps, amsgrad=False,
                                maximize=False, grad_scale=divisor)

    @torch.no_grad()
    def reference_step(self, lr: float, grad_divisor: float | None = None) -> None:
        """The update written out parameter by parameter (BF16 moments, and the tests' reference);
        ``steps`` must already count this step. Divided gradients are left behind, as the fused kernel does."""
        c = self.cfg
        divisors: dict[torch.device, torch.Tensor] = {}  # one FP32 divisor per device, made once
        t = int(self.steps)
        bc1, bc2 = 1 - c.beta1 ** t, 1 - c.beta2 ** t
        for name in self.owned:
            p = self.params[name]
            if p.grad is None:
                continue
            if grad_divisor is not None:
                if p.device not in divisors:
                    divisors[p.device] = torch.full((), grad_divisor, dtype=torch.float32, device=p.device)
                p.grad.copy_(p.grad.float() / divisors[p.device])
            g = p.grad.float()
            m = self.exp_avg[name].float().mul_(c.beta1).add_(g, alpha=1 - c.beta1)
            v = self.exp_avg_sq[name].float().mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
            if p.ndim >= 2 and c.weight_decay:
                p.mul_(1 - lr * c.weight_decay)
            p.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(c.eps), value=-lr)
            if m is not self.exp_avg[name]:  # BF16 moments: round the FP32 update back
                self.exp_avg[name].copy_(m)
                self.exp_avg_sq[name].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"step": self.steps}
        for n in self.owned:
            out[f"{n}.exp_avg"] = self.exp_avg[n]
            out[f"{n}.exp_avg_sq"] = self.exp_avg_sq[n]
        return out
