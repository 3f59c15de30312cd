"""Small ONNX models in an insightface model pack's layout, exported from torch, for tests.

No real insightface weights can be fetched here. These files have the inputs and outputs that
insightface's ``model_zoo.get_model`` inspects to pick a model class, so the real loading and
inference code runs on them:

- ``det_10g.onnx``: SCRFD's layout, input ``input.1`` (1, 3, H, W) with H and W free, nine
  rank-2 outputs: scores (n, 1), box distances (n, 4) and 5 keypoints (n, 10) for strides 8, 16
  and 32, two anchors per cell. Its weights are set by hand so that results can be checked: it
  fires (stride 32 only) where a window of 3 x 3 cells around an anchor is bright, and its box
  spans exactly that window, so a white square on a dark image is "a face";
- ``w600k_r50.onnx``: ArcFace's layout, (n, 3, 112, 112) -> (n, 512), random weights;
- ``genderage.onnx``: (1, 3, 96, 96) -> (1, 3); set by hand: gender "male" (index 1) for a
  bright crop and "female" for a dark one, age 0.30 (30 years after insightface's x100);
- ``1k3d68.onnx``: (1, 3, 192, 192) -> (1, 3309) (1103 points x 3), random weights.

``write_pack(..., batched=True)`` exports the detector with a batch axis on its input and
outputs ((b, 3, H, W) -> (b, n, 1), ...) and the gender/age model for any batch, as the GPU path
batches them (portrait/faces/batched.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16, 32)
ANCHORS = 2


class BrightWindowDetector(nn.Module):
    """SCRFD's outputs for a detector that finds bright 3x3-cell windows at stride 32."""

    # five points inside the box, in stride units from the anchor (the box is [-1, +2] strides)
    KEYPOINTS = (-0.1, 0.1, 1.1, 0.1, 0.5, 0.6, 0.0, 1.2, 1.0, 1.2)

    def __init__(self, batched: bool = False):
        super().__init__()
        self.batched = batched

    def forward(self, x):
        grey = x.mean(dim=1, keepdim=True)  # ~ +1 for white after insightface's normalisation
        scores, boxes, points = [], [], []
        for stride in STRIDES:
            # window [anchor - stride, anchor + 2 * stride): the same span as the box below
            window = F.avg_pool2d(grey, 3 * stride, stride=stride, padding=stride, count_include_pad=True)
            window = window[:, :, : x.shape[2] // stride, : x.shape[3] // stride]
            gain = 30.0 if stride == 32 else 0.0
            score = torch.sigmoid(gain * (window - 0.8) - (0.0 if stride == 32 else 30.0))
            flat = score.permute(0, 2, 3, 1).repeat(1, 1, 1, ANCHORS)
            flat = flat.reshape(x.shape[0], -1, 1) if self.batched else flat.reshape(-1, 1)
            scores.append(flat)
            boxes.append(flat * 0 + torch.tensor([[1.0, 1.0, 2.0, 2.0]]))
            points.append(flat * 0 + torch.tensor([self.KEYPOINTS]))
        return (*scores, *boxes, *points)


class RandomEmbedder(nn.Module):
    def __init__(self, size: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.fc = nn.Linear(16 * (size // 8) ** 2, out)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class BrightnessGenderAge(nn.Module):
    def forward(self, x):
        m = x.mean(dim=(1, 2, 3)).reshape(-1, 1)
        return torch.cat([-m, m, m * 0 + 0.30], dim=1)


def _export(model: nn.Module, example: torch.Tensor, path: Path, n_out: int, dynamic: dict) -> None:
    names = [f"out{i}" for i in range(n_out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=["input.1"],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=17,
        )


def write_pack(folder: Path, pack: str = "buffalo_l", landmarks68: bool = True, seed: int = 0, batched: bool = False) -> Path:
    """Write a model pack folder; returns it. Same seed, same weights."""
    from portrait.faces.insightface_backend import PACKS

    layout = PACKS[pack]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    det_outputs = 3 * len(STRIDES)
    if batched:
        axes = {"input.1": {0: "batch", 2: "height", 3: "width"}, **{f"out{i}": {0: "batch", 1: f"n{i}"} for i in range(det_outputs)}}
    else:
        axes = {"input.1": {2: "height", 3: "width"}, **{f"out{i}": {0: f"n{i}"} for i in range(det_outputs)}}
    _export(BrightWindowDetector(batched), torch.zeros(1, 3, 640, 640), folder / layout["detection"], det_outputs, axes)
    write_recognizer(folder / layout["recognition"], seed=None)
    _export(BrightnessGenderAge(), torch.zeros(1, 3, 96, 96), folder / layout["genderage"], 1,
            {"input.1": {0: "batch"}, "out0": {0: "batch"}} if batched else {})
    if landmarks68:
        _export(RandomEmbedder(192, 3309), torch.zeros(1, 3, 192, 192), folder / layout["landmark_3d_68"], 1, {})
    return folder


def write_recognizer(path: Path, seed: int | None = 0) -> Path:
    """Only an ArcFace-layout recognition model (``w600k_r50.onnx``'s inputs and outputs), random;
    ``seed`` None continues the current random stream (``write_pack``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        torch.manual_seed(seed)
    _export(RandomEmbedder(112, 512), torch.zeros(1, 3, 112, 112), path, 1, {"input.1": {0: "batch"}, "out0": {0: "batch"}})
    return path
