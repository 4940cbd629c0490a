"""S2FT's gradient selection: score every input column of the output modules on a few calibration batches.

The score of logical input column ``j`` (a head's column, or an FFN channel) of a module is the
squared norm of that column of the weight gradient, summed over the batches:
``sum_b ||dW_b[:, j]||^2`` with ``dW_b = dY_b^T X_b`` of batch ``b``'s mean loss. Each module's ``dW``
is formed in its backward, scored, and dropped (one dense matrix at a time, as SFT's "ag" window does).
Under DDP/FSDP the scores of every rank's batches are summed, so every rank chooses the same.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ...sparse.distributed import all_reduce_sum_, world_size


def gradient_column_scores(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``{name: scores [in]}`` for each of ``modules`` (layers of ``model``) over ``batches`` of model inputs with labels.

    Runs forward and backward on each batch; leaves no gradient behind on ``model``'s parameters.

    Example:
        >>> batches = [{"input_ids": ids, "labels": ids}]  # doctest: +SKIP
        >>> scores = gradient_column_scores(model, {"model.layers.0.mlp.down_proj": layer}, batches)  # doctest: +SKIP
    """
    scores: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs[name] = args[0].detach()
        if output.requires_grad:
            output.register_hook(lambda grad_output: add_scores(name, grad_output))

    def add_scores(name: str, grad_output: torch.Tensor) -> None:
        x = inputs.pop(name)
        gradient = grad_output.reshape(-1, grad_output.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        column_scores = gradient.square_().sum(0)  # [in]
        scores[name] = scores[name] + column_scores if name in scores else column_scores

    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: keep_input(name, module, args, output))
        for name, module in modules.items()
    ]
    try:
        for batch in tqdm(batches, desc="S2FT gradient selection", unit="batch", disable=world_size() > 1):
            model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    missing = sorted(set(modules) - set(scores))
    if missing:
        raise ValueError(f"batches must reach every S2FT module with a gradient; no gradient reached {missing[:3]}")
    for column_scores in scores.values():
        all_reduce_sum_(column_scores)
    return scores
