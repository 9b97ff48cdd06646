"""Pruning of Conv2d / Linear weights, in place, for the sparse operators to exploit.

Which layers are prunable (``_prunable``): every Conv2d with groups == 1 and every Linear,
except the first Conv2d in module order (the 3-channel stem: it has few weights and is
sensitive to pruning). Grouped/depthwise convs are left dense by default because their
weights are few and the sparse ops target dense-grouping convs. Biases are never pruned.

Layer weights are seen as matrices like ``fscnn_tvm.formats`` does: a conv weight
(O, I, KH, KW) as O rows x I*KH*KW columns in C order, a linear weight as itself. That is
the grid ``prune_blocks`` cuts into blocks, so its blocks are exactly the BSR blocks of
``formats.to_bsr`` with the same ``block``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn


class LayerSparsity(NamedTuple):
    name: str
    shape: tuple[int, ...]
    sparsity: float  # fraction of exact zeros in the weight after pruning


@dataclass
class PruneReport:
    layers: list[LayerSparsity] = field(default_factory=list)  # the pruned layers, in module order
    skipped: list[str] = field(default_factory=list)  # conv/linear layers deliberately left dense

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the weights of all pruned layers together."""
        numel = [math.prod(l.shape) for l in self.layers]
        total = sum(numel)
        return sum(n * l.sparsity for n, l in zip(numel, self.layers)) / total if total else 0.0

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)


def sparsity_of(tensor) -> float:
    """Fraction of exact zeros in ``tensor`` (0.0 for an empty tensor)."""
    t = torch.as_tensor(tensor)
    return 1.0 - torch.count_nonzero(t).item() / t.numel() if t.numel() else 0.0


def model_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the weights of *all* Conv2d and Linear layers (pruned or not)."""
    _check_model(model)
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in ws)
    return sum(w.numel() - torch.count_nonzero(w).item() for w in ws) / total if total else 0.0


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float, scope: str = "layer",
                    keep_first_conv_dense: bool = True, include_linear: bool = True,
                    skip_grouped: bool = True) -> PruneReport:
    """Unstructured magnitude pruning: zero the weights of smallest |w|.

    ``scope="layer"``: each prunable layer gets exactly ``round(sparsity * numel)`` zeros.
    ``scope="global"``: one threshold over all prunable layers together, which get exactly
    ``round(sparsity * total numel)`` zeros between them, unevenly spread.
    Ties at the threshold go to the lowest flat index (layers in module order for global), so
    the result is deterministic. Weights that are already zero count as the smallest; if a
    layer already has more zeros than its target, it keeps them.
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layers, skipped = _prunable(model, keep_first_conv_dense, include_linear, skip_grouped)
    ws = [m.weight for _, m in layers]
    if scope == "layer":
        budgets = [round(sparsity * w.numel()) for w in ws]
    else:
        budgets = _global_budgets(ws, sparsity)
    for w, k in zip(ws, budgets):
        w.masked_fill_(_smallest(w.abs().flatten(), k).view(w.shape), 0)
    return _report(layers, skipped)


