"""The paper-scale face models (devtools/face_model_zoo.py) are the published architectures:
their sizes and costs match the published figures, and their ONNX exports run batched on
onnxruntime exactly as in torch."""

from __future__ import annotations

import numpy as np
import torch

from devtools import face_model_zoo as zoo


def test_scrfd_10g_has_the_published_parameters_and_cost():
    params_m, gmacs = zoo.count(zoo.build("scrfd_10g_kps"), (480, 640))  # VGA, as published
    assert abs(params_m - 4.23) < 0.01, params_m
    assert abs(gmacs - 10.0) < 0.1, gmacs


def test_arcface_r50_has_the_published_cost():
    params_m, gmacs = zoo.count(zoo.build("arcface_r50"), (112, 112))
    assert abs(gmacs - 6.3) < 0.05, gmacs
    assert 43 < params_m < 44


def test_exported_scrfd_runs_batched_on_onnxruntime_as_in_torch(tmp_path):
    model = zoo.build("scrfd_10g_kps")
    path = zoo.export(model, (64, 64), tmp_path / "scrfd.onnx")
    sess = zoo.session(path)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    outs = sess.run(None, {"input": x})
    # insightface's batched layout: scores, boxes, keypoints per stride 8, 16, 32, 2 anchors a cell
    assert [o.shape for o in outs] == [(3, 128, 1), (3, 32, 1), (3, 8, 1), (3, 128, 4), (3, 32, 4), (3, 8, 4),
                                       (3, 128, 10), (3, 32, 10), (3, 8, 10)]
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    for got, want in zip(outs, expected):
        assert np.allclose(got, want.numpy(), rtol=1e-3, atol=1e-3)
    single = sess.run(None, {"input": x[1:2]})
    assert all(np.allclose(s[0], o[1], rtol=1e-4, atol=1e-4) for s, o in zip(single, outs))
    cost = zoo.ms_per_image(sess, (64, 64), batch=2, min_seconds=0.0)
    assert cost["batch"] == 2 and cost["runs"] >= 2 and cost["cpu_ms"] > 0
