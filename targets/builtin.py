"""The shipped targets: replaces per-user guesses about common boards with one reviewed
table of figures, each labelled with its source, plus `host`, detected on this machine.

Figures marked "estimate" are derived (the formula is given) or typical values, not
datasheet numbers; a user who measured their board should override them with a YAML
target that `extends` the shipped one.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_TARGETS", "detect_host"]

logger = logging.getLogger(__name__)

_AARCH64_LINUX = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
_AARCH64_ANDROID = {"kind": "llvm", "mtriple": "aarch64-linux-android"}

_JETSON_MODULES = "NVIDIA Jetson modules page (developer.nvidia.com/embedded/jetson-modules)"
_SD855 = "Qualcomm Snapdragon 855 product brief"

#: The shipped device targets (besides `host`), as plain data in Target's field names.
BUILTIN_TARGETS: list[dict[str, Any]] = [
    {
        "name": "rpi4",
        "description": "Raspberry Pi 4 Model B: Broadcom BCM2711, 4x Cortex-A72 @ 1.5 GHz, "
        "4 GB LPDDR4-3200",
        "tvm_target": {
            **_AARCH64_LINUX,
            "mcpu": "cortex-a72",
            "mattr": ["+neon"],
            "num-cores": 4,
        },
        "cross_compiler": "aarch64-linux-gnu-g++",
        "cores": 4,
        "peak_gflops": {"float32": 48.0, "int8": 96.0},
        "mem_bandwidth_gbs": 12.8,
        "memory_mb": 4096,
        "storage_mb": 32768,
        "power_idle_w": 2.7,
        "power_active_w": 6.4,
        "sources": {
            "description": "Raspberry Pi 4 Model B specifications "
            "(raspberrypi.com/products/raspberry-pi-4-model-b/specifications)",
            "peak_gflops.float32": "estimate: 4 cores x 1.5 GHz x 8 FLOP/cycle "
            "(one 128-bit NEON FMA per cycle on Cortex-A72)",
            "peak_gflops.int8": "estimate: twice float32 (ARMv8.0 has no int8 dot product; "
            "widening multiply-accumulate)",
            "mem_bandwidth_gbs": "theoretical peak of LPDDR4-3200 on a 32-bit bus "
            "(3200 MT/s x 4 B); sustained bandwidth is lower",
            "memory_mb": "the 4 GB model (the board ships with 1, 2, 4 or 8 GB)",
            "storage_mb": "assumption: a 32 GB microSD card",
            "power_idle_w": "pidramble.com power consumption benchmarks: 540 mA idle at 5 V",
            "power_active_w": "pidramble.com power consumption benchmarks: 1280 mA at 5 V "
            "under 400% CPU load",
        },
    },
    {
        "name": "pixel4-cpu",
        "description": "Google Pixel 4 CPU big cores: Snapdragon 855, 1x Cortex-A76 @ 2.84 GHz "
        "+ 3x Cortex-A76 @ 2.42 GHz (Kryo 485 Gold), Android",
        "tvm_target": {**_AARCH64_ANDROID, "mcpu": "cortex-a76", "num-cores": 4},
        "cross_compiler": "aarch64-linux-android29-clang++",
        "cores": 4,
        "peak_gflops": {"float32": 161.6, "float16": 323.2, "int8": 646.4},
        "mem_bandwidth_gbs": 34.1,
        "memory_mb": 6144,
        "storage_mb": 65536,
        "power_idle_w": 0.5,
        "power_active_w": 5.0,
        "sources": {
            "description": f"{_SD855}; Google Pixel 4 tech specs",
            "peak_gflops.float32": "estimate: 16 FLOP/cycle per Cortex-A76 core (two 128-bit "
            "NEON FMA pipes) x (2.84 + 3 x 2.42) GHz",
            "peak_gflops.float16": "estimate: twice float32 (ARMv8.2 half-precision arithmetic)",
            "peak_gflops.int8": "estimate: four times float32 (SDOT: 16 int8 MACs per 128-bit "
            "instruction)",
            "mem_bandwidth_gbs": f"{_SD855}: LPDDR4X, 4x16-bit at 2133 MHz (4266 MT/s x 8 B)",
            "memory_mb": "Google Pixel 4 tech specs: 6 GB RAM",
            "storage_mb": "Google Pixel 4 tech specs: the 64 GB model",
            "power_idle_w": "estimate: screen-off idle of a flagship phone",
            "power_active_w": "estimate: about 1 W per big core at peak clock plus SoC and DRAM",
            "cross_compiler": "Android NDK clang for API level 29 (Android 10, the Pixel 4's "
            "launch release); needs the NDK's toolchains/llvm/prebuilt/*/bin on PATH",
        },
    },
    {
        "name": "mali-g76",
        "description": "Arm Mali-G76 MP12 @ 702 MHz (Samsung Exynos 9820, e.g. Galaxy S10) "
        "through OpenCL; Android host CPU",
        "tvm_target": {
            "kind": "opencl",
            "device": "mali",
            "host": {**_AARCH64_ANDROID, "mcpu": "cortex-a75"},
        },
        "cross_compiler": "aarch64-linux-android28-clang++",
        "cores": 8,
        "peak_gflops": {"float32": 404.4, "float16": 808.7, "int8": 1617.4},
        "mem_bandwidth_gbs": 33.5,
        "memory_mb": 8192,
        "storage_mb": 131072,
        "power_idle_w": 0.5,
        "power_active_w": 6.0,
        "sources": {
            "description": "Samsung Exynos 9820 specifications: Mali-G76 MP12; CPU 2x Samsung "
            "M4, 2x Cortex-A75, 4x Cortex-A55 (host code is tuned for Cortex-A75)",
            "peak_gflops.float32": "estimate: 3 execution engines x 8 lanes x 2 FLOP (FMA) per "
            "Mali-G76 core and cycle (Arm Mali-G76 overview) x 12 cores x 702 MHz",
            "peak_gflops.float16": "estimate: twice float32 (two fp16 lanes per fp32 lane)",
            "peak_gflops.int8": "estimate: four times float32 (Mali-G76 int8 dot product)",
            "mem_bandwidth_gbs": "estimate: LPDDR4X, 4x16-bit at about 2100 MHz",
            "memory_mb": "Galaxy S10: 8 GB RAM",
            "storage_mb": "Galaxy S10: the 128 GB model",
            "power_idle_w": "estimate: screen-off idle of a flagship phone",
            "power_active_w": "estimate: sustained GPU load of a flagship phone SoC",
            "cross_compiler": "Android NDK clang for API level 28 (Android 9, the Galaxy S10's "
            "launch release)",
        },
    },
    {
        "name": "adreno640",
        "description": "Qualcomm Adreno 640 @ 585 MHz (Snapdragon 855, e.g. Xiaomi Mi 9 as in "
        "nn-Meter) through OpenCL; Android host CPU (Kryo 485, Cortex-A76 class)",
        "tvm_target": {
            "kind": "opencl",
            "device": "adreno",
            "host": {**_AARCH64_ANDROID, "mcpu": "cortex-a76"},
        },
        "cross_compiler": "aarch64-linux-android28-clang++",
        "cores": 8,
        "peak_gflops": {"float32": 898.6, "float16": 1797.1},
        "mem_bandwidth_gbs": 34.1,
        "memory_mb": 6144,
        "storage_mb": 65536,
        "power_idle_w": 0.5,
        "power_active_w": 5.0,
        "sources": {
            "description": f"{_SD855}: Adreno 640 GPU, Kryo 485 CPU",
            "peak_gflops.float32": "estimate: third-party figure of 768 ALU lanes x 2 FLOP x "
            "585 MHz; Qualcomm does not publish it",
            "peak_gflops.float16": "estimate: twice float32",
            "peak_gflops.int8": "no published figure; the float32 figure is used",
            "mem_bandwidth_gbs": f"{_SD855}: LPDDR4X, 4x16-bit at 2133 MHz (4266 MT/s x 8 B)",
            "memory_mb": "Xiaomi Mi 9: the 6 GB model",
            "storage_mb": "Xiaomi Mi 9: the 64 GB model",
            "power_idle_w": "estimate: screen-off idle of a flagship phone",
            "power_active_w": "estimate: sustained GPU load of a flagship phone SoC",
            "cross_compiler": "Android NDK clang for API level 28 (Android 9, the Mi 9's launch "
            "release)",
        },
    },
    {
        "name": "jetson-nano",
        "description": "NVIDIA Jetson Nano 4 GB: 128-core Maxwell GPU (sm_53) @ 921.6 MHz "
        "through CUDA; host 4x Cortex-A57 @ 1.43 GHz",
        "tvm_target": {
            "kind": "cuda",
            "arch": "sm_53",
            "host": {**_AARCH64_LINUX, "mcpu": "cortex-a57", "num-cores": 4},
        },
        "cross_compiler": "aarch64-linux-gnu-g++",
        "cores": 4,
        "peak_gflops": {"float32": 235.9, "float16": 471.9},
        "mem_bandwidth_gbs": 25.6,
        "memory_mb": 4096,
        "storage_mb": 16384,
        "power_idle_w": 1.5,
        "power_active_w": 10.0,
        "sources": {
            "description": f"NVIDIA Jetson Nano module data sheet; {_JETSON_MODULES}",
            "peak_gflops.float32": "128 CUDA cores x 2 FLOP (FMA) x 921.6 MHz",
            "peak_gflops.float16": "NVIDIA Jetson Nano data sheet: 472 GFLOPS (FP16)",
            "peak_gflops.int8": "Maxwell has no int8 dot product; the float32 figure is used",
            "mem_bandwidth_gbs": "NVIDIA Jetson Nano data sheet: 64-bit LPDDR4, 25.6 GB/s",
            "memory_mb": "NVIDIA Jetson Nano data sheet: 4 GB",
            "storage_mb": "NVIDIA Jetson Nano data sheet: 16 GB eMMC 5.1 (production module; "
            "the developer kit boots from microSD)",
            "power_idle_w": "estimate: typical idle draw of the module",
            "power_active_w": "NVIDIA Jetson Nano data sheet: 10 W power mode (MAXN)",
        },
    },
    {
        "name": "jetson-tx2",
        "description": "NVIDIA Jetson TX2: 256-core Pascal GPU (sm_62) @ 1.3 GHz through CUDA; "
        "host 2x Denver2 + 4x Cortex-A57 @ 2 GHz",
        "tvm_target": {
            "kind": "cuda",
            "arch": "sm_62",
            "host": {**_AARCH64_LINUX, "mcpu": "cortex-a57", "num-cores": 6},
        },
        "cross_compiler": "aarch64-linux-gnu-g++",
        "cores": 6,
        "peak_gflops": {"float32": 665.6, "float16": 1331.2},
        "mem_bandwidth_gbs": 59.7,
        "memory_mb": 8192,
        "storage_mb": 32768,
        "power_idle_w": 2.0,
        "power_active_w": 15.0,
        "sources": {
            "description": f"NVIDIA Jetson TX2 module data sheet; {_JETSON_MODULES}",
            "peak_gflops.float32": "256 CUDA cores x 2 FLOP (FMA) x 1.3 GHz",
            "peak_gflops.float16": "twice float32 (GP10B runs FP16 at twice the FP32 rate); "
            "NVIDIA quotes 1.3 TFLOPS",
            "peak_gflops.int8": "no published figure; the float32 figure is used",
            "mem_bandwidth_gbs": "NVIDIA Jetson TX2 data sheet: 128-bit LPDDR4, 59.7 GB/s",
            "memory_mb": "NVIDIA Jetson TX2 data sheet: 8 GB",
            "storage_mb": "NVIDIA Jetson TX2 data sheet: 32 GB eMMC 5.1",
            "power_idle_w": "estimate: typical idle draw of the module",
            "power_active_w": "NVIDIA Jetson TX2 data sheet: 15 W power budget (Max-N)",
        },
    },
    {
        "name": "jetson-orin-nano",
        "description": "NVIDIA Jetson Orin Nano 8 GB: 1024-core Ampere GPU with 32 Tensor Cores "
        "(sm_87) @ 625 MHz through CUDA; host 6x Cortex-A78AE @ 1.5 GHz",
        "tvm_target": {
            "kind": "cuda",
            "arch": "sm_87",
            "host": {**_AARCH64_LINUX, "mcpu": "cortex-a78ae", "num-cores": 6},
        },
        "cross_compiler": "aarch64-linux-gnu-g++",
        "cores": 6,
        "peak_gflops": {"float32": 1280.0, "float16": 10240.0, "int8": 20480.0},
        "mem_bandwidth_gbs": 68.0,
        "memory_mb": 8192,
        "storage_mb": 65536,
        "power_idle_w": 3.0,
        "power_active_w": 15.0,
        "sources": {
            "description": f"NVIDIA Jetson Orin Nano series data sheet; {_JETSON_MODULES}",
            "peak_gflops.float32": "1024 CUDA cores x 2 FLOP (FMA) x 625 MHz",
            "peak_gflops.float16": "estimate: half the dense int8 Tensor Core rate",
            "peak_gflops.int8": "NVIDIA: 40 TOPS int8 with 2:4 sparsity, i.e. about 20 dense",
            "mem_bandwidth_gbs": "NVIDIA Jetson Orin Nano data sheet: 128-bit LPDDR5, 68 GB/s",
            "memory_mb": "NVIDIA Jetson Orin Nano data sheet: 8 GB",
            "storage_mb": "assumption: a 64 GB microSD or NVMe drive (the module has no eMMC)",
            "power_idle_w": "estimate: typical idle draw of the module",
            "power_active_w": "NVIDIA Jetson Orin Nano data sheet: 15 W power mode",
        },
    },
]


# ---------------------------------------------------------------------- host detection
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where it does not exist)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip().lower(), value.strip())
    return info


def _physical_cores() -> int:
    """Physical cores this process may use (affinity and cgroup CPU sets respected)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(usable, physical))


