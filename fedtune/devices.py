"""Where training runs: the device, the numeric precision, and random generators that live on the device.

``train.device`` is ``auto`` (the first CUDA GPU when the machine has one, else the CPU), ``cpu``,
``cuda`` or ``cuda:N``; each node resolves it on its own hardware, so one config serves hospitals with
and without GPUs. ``train.precision`` is ``fp32`` or ``bf16`` (frozen base weights stored in bfloat16 and
the forward pass autocast to it; the adapter, its gradients and the optimizer stay float32, so what
travels is float32 either way).
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

PRECISIONS = ("fp32", "bf16")
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """Refuse a ``train.device`` value that names no device kind fedtune trains on.

    Raises:
        ValueError: Naming the accepted values.
    """
    if not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"train.device={name!r}: use auto, cpu, cuda or cuda:N (N = GPU index).")


def resolve(name: str, deterministic: bool = True) -> torch.device:
    """The device ``train.device`` names on this machine.

    With ``deterministic`` (``train.deterministic``), CUDA is set up to repeat bit for bit: PyTorch's
    deterministic algorithms (an operation without a deterministic CUDA kernel raises instead of silently
    varying) and a fixed cuBLAS workspace. The CPU needs neither.

    Raises:
        ValueError: CUDA asked for on a machine without a usable CUDA GPU, or a GPU index out of range.
    """
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"train.device={name} but this machine has no usable CUDA GPU (or this PyTorch build has no CUDA); "
                "set train.device=auto or cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                "use an index below that, or set CUDA_VISIBLE_DEVICES per node."
            )
        if deterministic:
            _deterministic_cuda()
    return device


def of(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on."""
    return next(model.parameters()).device


def weights_dtype(precision: str) -> torch.dtype:
    """How the frozen base weights are stored for ``train.precision``."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: bfloat16 autocast for ``bf16``, else plain float32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator_on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` whose stream follows from ``generator``; on the CPU, ``generator`` itself.

    Torch draws on a CUDA tensor only from a CUDA generator. Seeding it with a draw from ``generator``
    keeps DP noise exactly as secret (or as reproducible) as ``generator`` is.
    """
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _deterministic_cuda() -> None:
    """Make CUDA kernels reproducible run to run: cuBLAS with a fixed workspace, deterministic algorithms."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, before any product
    # Not warn_only: with it, PyTorch keeps the non-deterministic memory-efficient attention backward.
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
