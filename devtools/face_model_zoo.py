"""The paper-scale face models with random weights, to measure what they cost on this machine.

Compute cost does not depend on weight values, so a model with the exact architecture and input
size of a published one costs what the published one costs. Written from the published
definitions in deepinsight/insightface:

- SCRFD-10G with keypoints (``detection/scrfd/configs/scrfd/scrfd_10g_bnkps.py``; insightface's
  ``det_10g.onnx``): ResNetV1e backbone (deep stem, 2x2 max pool, BasicBlocks (3, 4, 2, 3) of
  widths (56, 88, 88, 224), average-pool shortcuts), a PAFPN neck on the last three stages
  (56 channels), and per stride (8, 16, 32) a head of three 3x3 conv-BN-ReLU (80 channels) with
  score, box and 5-keypoint convolutions for 2 anchors. Input 640x640 as insightface runs it.
- ArcFace iresnet50 / iresnet100 (``recognition/arcface_torch/backbones/iresnet.py``; buffalo_l's
  ``w600k_r50.onnx`` and antelopev2's ``glintr100.onnx``): pre-activation BasicBlocks
  (3, 4, 14, 3) / (3, 13, 30, 3) with PReLU, widths 64..512, a 512-d embedding. Input 112x112.

``published`` holds the published size and cost of each; ``count`` recomputes them from the
torch modules (multiply-accumulates, the convention of the published tables), ``export`` writes
ONNX with a dynamic batch axis and ``ms_per_image`` runs it on onnxruntime on one CPU thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


# ---------------------------------------------------------------- SCRFD-10G (mmdet layout)


class BasicBlock(nn.Module):
    """mmdet's ResNet BasicBlock; with ``avg_down`` the strided shortcut is AvgPool + 1x1 conv."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, relu=False)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            pool = [nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)] if stride != 1 else []
            self.shortcut = nn.Sequential(*pool, conv_bn(cin, cout, 1, 1, relu=False))

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class SCRFD(nn.Module):
    strides = (8, 16, 32)
    anchors = 2

    def __init__(self, blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224), neck=56, head=80, head_convs=3):
        super().__init__()
        stem = planes[0]
        self.stem = nn.Sequential(conv_bn(3, stem // 2, 3, 2), conv_bn(stem // 2, stem // 2), conv_bn(stem // 2, stem),
                                  nn.MaxPool2d(2, 2))  # fmt: skip
        stages, cin = [], stem
        for i, (n, cout) in enumerate(zip(blocks, planes)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        used = planes[1:]  # PAFPN start_level=1: strides 8, 16, 32
        self.lateral = nn.ModuleList(nn.Conv2d(c, neck, 1) for c in used)
        self.fpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, padding=1) for _ in used)
        self.down = nn.ModuleList(nn.Conv2d(neck, neck, 3, 2, 1) for _ in used[1:])
        self.pafpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, padding=1) for _ in used[1:])
        # strides_share=False: every stride has its own head; cls_reg_share=True: one conv tower
        self.towers = nn.ModuleList(
            nn.Sequential(*[conv_bn(neck if i == 0 else head, head) for i in range(head_convs)]) for _ in self.strides
        )
        self.score = nn.ModuleList(nn.Conv2d(head, self.anchors, 3, padding=1) for _ in self.strides)
        self.box = nn.ModuleList(nn.Conv2d(head, 4 * self.anchors, 3, padding=1) for _ in self.strides)
        self.kps = nn.ModuleList(nn.Conv2d(head, 10 * self.anchors, 3, padding=1) for _ in self.strides)

    def forward(self, x):
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats[1:])]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        inter = [conv(t) for conv, t in zip(self.fpn, lat)]
        for i in range(len(inter) - 1):  # bottom-up
            inter[i + 1] = inter[i + 1] + self.down[i](inter[i])
        outs = [inter[0]] + [conv(t) for conv, t in zip(self.pafpn, inter[1:])]
        scores, boxes, kpss = [], [], []
        for i, (f, stride) in enumerate(zip(outs, self.strides)):
            t = self.towers[i](f)
            n = t.shape[0]
            # insightface's batched output layout: (N, H*W*anchors, C), boxes and keypoints in pixels
            scores.append(self.score[i](t).permute(0, 2, 3, 1).reshape(n, -1, 1).sigmoid())
            boxes.append(self.box[i](t).permute(0, 2, 3, 1).reshape(n, -1, 4) * stride)
            kpss.append(self.kps[i](t).permute(0, 2, 3, 1).reshape(n, -1, 10) * stride)
        return (*scores, *boxes, *kpss)