@torch.no_grad()
def prune_blocks(model: nn.Module, sparsity: float, block=(4, 1), norm: str = "l2",
                 keep_first_conv_dense: bool = True, include_linear: bool = True,
                 skip_grouped: bool = True) -> PruneReport:
    """Block pruning, layer by layer: cut each weight matrix (see the module doc) into
    ``block = (bo, bi)`` blocks, rows x columns, and zero the ``round(sparsity * n_blocks)``
    blocks of smallest ``norm`` ("l2" or "l1"), ties to the lowest block index (row-major).

    When bo or bi does not divide the matrix, the edge blocks are padded with zeros, as BSR
    stores them; their norm is that of their real part, so ranking by L2 zeros the blocks
    whose removal costs the least Frobenius error, small edge blocks included. ``sparsity``
    is a fraction of blocks; the element sparsity of a layer differs when edge blocks go.
    """
    sparsity = _check_sparsity(sparsity)
    bo, bi = _check_block(block)
    if norm not in ("l2", "l1"):
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
    layers, skipped = _prunable(model, keep_first_conv_dense, include_linear, skip_grouped)
    for _, m in layers:
        w = m.weight
        mat = w.reshape(w.shape[0], -1)
        rows, cols = mat.shape
        nbo, nbi = -(-rows // bo), -(-cols // bi)
        padded = mat.new_zeros(nbo * bo, nbi * bi)
        padded[:rows, :cols] = mat
        blocks = padded.view(nbo, bo, nbi, bi)
        score = blocks.pow(2).sum((1, 3)) if norm == "l2" else blocks.abs().sum((1, 3))
        drop = _smallest(score.flatten(), round(sparsity * score.numel())).view(nbo, nbi)
        mask = drop.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
        w.masked_fill_(mask.reshape(w.shape), 0)
    return _report(layers, skipped)


# ---------------------------------------------------------------------------------- helpers

def prune_model(model: nn.Module, sparsity: float, mode: str = "layer", block=None) -> PruneReport:
    """Prune ``model`` in place as the tools' ``--prune`` names it: ``"layer"`` or ``"global"``
    magnitude pruning, or ``"block"`` (whole blocks, 8x1 unless ``block`` says otherwise)."""
    if mode == "block":
        return prune_blocks(model, sparsity, block=block or (8, 1))
    return prune_magnitude(model, sparsity, scope=mode)


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k smallest entries of 1-D ``scores``, ties to the lowest index.

    kthvalue + a tie pass instead of a stable argsort: the latter needs 8 bytes of index per
    weight, about 1 GB for VGG16's 103M-weight first Linear layer.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    t = scores.kthvalue(k).values
    mask = scores < t
    ties = (scores == t).nonzero().flatten()
    mask[ties[: k - int(mask.sum())]] = True
    return mask


def _global_budgets(ws: list[torch.Tensor], sparsity: float) -> list[int]:
    """Per-layer zero counts for one global magnitude threshold: all weights below it, plus
    weights equal to it in layer order until the total is round(sparsity * total numel)."""
    if not ws:
        return []
    k = round(sparsity * sum(w.numel() for w in ws))
    if k == 0:
        return [0] * len(ws)
    t = torch.cat([w.abs().flatten() for w in ws]).kthvalue(k).values
    below = [int((w.abs() < t).sum()) for w in ws]
    left = k - sum(below)
    budgets = []
    for w, b in zip(ws, below):
        eq = min(left, int((w.abs() == t).sum()))
        left -= eq
        budgets.append(b + eq)
    return budgets


def _prunable(model, keep_first_conv_dense, include_linear, skip_grouped):
    """``([(name, module) to prune], [names of conv/linear layers left dense])``."""
    _check_model(model)
    layers, skipped, seen_conv = [], [], False
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            first, seen_conv = not seen_conv, True
            if (first and keep_first_conv_dense) or (m.groups != 1 and skip_grouped):
                skipped.append(name)
                continue
        elif isinstance(m, nn.Linear):
            if not include_linear:
                skipped.append(name)
                continue
        else:
            continue
        layers.append((name, m))
    return layers, skipped


def _report(layers, skipped) -> PruneReport:
    return PruneReport([LayerSparsity(n, tuple(m.weight.shape), sparsity_of(m.weight)) for n, m in layers],
                       skipped)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a real number in [0, 1], got {sparsity!r}")
    if not 0.0 <= sparsity <= 1.0:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return float(sparsity)


def _check_block(block) -> tuple[int, int]:
    ok = (isinstance(block, (tuple, list)) and len(block) == 2
          and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0 for b in block))
    if not ok:
        raise ValueError(f"block must be a pair (rows, cols) of positive ints, got {block!r}")
    return int(block[0]), int(block[1])
