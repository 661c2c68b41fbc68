"""The PASS hypernetwork: prompt encoder -> recurrent walk over the groups -> per-group channel scores.

Step i of the walk reads a fixed-size summary of group i, whatever its width:
  * the weight statistics of group i (mean |W| over c_in, k, k of the layers producing its channels,
    with input channels removed by the masks chosen earlier in the walk -- none removed where those keep no
    input: all-zero statistics have no spread to standardise by), standardised per group and
    summarised by ``QUANTILES`` quantiles -- the shape of the layer's magnitude distribution;
  * the kept fraction of the mask the walk gave group i-1 (straight-through, so gradients reach
    earlier steps), and the group's width relative to the widest group;
  * the prompt embedding (a three-layer CNN over the prompt image), which is also the initial hidden
    state; a learnable embedding is the initial cell state. Feeding the embedding at every step keeps
    the encoder's gradient alive: through the initial state alone it fades over a long walk.

The paper zero-pads every statistic vector to the widest group; on a network whose widest group has
1280 channels that makes the LSTM's input 2 x 1280 wide, and the hypernetwork 42 % the size of the
network it prunes. The summary keeps it at a few percent (the paper's 0.2-6 %).

Scores: unit u of group i scores
    s_iu = U_i[u] . (P h_i)  +  a(h_i) * z_iu  +  b(h_i)   (+ prior_i * log(stat_iu / mean stat_i))
where h_i is the walk's output at group i, P a shared projection to a small rank, U_i the group's own
low-rank unit embeddings (the "head" of group i), z_iu the unit's standardised statistic, and a, b a
shared linear map of h_i: how much group i trusts magnitude, and how many of its units it keeps under
the global threshold. The optional prior (``use_prior``) adds the hand-made log-magnitude ranking with
a learned per-group gain, so that a short search starts from a magnitude ranking; without it every
part of the score is learned (the paper's setting), and a(h) starts at 1 with small embeddings, so the
walk still starts from the magnitude ranking within each group and learns away from it: a(h) is a
learned constant (starting at 1) plus ``magnitude_pace`` times a learned read of h. At full pace a(h)
moves tens of times faster than one parameter such as the prior's gain (under Adam each of its weights
moves by about the learning rate per step), and while the budget tightened the gradients wiped the
ranking out (a: 1 -> 0.1-0.3 within 60 steps) before the search had learned anything in its place.

Scales across groups (``scores``): ``"raw"`` (the default) ranks the sums above as they are; ``"group"``
standardises the within-group part (everything but b) per group and adds a learned offset b(h_i), so
every group starts from the same distribution (a uniform allocation) and how many units it keeps is
learned explicitly. Raw scores of different groups are not comparable, and a group whose scores are
flat can fall to its floor in one step; on Lite0 at 10 % MACs, however, "group" did not learn better
(held-out training images, seed 0: with the prior, stage-1 loss 1.64 against 1.50 on Fashion-MNIST and
1.87 against 1.41 on scikit-learn digits), so it stays an option; ``--max-prune-ratio`` is the guard
against collapse.

Budget-conditioned (``budget_range``): the log of the step's budget, as a fraction of the dense cost, is
one more input of every step, so one hypernetwork scores the units for any budget in the range it was
searched over (``search.budget_family``): a family of pruned networks from one search.

While walking, the mask of group i is a *provisional* one: scores above the threshold of the global
selection at the current step's budget (see ``search.MaskedSearchModel``). The final masks come from
the global budgeted selection over all scores (``pass_zoo.graph.masks.select_units``), which needs every
group's scores first.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from ...config import HYPERNET_CORES
from ...errors import PassZooError, one_line
from ...fileio import json_bytes

QUANTILES = 16
SCORE_SCALES = ("group", "raw")  # see "Scales across groups" above

class PromptEncoder(nn.Module):
    """Three convolutions + global pooling: prompt image -> vector of the hypernetwork's hidden size.

    Two fixed coordinate channels ride along with the image: a prompt starts at zero, and a
    convolution over an all-zero input gets no weight gradient.
    """

    def __init__(self, hidden: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(5, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, hidden, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, prompt_image: torch.Tensor) -> torch.Tensor:
        _, h, w = prompt_image.shape
        ys = torch.linspace(-1, 1, h, device=prompt_image.device, dtype=prompt_image.dtype)
        xs = torch.linspace(-1, 1, w, device=prompt_image.device, dtype=prompt_image.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))
        return self.net(torch.cat([prompt_image, coords]).unsqueeze(0)).squeeze(0)


class _LSTMCore(nn.Module):
    """Recurrent core (the paper's): state carries from group to group."""

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.cell = nn.LSTMCell(in_size, hidden)

    def forward(self, x, state):
        h, c = self.cell(x.unsqueeze(0), (state[0].unsqueeze(0), state[1].unsqueeze(0)))
        return h.squeeze(0), (h.squeeze(0), c.squeeze(0))


class _MLPCore(nn.Module):
    """Ablation: no recurrence; each step sees its own input (which includes the prompt embedding)."""

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self, x, state):
        return self.net(x), state


