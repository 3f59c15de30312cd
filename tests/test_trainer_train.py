"""Whole training runs of the tiny config on CPU: outputs, exact resume, two-process data
parallelism through ``accelerate launch``, and inference from the checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.shards import synthetic_samples, write_shards
from trainer.train import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on shared cores: more threads only fight over them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

RUN = [
    "--config", "tiny",
    "--threads", "1",
    "--max-steps", "7",
    "--set", "data.num_workers=2",
    "--set", "data.batches_per_epoch=4",  # the run crosses epochs; the interruption falls mid-epoch
    "--set", "train.checkpoint_every=4",
    "--set", "train.validate_every=100",
    "--set", "train.val_identities=2",
    "--set", "train.val_inference_steps=2",
    "--set", "train.warmup_steps=2",
    "--set", "data.holdout_fraction=0.1",  # identities 3 and 6 of the fixture
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, synthetic_samples(8, 6, seed=5), identities_per_shard=2)
    return folder


def losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("full")
    summary = main([*RUN, "--shards", str(shards), "--output", str(out)])
    return out, summary


def test_a_run_writes_checkpoint_loss_curve_samples_and_logs(full_run):
    out, summary = full_run
    assert summary["finished"] and summary["step"] == 7
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000007"
    assert (out / "loss.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert [s for s, _, _ in losses(out)] == list(range(1, 8))
    validation = summary["validation"]
    assert validation["images"] == 2
    # random tiny weights draw no face: every image is a counted miss, not a silent gap
    assert validation["faces_detected"] + validation["detector_misses"] == 2
    # no build.json beside the synthetic shards: measured with the default face settings, said so
    assert validation["faces"].startswith("default settings") and not (out / "faces.json").exists()
    assert validation["similarity_model"] == "dlib_face_recognition_resnet_model_v1"


def test_checkpoints_hold_no_pickle(full_run):
    out, _ = full_run
    folder = out / "checkpoints" / "step-0000007"
    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes
    for path in folder.rglob("*.safetensors"):
        assert not path.read_bytes()[:2] == b"\x80\x04"  # a pickle stream would start so
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000004", "step-0000007"]


def test_resume_latest_repeats_the_uninterrupted_loss_sequence(full_run, shards, tmp_path):
    out, _ = full_run
    main([*RUN, "--shards", str(shards), "--output", str(tmp_path), "--stop-after", "3"])
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    with open(tmp_path / "metrics.jsonl", "a") as log:  # a step logged after the last checkpoint, then a crash
        log.write(json.dumps({"step": 4, "loss": 99.0, "lr": 0.0}) + "\n")
    main([*RUN, "--shards", str(shards), "--output", str(tmp_path), "--resume", "latest"])
    assert losses(tmp_path) == losses(out)  # bit for bit: same loss and LR at every step
    from safetensors.torch import load_file

    a = load_file(out / "checkpoints/step-0000007/face_refiner/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "checkpoints/step-0000007/face_refiner/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_makes_an_image_of_the_requested_size_from_a_checkpoint(full_run):
    from portrait.landmarks import render_landmarks
    from trainer.pipeline import HiFiPortraitPipeline
    from devtools.shards import template_landmarks

    out, _ = full_run
    pipe = HiFiPortraitPipeline.from_checkpoint(out)
    pipe.set_progress_bar_config(disable=True)
    faces = torch.zeros(4, 3, 32, 32)
    embeddings = np.eye(4, 128, dtype=np.float32)
    image = pipe(
        "a photo of a person",
        faces,
        embeddings,
        landmarks=template_landmarks() * [24, 40] + [4, 4],
        width=32,
        height=48,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 48)
    half = HiFiPortraitPipeline.from_checkpoint(out, dtype=torch.bfloat16)  # frozen bf16, trained float32
    half.set_progress_bar_config(disable=True)
    image = half("a face", faces, embeddings, landmarks=template_landmarks() * 12, width=16, height=16, num_inference_steps=2).images[0]
    assert image.size == (16, 16) and np.asarray(image).std() > 0
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe("x", faces, embeddings, landmark_image=render_landmarks(template_landmarks() * 30, 40), width=40, height=40)


def test_infer_cli_from_photos(full_run, faces_dir, tmp_path):
    out, _ = full_run
    faces = tmp_path / "faces.yaml"  # the synthetic shards have no build.json: the settings are given
    faces.write_text("faces:\n  backend: dlib\n")
    blair = sorted((faces_dir / "dev" / "Tony_Blair").iterdir())[:4]
    driving = sorted((faces_dir / "dev" / "Kate_Winslet").iterdir())[0]
    result = subprocess.run(
        [sys.executable, "-m", "trainer.infer", "--checkpoint", str(out), "--reference", *map(str, blair),
         "--driving", str(driving), "--prompt", "a portrait", "--steps", "2", "--size", "32", "--faces", str(faces),
         "--output", str(tmp_path / "out.png"), "--landmark-image", str(tmp_path / "lm.png")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    assert Image.open(tmp_path / "out.png").size == (32, 32)
    assert np.asarray(Image.open(tmp_path / "lm.png")).sum() > 0
    without = subprocess.run(
        [sys.executable, "-m", "trainer.infer", "--checkpoint", str(out), "--reference", *map(str, blair),
         "--driving", str(driving), "--prompt", "a portrait", "--steps", "2", "--size", "32"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert without.returncode != 0 and "give --faces" in without.stderr and "Traceback" not in without.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_and_take_the_same_steps(shards, tmp_path):
    """Data parallelism on CPU: ``accelerate launch --multi_gpu`` starts two gloo ranks (the
    trainer asks accelerate for CPU when there is no GPU), with gradient accumulation."""
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        "-m", "trainer.train", "--config", "tiny", "--shards", str(shards), "--output", str(out), "--threads", "1",
        "--max-steps", "3", "--set", "data.num_workers=1", "--set", "data.batches_per_epoch=4",
        "--set", "train.gradient_accumulation_steps=2",
        "--set", "train.val_identities=0", "--set", "data.holdout_fraction=0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3 and all(r["finished"] for r in ranks)
    assert ranks[0]["batches_seen"] == ranks[1]["batches_seen"] == 6  # 2 micro-batches per optimizer step
    read = [set(r["shards_read"]) for r in ranks]
    assert read[0] and read[1] and not read[0] & read[1]
    state = json.loads((out / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {p.name for p in (out / "checkpoints" / "step-0000003").glob("rng-rank*.safetensors")} == {
        "rng-rank0.safetensors", "rng-rank1.safetensors"
    }
