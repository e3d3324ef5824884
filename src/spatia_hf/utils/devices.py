"""Which torch device to run on: one resolver for the CLI, the demo and evaluation."""

from __future__ import annotations


def resolve_device(name: str = "auto"):
    """'auto' picks CUDA, then MPS, then CPU; anything else is passed to torch.device and must exist
    here (a clear error instead of torch's "not compiled with CUDA" deep inside a command)."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device. Fix: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}). Fix: use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} GPU(s) visible. Fix: pick an index "
                         f"below {torch.cuda.device_count()}")
    if device.type == "mps" and not mps:
        raise ValueError(f"--device {name!r}: MPS is not available here. Fix: use --device cpu or auto")
    return device
