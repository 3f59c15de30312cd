"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder ``OUTPUT/checkpoints/step-NNNNNNN/`` holds

- ``controlnet/`` and ``face_refiner/``: diffusers ``save_pretrained`` folders (config.json +
  safetensors), loadable with ``from_pretrained``;
- ``face_attention.safetensors``: the trained key/value projections of the face attention;
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW's moment tensors and its param groups;
- ``rng-rank{R}.safetensors``: each rank's noise generator and torch RNG states;
- ``trainer_state.json``: step, loader position, LR-scheduler and grad-scaler state, data
  counters, the config, and where the frozen base came from.

``OUTPUT/checkpoints/latest`` is a one-line text file naming the newest complete checkpoint; a
checkpoint is written under a temporary name and renamed when complete, so ``latest`` never
points at a partial one.

Writing does not hold the other ranks: the main process copies the trained weights and the
optimizer state to host memory (``snapshot``, seconds), every rank writes its small RNG file,
and a background thread of the main process writes the ~20 GB (SDXL) and renames the folder
once every rank's RNG file is there (``write_snapshot``). Training continues meanwhile; the next
checkpoint (or the end of the run) waits for the previous write to finish.

Loading the optimizer streams its tensors one at a time from the memory-mapped safetensors file
straight to the training device (``load_optimizer``): a rank never holds the whole file in host
memory (8 ranks each reading 13.4 GB at once was the old cost).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


def checkpoint_root(output: Path) -> Path:
    return Path(output) / "checkpoints"


def resolve_checkpoint(path: str | Path, output: Path | None = None) -> Path:
    """A checkpoint folder from: a checkpoint folder, a run folder, a checkpoints folder, or
    ``latest`` (relative to ``output``)."""
    path = Path(path)
    if str(path) == "latest":
        if output is None:
            raise ValueError("'latest' needs the run's output folder")
        path = checkpoint_root(output)
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE_FILE).is_file():
            return candidate
        latest = candidate / "latest"
        if latest.is_file():
            found = candidate / latest.read_text().strip()
            if (found / STATE_FILE).is_file():
                return found
            raise FileNotFoundError(f"{latest} names {found.name}, which is not a complete checkpoint")
    raise FileNotFoundError(f"no checkpoint at {path} (looked for {STATE_FILE} and checkpoints/latest)")


# ---------------------------------------------------------------- optimizer


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory that later in-place updates of ``tensor`` do not change."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = host_copy(value)
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- RNG


