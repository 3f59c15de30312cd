"""The measured cost of each stage and a projection to the full corpus."""

from __future__ import annotations

from datakit import registry

import json
from pathlib import Path



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


def projection(costs: dict[str, dict], measured_cpus: int = 2, images: int = 960_000, nodes: int = 8,
               cpus: int = 32, gpus_per_node: int = 1, gpu_speedup: float = 50.0,
               efficiency: float = 0.7) -> list[str]:
    """Wall time for ``images`` on ``nodes`` x ``cpus`` from measured per-item costs.

    Partition stages (seconds = worker time) and the fanned-out global stages (seconds = wall
    on ``measured_cpus``, so x that many core-seconds) spread over every CPU at ``efficiency``.
    ``cluster`` is one task: its time is scaled linearly and added serially. With GPUs, the
    face stages run on the GPUs while the CPU stages use the CPUs (pipelined: the slower side
    sets the pace)."""
    lines = [f"projection to {images:,} images on {nodes} nodes x {cpus} CPUs, {efficiency:.0%} of ideal "
             f"parallelism assumed; GPU case: {gpus_per_node} GPU per node, each running detect+embed "
             f"{gpu_speedup:g}x faster than one CPU core (an ASSUMPTION, not measured here: no GPU)"]
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
    gpu_wall = max(other / slots, face / gpu_speedup / max(gpus, 1e-9)) + serial
    lines.append(f"  CPU only : {cpu_wall / 3600:6.2f} h wall ({(face + other) / 3600:.0f} core-hours, of which "
                 f"cluster {serial / 3600:.2f} h runs as one task)")
    lines.append(f"  with GPUs: {gpu_wall / 3600:6.2f} h wall (face stages {face / gpu_speedup / max(gpus, 1e-9) / 3600:.2f} h "
                 f"on GPUs, the rest {other / slots / 3600:.2f} h on CPUs)")
    for target_h in (1.0, 4.0):
        budget = target_h * 3600 - serial
        need = (face + other) / budget / (cpus * efficiency) if budget > 0 else float("inf")
        lines.append(f"  machines of {cpus} CPUs (no GPU) to finish in {target_h:g} h: {need:.1f}")
    drivers = ", ".join(f"{name} {100 * core_s / whole:.0f}%" for name, core_s, _ in rows[:3])
    lines.append(f"  cost drivers (share of core time): {drivers}")
    return lines
