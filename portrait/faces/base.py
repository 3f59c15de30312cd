"""The face-model backend interface that detect, filter, embed and attributes stages call.

Coordinates are pixels of the image passed in. ``box`` follows RetinaFace's convention
(x0, y0, x1, y1 around forehead-to-chin and ear-to-ear); each backend maps its own detector's
box to that convention and says how in ``box_convention``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class Face:
    box: tuple[float, float, float, float]  # RetinaFace convention, pixels
    score: float
    landmarks5: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth, right mouth
    landmarks68: np.ndarray | None = None  # (68, 2) when the backend gives them
    raw_box: tuple[float, float, float, float] | None = None  # the detector's own box
    extra: dict = field(default_factory=dict)

    def scaled(self, factor: float) -> Face:
        """The same face in an image ``factor`` times as large (a reduced decode's face in the
        full image's pixels, or back); coordinates scale as the detection copy's do."""
        if factor == 1:
            return self
        return replace(
            self,
            box=tuple(float(v) * factor for v in self.box),
            landmarks5=np.asarray(self.landmarks5, dtype=np.float64) * factor,
            landmarks68=None if self.landmarks68 is None else np.asarray(self.landmarks68, dtype=np.float64) * factor,
            raw_box=None if self.raw_box is None else tuple(float(v) * factor for v in self.raw_box),
        )

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class FaceBackend(ABC):
    name: str = ""
    embedding_model: str = ""
    embedding_dim: int = 0
    box_convention: str = ""  # how the detector's box maps to RetinaFace's
    # images or faces the stages hand to one detect_many / embed_many call: 1 for a backend that
    # runs one at a time (a stage then holds one decoded image, not a batch of them)
    batch_size: int = 1

    @abstractmethod
    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Every face in an HxWx3 uint8 RGB array, largest first."""

    @abstractmethod
    def embed(
        self, rgb: np.ndarray, face: Face, crop_size: int = 256, crop_padding: float = 0.25
    ) -> tuple[np.ndarray, np.ndarray]:
        """(L2-normalised float32 embedding, aligned face crop as crop_size x crop_size x 3 uint8
        RGB with crop_padding of the aligned face's side added around it)."""

    def detect_many(self, images: list[np.ndarray]) -> list[list[Face]]:
        """``detect`` over many images; backends with a batched detector override it."""
        return [self.detect(rgb) for rgb in images]

    def embed_many(
        self, items: list[tuple[np.ndarray, Face]], crop_size: int = 256, crop_padding: float = 0.25
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``embed`` over many faces; backends with a batched recogniser override it."""
        return [self.embed(rgb, face, crop_size, crop_padding) for rgb, face in items]

    def age_gender(self, rgb: np.ndarray, face: Face) -> tuple[float | None, str | None]:
        """(age in years, "female" | "male") from a model, or (None, None) without one."""
        return None, None

    def age_gender_many(self, items: list[tuple[np.ndarray, Face]]) -> list[tuple[float | None, str | None]]:
        """``age_gender`` over many faces; backends with a batched model override it."""
        return [self.age_gender(rgb, face) for rgb, face in items]

    @property
    def has_age_gender_model(self) -> bool:
        return False
