"""The training objective against what matters for a real run (tiny config, CPU): the CFG
unconditional branch of inference is what the training dropout taught, SDXL's time ids reach both
networks, v-prediction targets the velocity, accumulation 2 x batch 1 equals batch 2, and the
optimizer's parameter groups carry their own learning rates and decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.data import in_order, make_loader
from devtools.shards import synthetic_samples, template_landmarks, write_shards
from trainer.train import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, synthetic_samples(6, 6, seed=11), identities_per_shard=2)
    return folder


def make_trainer(tmp_path_factory, shards, *overrides) -> Trainer:
    base = ["data.num_workers=0", "data.batch_size=2", "train.warmup_steps=0", "train.lr_scheduler=constant",
            "train.val_identities=0"]
    t = Trainer(load_config("tiny", [*base, *overrides]), tmp_path_factory.mktemp("run"), str(shards), threads=1)
    t.setup()
    return t


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, shards):
    # every example drops both conditions: the training side of the CFG pair
    return make_trainer(tmp_path_factory, shards, "train.prompt_dropout=0", "train.face_dropout=0", "train.joint_dropout=1")


@pytest.fixture(scope="module")
def batch(trainer):
    trainer.stream.set_position(0, 0)
    return next(iter(in_order(make_loader(trainer.stream), 0)))


class Capture:
    """Forward pre-hooks recording what a module receives."""

    def __init__(self):
        self.calls, self.handles = [], []

    def on(self, module, name):
        def hook(_module, args, kwargs):
            self.calls.append((name, args, kwargs))

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def first(self, name):
        return next((args, kwargs) for n, args, kwargs in self.calls if n == name)


def unet_inputs(capture):
    _, kwargs = capture.first("unet")
    return kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]["text_embeds"]


def test_inference_unconditional_branch_is_the_training_dropout(trainer, batch):
    """What the UNet and the ControlNet see for a fully dropped training example equals the
    unconditional half of a guided inference step: zero prompt, zero pooled text, zero face tokens."""
    net = trainer.accelerator.unwrap_model(trainer.model)
    training = Capture().on(trainer.base.unet, "unet").on(net.controlnet, "controlnet")
    try:
        with torch.no_grad():
            trainer.loss(batch)
    finally:
        training.remove()
    train_context, train_pooled = unet_inputs(training)
    train_tokens = training.first("controlnet")[1]["encoder_hidden_states"]

    pipe = trainer.pipeline()
    pipe.set_progress_bar_config(disable=True)
    inference = Capture().on(pipe.unet, "unet").on(pipe.controlnet, "controlnet")
    try:
        pipe("a photo of a person", batch["reference_pixels"][0], batch["reference_embeddings"][0].numpy(),
             landmarks=template_landmarks() * 48 + 8, width=64, height=64, num_inference_steps=1, guidance_scale=3.0)
    finally:
        inference.remove()
    infer_context, infer_pooled = unet_inputs(inference)
    infer_tokens = inference.first("controlnet")[1]["encoder_hidden_states"]
    # guided inference batches [unconditional, conditional]; the conditional half really is conditioned
    assert infer_tokens[1].abs().sum() > 0 and infer_context[1].abs().sum() > 0
    torch.testing.assert_close(infer_context[0], train_context[0].to(infer_context.dtype))
    torch.testing.assert_close(infer_pooled[0], train_pooled[0].to(infer_pooled.dtype))
    torch.testing.assert_close(infer_tokens[0], train_tokens[0].to(infer_tokens.dtype))


def test_time_ids_reach_the_unet_and_the_controlnet(trainer, batch):
    capture = Capture().on(trainer.base.unet.add_time_proj, "unet").on(
        trainer.accelerator.unwrap_model(trainer.model).controlnet.add_time_proj, "controlnet")
    try:
        with torch.no_grad():
            trainer.loss(batch)
    finally:
        capture.remove()
    sent = batch["time_ids"].flatten()
    assert sent.abs().sum() > 0  # original size and crop of real examples: never all zero
    for name in ("unet", "controlnet"):
        args, _ = capture.first(name)
        torch.testing.assert_close(args[0].float(), sent)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_targets_noise_or_velocity(trainer, batch, prediction_type):
    """With the model's prediction and the input it saw, the loss is the MSE against the noise
    (epsilon) or against sqrt(a) * noise - sqrt(1 - a) * x0 (v-prediction)."""
    from diffusers import DDPMScheduler

    before = trainer.noise_scheduler
    trainer.noise_scheduler = DDPMScheduler.from_config(before.config, prediction_type=prediction_type)
    draws = trainer.draw(2)
    seen = {}
    hook = trainer.base.unet.register_forward_hook(lambda m, a, kw, out: seen.update(x=kw.get("sample", a[0] if a else None), out=out[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            loss = trainer.loss(batch, draws)
    finally:
        hook.remove()
        trainer.noise_scheduler = before
    alphas = before.alphas_cumprod[draws["timesteps"]].view(-1, 1, 1, 1)
    noise, noisy = draws["noise"], seen["x"].float()
    x0 = (noisy - (1 - alphas).sqrt() * noise) / alphas.sqrt()
    target = noise if prediction_type == "epsilon" else alphas.sqrt() * noise - (1 - alphas).sqrt() * x0
    expected = torch.nn.functional.mse_loss(seen["out"].float(), target)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    other = alphas.sqrt() * noise - (1 - alphas).sqrt() * x0 if prediction_type == "epsilon" else noise
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(seen["out"].float(), other), rtol=1e-3)


def _one_optimizer_step(trainer, batches, draws) -> tuple[dict, list]:
    """The gradients the optimizer steps with, and whether the weights stayed put before it."""
    trainer.model.train()
    net = trainer.accelerator.unwrap_model(trainer.model)
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    grads, unmoved = {}, []
    for index, (micro, part) in enumerate(zip(batches, draws)):
        with trainer.accelerator.accumulate(trainer.model):
            trainer.accelerator.backward(trainer.loss(micro, part))
            if trainer.accelerator.sync_gradients:
                grads = {k: p.grad.detach().clone() for k, p in net.named_parameters() if p.grad is not None}
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        if index < len(batches) - 1:
            unmoved.append(all(torch.equal(p, start[k]) for k, p in net.named_parameters()))
    assert trainer.accelerator.sync_gradients
    return grads, unmoved


def _half(batch, index):
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value[index : index + 1]
        elif isinstance(value, list):
            out[key] = value[index : index + 1]
        else:
            out[key] = value
    return out


def test_accumulating_two_batches_of_one_equals_one_batch_of_two(tmp_path_factory, shards, batch):
    common = ("train.prompt_dropout=0.3", "train.face_dropout=0.3", "train.joint_dropout=0.2", "train.learning_rate=0.01",
              "train.refiner_learning_rate=0.01", "train.face_attention_learning_rate=0.01", "train.max_grad_norm=0")
    # accelerate keeps one gradient-accumulation state per process: each trainer steps right after it is made
    whole = make_trainer(tmp_path_factory, shards, *common)
    draws = whole.draw(2)
    halves = [{k: v[i : i + 1] for k, v in draws.items()} for i in range(2)]
    one, _ = _one_optimizer_step(whole, [batch], [draws])
    split = make_trainer(tmp_path_factory, shards, *common, "train.gradient_accumulation_steps=2")
    two, unmoved = _one_optimizer_step(split, [_half(batch, 0), _half(batch, 1)], halves)
    assert unmoved == [True]  # no optimizer step after the first micro-batch
    assert one.keys() == two.keys() and len(one) > 10
    assert sum(g.abs().sum() for g in one.values()) > 0
    for key in one:  # the mean over two micro-batches of one: the mean over the batch of two
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-7, msg=key)


def test_parameter_groups_have_their_rates_and_no_decay_on_norms_biases_queries(trainer):
    from trainer.optim import decays

    cfg = load_config("sdxl", ["model.pretrained=/x", "model.image_encoder=/x"]).train
    assert cfg.refiner_learning_rate == cfg.face_attention_learning_rate == 1e-4 and cfg.learning_rate == 1e-5
    groups = {g["name"]: g for g in trainer.optimizer.optimizer.param_groups}
    t = trainer.cfg.train
    assert groups["controlnet/decay"]["lr"] == t.learning_rate
    assert groups["refiner/decay"]["lr"] == t.refiner_learning_rate
    assert groups["face_attention/decay"]["lr"] == t.face_attention_learning_rate
    assert all(g["weight_decay"] == 0 for n, g in groups.items() if n.endswith("no_decay"))
    no_decay = {id(p) for n, g in groups.items() if n.endswith("no_decay") for p in g["params"]}
    net = trainer.accelerator.unwrap_model(trainer.model)
    named = dict(net.named_parameters())
    assert id(named["refiner.queries"]) in no_decay
    assert all(id(p) in no_decay for n, p in named.items() if n.endswith("bias") or ".norm" in n)
    assert id(named["controlnet.conv_in.weight"]) not in no_decay and decays("conv_in.weight", named["controlnet.conv_in.weight"])
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in net.parameters() if p.requires_grad)


def test_8bit_adam_runs_or_says_clearly_why_not(tmp_path_factory, shards):
    from trainer.optim import bitsandbytes_unavailable_reason

    reason = bitsandbytes_unavailable_reason()
    t = Trainer(load_config("tiny", ["data.num_workers=0", "train.optimizer=adamw8bit"]), tmp_path_factory.mktemp("run"), str(shards), threads=1)
    if reason is None:
        t.setup()
        assert type(t.optimizer.optimizer).__name__ == "AdamW8bit"
        pytest.skip("bitsandbytes loads here: its optimizer is in use (no failure message to check)")
    with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes.*train.optimizer=adamw"):
        t.setup()


def test_card_presets_extend_sdxl():
    paths = ["model.pretrained=/x", "model.image_encoder=/x"]
    base, big, small = (load_config(n, paths) for n in ("sdxl", "sdxl-80gb", "sdxl-40gb"))
    assert big.train.unet_gradient_checkpointing is False and big.train.gradient_checkpointing is True
    assert small.train.unet_gradient_checkpointing is True and small.train.optimizer == "adamw8bit"
    assert big.refiner == base.refiner and big.train.refiner_learning_rate == base.train.refiner_learning_rate
    for cfg in (big, small):  # the same effective batch per GPU
        assert cfg.data.batch_size * cfg.train.gradient_accumulation_steps == 8


def test_unet_checkpointing_has_its_own_switch(tmp_path_factory, shards):
    t = make_trainer(tmp_path_factory, shards, "train.gradient_checkpointing=true", "train.unet_gradient_checkpointing=false")
    assert t.net.controlnet.is_gradient_checkpointing and not t.base.unet.is_gradient_checkpointing


def test_loader_counts_upsampled_targets(shards):
    from trainer.data import IdentityStream

    counts = {}
    for resolution in (64, 512):  # synthetic photos are 96 px: 512 px training crops are upsampled
        stream = IdentityStream(str(shards), resolution=resolution, clip_size=32, batch_size=2, batches_per_epoch=2)
        stream.set_position(0, 0)
        counts[resolution] = sum(b["stats"].get("upsampled_target", 0) for b in in_order(make_loader(stream), 0))
    assert counts == {64: 0, 512: 4}


@pytest.mark.parametrize("name", ["one_node_8gpu", "multi_node", "deepspeed_zero2"])
def test_accelerate_config_files_load(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parent.parent / "trainer" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16" and config.num_processes == 8 * config.num_machines
    assert str(config.distributed_type).endswith("DEEPSPEED" if name == "deepspeed_zero2" else "MULTI_GPU")


def test_make_train_passes_nodes_rank_and_address():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    command = subprocess.run(
        ["make", "-n", "train", "CONFIG=sdxl-80gb", "MODEL=/models/sdxl", "NODES=4", "NODE_RANK=2", "MAIN_ADDR=10.0.0.7",
         "SHARDS=s3://bucket/shards", "STAMP="],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout
    assert "--config_file trainer/accelerate/multi_node.yaml" in command
    assert "--num_machines 4 --machine_rank 2 --main_process_ip 10.0.0.7" in command
    assert "$(( 8 * 4 ))" in command and "--num_machines 1" not in command


def test_vae_override_loads_a_local_vae_folder_or_names_the_problem(tmp_path_factory, shards, trainer):
    """model.vae (an fp16-fix VAE's folder in a real run) replaces the base's VAE."""
    import shutil

    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("vae") / "fp16-fix"
    shutil.copytree(trainer.base_dir / "vae", folder)
    other = AutoencoderKL.from_pretrained(folder)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    other.register_to_config(force_upcast=False)
    other.save_pretrained(folder)
    t = make_trainer(tmp_path_factory, shards, f"model.vae={folder}")
    assert t.base.vae.config.force_upcast is False
    torch.testing.assert_close(t.base.vae.encoder.conv_in.weight, trainer.base.vae.encoder.conv_in.weight * 0.5)
    with pytest.raises(FileNotFoundError, match="model.vae"):
        make_trainer(tmp_path_factory, shards, f"model.vae={folder.parent / 'missing'}")
