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
   all-bf16. Activations are not included: they depend on batch size, resolution and
   checkpointing, and only a GPU run can measure them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=str(REPO / "manifests" / "demo" / "shards"))
    parser.add_argument("--quick", action="store_true", help="fewer batches and steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    shards, where = shards_for(args)
    print(f"shards: {where}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU only")
    bench_loader(shards, args.quick)
    bench_tiny_step(shards, args.quick)
    bench_sdxl_meta()


if __name__ == "__main__":
    main()