# ---------------------------------------------------------------- ArcFace iresnet


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    def __init__(self, layers, features: int = 512):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        stages, cin = [], 64
        for n, cout in zip(layers, (64, 128, 256, 512)):
            stages += [IBasicBlock(cin if j == 0 else cout, cout, 2 if j == 0 else 1) for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 7 * 7, features)
        self.features = nn.BatchNorm1d(features)

    def forward(self, x):
        x = self.bn2(self.stages(self.stem(x)))
        return self.features(self.fc(torch.flatten(x, 1)))


# ---------------------------------------------------------------- what was published


@dataclass(frozen=True)
class Spec:
    name: str
    build: object  # () -> nn.Module
    input_hw: tuple[int, int]  # what the pipeline feeds it
    published_hw: tuple[int, int]  # where the published FLOPs were counted
    published_params_m: float | None
    published_gmacs: float
    source: str
    per: str  # "image" (detector) or "face" (recognition)


SPECS = {
    "scrfd_10g_kps": Spec(
        "SCRFD-10G (kps)", SCRFD, (640, 640), (480, 640), 4.23, 10.0,
        "deepinsight/insightface detection/scrfd/README.md: SCRFD_10G_KPS 4.23 M params, 10 GFLOPs at VGA "
        "(SCRFD-10GF 9.98 G, 3.86 M without keypoints); arXiv:2105.04714", "image"),
    "arcface_r50": Spec(
        "ArcFace iresnet50", lambda: IResNet((3, 4, 14, 3)), (112, 112), (112, 112), None, 6.3,
        "deepinsight/insightface recognition/arcface_torch/README.md: r50 6.3 GFLOPs", "face"),
    "arcface_r100": Spec(
        "ArcFace iresnet100", lambda: IResNet((3, 13, 30, 3)), (112, 112), (112, 112), None, 12.1,
        "deepinsight/insightface recognition/arcface_torch/README.md: r100 12.1 GFLOPs (24.2 G counting "
        "a multiply-add as two)", "face"),
}  # fmt: skip


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SPECS[name].build().eval()


def count(model: nn.Module, hw: tuple[int, int]) -> tuple[float, float]:
    """(parameters in millions, GMACs for one input of height x width)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, *hw))
    params = sum(p.numel() for p in model.parameters())
    return params / 1e6, counter.get_total_flops() / 2 / 1e9  # the counter counts a multiply-add as 2


def export(model: nn.Module, hw: tuple[int, int], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, *hw))
    n_out = len(out) if isinstance(out, tuple) else 1
    names = [f"output{i}" for i in range(n_out)]
    torch.onnx.export(model, (torch.zeros(1, 3, *hw),), str(path), input_names=["input"], output_names=names,
                      dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                      opset_version=17, dynamo=False)  # fmt: skip
    return path


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # random weights can drift into denormal floats, which are far slower on x86 than real weights
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ms_per_image(sess, hw: tuple[int, int], batch: int, min_seconds: float = 2.0, seed: int = 0) -> dict:
    """Wall and CPU milliseconds per input at ``batch``, after one warm-up run (at least 2 runs)."""
    x = np.random.default_rng(seed).standard_normal((batch, 3, *hw), dtype=np.float32)
    name = sess.get_inputs()[0].name
    out = sess.run(None, {name: x})
    if not all(np.isfinite(o).all() for o in out):
        raise RuntimeError("non-finite model output (random weights overflowed): costs would not be real")
    runs, wall, cpu = 0, 0.0, 0.0
    while runs < 2 or wall < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, {name: x})
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        runs += 1
    return {"batch": batch, "wall_ms": 1000 * wall / runs / batch, "cpu_ms": 1000 * cpu / runs / batch, "runs": runs}


def measure(name: str, folder: Path, batches=(1, 8), threads: int = 1, min_seconds: float = 2.0) -> dict:
    """Size and cost of one model: counted, compared with the published figures, and run on CPU."""
    spec = SPECS[name]
    model = build(name)
    params_m, gmacs_published_input = count(model, spec.published_hw)
    _, gmacs = count(model, spec.input_hw)
    path = export(model, spec.input_hw, folder / f"{name}.onnx")
    sess = session(path, threads)
    runs = [ms_per_image(sess, spec.input_hw, b, min_seconds) for b in batches]
    return {
        "name": name, "label": spec.name, "per": spec.per, "input": spec.input_hw, "threads": threads,
        "params_m": params_m, "published_params_m": spec.published_params_m,
        "gmacs_at_published_input": gmacs_published_input, "published_gmacs": spec.published_gmacs,
        "published_input": spec.published_hw, "gmacs": gmacs, "source": spec.source, "runs": runs,
    }  # fmt: skip
