"""One training step and one validation pass: the loss, gradient accumulation, clipping, the update.

These are the app's only copies: benchmarks and test workers call them too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the step was not applied."""


def sequence_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence of `batch` `[B, T + 1]` (inputs [:, :-1], targets [:, 1:]),
    in float32 at least, whatever the model's precision: shape `[B]`."""
    logits = model(batch[:, :-1])
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    losses = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
    return losses.view(batch.shape[0], -1).mean(1)


def batch_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` `[B, T + 1]` (every sequence holds T targets)."""
    return sequence_losses(model, batch).mean()


def forward_backward(fabric, model, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """Forward/backward over the micro-batches of one step; returns this rank's mean loss (detached).

    Each micro loss is divided by the number of micro-batches, so the summed gradients equal those of one
    batch holding all of them (all have the same token count). Gradient sync (DDP all-reduce, FSDP
    reduce-scatter) happens on the last micro-batch only.
    """
    n = len(micro_batches)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=i < n - 1):
            loss = batch_loss(model, batch)
            fabric.backward(loss / n)
        total = total + loss.detach()
    return total / n


@dataclass
class StepResult:
    loss: float        # mean over all ranks and micro-batches
    grad_norm: float   # global, before clipping


def train_step(fabric, model, optimizer, micro_batches: list[torch.Tensor], grad_clip: float) -> StepResult:
    """forward/backward, clip, one optimizer step. Raises NonFiniteLossError (gradients dropped, weights
    untouched) when the loss or the gradient norm is NaN/inf on any rank."""
    loss = forward_backward(fabric, model, micro_batches)
    norm = fabric.clip_gradients(model, optimizer, max_norm=grad_clip or math.inf, error_if_nonfinite=False)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    loss_v, norm_v = fabric.all_reduce(torch.stack([loss.double(), norm.to(loss.device).double()]),
                                       reduce_op="mean").tolist()
    if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss {loss_v}, grad norm {norm_v}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_v, norm_v)


@torch.no_grad()
def validate(fabric, model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over the validation sequences of all ranks: `batches` are (tokens, weights) pairs, weight 0
    marking a padding row (every rank runs the same number of forward passes, as FSDP requires)."""
    model.eval()
    total = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    for tokens, weights in batches:
        losses = sequence_losses(model, fabric.to_device(tokens)).double()
        weights = fabric.to_device(weights).double()
        total += torch.stack([(losses * weights).sum(), weights.sum()])
    model.train()
    total = fabric.all_reduce(total, reduce_op="sum")
    return float(total[0] / total[1])
