"""HiFi-Net, the face refiner and one training step, on the tiny config (CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainer.config import load_config
from trainer.data import in_order, make_loader
from trainer.hifinet import FaceAttnProcessor, build_hifinet, check_conditioning_channels
from devtools.shards import synthetic_samples, write_shards
from trainer.train import Trainer



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, synthetic_samples(8, 6, seed=4), identities_per_shard=2)
    return folder


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, shards):
    overrides = [
        "data.num_workers=0",
        "data.batch_size=2",
        "train.prompt_dropout=0",
        "train.face_dropout=0",
        "train.joint_dropout=0",
        "train.warmup_steps=0",
        "train.lr_scheduler=constant",
        "train.learning_rate=0.001",
    ]
    t = Trainer(load_config("tiny", overrides), tmp_path_factory.mktemp("run"), str(shards), threads=1)
    t.setup()
    return t


@pytest.fixture(scope="module")
def batch(trainer):
    trainer.stream.set_position(0, 0)
    return next(iter(in_order(make_loader(trainer.stream), 0)))


def test_tensor_shapes_end_to_end(trainer, batch):
    from trainer.conditioning import encode_prompts, encode_reference_crops, model_inputs

    base, net = trainer.base, trainer.net
    inputs = model_inputs(batch, "cpu")
    assert inputs["pixels"].min() >= -1 and inputs["pixels"].max() <= 1 and inputs["pixels"].std() > 0.1
    cross = base.unet.config.cross_attention_dim
    prompt, pooled = encode_prompts((base.tokenizer, base.tokenizer_2), (base.text_encoder, base.text_encoder_2), batch["captions"], "cpu")
    assert prompt.shape == (2, 77, cross) and pooled.shape == (2, base.text_encoder_2.config.projection_dim)
    clip = encode_reference_crops(base.image_encoder, inputs["reference_pixels"])
    tokens_in_crop = (32 // 8) ** 2 + 1
    assert clip.shape == (2, 4, tokens_in_crop, base.image_encoder.config.hidden_size)
    tokens = net.face_tokens(clip, batch["reference_embeddings"])
    assert tokens.shape == (2, trainer.cfg.refiner.num_tokens, cross)

    latents = base.vae.encode(inputs["pixels"]).latent_dist.mean
    assert latents.shape == (2, 4, 16, 16)  # 64 px / VAE factor 4
    t = torch.tensor([10, 500])
    added = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
    down, mid = net.controlnet(latents, t, tokens, controlnet_cond=inputs["landmark_image"], added_cond_kwargs=added, return_dict=False)
    channels = base.unet.config.block_out_channels
    expected = [(channels[0], 16)] + [(channels[0], 16), (channels[0], 8), (channels[1], 8), (channels[1], 4), (channels[2], 4)]
    assert [(r.shape[1], r.shape[2]) for r in down] == expected
    assert mid.shape == (2, channels[-1], 4, 4)
    prediction = net(latents, t, prompt, pooled, batch["time_ids"], inputs["landmark_image"], clip, batch["reference_embeddings"])
    assert prediction.shape == latents.shape


def test_face_attention_is_on_every_cross_attention_layer_only(trainer):
    processors = trainer.base.unet.attn_processors
    face = {n for n, p in processors.items() if isinstance(p, FaceAttnProcessor)}
    assert face and face == {n for n in processors if n.endswith("attn2.processor")}
    assert len(trainer.net.face_attention) == len(face)


def test_frozen_parts_get_no_gradients_and_trained_parts_do(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name, module in trainer.base.frozen_modules().items():
        own = [p for n, p in module.named_parameters() if "_face" not in n]
        assert own and all(not p.requires_grad and p.grad is None for p in own), name
    net = trainer.net
    assert all(p.requires_grad and p.grad is not None for p in net.parameters())
    for part in (net.controlnet, net.refiner, net.face_attention):
        assert sum(p.grad.norm() for p in part.parameters()) > 0
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in net.parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)


def test_refiner_ignores_the_order_of_references(trainer, batch):
    from trainer.conditioning import encode_reference_crops, normalise_clip

    clip = encode_reference_crops(trainer.base.image_encoder, normalise_clip(batch["reference_pixels"]))
    ids = batch["reference_embeddings"]
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = trainer.net.refiner(clip, ids)
        b = trainer.net.refiner(clip[:, order], ids[:, order])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_without_face_attention_the_unet_keeps_its_processors(trainer):
    from diffusers import UNet2DConditionModel

    from trainer.architectures import TINY_UNET

    cfg = load_config("tiny", ["hifinet.face_cross_attention=false"])
    unet = UNet2DConditionModel(**TINY_UNET)
    net = build_hifinet(unet, 32, 128, cfg.refiner, cfg.hifinet, vae_factor=4)
    assert len(net.face_attention) == 0
    assert not any(isinstance(p, FaceAttnProcessor) for p in unet.attn_processors.values())
    assert not net.uses_face_attention


def test_condition_dropout_partitions_the_draws():
    from trainer.train import condition_dropout

    u = torch.tensor([0.0, 0.09, 0.1, 0.19, 0.2, 0.29, 0.3, 0.99])
    prompt, face = condition_dropout(u, 0.1, 0.1, 0.1)
    assert prompt.tolist() == [True, True, False, False, True, True, False, False]
    assert face.tolist() == [False, False, True, True, True, True, False, False]
    none_dropped = condition_dropout(torch.rand(1000), 0.0, 0.0, 0.0)
    assert not none_dropped[0].any() and not none_dropped[1].any()


def test_dropped_prompts_are_zero_embeddings_and_dropped_faces_zero_tokens(trainer, batch):
    from trainer.conditioning import encode_prompts, encode_reference_crops, normalise_clip

    base = trainer.base
    prompt, pooled = encode_prompts((base.tokenizer, base.tokenizer_2), (base.text_encoder, base.text_encoder_2), ["", "a face"], "cpu")
    assert prompt[0].abs().sum() == 0 and pooled[0].abs().sum() == 0 and prompt[1].abs().sum() > 0
    clip = encode_reference_crops(base.image_encoder, normalise_clip(batch["reference_pixels"]))
    tokens = trainer.net.face_tokens(clip, batch["reference_embeddings"], face_keep=torch.tensor([False, True]))
    assert tokens[0].abs().sum() == 0 and tokens[1].abs().sum() > 0


def test_conditioning_channels_must_match_the_vae():
    check_conditioning_channels([16, 32, 96, 256], 8)
    with pytest.raises(ValueError, match="VAE downsamples by 4"):
        check_conditioning_channels([16, 32, 96, 256], 4)


def test_sdxl_needs_local_folders_with_clear_errors(tmp_path):
    from trainer.components import check_base_folders

    with pytest.raises(ValueError, match="model.pretrained"):
        load_config("sdxl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_base_folders(tmp_path / "nowhere", tmp_path / "enc")
    (tmp_path / "sdxl" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks sub-folder.*vae"):
        check_base_folders(tmp_path / "sdxl", tmp_path / "enc")
    done = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", "sdxl", "--model", str(tmp_path / "none"), "--shards", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "does not exist" in done.stderr or "no shards" in done.stderr
    assert "Traceback" not in done.stderr


def test_loss_falls_when_overfitting_one_batch(trainer, batch):
    """Same batch, same noise and timesteps every step (the generator is rewound): the trained
    parts must learn it. Runs last: it changes the shared trainer's weights."""
    state = trainer.generator.get_state()
    losses = []
    for _ in range(25):
        trainer.generator.set_state(state)
        loss = trainer.loss(batch)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a different precision needs it reset, before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_keeps_trained_weights_float32_and_frozen_ones_bf16(fresh_accelerator_state, tmp_path, shards, batch):
    """The GPU's mixed-precision layout, run on CPU (train.cpu_mixed_precision). Runs after the
    tests that share the float32 trainer."""
    overrides = ["data.num_workers=0", "data.batch_size=2", "train.cpu_mixed_precision=true"]
    t = Trainer(load_config("tiny", overrides), tmp_path, str(shards), threads=1)
    t.setup()
    assert t.accelerator.mixed_precision == "bf16"
    loss = t.loss(batch)
    t.accelerator.backward(loss)
    t.optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in t.net.parameters())
    unet_own = [p for n, p in t.base.unet.named_parameters() if "_face" not in n]
    assert all(p.dtype == torch.bfloat16 for p in unet_own)
    assert t.base.text_encoder.dtype == t.base.image_encoder.dtype == torch.bfloat16
