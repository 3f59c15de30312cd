"""Landmark geometry: the training crop, the landmark condition image, and 2D retargeting.

Landmarks are (N, 2) float arrays of pixel x, y: 68 points in the iBUG 300-W order (dlib's) or
5 points (left eye, right eye, nose tip, left and right mouth corner; ArcFace's order).

Retargeting is a 2D stand-in for the paper's 3D landmark generator: it keeps the driving face's
pose (position, scale, in-plane rotation) and expression (the shape of each part: eye and mouth
opening, brow raise) and takes the face shape (part sizes and placement, jaw line) from the
reference identity. Out-of-plane rotation is not modelled: a reference photographed at a
different yaw than the driving photo leaves some of that yaw in the result.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from portrait.faces.geometry import five_from_68, similarity_matrix

# iBUG 68-point parts: (first index, last index, closed)
PARTS_68 = {
    "jaw": (0, 16, False),
    "right_brow": (17, 21, False),
    "left_brow": (22, 26, False),
    "nose_bridge": (27, 30, False),
    "nose_lower": (31, 35, False),
    "right_eye": (36, 41, True),
    "left_eye": (42, 47, True),
    "outer_lip": (48, 59, True),
    "inner_lip": (60, 67, True),
}
PART_COLOURS = {
    "jaw": (255, 255, 255),
    "right_brow": (255, 64, 64),
    "left_brow": (64, 255, 64),
    "nose_bridge": (64, 64, 255),
    "nose_lower": (64, 200, 255),
    "right_eye": (255, 200, 0),
    "left_eye": (255, 0, 200),
    "outer_lip": (0, 255, 200),
    "inner_lip": (200, 255, 0),
}
# 5 points: colours per point and the limbs drawn between them (InstantID-style keypoint image)
POINT_COLOURS_5 = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
LIMBS_5 = [(0, 2), (1, 2), (2, 3), (2, 4), (0, 1), (3, 4)]


def square_crop(width: int, height: int, box) -> tuple[int, int, int]:
    """(left, top, side) of the largest square inside the image, centred on the face box as far
    as the image allows."""
    side = min(width, height)
    x0, y0, x1, y1 = (float(v) for v in box)
    left = min(max((x0 + x1) / 2 - side / 2, 0.0), width - side)
    top = min(max((y0 + y1) / 2 - side / 2, 0.0), height - side)
    return int(round(left)), int(round(top)), side


def to_crop(points: np.ndarray, left: int, top: int, side: int, resolution: int) -> np.ndarray:
    """Image pixel coordinates -> coordinates in the crop resized to resolution x resolution."""
    scale = resolution / side
    return ((np.asarray(points, dtype=np.float32) - np.array([left, top], dtype=np.float32)) * scale).astype(np.float32)


def box_of(points: np.ndarray) -> tuple[float, float, float, float]:
    points = np.asarray(points, dtype=np.float32)
    return float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max())


def render_landmarks(points: np.ndarray, width: int, height: int | None = None) -> Image.Image:
    """The landmark condition image: coloured part outlines (68 points) or keypoints and limbs
    (5 points) on black, drawn at the given size in that size's pixel coordinates."""
    height = height or width
    points = np.asarray(points, dtype=np.float32)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    line = max(1, round(min(width, height) / 128))
    if points.shape == (68, 2):
        for name, (first, last, closed) in PARTS_68.items():
            xy = [tuple(p) for p in points[first : last + 1].tolist()]
            if closed:
                xy.append(xy[0])
            draw.line(xy, fill=PART_COLOURS[name], width=line)
    elif points.shape == (5, 2):
        for a, b in LIMBS_5:
            draw.line([tuple(points[a]), tuple(points[b])], fill=(128, 128, 128), width=line)
        radius = max(1.5, min(width, height) / 64)
        for (x, y), colour in zip(points.tolist(), POINT_COLOURS_5):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    else:
        raise ValueError(f"landmarks must be 68x2 or 5x2, got {points.shape}")
    return image


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


# points that move little with expression: nose bridge and eye corners
STABLE_68 = [27, 28, 29, 30, 36, 39, 42, 45]
RETARGET_PARTS = {
    "right_brow": range(17, 22),
    "left_brow": range(22, 27),
    "nose": range(27, 36),
    "right_eye": range(36, 42),
    "left_eye": range(42, 48),
    "mouth": range(48, 68),
}
LOWER_JAW = list(range(4, 13))
LOWER_JAW_WEIGHTS = np.array([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


def _mouth_opening(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[[65, 66, 67]].mean(0) - points[[61, 62, 63]].mean(0)))


def retarget_landmarks(driving: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
    """68 driving points re-shaped to the references' face (see the module docstring)."""
    driving = np.asarray(driving, dtype=np.float64)
    if driving.shape != (68, 2) or not references or any(np.shape(r) != (68, 2) for r in references):
        raise ValueError("retargeting needs 68-point landmarks for the driving face and every reference")
    aligned = [
        apply_transform(similarity_matrix(np.asarray(r, dtype=np.float64)[STABLE_68], driving[STABLE_68]), r) for r in references
    ]
    shape = np.mean(aligned, axis=0)  # the identity's face shape, in the driving face's pose
    out = shape.copy()
    mouth_scale = 1.0
    for name, index in RETARGET_PARTS.items():
        index = list(index)
        drv, ref = driving[index], shape[index]
        width_drv = np.ptp(drv[:, 0]) or 1.0
        scale = np.ptp(ref[:, 0]) / width_drv
        if name == "mouth":
            mouth_scale = scale
        out[index] = ref.mean(0) + (drv - drv.mean(0)) * scale
    # the chin follows the driving mouth: open the lower jaw by the change in mouth opening
    eye_line = shape[42:48].mean(0) - shape[36:42].mean(0)
    down = np.array([-eye_line[1], eye_line[0]]) / (np.linalg.norm(eye_line) or 1.0)
    if down @ (shape[8] - shape[27]) < 0:
        down = -down
    extra = _mouth_opening(driving) * mouth_scale - _mouth_opening(shape)
    out[LOWER_JAW] += LOWER_JAW_WEIGHTS[:, None] * extra * down
    return out.astype(np.float32)


def landmark_error(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean point distance normalised by the target's inter-ocular distance (NME). When one side
    has 68 points and the other 5, the 68 are reduced to their 5."""
    predicted = np.asarray(predicted, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if target.shape == (5, 2) and predicted.shape == (68, 2):
        predicted = five_from_68(predicted)
    if predicted.shape == (5, 2) and target.shape == (68, 2):
        target = five_from_68(target)
    if predicted.shape != target.shape:
        raise ValueError(f"landmark shapes differ: {predicted.shape} vs {target.shape}")
    eyes = five_from_68(target)[:2] if target.shape == (68, 2) else target[:2]
    inter_ocular = float(np.linalg.norm(eyes[0] - eyes[1])) or 1.0
    return float(np.linalg.norm(predicted - target, axis=1).mean() / inter_ocular)