class _ConvCore(nn.Module):
    """Ablation: a 1-D CNN over the step's input vector, no recurrence."""

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(16))
        self.proj = nn.Linear(8 * 16, hidden)

    def forward(self, x, state):
        return torch.tanh(self.proj(self.conv(x.view(1, 1, -1)).flatten())), state


CORES = dict(zip(HYPERNET_CORES, (_LSTMCore, _MLPCore, _ConvCore)))  # the settings name them, in this order


class _UnitHead(nn.Module):
    """Group i's head: low-rank unit embeddings (units x rank) and a bias per unit."""

    def __init__(self, units: int, rank: int, init_std: Optional[float]):
        super().__init__()
        std = init_std if init_std is not None else rank ** -0.5
        self.embed = nn.Parameter(torch.randn(units, rank) * std)
        self.bias = nn.Parameter(torch.zeros(units))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.embed @ code + self.bias


def _standardise(v: torch.Tensor) -> torch.Tensor:
    if v.numel() < 2:  # nothing to rank; zero, but still in the graph (distributed training wants every parameter used)
        return v - v.detach()
    return (v - v.mean()) / (v.std() + 1e-8)


def _log_ratio(v: torch.Tensor) -> torch.Tensor:
    v = v.clamp_min(0) + 1e-12
    return torch.log(v / v.mean())


class PassHyperNetwork(nn.Module):
    """Maps (prompt image, weight statistics) to one score vector per group, in walk order."""

    def __init__(self, units: Sequence[int], hidden: int = 64, core: str = "lstm",
                 use_prompt: bool = True, use_weights: bool = True, use_prior: bool = True, rank: int = 8,
                 scores: str = "raw", budget_range: Optional[Sequence[float]] = None,
                 magnitude_pace: float = 0.1):
        super().__init__()
        # (lowest, highest) budget fraction it was searched over, or None: not budget-conditioned
        self.budget_range = None if budget_range is None else [float(b) for b in budget_range]
        if core not in CORES:
            raise ValueError(f"unknown hypernetwork core '{core}' (choose from {', '.join(CORES)})")
        if scores not in SCORE_SCALES:
            raise ValueError(f"unknown hypernetwork scores '{scores}' (choose from {', '.join(SCORE_SCALES)})")
        self.scores = scores
        self.units = [int(u) for u in units]
        self.core_name = core
        self.max_units = max(self.units)
        self.hidden, self.rank = hidden, rank
        self.use_prompt, self.use_weights = use_prompt, use_weights
        self.use_prior = use_prior and use_weights
        # Only parameters that take part in the forward pass exist (distributed training requires it).
        if use_prompt:
            self.encoder = PromptEncoder(hidden)
        else:
            self.h0 = nn.Parameter(torch.zeros(hidden))  # ablation: a learned initial state, no prompt
        if core == "lstm":
            self.c0 = nn.Parameter(torch.zeros(hidden))  # the learnable embedding: initial cell state
        self.core = CORES[core](QUANTILES + 2 + hidden + (self.budget_range is not None), hidden)
        self.project = nn.Linear(hidden, rank)
        grouped = scores == "group"
        # The walk starts from the magnitude ranking with the prior, or (raw scores) through a(h) without it;
        # the unit embeddings then start small.
        magnitude_start = self.use_prior or (use_weights and not grouped)
        # without the prior, the part of a(h) read from h moves at this fraction of its rate (see above)
        self.magnitude_pace = float(magnitude_pace) if magnitude_start and not self.use_prior else 1.0
        self.heads = nn.ModuleList(_UnitHead(u, rank, 0.01 if magnitude_start else None) for u in self.units)
        if use_weights:  # per group: weight on the unit's own statistic (and, raw, the offset)
            self.gain = nn.Linear(hidden, 1 if grouped else 2)
        if grouped:  # per group: the offset of its standardised scores, i.e. how many units it keeps
            self.allocation = nn.Linear(hidden, 1)
            nn.init.zeros_(self.allocation.weight)
            nn.init.zeros_(self.allocation.bias)
        if self.use_prior:
            # The score starts as the magnitude ranking and the learned part starts small: a short search
            # then refines a sensible ranking instead of spending its steps undoing a random one.
            self.prior_gain = nn.Parameter(torch.ones(len(self.units)))
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.gain.bias)
        elif magnitude_start:
            # Without the prior the learned weight on the unit's own statistic starts at 1 (and the offsets
            # equal): the walk starts from the magnitude ranking within each group, but every part of it is
            # learned. From random scores a tight budget keeps channels that are dead on the new task, and
            # the head never gets below chance on them.
            nn.init.zeros_(self.gain.weight)
            with torch.no_grad():
                self.gain.bias.copy_(torch.tensor([1.0, 0.0]))
        self.register_buffer("levels", torch.linspace(0, 1, QUANTILES), persistent=False)
        width = torch.log(torch.tensor(self.units, dtype=torch.float) / self.max_units)
        self.register_buffer("width", width, persistent=False)
        # Raw-score threshold of the global selection at the current budget: the walk's provisional masks.
        self.register_buffer("threshold", torch.zeros(()))

    def config(self) -> dict:
        return {"units": self.units, "hidden": self.hidden, "core": self.core_name, "use_prompt": self.use_prompt,
                "use_weights": self.use_weights, "use_prior": self.use_prior, "rank": self.rank, "scores": self.scores,
                "budget_range": self.budget_range, "magnitude_pace": self.magnitude_pace}

    def forward(self, prompt_image: torch.Tensor,
                stats_fn: Callable[[int, List[Optional[torch.Tensor]]], torch.Tensor],
                budget: Optional[float] = None) -> List[torch.Tensor]:
        """``budget``: the fraction of the dense cost the scores are for (budget-conditioned only)."""
        embedding = self.encoder(prompt_image) if self.use_prompt else self.h0
        dev, dtype = embedding.device, embedding.dtype
        extra = []
        if self.budget_range is not None:
            if budget is None:
                raise ValueError("a budget-conditioned hypernetwork needs the budget it scores for")
            extra = [torch.full((1,), math.log(float(budget)), device=dev, dtype=dtype)]
        state = (embedding, self.c0 if hasattr(self, "c0") else None)
        prev_kept = torch.ones((), device=dev, dtype=dtype)
        scores: List[torch.Tensor] = []
        provisional: List[Optional[torch.Tensor]] = []
        for i, units in enumerate(self.units):
            if self.use_weights:
                raw = stats_fn(i, provisional).to(dev, dtype)
                z = _standardise(raw)
                summary = torch.quantile(z, self.levels.to(dev, dtype))
            else:
                summary = torch.zeros(QUANTILES, device=dev, dtype=dtype)
            step_in = torch.cat([summary, prev_kept.view(1), self.width[i].view(1).to(dev, dtype), embedding, *extra])
            out, state = self.core(step_in, state)
            s = self.heads[i](self.project(out))
            if self.use_weights:
                a, *b = self.gain(out)
                if self.magnitude_pace != 1.0:
                    a = self.magnitude_pace * (a - self.gain.bias[0]) + self.gain.bias[0]
                s = s + a * z + (b[0] if b else 0.0)
            if self.use_prior:
                s = s + self.prior_gain[i] * _log_ratio(raw.detach())
            if self.scores == "group":
                s = _standardise(s) + self.allocation(out)
            scores.append(s)
            hard = (s.detach() > self.threshold).to(s.dtype)
            mask = hard + s - s.detach()  # straight-through: gradients pass the threshold unchanged
            provisional.append(mask)
            prev_kept = mask.mean()
        return scores