def rng_tensors(generator: torch.Generator) -> dict:
    tensors = {"noise_generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    return tensors


def restore_rng(tensors: dict, generator: torch.Generator) -> None:
    generator.set_state(tensors["noise_generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


# ---------------------------------------------------------------- save / load


def save_trained_parts(net, folder: Path) -> None:
    net.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    net.refiner.save_pretrained(folder / "face_refiner", safe_serialization=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.face_attention.state_dict().items()}
    if tensors:
        save_file(tensors, folder / "face_attention.safetensors")


def _load_folder_weights(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    weights = {}
    for file in files:
        weights.update(read_weights(file))
    return weights


def _load_into(module, weights: dict, where: Path) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exn:  # other names or shapes: another config's checkpoint
        raise ValueError(f"{where}: the weights do not fit this model ({str(exn).splitlines()[0]})") from None


def load_trained_parts(net, folder: Path) -> None:
    _load_into(net.controlnet, _load_folder_weights(folder / "controlnet"), folder / "controlnet")
    _load_into(net.refiner, _load_folder_weights(folder / "face_refiner"), folder / "face_refiner")
    face_file = folder / "face_attention.safetensors"
    if len(net.face_attention):
        if not face_file.is_file():
            raise FileNotFoundError(f"{face_file} missing but the model uses face attention")
        _load_into(net.face_attention, read_weights(face_file), face_file)


def begin(output: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (main process)."""
    tmp = checkpoint_root(output) / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' from_pretrained reads


def snapshot(net, optimizer, state: dict) -> dict:
    """Everything the main process writes, copied to host memory (training may go on)."""
    parts = {}
    for name, module in (("controlnet", net.controlnet), ("face_refiner", net.refiner)):
        parts[name] = (dict(module.config), {k: host_copy(v) for k, v in module.state_dict().items()})
    face = {k: host_copy(v) for k, v in net.face_attention.state_dict().items()}
    optimizer_files = optimizer_to_files(optimizer) if optimizer is not None else None
    return {"parts": parts, "configs": {"controlnet": net.controlnet, "face_refiner": net.refiner},
            "face_attention": face, "optimizer": optimizer_files, "state": state}


def write_snapshot(tmp: Path, snap: dict) -> None:
    for name, (_, weights) in snap["parts"].items():
        (tmp / name).mkdir(parents=True, exist_ok=True)
        snap["configs"][name].save_config(tmp / name)  # config.json, as save_pretrained writes it
        save_file(weights, tmp / name / WEIGHTS_NAME, metadata={"format": "pt"})
    if snap["face_attention"]:
        save_file(snap["face_attention"], tmp / "face_attention.safetensors")
    if snap["optimizer"] is not None:  # None: sharded by DeepSpeed/FSDP, not checkpointed
        tensors, meta = snap["optimizer"]
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta) + "\n")
    (tmp / STATE_FILE).write_text(json.dumps(snap["state"], indent=1, default=str) + "\n")


def wait_for_rank_files(tmp: Path, world_size: int, timeout: float) -> None:
    """Every rank writes its RNG file right after the barrier that created ``tmp``; a missing one
    after ``timeout`` seconds means a rank died: the checkpoint stays a temporary folder."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world_size) if not (tmp / f"rng-rank{r}.safetensors").is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tmp}: rank(s) {missing} wrote no RNG state within {timeout:.0f} s; checkpoint left incomplete")
        time.sleep(0.05)


def save_rank_rng(tmp: Path, rank: int, generator: torch.Generator) -> None:
    save_file(rng_tensors(generator), tmp / f"rng-rank{rank}.safetensors")


def finish(output: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename the temporary folder, point ``latest`` at it, prune older checkpoints."""
    root = checkpoint_root(output)
    final = root / f"step-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    latest_tmp.replace(root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


# what loading a checkpoint reads from its state file (train.py's Trainer.state writes more)
STATE_KEYS = ("step", "config", "base_model", "image_encoder", "face_attention")


def load_state(folder: Path) -> dict:
    """The checkpoint's trainer_state.json; ValueError naming the file when it is not one."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exn:
        raise ValueError(f"{path}: not valid JSON ({exn}); the checkpoint is damaged") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}; is it a trainer checkpoint's state file?")
    return state


def read_weights(file: Path) -> dict:
    """A safetensors file's tensors; ValueError naming the file when it is empty, cut short or
    not safetensors at all."""
    from safetensors import SafetensorError

    try:
        return load_file(file)
    except SafetensorError as exn:
        raise ValueError(f"{file}: not a readable safetensors file ({exn}); the checkpoint is damaged") from None


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, device: str | torch.device = "cpu") -> None:
    """Stream the optimizer state from the memory-mapped file to ``device``, tensor by tensor."""
    meta = json.loads((folder / "optimizer.json").read_text())
    tensors = {}
    with safe_open(folder / "optimizer.safetensors", framework="pt", device=str(device)) as handle:
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    try:
        optimizer.load_state_dict(optimizer_from_files(tensors, meta))
    except ValueError as exn:  # another parameter grouping (an older trainer): weights only is what is left
        raise ValueError(f"{folder}: optimizer state does not fit this run ({exn}); use --init-from {folder} to load the weights only") from None


def load_rank_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    path = folder / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the checkpoint was written by fewer ranks than this run has")
    restore_rng(load_file(path), generator)
