"""The loss-curve PNG and the sample grid PNG of a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curve(metrics_file: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_file) if "loss" in r]
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss per step")
    if len(loss) >= 10:
        window = max(5, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _tile(image: Image.Image, size: int) -> Image.Image:
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def _to_image(chw: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(chw, dtype=np.uint8).transpose(1, 2, 0))


def sample_grid(examples: list[dict], generated: list[Image.Image], out: Path, tile: int = 128) -> Path:
    """One row per example: target photo, landmark condition, references, generated image."""
    if not examples:
        raise ValueError("no examples for the sample grid")
    refs = max(len(e["reference_images"]) for e in examples)
    columns = 3 + refs
    label_h = 14
    grid = Image.new("RGB", (columns * tile, len(examples) * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, (example, image) in enumerate(zip(examples, generated)):
        y = row * (tile + label_h)
        tiles = [_to_image(example["pixels"]), _to_image(example["landmark_image"])]
        tiles += [face for face in example["reference_faces"]]
        tiles += [Image.new("RGB", (tile, tile), (200, 200, 200))] * (refs - len(example["reference_faces"]))
        tiles.append(image)
        for column, picture in enumerate(tiles):
            grid.paste(_tile(picture, tile), (column * tile, y + label_h))
        draw.text((2, y + 1), f"{example['identity_id']}: target | landmarks | references | generated", fill=(0, 0, 0))
    grid.save(out)
    return out
