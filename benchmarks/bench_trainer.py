"""Trainer benchmarks: loader throughput, tiny step time on CPU, SDXL sizes and memory per GPU.

    .venv/bin/python benchmarks/bench_trainer.py [--shards manifests/demo/shards] [--quick]

1. Loader: decoded identity groups (1 target + k references, the unit a training example is
   made of) per second through the real DataLoader, 2 workers against 0 workers (decoding in the
   main process) as the baseline, at the tiny config's sizes (64 px, 32 px CLIP crops) and the
   sdxl config's (1024 px, 224 px).
2. Tiny step: seconds per optimizer step on CPU (forward, backward, AdamW) with gradient
   checkpointing (the configs' default) against without it.
3. SDXL on the meta device (``accelerate.init_empty_weights``, no weights needed) from the real
   configs in trainer/architectures.py: trained and frozen parameter counts and the memory per
   GPU for weights, gradients and AdamW state in bf16, as the trainer holds them (frozen weights
   bf16; trained weights float32 masters under bf16 autocast, float32 gradients and moments) and
   all-bf16.
4. SDXL plan at 1024 px, also on the meta device (no weights, no GPU): FLOPs per training example
   (torch.utils.flop_counter over the real forward + backward, recomputation included, and the
   frozen encoders: fp32 VAE encode, both text encoders, CLIP-H on the k references), the same with
   the precompute cache; activation memory at each card preset's batch size (bytes autograd saves
   for backward, counted by saved-tensor hooks, plus, with checkpointing, the inputs kept at block
   boundaries and the largest block's activations while it is recomputed); memory per GPU against
   the card; optimizer steps per hour on 8 A100s and 8 H100s at a stated utilisation.
   These are planning figures: a GPU run confirms them (allocator overhead and workspace, NCCL
   buffers and real kernel efficiency are not modelled).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.data import IdentityStream, in_order, make_loader  # noqa: E402

GiB = 1024**3


def shards_for(args) -> tuple[str, str]:
    demo = Path(args.shards)
    if list(demo.glob("*.tar")):
        return str(demo), f"{demo} (demo shards)"
    from devtools.shards import synthetic_samples, write_shards

    folder = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    write_shards(folder, synthetic_samples(16, 10, seed=0, size=160), identities_per_shard=4)
    return str(folder), f"{folder} (synthetic: {demo} has no shards; run make demo)"


def loader_rate(shards: str, workers: int, resolution: int, clip: int, batches: int) -> float:
    stream = IdentityStream(
        shards, resolution=resolution, clip_size=clip, references=4, batch_size=4,
        batches_per_epoch=batches, num_workers=workers, seed=0,
    )
    stream.set_position(0, 0)
    loader = make_loader(stream)
    iterator = in_order(loader, 0)
    first = next(iterator)  # worker start-up is not throughput
    started, groups = time.perf_counter(), 0
    for batch in iterator:
        groups += len(batch["keys"])
    elapsed = time.perf_counter() - started
    del first
    return groups / elapsed


def bench_loader(shards: str, quick: bool) -> None:
    print("\n== loader: decoded identity groups per second (batch 4, k=4) ==")
    batches = 12 if quick else 40
    for name, resolution, clip in (("tiny sizes 64px/32px", 64, 32), ("sdxl sizes 1024px/224px", 1024, 224)):
        base = loader_rate(shards, 0, resolution, clip, batches)
        two = loader_rate(shards, 2, resolution, clip, batches)
        print(f"{name:26s} 0 workers (baseline) {base:7.1f}/s   2 workers {two:7.1f}/s   ratio {two / base:4.2f}x")


def bench_tiny_step(shards: str, quick: bool) -> None:
    from trainer.config import load_config
    from trainer.train import Trainer

    print("\n== tiny config: one optimizer step on CPU (batch 4, 64 px, 1 thread) ==")
    steps = 5 if quick else 15
    results = {}
    for checkpointing in (True, False):
        out = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
        overrides = ["data.num_workers=0", f"train.gradient_checkpointing={str(checkpointing).lower()}"]
        trainer = Trainer(load_config("tiny", overrides), out, shards, threads=1)
        trainer.setup()
        trainer.stream.set_position(0, 0)
        batch = next(iter(in_order(make_loader(trainer.stream), 0)))
        times = []
        for index in range(steps + 2):
            started = time.perf_counter()
            loss = trainer.loss(batch)
            trainer.accelerator.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if index >= 2:  # first steps warm allocator and kernels
                times.append(time.perf_counter() - started)
        results[checkpointing] = statistics.median(times)
    print(f"without gradient checkpointing (baseline) {results[False]:.3f} s/step")
    print(f"with gradient checkpointing (default)     {results[True]:.3f} s/step   ratio {results[True] / results[False]:4.2f}x")


def bench_sdxl_meta() -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from trainer import architectures as arch
    from trainer.components import freeze
    from trainer.config import load_config
    from trainer.hifinet import build_hifinet

    print("\n== sdxl config on the meta device (SDXL base 1.0 + OpenCLIP ViT-H/14 image encoder) ==")
    cfg = load_config("sdxl", ["model.pretrained=/meta", "model.image_encoder=/meta"])
    for id_dim, backend in ((512, "ArcFace embeddings"), (128, "dlib embeddings")):
        with init_empty_weights():
            unet = UNet2DConditionModel(**arch.SDXL_UNET)
            frozen = {
                "unet": unet,
                "vae": AutoencoderKL(**arch.SDXL_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.SDXL_TEXT_ENCODER)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**arch.SDXL_TEXT_ENCODER_2)),
                "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.IMAGE_ENCODER_VIT_H)),
            }
            for module in frozen.values():
                freeze(module)  # as load_base does; the face attention installed next stays trainable
            net = build_hifinet(
                unet, arch.IMAGE_ENCODER_VIT_H["hidden_size"], id_dim, cfg.refiner, cfg.hifinet, vae_factor=8,
                copy_weights=False,
            )
        trained = {
            "controlnet": sum(p.numel() for p in net.controlnet.parameters()),
            "face_refiner": sum(p.numel() for p in net.refiner.parameters()),
            "face_attention": sum(p.numel() for p in net.face_attention.parameters()),
        }
        frozen_counts = {k: sum(p.numel() for p in m.parameters() if not p.requires_grad) for k, m in frozen.items()}
        n_trained, n_frozen = sum(trained.values()), sum(frozen_counts.values())
        # the trainer keeps a VAE with force_upcast (SDXL's) in float32, every other frozen part in bf16
        vae_bytes = 4 if arch.SDXL_VAE["force_upcast"] else 2
        frozen_bytes = 2 * (n_frozen - frozen_counts["vae"]) + vae_bytes * frozen_counts["vae"]
        print(f"\n-- face refiner fed {backend} ({id_dim}-d); {len(net.face_attention)} face cross-attention layers")
        for name, count in trained.items():
            print(f"trained {name:16s} {count:>15,}")
        for name, count in frozen_counts.items():
            print(f"frozen  {name:16s} {count:>15,}")
        print(f"trained total            {n_trained:>15,}")
        print(f"frozen total             {n_frozen:>15,}")
        rows = [
            ("as trained: frozen bf16 (VAE fp32), trained fp32 + fp32 grads + fp32 AdamW", frozen_bytes + 4 * n_trained, 4 * n_trained, 8 * n_trained),
            ("all bf16 (weights, grads, AdamW moments)", 2 * (n_frozen + n_trained), 2 * n_trained, 4 * n_trained),
        ]
        print(f"{'memory per GPU (GiB), DDP keeps a full copy per GPU':74s} weights   grads  AdamW   total")
        for name, weights, grads, optim in rows:
            print(f"{name:74s} {weights / GiB:7.2f} {grads / GiB:7.2f} {optim / GiB:6.2f} {(weights + grads + optim) / GiB:7.2f}")
    print("(gradients are DDP's bucket views, no second copy; activations come on top)")


PEAK_TFLOPS = {"A100 (bf16 dense 312 TFLOP/s)": 312e12, "H100 SXM (bf16 dense 989 TFLOP/s)": 989e12}
UTILISATION = 0.40  # model FLOPs utilisation assumed for the step-rate estimate


class SavedBytes:
    """Bytes autograd keeps for backward (each storage once), and what checkpointing keeps and
    rematerialises."""

    def __init__(self):
        self.storages: dict[int, int] = {}
        self.boundary = 0  # tensor inputs the checkpointed blocks keep
        self.largest_block = 0  # the most any one block saves, alive again while it is recomputed

    def pack(self, tensor):
        key = tensor.untyped_storage()._cdata
        self.storages[key] = max(self.storages.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def checkpoint_func(self):
        """A gradient_checkpointing_func for diffusers that measures each block before checkpointing it."""

        def run(module, *args):
            inner = SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
                module(*args)  # meta device: costs no compute
            self.largest_block = max(self.largest_block, inner.total)
            self.boundary += sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a))
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

        return run


def meta_sdxl(cfg, id_dim: int = 512):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from trainer import architectures as arch
    from trainer.components import freeze
    from trainer.hifinet import build_hifinet

    with init_empty_weights():
        unet = UNet2DConditionModel(**arch.SDXL_UNET)
        frozen = {
            "unet": unet,
            "vae": AutoencoderKL(**arch.SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.SDXL_TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**arch.SDXL_TEXT_ENCODER_2)),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.IMAGE_ENCODER_VIT_H)),
        }
        for module in frozen.values():
            freeze(module)
        net = build_hifinet(unet, arch.IMAGE_ENCODER_VIT_H["hidden_size"], id_dim, cfg.refiner, cfg.hifinet, vae_factor=8, copy_weights=False)
    frozen["unet"].to(torch.bfloat16)
    for name in ("text_encoder", "text_encoder_2", "image_encoder"):
        frozen[name].to(torch.bfloat16)
    return net, frozen


def sdxl_step(net, frozen, batch: int, resolution: int, refs: int, controlnet_ckpt: bool, unet_ckpt: bool, encoders: bool, measure: str):
    """One training step on the meta device: its FLOPs (``measure="flops"``) or its activation
    bytes (``measure="memory"``; the block measurement would add forward FLOPs, hence two passes)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    saved = SavedBytes()
    for module, on in ((net.controlnet, controlnet_ckpt), (frozen["unet"], unet_ckpt)):
        if module.is_gradient_checkpointing:
            module.disable_gradient_checkpointing()
        if on:
            module.enable_gradient_checkpointing(saved.checkpoint_func() if measure == "memory" else None)
    latent = resolution // 8
    counter = FlopCounterMode(display=False) if measure == "flops" else contextlib.nullcontext()
    with counter:
        if encoders:
            with torch.no_grad():
                frozen["vae"].encode(torch.empty(batch, 3, resolution, resolution, device=meta))  # fp32 (force_upcast)
                ids = torch.zeros(batch, 77, dtype=torch.long, device=meta)
                frozen["text_encoder"](ids, output_hidden_states=True)
                frozen["text_encoder_2"](ids, output_hidden_states=True)
                frozen["image_encoder"](torch.empty(batch * refs, 3, 224, 224, device=meta, dtype=torch.bfloat16), output_hidden_states=True)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            bf = {"device": meta, "dtype": torch.bfloat16}
            prediction = net(
                torch.empty(batch, 4, latent, latent, **bf),
                torch.zeros(batch, dtype=torch.long, device=meta),
                torch.empty(batch, 77, 2048, **bf),
                torch.empty(batch, 1280, **bf),
                torch.empty(batch, 6, **bf),
                torch.empty(batch, 3, resolution, resolution, **bf),
                clip_hidden=torch.empty(batch, refs, 257, 1280, **bf),
                id_embeds=torch.empty(batch, refs, 512, **bf),
            )
        prediction.float().pow(2).mean().backward()
    if measure == "flops":
        return counter.get_total_flops()
    return saved.total + saved.boundary + saved.largest_block


