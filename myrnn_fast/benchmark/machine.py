"""The machine a report comes from: CPU, cores, threads, library versions, GPU and driver."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata

import torch

from .. import __version__


def _cpuinfo() -> list[dict[str, str]]:
    """``/proc/cpuinfo`` as one dict per logical CPU (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            blocks = f.read().strip().split("\n\n")
    except OSError:
        return []
    cpus = []
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        cpus.append(fields)
    return cpus


def cpu_model(cpus: list[dict[str, str]]) -> str:
    for cpu in cpus:
        if cpu.get("model name"):
            return cpu["model name"]
    return platform.processor() or platform.machine() or "unknown"


def physical_cores(cpus: list[dict[str, str]]) -> int | None:
    cores = {(cpu.get("physical id"), cpu.get("core id")) for cpu in cpus if "core id" in cpu}
    return len(cores) or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _numba_threads() -> int | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


def _gpu(device: torch.device) -> dict:
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"gpu": None}
    props = torch.cuda.get_device_properties(device)
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            )
            driver = query.stdout.strip().splitlines()[0] or None
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = None
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        # torch's defaults, left as users get them: cuDNN may run float32 RNNs on TF32 tensor
        # cores, while cuBLAS matmuls (our GEMMs) stay float32 unless matmul TF32 is turned on.
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was around the run."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpp_kernels() -> dict:
    """The cpp backend's CPU kernels: instruction set, and how they convert float16 / bfloat16."""
    try:
        from .. import _C
    except ImportError:
        return {}
    ext = json.loads(_C.build_info())
    return {"cpp_cpu_isa": ext["cpu_isa"], "cpp_conversions": ext.get("cpu_conversions")}


def machine_info(device="cpu") -> dict:
    cpus = _cpuinfo()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(cpus),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "physical_cores": physical_cores(cpus),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": _numba_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "myrnn_fast": __version__,
        "torch": torch.__version__,
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "mkl": torch.backends.mkl.is_available(),
        **_cpp_kernels(),
        "load_average_before": load_average(),
        **_gpu(torch.device(device)),
    }


def describe(machine: dict) -> str:
    """One line: where the numbers come from."""
    cores = machine.get("physical_cores") or machine.get("logical_cpus")
    text = (
        f"{machine['cpu']} ({cores} cores, {machine['logical_cpus']} logical CPUs, "
        f"{machine['cpu_capability']}), torch {machine['torch']} with {machine['torch_threads']} threads"
    )
    if machine.get("numba"):
        text += f", numba {machine['numba']}"
    if machine.get("cpp_cpu_isa"):
        text += f"; cpp CPU kernels {machine['cpp_cpu_isa']} ({machine.get('cpp_conversions')})"
    if machine.get("gpu"):
        text += (
            f"; GPU {machine['gpu']} (driver {machine.get('gpu_driver') or 'unknown'}, "
            f"CUDA {machine.get('cuda')}, cuDNN {machine.get('cudnn')}; TF32: cuDNN "
            f"{'on' if machine.get('cudnn_allow_tf32') else 'off'}, matmul {'on' if machine.get('matmul_allow_tf32') else 'off'})"
        )
    return text
