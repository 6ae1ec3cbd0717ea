"""How the per-task losses become one training step: equal (static) weights, uncertainty
weighting (Kendall et al., CVPR 2018), GradNorm (Chen et al., ICML 2018), PCGrad (Yu et al.,
NeurIPS 2020). Selected by `TrainConfig.loss_balance`.

A balancer's `backward(losses, model)` fills the parameters' `.grad` for one step and returns
the statically weighted loss (sum_t w_t L_t) for the curves, so runs with different balancers
log comparable numbers. The balancers other than `equal` work on one process only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from training.model import MultiTaskModel

LossBalance = Literal["equal", "uncertainty", "gradnorm", "pcgrad"]


class LossBalancer(nn.Module):
    """Equal (static) weights: backpropagate sum_t w_t L_t."""

    weights: Tensor

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.clone())  # (T,) the static weights

    def backward(self, losses: Tensor, model: MultiTaskModel) -> Tensor:
        loss = (losses * self.weights).sum()
        loss.backward()
        return loss.detach()

    def after_step(self) -> None:
        """Called after the optimizer step (GradNorm updates its weights there)."""

    def task_weights(self) -> list[float]:
        """The effective weight of each task's loss now."""
        return [float(w) for w in self.weights]


class UncertaintyWeighting(LossBalancer):
    """Kendall et al.: a learned log-variance s_t per task, loss = sum_t w_t (exp(-s_t) L_t +
    s_t / 2) (the classification form, 1/sigma^2 L + log sigma). The s_t are trained by the
    model's optimizer (`fit` adds them as a parameter group without weight decay)."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__(weights)
        self.log_var = nn.Parameter(torch.zeros_like(weights))  # (T,)

    def backward(self, losses: Tensor, model: MultiTaskModel) -> Tensor:
        balanced = self.weights * (torch.exp(-self.log_var) * losses + 0.5 * self.log_var)
        balanced.sum().backward()
        return (losses * self.weights).sum().detach()

    def task_weights(self) -> list[float]:
        return [float(w) for w in self.weights * torch.exp(-self.log_var.detach())]


class GradNorm(LossBalancer):
    """Chen et al.: task weights w_t (sum T) trained so that the gradient norm of w_t L_t on
    the last shared layer tracks mean_t(G) * r_t^alpha, r_t the task's relative inverse
    training rate (L_t / L_t(0), over its mean). The weights have their own Adam."""

    initial: Tensor

    def __init__(self, weights: Tensor, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(weights)
        self.alpha = alpha
        self.w = nn.Parameter(torch.ones_like(weights))  # (T,)
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self.register_buffer("initial", torch.zeros_like(weights))  # L_t at the first step

    def backward(self, losses: Tensor, model: MultiTaskModel) -> Tensor:
        if not bool((self.initial > 0).all()):
            self.initial.copy_(losses.detach().clamp_min(1e-8))
        static = losses * self.weights  # (T,)
        layer = model.gradnorm_layer()
        norms = torch.stack([
            torch.autograd.grad(static[t], layer, retain_graph=True)[0].norm()
            for t in range(len(losses))
        ]).detach()  # (T,) ||grad_W L_t||
        g = self.w * norms  # (T,) ||grad_W w_t L_t||, differentiable in w
        ratio = losses.detach() / self.initial
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()  # (T,)
        self.opt.zero_grad(set_to_none=True)
        (g - target).abs().sum().backward(inputs=[self.w])
        (self.w.detach() * static).sum().backward()  # the model's gradient
        return static.sum().detach()

    def after_step(self) -> None:
        self.opt.step()
        with torch.no_grad():  # renormalise: sum_t w_t = T, each > 0
            self.w.clamp_(min=1e-3)
            self.w.mul_(len(self.w) / self.w.sum())

    def task_weights(self) -> list[float]:
        return [float(w) for w in self.weights * self.w.detach()]


def pcgrad_project(grads: list[Tensor], gen: torch.Generator | None = None) -> list[Tensor]:
    """Yu et al.: for each task's flat gradient g_i, in a random order of the other tasks j,
    if g_i . g_j < 0 remove g_i's component along g_j (using the original g_j)."""
    out = []
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        order = torch.randperm(len(others), generator=gen).tolist()
        for j in (others[k] for k in order):
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / grads[j].dot(grads[j]).clamp_min(1e-20) * grads[j]
        out.append(g)
    return out


class PCGrad(LossBalancer):
    """Yu et al.: per-task gradients over every parameter, conflicting pairs projected, summed."""

    def __init__(self, weights: Tensor, seed: int = 0) -> None:
        super().__init__(weights)
        self.gen = torch.Generator().manual_seed(seed)

    def backward(self, losses: Tensor, model: MultiTaskModel) -> Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        static = losses * self.weights  # (T,)
        flat = []
        for t in range(len(losses)):
            gs = torch.autograd.grad(static[t], params, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(gs, params, strict=True)]))
        total = torch.stack(pcgrad_project(flat, self.gen)).sum(0)  # (P,)
        start = 0
        for p in params:
            n = p.numel()
            p.grad = total[start : start + n].view_as(p).clone()
            start += n
        return static.sum().detach()


def make_balancer(kind: str, weights: Tensor, *, alpha: float = 1.5,
                  seed: int = 0) -> LossBalancer:
    if kind == "equal":
        return LossBalancer(weights)
    if kind == "uncertainty":
        return UncertaintyWeighting(weights)
    if kind == "gradnorm":
        return GradNorm(weights, alpha=alpha)
    if kind == "pcgrad":
        return PCGrad(weights, seed=seed)
    raise ValueError(f"unknown loss balance {kind!r}: equal, uncertainty, gradnorm or pcgrad")