def bench_sdxl_plan() -> None:
    from diffusers.utils import logging as diffusers_logging

    from trainer.config import load_config

    diffusers_logging.set_verbosity_error()
    print(f"\n== sdxl plan at 1024 px on the meta device (load {os.getloadavg()[0]:.2f}; counts, not timings) ==")
    paths = ["model.pretrained=/meta", "model.image_encoder=/meta"]
    cfg = load_config("sdxl", paths)
    net, frozen = meta_sdxl(cfg)
    net.to(torch.bfloat16)  # autocast's compute dtype; the float32 masters are counted in the weights column
    n_trained = sum(p.numel() for p in net.parameters())
    n_frozen = {k: sum(p.numel() for p in m.parameters()) for k, m in frozen.items()}
    weights_frozen = 2 * (sum(n_frozen.values()) - n_frozen["vae"]) + 4 * n_frozen["vae"]
    refs, res = cfg.data.references, cfg.data.resolution
    step = partial(sdxl_step, net, frozen, resolution=res, refs=refs)
    print("per training example (batch 1):  FLOPs = forward + backward of the trained path (recomputation included) + frozen encoders")
    print(f"  {'checkpointing':24s} {'encoders':18s} {'TFLOP':>7s} {'activations':>11s}")
    per_example = {}
    for cn, un in ((True, True), (True, False), (False, False)):
        activations = step(1, controlnet_ckpt=cn, unet_ckpt=un, encoders=True, measure="memory")
        for enc in (True, False):
            flops = step(1, controlnet_ckpt=cn, unet_ckpt=un, encoders=enc, measure="flops")
            per_example[(cn, un, enc)] = flops
            label = {(True, True): "ControlNet + UNet", (True, False): "ControlNet only", (False, False): "none"}[(cn, un)]
            print(f"  {label:24s} {'every step' if enc else 'precompute cache':18s} {flops / 1e12:7.1f} {activations / GiB:7.1f} GiB")
    print(f"\n{'preset':10s} {'batch':>5s} {'accum':>5s} {'ckpt CN/UNet':>12s} {'optimizer':>9s} {'activations':>11s} {'weights+grads+optim':>19s} {'total/GPU':>9s}  card")
    plans = []
    for preset, card in (("sdxl-80gb", 80), ("sdxl-40gb", 40)):
        p = load_config(preset, paths)
        b, t = p.data.batch_size, p.train
        activations = step(b, controlnet_ckpt=t.gradient_checkpointing, unet_ckpt=t.unet_gradient_checkpointing, encoders=True, measure="memory")
        optim_bytes = (2 if t.optimizer == "adamw8bit" else 8) * n_trained
        static = weights_frozen + 4 * n_trained + 4 * n_trained + optim_bytes  # fp32 masters, fp32 grads (DDP buckets)
        total = static + activations
        print(f"{preset:10s} {b:5d} {t.gradient_accumulation_steps:5d} {str(t.gradient_checkpointing)[0] + '/' + str(t.unet_gradient_checkpointing)[0]:>12s} "
              f"{t.optimizer:>9s} {activations / GiB:7.1f} GiB {static / GiB:15.1f} GiB {total / GiB:5.1f} GiB  {card} GB = {card * 1e9 / GiB:.1f} GiB ({total / (card * 1e9) * 100:.0f}%)")
        plans.append((preset, b * t.gradient_accumulation_steps, per_example[(t.gradient_checkpointing, t.unet_gradient_checkpointing, True)],
                      per_example[(t.gradient_checkpointing, t.unet_gradient_checkpointing, False)]))
    print(f"\noptimizer steps per hour on 8 GPUs at {UTILISATION:.0%} model FLOPs utilisation (without -> with the precompute cache):")
    for preset, per_gpu_batch, flops, cached in plans:
        for gpu, peak in PEAK_TFLOPS.items():
            rate = 3600 * UTILISATION * peak  # FLOPs per GPU per hour
            print(f"  {preset:10s} effective batch {8 * per_gpu_batch:3d}  {gpu:34s} {rate / flops / per_gpu_batch:6.0f} -> {rate / cached / per_gpu_batch:6.0f} steps/h"
                  f"  ({rate / flops:6.0f} -> {rate / cached:6.0f} examples/h/GPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=str(REPO / "manifests" / "demo" / "shards"))
    parser.add_argument("--quick", action="store_true", help="fewer batches and steps")
    parser.add_argument("--plan-only", action="store_true", help="only the SDXL plan (section 4)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    if args.plan_only:
        bench_sdxl_plan()
        return
    shards, where = shards_for(args)
    print(f"shards: {where}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU only")
    bench_loader(shards, args.quick)
    bench_tiny_step(shards, args.quick)
    bench_sdxl_meta()
    bench_sdxl_plan()


if __name__ == "__main__":
    main()
