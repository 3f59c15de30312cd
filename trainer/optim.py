"""The optimizer of the trained parts: one parameter group per part and decay kind.

Each trained part has its own learning rate (``train.learning_rate`` for the ControlNet, which
starts as a copy of the UNet; ``refiner_learning_rate`` and ``face_attention_learning_rate`` for
the parts that start from scratch, 10x higher in the reference recipes). Weight decay applies to
weight matrices and kernels only: biases, norm scales and the refiner's learned queries are
excluded (decaying them pulls norms towards zero and the queries towards each other).

``train.optimizer: adamw8bit`` uses bitsandbytes' AdamW8bit (moments in 8 bits: 2 bytes per
trained parameter instead of 8). bitsandbytes is an optional dependency (the ``gpu`` extra):
where it is missing or cannot load, the run stops with one line saying so.
"""

from __future__ import annotations

import torch

NO_DECAY_NAMES = ("queries",)  # learned query tokens: parameters, not weights of a map


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight matrices and conv kernels decay; biases, norm scales and learned queries do not."""
    if param.ndim < 2:
        return False
    return name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def parameter_groups(net, train_cfg) -> list[dict]:
    """``[{"name", "params", "lr", "weight_decay"}, ...]``: part x (decay, no_decay), empty groups left out."""
    rates = {
        "controlnet": train_cfg.learning_rate,
        "refiner": train_cfg.refiner_learning_rate,
        "face_attention": train_cfg.face_attention_learning_rate,
    }
    groups = []
    for part, lr in rates.items():
        named = [(n, p) for n, p in getattr(net, part).named_parameters() if p.requires_grad]
        for kind, wd in (("decay", train_cfg.adam_weight_decay), ("no_decay", 0.0)):
            params = [p for n, p in named if decays(n, p) == (kind == "decay")]
            if params:
                groups.append({"name": f"{part}/{kind}", "params": params, "lr": lr, "weight_decay": wd})
    return groups


def bitsandbytes_unavailable_reason() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exn:  # ImportError, or a CUDA library it cannot load (RuntimeError, OSError)
        return f"bitsandbytes cannot load ({type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''})"
    return None


def make_optimizer(net, train_cfg) -> torch.optim.Optimizer:
    groups = parameter_groups(net, train_cfg)
    common = {"betas": (train_cfg.adam_beta1, train_cfg.adam_beta2), "eps": train_cfg.adam_epsilon}
    if train_cfg.optimizer == "adamw8bit":
        reason = bitsandbytes_unavailable_reason()
        if reason:
            raise ValueError(
                f"train.optimizer=adamw8bit needs bitsandbytes: {reason}; install it with "
                "pip install -e '.[gpu]' on a GPU machine, or use train.optimizer=adamw"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **common)
    return torch.optim.AdamW(groups, **common)
