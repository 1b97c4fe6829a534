"""Router auxiliary losses, the auto-scaler that puts them in the backward pass, and the
loss-free balancing bias rule.

Load-balancing loss (Switch Transformer, arXiv 2101.03961; GShard)::

    L_lb = E · Σ_e f_e · P_e

- ``P_e`` = mean over tokens of the router probability of expert e (softmax scores; for sigmoid
  routing, the sigmoid scores renormalised to sum to 1 per token, as in DeepSeek-V3);
- ``f_e`` = fraction of routed assignments that went to e. Frameworks disagree on its denominator:

  * ``normalization="megatron"`` (default, Megatron-Core's ``switch_load_balancing_loss_func``):
    ``f_e = n_e / (T·k)``, so perfectly balanced routing gives ``L_lb = 1`` for any k;
  * ``normalization="mixtral"`` (Hugging Face Mixtral's ``load_balancing_loss_func``):
    ``f_e = n_e / T``, so balanced routing gives ``L_lb = k``.

Variants: per micro-batch (all T tokens at once), per sequence (f and P per sequence, the loss
averaged over sequences — DeepSeek-V3's sequence-wise balance loss) and global (``f`` from counts
summed over a process group — e.g. all data-parallel ranks — with P kept local).

Router z-loss (ST-MoE, arXiv 2202.08906): ``L_z = mean_t (logsumexp_e logits[t, e])²``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_int, check_tensor
from .ops.routing_stats import routing_stats

NORMALIZATIONS = ("megatron", "mixtral")


def load_balancing_loss_from_stats(
    tokens_per_expert: Tensor, prob_mean: Tensor, top_k: int, *, normalization: str = "megatron"
) -> Tensor:
    """``mean_s E · Σ_e f_{s,e} · P_{s,e}`` from ``routing_stats`` output (``[S, E]`` each).

    ``f = n / Σ_e n`` (= n / (T·k)) for "megatron"; times k (= n / T) for "mixtral".
    """
    check_choice("load_balancing_loss", "normalization", normalization, NORMALIZATIONS)
    num_experts = tokens_per_expert.shape[-1]
    counts = tokens_per_expert.to(prob_mean.dtype)
    fraction = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    if normalization == "mixtral":
        fraction = fraction * top_k
    return num_experts * (fraction * prob_mean).sum(dim=-1).mean()


def load_balancing_loss(
    probs: Tensor,
    expert_idx: Tensor,
    *,
    coeff: float = 1.0,
    normalization: str = "megatron",
    num_sequences: int = 1,
    group: Optional["dist.ProcessGroup"] = None,
) -> Tensor:
    """The Switch/GShard load-balancing loss, ``coeff · E · Σ_e f_e · P_e`` (see the module docstring).

    Args:
        probs: ``[T, E]`` router probabilities (rows sum to 1).
        expert_idx: ``[T, k]`` chosen experts.
        coeff: multiplies the loss (1 returns the bare loss).
        normalization: "megatron" (balanced → 1, default) or "mixtral" (balanced → k).
        num_sequences: > 1 splits the T tokens into that many equal consecutive sequences and
            averages the per-sequence losses.
        group: if given, the token counts are all-reduced over this process group (global-batch
            variant); probabilities stay local, so gradients need no communication.

    Returns:
        A scalar tensor (0 for an empty batch).
    """
    where = "load_balancing_loss"
    check_tensor(where, "probs", probs, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, None))
    check_tensor(where, "expert_idx", expert_idx, ndim=2, dtypes=INDEX_DTYPES, shape=(probs.shape[0], None), device=probs.device)
    check_choice(where, "normalization", normalization, NORMALIZATIONS)
    check_int(where, "num_sequences", num_sequences, low=1)
    if isinstance(probs.shape[0], int) and probs.shape[0] % num_sequences:
        raise ValueError(f"{where}: `num_sequences`={num_sequences} must divide the number of tokens T={probs.shape[0]}")
    if not math.isfinite(coeff):
        raise ValueError(f"{where}: `coeff` must be finite, got {coeff}")
    if num_sequences > 1 and group is not None:
        raise ValueError(f"{where}: `num_sequences` > 1 (per-sequence) and `group` (global) are exclusive")
    tokens, prob_mean = routing_stats(probs, expert_idx, num_sequences)
    if group is not None:
        tokens = tokens.detach().clone()  # counts carry no gradient (and c10d's all_reduce has no autograd)
        dist.all_reduce(tokens, group=group)
    return coeff * load_balancing_loss_from_stats(tokens, prob_mean, expert_idx.shape[1], normalization=normalization)


def z_loss(logits: Tensor, coeff: float = 1.0) -> Tensor:
    """Router z-loss ``coeff · mean_t (logsumexp_e logits[t, e])²`` in fp32 (0 for an empty batch)."""
    check_tensor("z_loss", "logits", logits, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, None))
    if not math.isfinite(coeff):
        raise ValueError(f"z_loss: `coeff` must be finite, got {coeff}")
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return coeff * torch.logsumexp(logits.to(acc), dim=-1).square().mean()


# ---- aux losses inside backward (Megatron-Core's MoEAuxLossAutoScaler trick) -------------------
_aux_loss_scale = 1.0


def set_aux_loss_scale(scale: float) -> None:
    """Scale of the aux-loss gradient injected in backward (default 1).

    The auto-scaler acts as if ``aux_loss`` were added to the trainer's loss. When the trainer
    scales its loss before ``backward()`` — dividing by the number of gradient-accumulation
    micro-batches, or multiplying by an fp16 loss scale — set the same factor here so the aux
    gradient is scaled alike.
    """
    global _aux_loss_scale
    _aux_loss_scale = float(scale)


def get_aux_loss_scale() -> float:
    return _aux_loss_scale


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``output``; in backward, gives ``aux_loss`` the gradient ``scale``.

    Attaching the aux loss to the layer's output this way makes ``output.sum().backward()`` (or the
    trainer's loss) also back-propagate the aux loss, with no change to the training loop.
    """

    @staticmethod
    def forward(ctx, output: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(output: Tensor, aux_loss: Tensor) -> Tensor:
    """``output`` unchanged, with ``aux_loss`` riding along into the backward pass."""
    return AuxLossAutoScaler.apply(output, aux_loss, _aux_loss_scale)


# ---- loss-free balancing (DeepSeek-V3, arXiv 2412.19437 §2.1.2) ----------------------------------
def expert_bias_delta(tokens_per_expert: Tensor, rate: float) -> Tensor:
    """The bias update ``rate · sign(mean_load − load_e)``: overloaded experts go down by ``rate``,
    underloaded ones up, balanced ones stay. ``tokens_per_expert [E]`` are the counts since the last
    update (summed over micro-batches and, for data parallelism, over ranks)."""
    load = tokens_per_expert.float()
    return rate * torch.sign(load.mean() - load)