def _clock_ghz(info: dict[str, str]) -> tuple[float, str]:
    try:
        import psutil

        freq = psutil.cpu_freq()
        if freq and (freq.max or freq.current):
            mhz = freq.max or freq.current
            return mhz / 1000.0, f"{'maximum' if freq.max else 'current'} clock from psutil"
    except (ImportError, NotImplementedError, OSError):
        pass
    if "cpu mhz" in info:
        return float(info["cpu mhz"]) / 1000.0, "current clock from /proc/cpuinfo"
    return 2.0, "assumed 2 GHz (the clock is not reported here)"


def _flops_per_cycle(flags: set[str], arch: str) -> tuple[int, int, str]:
    """(fp32 FLOP/cycle/core, int8 multiplier, reasoning) from the CPU's ISA flags."""
    if arch == "aarch64":
        int8 = 4 if "asimddp" in flags else 2
        return 16, int8, "two 128-bit NEON FMA pipes assumed"
    vnni = bool({"avx512_vnni", "avx_vnni"} & flags)
    int8 = 4 if vnni else 2
    if "avx512f" in flags:
        return 64, int8, "AVX-512 with two FMA units assumed"
    if "avx2" in flags and "fma" in flags:
        return 32, int8, "AVX2 with two FMA units assumed"
    if "avx" in flags:
        return 16, 2, "AVX without FMA"
    return 8, 2, "SSE"


