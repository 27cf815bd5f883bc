"""What every run records about where it ran: device, versions, date, commit and the machine's load."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def device_description(device: torch.device) -> str:
    """The device in words, with torch's version: "CPU x86_64, 2 threads (torch 2.13.0+cpu)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} threads (torch {torch.__version__})"


def device_name(device: torch.device) -> str:
    """The device alone, without versions: what must match for two runs to be compared."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} x{os.cpu_count()}, {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    """The versions a result depends on: Python, torch, Triton, CUDA where there is one."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = ""
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def environment(device: str) -> dict:
    """The run's record of where and when it ran. `load_average` says how busy the machine was
    (other jobs make every timing slower; the ratios measured in one run suffer less)."""
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "argv": sys.argv[1:],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """The checkout's commit, with "+dirty" when files differ from it; "" outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
