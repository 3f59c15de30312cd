"""Batched runs of insightface's ONNX models: one onnxruntime call for many images or faces.

On a GPU a batch fills the device where one image at a time leaves it mostly idle; on a CPU it
changes little (``make bench-faces`` prints both). The numbers are insightface's own: the
detector's letterbox, normalisation, anchor decoding and NMS are the steps of
``insightface.model_zoo.scrfd.SCRFD.detect`` for one input size, applied to each image of the
batch's outputs, with insightface's ``distance2bbox``/``distance2kps`` and the model's ``nms``.
``tests/test_faces_insightface.py`` checks that batched and one-at-a-time runs give the same
boxes, points, embeddings and gender/age.

A model batches when its input's batch axis is free and (for SCRFD) its outputs carry that
axis: insightface's released ``det_10g.onnx`` was exported for one image (outputs without a
batch axis), its ArcFace and gender/age models for any batch. A detector that cannot batch runs
one image at a time through insightface's own ``SCRFD.detect``; re-export it with a batch axis
(insightface's ``detection/scrfd/tools/scrfd2onnx.py``) to batch it.

On CUDA the detector's input is bound with onnxruntime's I/O binding (``run``): the batch is
copied to the device in one transfer and the outputs come back in one; on the CPU a plain
``session.run`` does the same work.
"""

from __future__ import annotations

import cv2
import numpy as np


def batch_axis_is_free(session) -> bool:
    """The model takes any number of inputs at once (its first input's batch axis is symbolic)."""
    return not isinstance(session.get_inputs()[0].shape[0], int)


def detector_batches(scrfd) -> bool:
    """SCRFD with a free batch axis on its input and a batch axis on its outputs."""
    return bool(scrfd.batched) and batch_axis_is_free(scrfd.session)


def run(session, input_name: str, output_names: list[str], blob: np.ndarray, bind: bool) -> list[np.ndarray]:
    """One onnxruntime call on ``blob``; with ``bind``, through I/O binding."""
    if not bind:
        return session.run(output_names, {input_name: blob})
    binding = session.io_binding()
    binding.bind_cpu_input(input_name, np.ascontiguousarray(blob))
    for name in output_names:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The image resized to fit ``size`` x ``size`` and placed at the top left of a black square,
    and the factor applied (insightface's SCRFD does the same)."""
    height, width = rgb.shape[:2]
    if height / width > 1.0:
        new_height, new_width = size, int(size / (height / width))
    else:
        new_width, new_height = size, int(size * (height / width))
    square = np.zeros((size, size, 3), dtype=np.uint8)
    square[:new_height, :new_width] = cv2.resize(rgb, (new_width, new_height))
    return square, new_height / height


class BatchedDetector:
    """An insightface SCRFD model run on batches of letterboxed images."""

    def __init__(self, scrfd, bind: bool = False):
        self.model = scrfd
        self.bind = bind
        self._centers: dict[tuple[int, int], np.ndarray] = {}

    def detect(self, images: list[np.ndarray], size: int, threshold: float):
        """(boxes (n, 4), scores (n,), points (n, 5, 2)) per RGB image, in its pixels."""
        m = self.model
        squares, factors = zip(*(letterbox(img, size) for img in images))
        # insightface feeds BGR and swaps to RGB here; these images are RGB already
        blob = cv2.dnn.blobFromImages(list(squares), 1.0 / m.input_std, (size, size), (m.input_mean,) * 3, swapRB=False)
        outputs = run(m.session, m.input_name, m.output_names, blob.astype(np.float32), self.bind)
        return [self._decode([out[i] for out in outputs], size, factors[i], threshold) for i in range(len(images))]

    def _anchor_centers(self, size: int, stride: int) -> np.ndarray:
        key = (size, stride)
        if key not in self._centers:
            cells = size // stride
            centers = np.stack(np.mgrid[:cells, :cells][::-1], axis=-1).astype(np.float32)
            centers = (centers * stride).reshape(-1, 2)
            if self.model._num_anchors > 1:
                centers = np.stack([centers] * self.model._num_anchors, axis=1).reshape(-1, 2)
            self._centers[key] = centers
        return self._centers[key]

    def _decode(self, outputs: list[np.ndarray], size: int, factor: float, threshold: float):
        from insightface.model_zoo.scrfd import distance2bbox, distance2kps

        m = self.model
        scores, boxes, points = [], [], []
        for idx, stride in enumerate(m._feat_stride_fpn):
            centers = self._anchor_centers(size, stride)
            score = outputs[idx]
            keep = np.where(score >= threshold)[0]
            scores.append(score[keep])
            boxes.append(distance2bbox(centers, outputs[idx + m.fmc] * stride)[keep])
            points.append(distance2kps(centers, outputs[idx + 2 * m.fmc] * stride).reshape(len(centers), -1, 2)[keep])
        if sum(len(s) for s in scores) == 0:
            return np.empty((0, 4), np.float32), np.empty((0,), np.float32), np.empty((0, 5, 2), np.float32)
        score = np.vstack(scores)
        order = np.argsort(-score.ravel(), kind="stable")
        found = np.hstack((np.vstack(boxes) / factor, score)).astype(np.float32, copy=False)[order]
        kps = (np.vstack(points) / factor)[order]
        keep = m.nms(found)
        return found[keep, :4], found[keep, 4], kps[keep]
