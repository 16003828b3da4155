"""The FLOPs a benchmark run's training loop executes, counted by torch's own FlopCounterMode: every matmul
(linear layers, LM head, value / score heads) and attention kernel, forward and backward, as dispatched, so
work a side skips is not counted and work it repeats is. Elementwise ops, softmaxes and the optimizer are
not counted (a few percent at these sizes, on both sides alike).

Used by ours.py, trl_side.py, trl_ppo.py and trl_grpo.py with `--flops`: a separate, untimed run of the same
cell (the counter's dispatch slows the run down).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import (FlopCounterMode, register_flop_formula, sdpa_backward_flop_count,
                                     sdpa_flop_count)

aten = torch.ops.aten

# torch counts its CUDA attention kernels only; the CPU one is the same computation. Both sides count it as
# full (not causal-halved) attention, as torch's formula does.
@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def counter() -> FlopCounterMode:
    """A context that counts the FLOPs run inside it (`.get_total_flops()`), quietly."""
    return FlopCounterMode(display=False)
