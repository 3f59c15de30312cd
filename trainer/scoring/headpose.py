"""Head pose and expression from 68 landmarks, with a 3D mean face fitted to them.

Pose: the 68 points of insightface's mean 3D face (``meanface68.npy``, see
``scripts/extract_meanface.py``) are fitted to a photo's 68 landmarks with OpenCV's
``solvePnP`` (a pinhole camera whose focal length is the image's longer side, centred); the
rotation gives yaw, pitch and roll in degrees (0, 0, 0 facing the camera; a mirrored photo has
yaw and roll negated). The pose error of an output is the absolute difference per angle to the
driving photo's pose.

Expression: the landmarks are first *frontalised*: each point is back-projected to the depth the
fitted mean face has there and rotated back by the fitted pose, so pose is factored out. Then
only ratios measured within one facial part are kept (eye opening over eye width, mouth opening
over mouth width, mouth-corner lift over mouth width, brow-to-eye distance over the eye span,
mouth width over the eye span). Sizes and placement of the parts, which differ from one person to
the next (the identity's face shape), cancel in these ratios; what is left moves with expression.
The expression error is the mean absolute difference of these ratios between the output and the
driving photo. Limits: a person's resting eye or mouth shape still shows in the ratios, and
frontalising with a mean face's depth is approximate beyond about 45 degrees of yaw.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

MEAN_FACE_FILE = Path(__file__).with_name("meanface68.npy")
ANGLES = ("yaw", "pitch", "roll")
EXPRESSION_FEATURES = (
    "right_eye_open", "left_eye_open", "mouth_open", "mouth_corner_lift",
    "right_brow_raise", "left_brow_raise", "mouth_width",
)


@lru_cache(maxsize=1)
def mean_face() -> np.ndarray:
    """(68, 3) in the camera's axes: x right, y down, z away from the camera (the nose nearest)."""
    points = np.load(MEAN_FACE_FILE, allow_pickle=False).astype(np.float64)
    return points * np.array([1.0, 1.0, -1.0])


def mean_face_sha256() -> str:
    return hashlib.sha256(MEAN_FACE_FILE.read_bytes()).hexdigest()


def _camera(width: int, height: int) -> np.ndarray:
    focal = float(max(width, height))
    return np.array([[focal, 0, width / 2.0], [0, focal, height / 2.0], [0, 0, 1]], dtype=np.float64)


def fit_pose(landmarks: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rotation 3x3, translation 3, camera 3x3) of the mean face fitted to 68 landmarks."""
    import cv2

    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"head pose needs 68 landmarks, got {points.shape}")
    camera = _camera(width, height)
    model = mean_face()
    # start facing the camera at the distance the face's size implies, so the iterative fit does
    # not fall into the mirrored solution behind the camera
    scale = np.ptp(points[:, 0]) / np.ptp(model[:, 0])
    start_t = np.array([(points[:, 0].mean() - camera[0, 2]) / scale, (points[:, 1].mean() - camera[1, 2]) / scale, camera[0, 0] / scale])
    ok, rvec, tvec = cv2.solvePnP(
        model, points, camera, None, rvec=np.zeros(3), tvec=start_t, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok:
        raise ValueError("the mean face could not be fitted to these landmarks")
    rotation, _ = cv2.Rodrigues(rvec)
    return rotation, tvec.reshape(3), camera


def angles(rotation: np.ndarray) -> dict[str, float]:
    """Yaw (turn, + to the photo's right), pitch (nod), roll (tilt) in degrees."""
    import cv2

    euler = cv2.RQDecomp3x3(rotation)[0]  # rotations about x, y, z in degrees
    pitch, yaw, roll = (float(v) for v in euler)
    # RQDecomp3x3 may report a pitch near +-180 for a face seen from the front: fold it back
    if pitch > 90:
        pitch -= 180
    elif pitch < -90:
        pitch += 180
    return {"yaw": yaw, "pitch": pitch, "roll": roll}


def head_pose(landmarks: np.ndarray, width: int, height: int) -> dict[str, float]:
    rotation, _, _ = fit_pose(landmarks, width, height)
    return angles(rotation)


def pose_error(pose: dict[str, float], target: dict[str, float]) -> dict[str, float]:
    """Absolute difference per angle (degrees, wrapped to [0, 180]) and their mean."""
    errors = {}
    for name in ANGLES:
        diff = abs(pose[name] - target[name]) % 360.0
        errors[name] = float(min(diff, 360.0 - diff))
    errors["mean"] = float(np.mean([errors[n] for n in ANGLES]))
    return errors


def frontalise(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """(68, 2) landmarks seen from the front in the mean face's frame (pose factored out)."""
    rotation, translation, camera = fit_pose(landmarks, width, height)
    model = mean_face()
    depth = (model @ rotation.T + translation)[:, 2]  # the fitted mean face's depth at each point
    pixels = np.asarray(landmarks, dtype=np.float64)
    rays = np.column_stack([(pixels[:, 0] - camera[0, 2]) / camera[0, 0], (pixels[:, 1] - camera[1, 2]) / camera[1, 1], np.ones(68)])
    in_camera = rays * depth[:, None]
    in_model = (in_camera - translation) @ rotation  # R^T (X - t), row-wise
    return in_model[:, :2]


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def expression(landmarks: np.ndarray, width: int, height: int) -> dict[str, float]:
    """Expression ratios of the frontalised landmarks (see the module docstring)."""
    p = frontalise(landmarks, width, height)
    right_eye, left_eye = p[36:42], p[42:48]
    eye_span = _dist(right_eye.mean(0), left_eye.mean(0)) or 1.0

    def eye_open(eye) -> float:  # eye aspect ratio: the two lid distances over the eye width
        return (_dist(eye[1], eye[5]) + _dist(eye[2], eye[4])) / (2.0 * (_dist(eye[0], eye[3]) or 1.0))

    mouth_width = _dist(p[48], p[54]) or 1.0
    lip_centre_y = (p[62, 1] + p[66, 1]) / 2.0
    corners_y = (p[48, 1] + p[54, 1]) / 2.0
    return {
        "right_eye_open": eye_open(right_eye),
        "left_eye_open": eye_open(left_eye),
        "mouth_open": _dist(p[62], p[66]) / mouth_width,
        "mouth_corner_lift": (lip_centre_y - corners_y) / mouth_width,  # y grows downwards
        "right_brow_raise": (right_eye.mean(0)[1] - p[17:22].mean(0)[1]) / eye_span,
        "left_brow_raise": (left_eye.mean(0)[1] - p[22:27].mean(0)[1]) / eye_span,
        "mouth_width": mouth_width / eye_span,
    }


def expression_error(features: dict[str, float], target: dict[str, float]) -> float:
    return float(np.mean([abs(features[k] - target[k]) for k in EXPRESSION_FEATURES]))
