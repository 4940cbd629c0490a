"""Remap the block-wise 8-bit optimizer state of bitsandbytes (``Adam8bit``, ``AdamW8bit``, ``PagedAdamW8bit``, ...).

bitsandbytes keeps each 8-bit moment as ``state<n>`` (uint8 codes, the parameter's shape, or
``[2, *shape]`` for AdEMAMix's two momenta), ``absmax<n>`` (float32, one scale per block of
consecutive entries) and ``qmap<n>`` (the 256 code values: signed for ``state1``, unsigned for
``state2``); an entry is ``qmap[code] * absmax[block]``. Codes mean nothing outside their block,
and code 0 is not zero (it is -0.993 in the signed map), so the moments are remapped in float32
and quantized again.
"""

from __future__ import annotations

import torch

# The block sizes bitsandbytes' block-wise kernels accept. Its optimizers do not expose theirs
# (0.50 uses 256, older releases 2048), so it is read off the number of absmax blocks.
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def blockwise_quantized_states(state: dict) -> dict[str, tuple[str, str]]:
    """``{"state1": ("absmax1", "qmap1"), ...}``: the 8-bit moments in one parameter's optimizer state."""
    quantized = {}
    for name, value in state.items():
        if not (name.startswith("state") and torch.is_tensor(value) and value.dtype == torch.uint8):
            continue
        suffix = name[len("state") :]
        scales = (f"absmax{suffix}", f"qmap{suffix}")
        missing = [key for key in scales if key not in state]
        if missing:
            raise ValueError(
                f"optimizer state '{name}' is 8-bit without {missing}: only block-wise 8-bit state "
                f"(state<n>, absmax<n>, qmap<n>, as bitsandbytes' 8-bit optimizers keep it) can follow remapped slots"
            )
        quantized[name] = scales
    return quantized


def blocksize_of(num_entries: int, num_blocks: int) -> int:
    """The block size that splits ``num_entries`` into ``num_blocks`` blocks.

    Unique when ``num_blocks > 1``; with one block every size >= ``num_entries`` quantizes alike.
    """
    for blocksize in BLOCKSIZES:
        if -(-num_entries // blocksize) == num_blocks:
            return blocksize
    raise ValueError(
        f"absmax must have ceil({num_entries} / blocksize) blocks for a blocksize in {BLOCKSIZES}, got {num_blocks}"
    )


@torch.no_grad()
def remap_blockwise_quantized(
    codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor, source_positions: torch.Tensor
) -> None:
    """Move one 8-bit moment to the new slots, writing its ``codes`` and ``absmax`` in place.

    ``codes`` [k] or [2, k] uint8, ``absmax`` [blocks] or [2, blocks], ``code_map`` [256] (left
    as it is: bitsandbytes shares it between parameters). ``source_positions`` [k]: old slot of
    each new slot, or -1 for a grown slot, whose moment becomes exactly 0.

    Blocks whose slots all stay where they were keep their codes and absmax bit for bit; the
    others are dequantized, remapped in float32 and quantized again with the same code map (one
    rounding, as in an optimizer step). The tensors keep their identity: paged optimizers
    allocate them in unified memory.
    """
    from bitsandbytes import functional as bnb_functional  # optional dependency

    num_slots = source_positions.numel()
    code_rows = codes.view(-1, num_slots)  # [rows, k]: rows = 2 for AdEMAMix's state1, else 1
    absmax_rows = absmax.view(code_rows.shape[0], -1)  # [rows, blocks]
    num_blocks = absmax_rows.shape[1]
    blocksize = blocksize_of(num_slots, num_blocks)

    slots = torch.arange(num_slots, device=source_positions.device)
    moved = torch.zeros(num_blocks * blocksize, dtype=torch.bool, device=source_positions.device)
    moved[:num_slots] = source_positions != slots
    changed_blocks = moved.view(num_blocks, blocksize).any(dim=1)  # [blocks]
    changed_slots = changed_blocks.repeat_interleave(blocksize)[:num_slots]  # [k]
    kept = source_positions >= 0
    gather_from = source_positions.clamp(min=0)
    zero_code = _zero_code(code_map)

    for row_codes, row_absmax in zip(code_rows, absmax_rows):
        moments = bnb_functional.dequantize_blockwise(row_codes, absmax=row_absmax, code=code_map, blocksize=blocksize)
        remapped = torch.where(kept, moments[gather_from], 0.0)
        new_codes, quant_state = bnb_functional.quantize_blockwise(remapped, code=code_map, blocksize=blocksize)
        # bnb's quantizer rounds 0 to a small non-zero code; grown slots start from exactly 0
        new_codes = torch.where(kept, new_codes, zero_code)
        row_codes.copy_(torch.where(changed_slots, new_codes, row_codes))
        row_absmax.copy_(torch.where(changed_blocks, quant_state.absmax, row_absmax))


def _zero_code(code_map: torch.Tensor) -> torch.Tensor:
    """The code whose value is exactly 0 (127 in the signed dynamic map, 0 in the unsigned one)."""
    zeros = (code_map == 0).nonzero().flatten()
    if zeros.numel() == 0:
        raise ValueError(
            f"qmap must contain the value 0.0 (grown slots start at zero), got a map from "
            f"{float(code_map.min())} to {float(code_map.max())} without it"
        )
    return zeros[0].to(torch.uint8)
