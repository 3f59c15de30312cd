"""Which detected face is the image's subject (the detect stage's choice, kept apart from it).

- A detection scoring under the score floor (``detect.min_score``) never competes: it is
  recorded among the other faces with ``"weak": true`` and the filter ignores it. A weak
  detection is still the subject when nothing stronger was found (the filter then judges it).
- Without a hint the subject is the face with the highest ``area x confidence``, where
  confidence is the score over ``detect.full_score`` capped at 1: a strong, large face wins; a
  large weak one does not win over a clear one by size alone.
- With a subject hint (a source's box for the labelled person, e.g. IMDb-Face's ``rect`` in
  the frame ``height width``) the box is scaled from its frame to the image as served and the
  subject is the face that overlaps it most (intersection over union, on the detector's own
  box or on the RetinaFace-convention box, whichever is higher); under ``detect.hint_min_iou``
  no face is the labelled person.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from portrait.faces import geometry
from portrait.faces.base import Face


# The score floor per backend (the detect stage's min_score / full_score override it). dlib HOG
# on the face fixtures: the real faces of the group negatives score 0.18 to 3.0, dev subjects
# 0.27 at the 1st percentile (median 1.6); the spurious hits seen (hair, an arm) score 0.05 and
# 0.12. insightface's detector already cuts at faces.min_score (0.5).
DEFAULT_MIN_SCORE = {"dlib": 0.15, "insightface": 0.5}
DEFAULT_FULL_SCORE = {"dlib": 1.0, "insightface": 0.8}


@dataclass(frozen=True)
class SubjectSettings:
    """The detect stage's ``min_score`` and ``full_score`` as a build's recipe sets them (None:
    the backend's default). The trainer's face reader takes them from the build's build.json,
    so that it picks the subject the build picked."""

    min_score: float | None = None
    full_score: float | None = None

    def thresholds(self, backend: str) -> tuple[float, float]:
        """(score floor, full score) for faces of ``backend``."""
        floor = self.min_score if self.min_score is not None else DEFAULT_MIN_SCORE.get(backend, 0.0)
        full = self.full_score if self.full_score is not None else DEFAULT_FULL_SCORE.get(backend, 1.0)
        return floor, full


@dataclass
class Choice:
    subject: Face | None  # None: no face matches the hint
    others: list[Face]  # strongest first
    weak: set[int]  # ids of the faces under the score floor
    hint_iou: float | None = None


def iou(a, b) -> float:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def scaled_hint(hint_json: str | None, height: int, width: int):
    """The hint's box in this image's pixels, or None."""
    if not hint_json:
        return None
    hint = json.loads(hint_json)
    frame_w, frame_h = hint["frame"]
    sx, sy = width / frame_w, height / frame_h
    x0, y0, x1, y1 = hint["box"]
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def hint_overlap(face: Face, box) -> float:
    own = face.raw_box if face.raw_box is not None else face.box
    return max(iou(face.box, box), iou(own, box))


def choose(faces: list[Face], height: int, width: int, min_score: float, full_score: float,
           hint_box=None, hint_min_iou: float = 0.3) -> Choice:  # fmt: skip
    weak = {id(f) for f in faces if f.score < min_score}

    def strength(f: Face) -> tuple:
        confident = min(1.0, max(f.score, 0.0) / full_score) if full_score > 0 else 1.0
        return (id(f) not in weak, geometry.clipped_area(f.box, height, width) * confident, f.score)

    ranked = sorted(faces, key=strength, reverse=True)
    if hint_box is None:
        return Choice(ranked[0], ranked[1:], weak)
    overlaps = [hint_overlap(f, hint_box) for f in ranked]
    best = max(range(len(ranked)), key=lambda i: (overlaps[i], -i))
    if overlaps[best] < hint_min_iou:
        return Choice(None, ranked, weak, overlaps[best])
    subject = ranked[best]
    return Choice(subject, [f for f in ranked if f is not subject], weak, overlaps[best])


def ranked(faces: list[Face], height: int, width: int, backend: str | None,
           settings: SubjectSettings = SubjectSettings()) -> list[Face]:  # fmt: skip
    """The faces with the subject first, as the detect stage with ``settings`` chooses it (by
    default the backend's floor and full score); without a backend name, by area alone."""
    if backend is None:
        return sorted(faces, key=lambda f: geometry.clipped_area(f.box, height, width), reverse=True)
    if not faces:
        return []
    c = choose(faces, height, width, *settings.thresholds(backend))
    return [c.subject, *c.others]