def _llvm_cpu() -> str | None:
    """LLVM's name for this CPU (`znver3`, `cortex-a72`), or None when generic or unknown."""
    try:
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
    except (ImportError, AttributeError, RuntimeError, ValueError) as e:
        logger.debug("LLVM cannot name this CPU: %s", e)
        return None
    return None if name in ("", "generic") else name


def detect_host() -> dict[str, Any]:
    """This machine as target data: cores, CPU model, LLVM CPU name, memory, disk.

    Compute peak, bandwidth and power are estimates from the ISA, clock and core count,
    labelled so in `sources`; nothing is measured here.
    """
    info = _cpuinfo()
    machine = platform.machine().lower()
    arch = "aarch64" if machine in ("aarch64", "arm64") else machine
    cores = _physical_cores()
    model = info.get("model name") or info.get("hardware") or platform.processor() or machine
    flags = set((info.get("flags") or info.get("features") or "").split())
    ghz, clock_source = _clock_ghz(info)
    per_cycle, int8_factor, isa = _flops_per_cycle(flags, arch)
    fp32 = round(cores * ghz * per_cycle, 1)
    mcpu = _llvm_cpu()
    tvm_target: dict[str, Any] = {"kind": "llvm", "num-cores": cores}
    if mcpu:
        tvm_target["mcpu"] = mcpu
    try:
        import psutil

        memory_mb = int(psutil.virtual_memory().total // 2**20)
    except ImportError:
        memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    storage_mb = int(shutil.disk_usage(Path.home()).total // 2**20)
    estimate = "estimate: the host's power is not detectable without a power meter or RAPL"
    return {
        "name": "host",
        "description": f"this machine: {model}, {cores} cores"
        + (f" (LLVM CPU {mcpu})" if mcpu else ""),
        "tvm_target": tvm_target,
        "cross_compiler": None,
        "cores": cores,
        "peak_gflops": {"float32": fp32, "int8": round(fp32 * int8_factor, 1)},
        "mem_bandwidth_gbs": float(min(10 * cores, 100)),
        "memory_mb": memory_mb,
        "storage_mb": storage_mb,
        "power_idle_w": round(1.5 * cores, 1),
        "power_active_w": round(7.5 * cores, 1),
        "sources": {
            "description": "detected: /proc/cpuinfo, os.sched_getaffinity, psutil, LLVM",
            "peak_gflops.float32": f"estimate: {cores} cores x {ghz:.2f} GHz ({clock_source}) "
            f"x {per_cycle} FLOP/cycle ({isa})",
            "peak_gflops.int8": f"estimate: {int8_factor}x float32 "
            + ("(VNNI/dot-product instructions)" if int8_factor == 4 else "(no int8 dot product)"),
            "mem_bandwidth_gbs": "rough estimate: 10 GB/s per core, at most 100; "
            "override with a measured (STREAM) figure in a user target",
            "memory_mb": "detected: psutil total memory",
            "storage_mb": "detected: size of the file system holding the home directory",
            "power_idle_w": f"{estimate} (1.5 W per core assumed)",
            "power_active_w": f"{estimate} (7.5 W per core assumed)",
        },
    }
