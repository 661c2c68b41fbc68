"""The PASS hypernetwork: prompt encoder -> recurrent walk over the groups -> per-group channel scores.

Step i of the walk reads two things, both zero-padded to the widest group:
  * the weight statistics of group i (mean |W| over c_in, k, k of the layers producing its channels,
    with input channels removed by the masks chosen earlier in the walk), standardised per group;
  * the mask the walk gave group i-1 (straight-through, so gradients reach earlier steps).
The prompt, through a three-layer CNN, is the initial hidden state; a learnable embedding is the
initial cell state. One linear head per group maps the hidden state to that group's unit scores.

While walking, the mask of group i is a *provisional* one: scores above the threshold of the last
global selection. The final masks come from the global budgeted selection over all scores
(``pass_zoo.masks.select_units``), which needs every group's scores first.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class PromptEncoder(nn.Module):
    """Three convolutions + global pooling: prompt image -> vector of the hypernetwork's hidden size."""

    def __init__(self, hidden: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, hidden, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, prompt_image: torch.Tensor) -> torch.Tensor:
        return self.net(prompt_image.unsqueeze(0)).squeeze(0)


class _LSTMCore(nn.Module):
    """Recurrent core (the paper's): state carries from group to group."""

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.cell = nn.LSTMCell(in_size, hidden)

    def forward(self, x, state):
        h, c = self.cell(x.unsqueeze(0), (state[0].unsqueeze(0), state[1].unsqueeze(0)))
        return h.squeeze(0), (h.squeeze(0), c.squeeze(0))


class _MLPCore(nn.Module):
    """Ablation: no recurrence; each step sees its own input and the prompt embedding only."""

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_size + hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self, x, state):
        h = self.net(torch.cat([x, state[2]]))
        return h, state


class _ConvCore(nn.Module):
    """Ablation: a 1-D CNN over the input vector, no recurrence."""

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(32))
        self.proj = nn.Linear(8 * 32 + hidden, hidden)

    def forward(self, x, state):
        feat = self.conv(x.view(1, 2, -1)).flatten()
        return torch.tanh(self.proj(torch.cat([feat, state[2]]))), state


CORES = {"lstm": _LSTMCore, "mlp": _MLPCore, "cnn": _ConvCore}


def _pad(v: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(v, (0, n - v.numel()))


def _standardise(v: torch.Tensor) -> torch.Tensor:
    if v.numel() < 2:
        return torch.zeros_like(v)
    return (v - v.mean()) / (v.std() + 1e-8)


def _log_ratio(v: torch.Tensor) -> torch.Tensor:
    v = v.clamp_min(0) + 1e-12
    return torch.log(v / v.mean())


class PassHyperNetwork(nn.Module):
    """Maps (prompt image, weight statistics) to one score vector per group, in walk order."""

    def __init__(self, units: Sequence[int], hidden: int = 64, core: str = "lstm",
                 use_prompt: bool = True, use_weights: bool = True, use_prior: bool = True):
        super().__init__()
        if core not in CORES:
            raise ValueError(f"unknown hypernetwork core '{core}' (choose from {', '.join(CORES)})")
        self.units = [int(u) for u in units]
        self.core_name = core
        self.max_units = max(self.units)
        self.hidden = hidden
        self.use_prompt, self.use_weights = use_prompt, use_weights
        # Only parameters that take part in the forward pass exist (distributed training requires it).
        if use_prompt:
            self.encoder = PromptEncoder(hidden)
        else:
            self.h0 = nn.Parameter(torch.zeros(hidden))  # ablation: a learned initial state, no prompt
        if core == "lstm":
            self.c0 = nn.Parameter(torch.zeros(hidden))  # the learnable embedding: initial cell state
        self.core = CORES[core](2 * self.max_units, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, u) for u in self.units)
        self.use_prior = use_prior and use_weights
        if self.use_prior:
            # Magnitude prior: the score starts as log(stat / mean stat of the group), a scale-free
            # magnitude ranking that is comparable across groups, and the learned part starts small.
            # Without it the first masks are random and a short search spends its steps undoing that.
            self.prior_gain = nn.Parameter(torch.ones(len(self.units)))
            for head in self.heads:
                nn.init.normal_(head.weight, std=0.01)
                nn.init.zeros_(head.bias)
        # Raw-score threshold of the last global selection: the walk's provisional masks use it.
        self.register_buffer("threshold", torch.zeros(()))

    def config(self) -> dict:
        return {"units": self.units, "hidden": self.hidden, "core": self.core_name, "use_prompt": self.use_prompt,
                "use_weights": self.use_weights, "use_prior": self.use_prior}

    def forward(self, prompt_image: torch.Tensor,
                stats_fn: Callable[[int, List[Optional[torch.Tensor]]], torch.Tensor]) -> List[torch.Tensor]:
        n = self.max_units
        h = self.encoder(prompt_image) if self.use_prompt else self.h0
        state = (h, self.c0 if hasattr(self, "c0") else None, h)
        prev = torch.zeros(n, device=h.device)
        scores: List[torch.Tensor] = []
        provisional: List[Optional[torch.Tensor]] = []
        for i, units in enumerate(self.units):
            if self.use_weights:
                raw = stats_fn(i, provisional).to(h.device, h.dtype)
                stats = _standardise(raw)
            else:
                stats = torch.zeros(units, device=h.device)
            out, state = self.core(torch.cat([_pad(stats, n), prev]), state)
            s = self.heads[i](out)
            if self.use_prior:
                s = s + self.prior_gain[i] * _log_ratio(raw.detach())
            scores.append(s)
            hard = (s.detach() > self.threshold).to(s.dtype)
            mask = hard + s - s.detach()  # straight-through: gradients pass the threshold unchanged
            provisional.append(mask)
            prev = _pad(mask, n)
        return scores


def save_hypernet(hypernet: PassHyperNetwork, folder) -> None:
    """``hypernet.safetensors`` + ``hypernet.json`` (what rebuilds it), written atomically."""
    from pathlib import Path

    from safetensors.torch import save as st_save

    from .runio import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in hypernet.state_dict().items()}
    atomic_write_bytes(folder / "hypernet.safetensors", st_save(state))
    atomic_write_json(folder / "hypernet.json", hypernet.config())


def load_hypernet(folder) -> PassHyperNetwork:
    """Rebuild a saved hypernetwork (strict; no pickle)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from .errors import PassZooError

    folder = Path(folder)
    cfg_path, weights = folder / "hypernet.json", folder / "hypernet.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise PassZooError(f"{folder} holds no PASS hypernetwork (hypernet.json + hypernet.safetensors)")
    try:
        net = PassHyperNetwork(**json.loads(cfg_path.read_text()))
        net.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as exc:
        raise PassZooError(f"cannot load the hypernetwork in {folder}: {str(exc).splitlines()[0]}") from exc
    return net.eval()
