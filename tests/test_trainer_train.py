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

from conftest import TINY_RUN
from trainer.train import main

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


RUN = TINY_RUN


@pytest.fixture(scope="module")
def shards(tiny_shards):
    return tiny_shards


def losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tiny_run):
    return tiny_run


def test_a_run_writes_checkpoint_loss_curve_samples_and_logs(full_run):
    out, summary = full_run
    assert summary["finished"] and summary["step"] == 7
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000007"
    assert (out / "loss.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert [s for s, _, _ in losses(out)] == list(range(1, 8))
    validation = summary["validation"]
    assert validation["images"] == 2
    # random tiny weights draw no face: every image is a counted miss and no similarity or
    # landmark error is made up for them
    assert (validation["faces_detected"], validation["detector_misses"]) == (0, 2)
    assert validation["face_similarity"] is None and validation["landmark_error"] is None
    # no build.json beside the synthetic shards: measured with the default face settings, said so
    assert validation["faces"].startswith("default settings") and not (out / "faces.json").exists()
    assert validation["similarity_model"] == "dlib_face_recognition_resnet_model_v1"


def test_checkpoints_hold_no_pickle(full_run):
    out, _ = full_run
    folder = out / "checkpoints" / "step-0000007"
    from safetensors import safe_open

    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes
    for path in folder.rglob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:  # a pickle or torch.save zip would not parse
            assert list(handle.keys())
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())
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
    # different data on each rank, the same weights after every step: DDP averaged the gradients
    # (without it each rank's weights follow its own shards and the digests differ)
    assert ranks[0]["parameter_digest"] == ranks[1]["parameter_digest"]
    state = json.loads((out / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {p.name for p in (out / "checkpoints" / "step-0000003").glob("rng-rank*.safetensors")} == {
        "rng-rank0.safetensors", "rng-rank1.safetensors"
    }


def test_relaxed_resume_continues_with_another_loader_layout_and_init_from_loads_weights_only(full_run, shards, tmp_path, caplog):
    out, _ = full_run
    run = tmp_path / "run"
    main([*RUN, "--shards", str(shards), "--output", str(run), "--stop-after", "4"])
    other_layout = [*RUN, "--set", "data.batches_per_epoch=5", "--shards", str(shards), "--output", str(run)]
    with pytest.raises(SystemExit, match="cannot continue exactly.*--relaxed"):
        main([*other_layout, "--resume", "latest"])
    with caplog.at_level("WARNING", logger="trainer.train"):
        summary = main([*other_layout, "--resume", "latest", "--relaxed"])
    assert summary["step"] == 7 and summary["finished"]
    assert "not exact" in caplog.text
    assert [s for s, _, _ in losses(run)] == list(range(1, 8))
    assert losses(run)[:4] == losses(out)[:4]
    assert losses(run)[4:] != losses(out)[4:]  # a new data order: continued, not repeated

    fresh = tmp_path / "fresh"
    main([*RUN, "--shards", str(shards), "--output", str(fresh), "--max-steps", "1", "--init-from", str(out)])
    again = tmp_path / "again"
    main([*RUN, "--shards", str(shards), "--output", str(again), "--max-steps", "1"])
    assert [s for s, _, _ in losses(fresh)] == [1]
    from safetensors.torch import load_file

    def refiner(run, step):
        return load_file(run / f"checkpoints/step-{step:07d}/face_refiner/diffusion_pytorch_model.safetensors")

    trained, warm, cold = refiner(out, 7), refiner(fresh, 1), refiner(again, 1)
    distance = lambda a: sum(float((a[k] - trained[k]).norm()) for k in trained)  # noqa: E731
    assert distance(warm) < distance(cold) / 3  # one step away from the checkpoint's weights, not from scratch
    state = json.loads((fresh / "checkpoints" / "step-0000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["lr_scheduler"]["last_epoch"] == 1


def test_precompute_cache_gives_the_same_loss_sequence(full_run, shards, tmp_path):
    import shutil

    from trainer.precompute import main as precompute

    out, _ = full_run
    cached = tmp_path / "shards"
    shutil.copytree(shards, cached)
    assert precompute(["--config", "tiny", "--shards", str(cached), "--threads", "1", "--batch-size", "3"]) == {"cached": 4}
    files = sorted(p.name for p in cached.glob("*.cache-64.safetensors"))
    assert files == [f"shard-{i:05d}.cache-64.safetensors" for i in range(4)]
    assert precompute(["--config", "tiny", "--shards", str(cached), "--threads", "1"]) == {"skipped": 4}  # resumable

    run = tmp_path / "run"
    main([*RUN, "--shards", str(cached), "--output", str(run), "--set", "train.val_identities=0"])
    with_cache, without = losses(run), losses(out)
    assert [s for s, _, _ in with_cache] == [s for s, _, _ in without]
    np.testing.assert_allclose([l for _, l, _ in with_cache], [l for _, l, _ in without], rtol=1e-4)

    # the cache is what training read: a cache of another sample's tensors changes the losses
    from safetensors.torch import load_file, save_file

    for path in cached.glob("*.cache-64.safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(path)
        save_file({k: (v.flip(0) if k.endswith("latent_mean") else v) for k, v in tensors.items()}, path, metadata=metadata)
    tampered = tmp_path / "tampered"
    main([*RUN, "--shards", str(cached), "--output", str(tampered), "--max-steps", "2", "--set", "train.val_identities=0"])
    assert [l for _, l, _ in losses(tampered)] != [l for _, l, _ in without][:2]


def test_pipeline_folder_round_trips_with_face_attention(full_run, tmp_path):
    from trainer.pipeline import HiFiPortraitPipeline
    from devtools.shards import template_landmarks

    out, summary = full_run
    assert summary["pipeline"] == str(out / "pipeline")
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "pipeline" / "face_attention.safetensors").is_file()
    pipe = HiFiPortraitPipeline.from_checkpoint(out)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert {"unet", "vae", "controlnet", "face_refiner", "image_encoder", "scheduler", "tokenizer_2"} <= set(index)
    loaded = HiFiPortraitPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    face = [n for n, p in loaded.unet.attn_processors.items() if hasattr(p, "to_k_face")]
    assert len(face) == len(pipe._face_processors()) > 0
    args = ("a photo", torch.zeros(4, 3, 32, 32), np.eye(4, 128, dtype=np.float32))
    kwargs = {"landmarks": template_landmarks() * 24 + 4, "width": 32, "height": 32, "num_inference_steps": 2, "output_type": "latent"}
    a = pipe(*args, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(*args, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(a, b)
    exported = HiFiPortraitPipeline.from_pretrained(out / "pipeline")  # what the finished run wrote
    exported.set_progress_bar_config(disable=True)
    torch.testing.assert_close(exported(*args, generator=torch.Generator().manual_seed(0), **kwargs).images, a)

    # a base override: the frozen parts from another folder (here the run's base), trained parts from this one
    moved = HiFiPortraitPipeline.from_pretrained(folder, base=out / "base")
    moved.set_progress_bar_config(disable=True)
    torch.testing.assert_close(moved(*args, generator=torch.Generator().manual_seed(0), **kwargs).images, a)
    elsewhere = HiFiPortraitPipeline.from_checkpoint(out / "checkpoints" / "step-0000007", base=folder)
    assert len([p for p in elsewhere.unet.attn_processors.values() if hasattr(p, "to_k_face")]) == len(face)

    (folder / "face_attention.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="face_attention.safetensors missing"):
        HiFiPortraitPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="not a HiFiPortraitPipeline folder"):
        HiFiPortraitPipeline.from_pretrained(out / "base")


def _damaged(run: Path, dest: Path, damage) -> Path:
    """A copy of the run (its base and checkpoints) with ``damage(latest step folder)`` done."""
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("pipeline", "logs", "*.png"))
    damage(dest / "checkpoints" / (dest / "checkpoints" / "latest").read_text().strip())
    return dest


INFER_MISTAKES = {  # name -> (damage to the latest step folder, extra arguments, words the answer must hold)
    "truncated safetensors": (lambda s: (s / "face_attention.safetensors").write_bytes((s / "face_attention.safetensors").read_bytes()[:900]), [],
                              "face_attention.safetensors: not a readable safetensors file"),
    "garbage safetensors": (lambda s: (s / "controlnet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x07garbage" * 100), [],
                            "controlnet/diffusion_pytorch_model.safetensors"),
    "bad config.json": (lambda s: (s.parent.parent / "base" / "unet" / "config.json").write_text("{oops"), [], "unet/config.json"),
    "bad trainer_state.json": (lambda s: (s / "trainer_state.json").write_text("[]"), [], "trainer_state.json: lacks step"),
    "size 7": (lambda s: None, ["--size", "7"], "--size 7: this model makes images whose side is a multiple of"),
    "steps 0": (lambda s: None, ["--steps", "0"], "--steps: expected a whole number of at least 1, got 0"),
}


@pytest.mark.parametrize("mistake", INFER_MISTAKES)
def test_infer_answers_a_user_mistake_in_one_line_with_exit_code_2(full_run, tmp_path, capsys, mistake):
    """trainer.infer once printed 40-line tracebacks for these, and took --steps 0 (issue 15 item 7)."""
    from trainer.infer import main as infer_main
    from trainer.usage import run

    damage, extra, words = INFER_MISTAKES[mistake]
    case = _damaged(full_run[0], tmp_path / "run", damage)
    np.save(tmp_path / "lm.npy", np.full((68, 2), 8.0, np.float32))
    (tmp_path / "faces.yaml").write_text("faces:\n  backend: dlib\n")
    argv = ["--checkpoint", str(case), "--reference", "a.jpg", "--landmarks", str(tmp_path / "lm.npy"), "--prompt", "x",
            "--faces", str(tmp_path / "faces.yaml"), "--steps", "1", "--size", "32", *extra]  # fmt: skip
    assert run(lambda: infer_main(argv)) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


def test_a_step_folder_moved_out_of_its_run_and_shards_that_are_not_tars_are_named(full_run, tmp_path, capsys):
    import shutil

    from trainer.infer import main as infer_main
    from trainer.usage import run

    run_dir = full_run[0]
    moved = tmp_path / "moved"
    shutil.copytree(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip(), moved)
    assert run(lambda: infer_main(["--checkpoint", str(moved), "--reference", "a.jpg", "--prompt", "x", "--faces", str(moved / "none.yaml")])) == 2
    assert "none.yaml" in capsys.readouterr().err  # the faces settings are read first
    (tmp_path / "faces.yaml").write_text("faces:\n  backend: dlib\n")
    code = run(lambda: infer_main(["--checkpoint", str(moved), "--reference", "a.jpg", "--prompt", "x", "--faces", str(tmp_path / "faces.yaml")]))
    err = capsys.readouterr().err
    assert code == 2 and "its base model is kept in its run folder" in err and "SDXL" not in err, err
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-00000.tar").write_bytes(b"")
    (shards / "shard-00001.tar").write_bytes(b"\x00garbage" * 512)
    assert run(lambda: main([*RUN, "--shards", str(shards), "--output", str(tmp_path / "out")])) == 2
    err = capsys.readouterr().err
    assert "no readable sample in 2 shard(s)" in err and "Traceback" not in err, err


def test_sigterm_stops_training_cleanly_and_resume_latest_finishes_the_same_run(full_run, shards, tmp_path, capsys):
    """A scheduler's stop (SIGTERM) mid-run: exit 143 with one line saying how to go on, every
    checkpoint whole; `--resume latest` then ends where the uninterrupted run ended."""
    import signal
    import threading
    import time

    from trainer.usage import run

    out, _ = full_run
    metrics = tmp_path / "metrics.jsonl"

    def stop_after_the_first_step():
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    stopper = threading.Thread(target=stop_after_the_first_step)
    stopper.start()
    try:
        code = run(lambda: main([*RUN, "--shards", str(shards), "--output", str(tmp_path)]))
    finally:
        stopper.join()
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 143 and "stopped (SIGTERM)" in err and "--resume latest" in err and "Traceback" not in err, err
    logged = [s for s, _, _ in losses(tmp_path)]
    assert logged and logged[-1] < 7, logged  # stopped mid-run
    assert not list(tmp_path.glob("checkpoints/.tmp-*"))
    main([*RUN, "--shards", str(shards), "--output", str(tmp_path), "--resume", "latest"])
    assert losses(tmp_path) == losses(out)
