"""The measured cost of each stage and a projection to the full corpus."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from datakit import registry

REPO = Path(__file__).resolve().parents[2]



# ---------------------------------------------------------------- cost and projection


FACE_STAGES = ("detect", "embed")
# Global steps that fan out one Ray task per shard (shard's write): their build.json seconds are
# the wall time of the whole step on the measuring cluster.
FANNED_OUT = ("shard",)


def stage_costs(output: Path) -> dict[str, dict]:
    """Seconds per item each stage spent (from build.json), and the share of the input it sees."""
    build = json.loads((output / "build.json").read_text())
    items = build["counts"]["items"]
    out = {}
    for name in [n for n in registry.STEPS if n in build["stages"]]:
        s = build["stages"][name]
        survival = s["items_in"] / max(1, items)
        if "dedup" in out and name in ("cluster", "caption", "shard"):
            # The rehearsal repeats a few hundred photos, so dedup drops almost everything; a real
            # corpus has few duplicates: project later stages with dedup's input share instead.
            survival = out["dedup"]["survival"]
        out[name] = {"s_per_item": s["seconds"] / max(1, s["items_in"]), "survival": survival,
                     "seconds": s["seconds"], "items_in": s["items_in"]}
    return out


# The paper's models on GPUs. Nothing here has a GPU, so the GPU case rests on published figures,
# per image (detector) and per face (recognition), named with their sources in the output.
GPU_MS = {
    "detect": (4.9, "SCRFD-10GF: 4.9 ms per VGA image on a GPU, batch 1 (insightface detection/scrfd/README.md; "
                    "arXiv:2105.04714)"),
    "embed": (1000 * 16 / (3 * 5200), "ArcFace r100: ~5,200 training samples/s on 16 GPUs (insightface "
              "recognition/arcface_torch/README.md, WF42M-PFC-0.2 r100(256*16)); a training step costs ~3 forward "
              "passes (the backward pass ~2x the forward: Kaplan et al. 2020, arXiv:2001.08361, sec. 2.1), so "
              "~975 faces/s forward per GPU"),
}
PAPER_MODELS = {"detect": ("scrfd_10g_kps", "dlib HOG detector"), "embed": ("arcface_r100", "dlib ResNet (128-d)")}


def paper_model_costs(path: Path = REPO / "bench-out" / "model_costs.json") -> dict[str, dict]:
    """CPU ms per unit (batch 1, one thread) of the paper's models and of the dlib models they
    replace, per face stage: from `make bench-faces` (its model section), else measured now."""
    if path.exists():
        measured = json.loads(path.read_text())
    else:
        from devtools import face_model_zoo as zoo

        with tempfile.TemporaryDirectory() as tmp:
            measured = {"dlib": [], "paper": [zoo.measure(n, Path(tmp), batches=(1,), min_seconds=1.0)
                                              for n, _ in PAPER_MODELS.values()]}
    by_name = {m.get("name", m["label"]): m for m in measured["paper"] + measured["dlib"]}
    return {stage: {"label": by_name[paper]["label"], "cpu_ms": by_name[paper]["runs"][0]["cpu_ms"],
                    "dlib_ms": by_name[dlib]["runs"][0]["cpu_ms"] if dlib in by_name else None}
            for stage, (paper, dlib) in PAPER_MODELS.items()}


def projection(costs: dict[str, dict], measured_cpus: int = 2, images: int = 960_000, nodes: int = 8,
               cpus: int = 32, gpus_per_node: int = 1, efficiency: float = 0.7,
               paper: dict[str, dict] | None = None) -> list[str]:
    """Wall time for ``images`` on ``nodes`` x ``cpus`` from measured per-item costs.

    Partition stages (seconds = worker time) and the fanned-out global stages (seconds = wall
    on ``measured_cpus``, so x that many core-seconds) spread over every CPU at ``efficiency``.
    ``cluster`` is one task: its time is scaled linearly and added serially. The paper's models
    (``paper``, from `paper_model_costs`) replace dlib's in detect and embed: the stage keeps its
    measured cost minus dlib's model and adds the paper model's measured CPU cost. With GPUs the
    paper's models run at the published GPU figures (``GPU_MS``) while everything else stays on
    the CPUs (pipelined: the slower side sets the pace)."""
    lines = [f"projection to {images:,} images on {nodes} nodes x {cpus} CPUs, {efficiency:.0%} of ideal "
             "parallelism assumed"]
    face = other = serial = 0.0
    rows = []
    for name, c in costs.items():
        core_s = c["s_per_item"] * c["survival"] * images * (measured_cpus if name in FANNED_OUT else 1)
        if name == "cluster":
            serial += core_s
        elif name in FACE_STAGES:
            face += core_s
        else:
            other += core_s
        rows.append((name, core_s, "one task" if name == "cluster" else "parallel"))
    slots = nodes * cpus * efficiency
    gpus = nodes * gpus_per_node * efficiency
    rows.sort(key=lambda r: -r[1])
    whole = sum(r[1] for r in rows) or 1.0
    for name, core_s, how in rows:
        lines.append(f"  {name:<11} {core_s / 3600:9.1f} core-hours  {100 * core_s / whole:5.1f}%  {how}")
    cpu_wall = (face + other) / slots + serial
    lines.append(f"  dlib models, CPU only: {cpu_wall / 3600:6.2f} h wall ({(face + other) / 3600:.0f} core-hours, of which "
                 f"cluster {serial / 3600:.2f} h runs as one task)")
    for target_h in (1.0, 4.0):
        budget = target_h * 3600 - serial
        need = (face + other) / budget / (cpus * efficiency) if budget > 0 else float("inf")
        lines.append(f"  machines of {cpus} CPUs (no GPU) to finish in {target_h:g} h: {need:.1f}")
    drivers = ", ".join(f"{name} {100 * core_s / whole:.0f}%" for name, core_s, _ in rows[:3])
    lines.append(f"  cost drivers (share of core time): {drivers}")
    if paper:
        lines += paper_projection(costs, paper, images, face, other, serial, slots, gpus, gpus_per_node)
    return lines


def paper_projection(costs, paper, images, face, other, serial, slots, gpus, gpus_per_node) -> list[str]:
    """The same build with the paper's models (SCRFD-10G, ArcFace R100), on CPUs and on GPUs."""
    lines = ["  the paper's models (measured here on one CPU thread, random weights, exact architectures):"]
    model_cpu = model_gpu = 0.0  # core-seconds on CPUs / GPU-seconds of the paper's models
    rest = 0.0  # what the face stages do besides their dlib model (decode, alignment, crops)
    for stage in FACE_STAGES:
        if stage not in costs:
            continue
        p, units = paper[stage], costs[stage]["survival"] * images
        gpu_ms, source = GPU_MS[stage]
        model_cpu += units * p["cpu_ms"] / 1000
        model_gpu += units * gpu_ms / 1000
        rest += max(0.0, costs[stage]["s_per_item"] * units - units * (p["dlib_ms"] or 0.0) / 1000)
        lines.append(f"    {stage:<6} {p['label']}: {p['cpu_ms']:.0f} ms CPU (dlib's model {p['dlib_ms'] or 0:.0f} ms); "
                     f"GPU {gpu_ms:.2f} ms, i.e. {p['cpu_ms'] / gpu_ms:.0f}x one core; source: {source}")
    cpu_wall = (rest + model_cpu + other) / slots + serial
    gpu_wall = max((rest + other) / slots, model_gpu / max(gpus, 1e-9)) + serial
    lines.append(f"    CPU only : {cpu_wall / 3600:6.2f} h wall ({(rest + model_cpu + other) / 3600:.0f} core-hours)")
    lines.append(f"    with GPUs: {gpu_wall / 3600:6.2f} h wall ({gpus_per_node} GPU per node: the models "
                 f"{model_gpu / max(gpus, 1e-9) / 3600:.2f} h on GPUs, the rest {(rest + other) / slots / 3600:.2f} h on CPUs)")
    return lines