def hypernet_files(hypernet: PassHyperNetwork) -> dict:
    """``{"hypernet.safetensors", "hypernet.json"}`` contents: the weights and what rebuilds them."""
    from safetensors.torch import save as st_save


    state = {k: v.detach().contiguous().cpu() for k, v in hypernet.state_dict().items()}
    return {"hypernet.safetensors": st_save(state), "hypernet.json": json_bytes(hypernet.config())}


def hypernet_from_files(files: dict) -> PassHyperNetwork:
    """The inverse of ``hypernet_files`` (strict; no pickle)."""
    import json

    from safetensors.torch import load

    config = json.loads(files["hypernet.json"])
    config.setdefault("scores", "raw")  # saved before the option existed: the unnormalised scores
    config.setdefault("budget_range", None)  # likewise: one budget
    config.setdefault("magnitude_pace", 1.0)  # likewise: a(h) read as it was learned
    net = PassHyperNetwork(**config)
    net.load_state_dict(load(files["hypernet.safetensors"]), strict=True)
    return net


def load_hypernet(folder) -> PassHyperNetwork:
    """Rebuild a saved hypernetwork (strict; no pickle)."""
    from pathlib import Path


    folder = Path(folder)
    cfg_path, weights = folder / "hypernet.json", folder / "hypernet.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise PassZooError(f"{folder} holds no PASS hypernetwork (hypernet.json + hypernet.safetensors)")
    try:
        net = hypernet_from_files({"hypernet.json": cfg_path.read_bytes(), "hypernet.safetensors": weights.read_bytes()})
    except Exception as exc:
        raise PassZooError(f"cannot load the hypernetwork in {folder}: {one_line(exc)}") from exc
    return net.eval()
