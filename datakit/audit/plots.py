"""PNG figures (matplotlib, Agg, no pyplot state): Figs. 11, 12, 13, 16 and Fig. 14-style sheets.

Each function returns PNG bytes. PNGs carry no software/date metadata, so the same statistics
give the same bytes.
"""

from __future__ import annotations

import io
import textwrap
import warnings

from matplotlib.figure import Figure
from PIL import Image

from datakit.audit.stats import UNKNOWN, Stats

KNOWN_COLOR = "#4C72B0"
UNKNOWN_COLOR = "#A0A0A0"
GENDER_COLORS = {"female": "#DD8452", "male": "#4C72B0", UNKNOWN: UNKNOWN_COLOR}


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs in names: drawn as boxes, not worth a warning
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight")
    return buf.getvalue()


def bars(counts: dict[str, int], title: str, xlabel: str, ylabel: str, width: float = 7.0) -> bytes:
    fig = Figure(figsize=(width, 3.6))
    ax = fig.subplots()
    labels = list(counts)
    values = [counts[k] for k in labels]
    colors = [UNKNOWN_COLOR if k.startswith(UNKNOWN) else KNOWN_COLOR for k in labels]
    rects = ax.bar(range(len(labels)), values, color=colors)
    ax.bar_label(rects, labels=[str(v) for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center", fontsize=8)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.spines[["top", "right"]].set_visible(False)
    return png(fig)


def fig11_identity_sizes(stats: Stats) -> bytes:
    return bars(stats.identity_sizes, "Fig. 11: identity cluster size", "kept images per identity", "identities")


def fig12_face_area(stats: Stats) -> bytes:
    return bars(stats.face_area, "Fig. 12: face area (face box / image)", "area fraction", "kept images")


def fig13_age(stats: Stats) -> bytes:
    return bars(stats.age_groups, "Fig. 13: age groups (estimated)", "age in years", "kept images")


def fig16_gender(stats: Stats) -> bytes:
    fig = Figure(figsize=(7.0, 3.2))
    axes = fig.subplots(1, 2)
    for ax, (title, counts) in zip(axes, (("images", stats.gender_images), ("identities", stats.gender_identities))):
        labels = list(counts)
        total = sum(counts.values()) or 1
        rects = ax.bar(labels, [counts[k] for k in labels], color=[GENDER_COLORS.get(k, KNOWN_COLOR) for k in labels])
        ax.bar_label(rects, labels=[f"{counts[k]} ({100 * counts[k] / total:.0f}%)" for k in labels], fontsize=8, padding=2)
        ax.set_title(f"kept {title}", fontsize=10)
        ax.margins(y=0.2)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Fig. 16: gender", fontsize=11)
    return png(fig)


def identity_sheet(title: str, tiles: list[tuple[bytes | None, str, str]], columns: int = 4) -> bytes:
    """Fig. 14-style sheet: each tile is (JPEG bytes or None, caption, key), captions under images."""
    n = max(1, len(tiles))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.6 * cols, 3.1 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(tiles):
            continue
        data, caption, key = tiles[i]
        image = _thumbnail(data)
        if image is None:
            ax.text(0.5, 0.5, f"{key}\nimage not in the shards", ha="center", va="center", fontsize=8, color="#a00")
        else:
            ax.imshow(image)
        text = "\n".join(textwrap.wrap(caption or "(no caption)", 34)[:4])
        ax.text(0.5, -0.03, text, transform=ax.transAxes, ha="center", va="top", fontsize=7.5)
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(hspace=0.5, wspace=0.08)
    return png(fig)


def _thumbnail(data: bytes | None, size: int = 256):
    if not data:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image = image.convert("RGB")
        image.thumbnail((size, size))
        return image
    except Exception:  # a corrupt member shows as "not in the shards"; verify reports it
        return None
