"""Visual prompts: a learnable input-space perturbation shared by every image of the task.

Both prompts act on the *normalised* image (after timm's mean/std) and apply no clamp, so the
prompt is an exact affine map of the input and travels inside the exported model (timm and ONNX).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdditivePrompt(nn.Module):
    """A learnable frame of ``width`` pixels added onto the image border (the paper's best prompt)."""

    kind = "additive"

    def __init__(self, img_size: int, width: int = 8):
        super().__init__()
        if not 0 <= 2 * width <= img_size:
            raise ValueError(f"prompt width {width} does not fit an image of {img_size} px")
        self.img_size, self.width = img_size, width
        self.delta = nn.Parameter(torch.zeros(3, img_size, img_size))
        frame = torch.ones(1, img_size, img_size)
        if width:
            frame[:, width:img_size - width, width:img_size - width] = 0
        else:
            frame.zero_()
        self.register_buffer("frame", frame, persistent=False)  # derivable from width

    def image(self) -> torch.Tensor:
        """The prompt as an image (what the prompt encoder reads)."""
        return self.delta * self.frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.image().unsqueeze(0).to(x.dtype)


class PadPrompt(nn.Module):
    """Expansive prompt: the image is shrunk into the centre of a learnable canvas (VPNs' pad prompt)."""

    kind = "pad"

    def __init__(self, img_size: int, width: int = 8):
        super().__init__()
        if not 0 < 2 * width < img_size:
            raise ValueError(f"pad width {width} does not fit an image of {img_size} px")
        self.img_size, self.width = img_size, width
        self.delta = nn.Parameter(torch.zeros(3, img_size, img_size))
        frame = torch.ones(1, img_size, img_size)
        frame[:, width:img_size - width, width:img_size - width] = 0
        self.register_buffer("frame", frame, persistent=False)  # derivable from width

    def image(self) -> torch.Tensor:
        return self.delta * self.frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.img_size - 2 * self.width
        x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False, antialias=False)
        x = F.pad(x, [self.width] * 4)
        return x + self.image().unsqueeze(0).to(x.dtype)


PROMPTS = {"additive": AdditivePrompt, "pad": PadPrompt}


def create_prompt(kind: str, img_size: int, width: int) -> nn.Module:
    if kind not in PROMPTS:
        raise ValueError(f"unknown prompt '{kind}' (choose from {', '.join(PROMPTS)})")
    return PROMPTS[kind](img_size, width)


def default_prompt_width(img_size: int) -> int:
    """16 px at 224, scaled with the input size (the paper's frame)."""
    return max(1, round(img_size * 16 / 224))


class PromptedModel(nn.Module):
    """prompt -> network: the unit that is fine-tuned, evaluated and exported."""

    def __init__(self, model: nn.Module, prompt: nn.Module):
        super().__init__()
        self.prompt = prompt
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prompt(x))
