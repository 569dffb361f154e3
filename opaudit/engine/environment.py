"""Environment fingerprint and the environment's own reproducibility hazards."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from opaudit.aten import precision

_CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
# What the variable was when opaudit was imported, which for the CLI is process
# start: cuBLAS reads it once, so a later change does not take effect.
_CUBLAS_AT_START = os.environ.get(_CUBLAS_VAR)
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_capability() -> str | None:
    """The vector instruction set ATen's CPU kernels dispatch to (``AVX2``, ``AVX512``, ``DEFAULT``...).

    Set by the CPU and by ``ATEN_CPU_CAPABILITY``; two machines that differ here run
    other kernels for the same op, and reductions and transcendental functions then
    give other bits.
    """
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return None


def fingerprint(device: str | None = None) -> dict[str, Any]:
    """Versions, hardware and global flags that decide how ops behave.

    Sorted keys, no timestamps, no paths: two fingerprints of the same setup are
    byte-identical.
    """
    fp: dict[str, Any] = {
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "cpu": _cpu_model(),
        "cpu_capability": _cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "hip": getattr(torch.version, "hip", None),
        "cublas_workspace_config": os.environ.get(_CUBLAS_VAR),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        **precision.snapshot(),  # tf32_matmul, tf32_cudnn, float32_matmul_precision
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill_uninitialized_memory": bool(torch.utils.deterministic.fill_uninitialized_memory),
    }
    want_cuda = device is None or str(device).startswith("cuda")
    if want_cuda and torch.cuda.is_available():
        idx = torch.device(device).index if device and ":" in str(device) else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        fp.update({
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
            "driver": _driver_version(),
            "cublas": _cublas_version(),
        })
    return dict(sorted(fp.items()))


NUMERIC_VARIABLES = (
    "ATEN_CPU_CAPABILITY", "CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", "CUDA_LAUNCH_BLOCKING",
    "CUDA_VISIBLE_DEVICES", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_NUM_THREADS", "NVIDIA_TF32_OVERRIDE",
    "OMP_NUM_THREADS", "ONEDNN_MAX_CPU_ISA", "PYTHONHASHSEED", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
)
"""Environment variables that change which kernels run, on how many threads, or Python's hashing."""


def variables() -> dict[str, str | None]:
    """The :data:`NUMERIC_VARIABLES` as this process sees them (``None``: unset), sorted."""
    return {k: os.environ.get(k) for k in NUMERIC_VARIABLES}


def _driver_version() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # optional
        pass
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            first = f.readline()
        for tok in first.split():
            if tok[:1].isdigit() and "." in tok:
                return tok
    except OSError:
        pass
    return None


def _cublas_version() -> str | None:
    """The cuBLAS library this process loaded (``12.4.5``), asked through ``cublasGetProperty``; else the CUDA
    version torch was compiled with, as before (cuBLAS is loaded on the first matmul)."""
    loaded = _loaded_library("libcublas.so")
    if loaded is not None:
        try:
            import ctypes

            lib = ctypes.CDLL(loaded)
            parts = []
            for prop in range(3):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
                v = ctypes.c_int()
                if lib.cublasGetProperty(prop, ctypes.byref(v)) != 0:
                    raise OSError("cublasGetProperty failed")
                parts.append(str(v.value))
            return ".".join(parts)
        except (OSError, AttributeError):
            pass
    try:
        v = torch._C._cuda_getCompiledVersion()  # type: ignore[attr-defined]
        return str(v)
    except Exception:
        return None


def _loaded_library(stem: str) -> str | None:
    """The path of an already loaded shared library whose file name starts with ``stem`` (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                path = line.rstrip().rsplit(" ", 1)[-1]
                if os.path.basename(path).startswith(stem + "."):
                    return path
    except OSError:
        pass
    return None


def environment_warnings(devices: set[str], uninitialized_calls: int = 0,
                         fill_cost_s: float | None = None) -> list[str]:
    """Global settings that undermine reproducibility for a run on ``devices``.

    ``fill_cost_s`` is the measured extra time that filling uninitialized memory
    costs under deterministic mode, summed over every such call of the recorded run.
    """
    out: list[str] = []
    cuda = any(d.startswith("cuda") for d in devices)
    now = os.environ.get(_CUBLAS_VAR)
    if cuda:
        if now != _CUBLAS_AT_START:
            out.append(f"{_CUBLAS_VAR} was set after the process started ({now!r}); cuBLAS reads it once, "
                       "so set it before launching Python, e.g. CUBLAS_WORKSPACE_CONFIG=:4096:8 python train.py")
        elif now not in _DETERMINISTIC_CUBLAS:
            out.append(f"{_CUBLAS_VAR} is {'missing' if now is None else repr(now)}: cuBLAS matmuls may be "
                       "nondeterministic and deterministic mode raises on them; launch with "
                       "CUBLAS_WORKSPACE_CONFIG=:4096:8")
        if torch.backends.cudnn.benchmark:
            out.append("torch.backends.cudnn.benchmark=True: cuDNN picks algorithms by timing, which can differ "
                       "between processes; set it to False for reproducible runs")
        if precision.read("tf32_matmul") is not False or precision.read("float32_matmul_precision") != "highest":
            out.append("TF32 matmuls are enabled (allow_tf32 / float32_matmul_precision): results depend on the "
                       "GPU generation; set torch.backends.cuda.matmul.allow_tf32=False to compare across hardware")
        if precision.read("tf32_cudnn") is not False:
            out.append("torch.backends.cudnn.allow_tf32=True (the default): cuDNN convolutions use TF32 on "
                       "Ampere and newer, so results differ across GPU generations")
    elif precision.read("float32_matmul_precision") != "highest":
        out.append("float32_matmul_precision is not 'highest': matmuls may use reduced precision")
    if torch.backends.cudnn.benchmark and not cuda:
        out.append("torch.backends.cudnn.benchmark=True: harmless on CPU, but nondeterministic on CUDA")
    if uninitialized_calls:
        if fill_cost_s is None:
            cost = ""
        elif fill_cost_s <= 0:
            cost = " (no measurable cost here)"
        else:
            cost = f" (measured here: {fill_cost_s * 1e6:.1f} us in total over the recorded run's calls)"
        out.append(f"{uninitialized_calls} call(s) return uninitialized memory: deterministic mode fills them "
                   f"(torch.utils.deterministic.fill_uninitialized_memory=True){cost}; set it to False "
                   "if their contents are always overwritten")
    return out

