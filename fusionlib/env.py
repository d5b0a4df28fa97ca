"""What we are running on: versions, threads, CPU; and a loud torchvision check.

``python -m fusionlib.env --check`` is the first step of ``make test`` / ``make run``:
it fails with an explanation when torchvision cannot import or run its C++ ops
(the classic symptom of a torch / torchvision pair built for each other's
strangers: ``operator torchvision::nms does not exist``).
"""
from __future__ import annotations

import os
import platform
import sys


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo, or platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict[str, str]:
    """Versions, thread count, CPU (and the GPU, once this process uses CUDA): print these next to every timing."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # named only when this process uses CUDA
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception as exc:  # reported, not raised: check_torchvision raises
        info["torchvision"] = f"unavailable ({exc.__class__.__name__})"
    return info


def format_environment(info: dict[str, str] | None = None) -> str:
    """:func:`environment_info` on one line: ``python=3.11.7  torch=2.14.1  threads=1  ...``."""
    info = environment_info() if info is None else info
    return "  ".join(f"{k}={v}" for k, v in info.items())


def check_torchvision() -> str:
    """Import torchvision and run one of its C++ ops; raise RuntimeError if either fails."""
    try:
        import torch
        import torchvision
        from torchvision.ops import nms

        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
        nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
    except Exception as exc:
        raise RuntimeError(
            "torchvision does not work in this environment:\n"
            f"    {exc.__class__.__name__}: {exc}\n"
            "torch and torchvision must be a matching pair, installed in one pip call.\n"
            "Fix: `make clean && make setup` (re-creates .venv from pyproject.toml), or\n"
            "`pip install 'torch>=2.14' 'torchvision>=0.29'` together in a fresh environment."
        ) from exc
    return f"torch {torch.__version__} + torchvision {torchvision.__version__}: OK"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        try:
            print(check_torchvision())
        except RuntimeError as exc:
            print("=" * 72, file=sys.stderr)
            print(f"ENVIRONMENT CHECK FAILED\n{exc}", file=sys.stderr)
            print("=" * 72, file=sys.stderr)
            return 1
    print(format_environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
