"""Run the trainer with its per-phase memory metrics on CPU too:  python tools/with_cpu_memory.py ASYPPO_ARGS

asyppo.py logs memory/{rollout,values,update,sync}_gb and memory/peak_gb on GPUs only (the CUDA allocator's peaks).
This wrapper supplies them on CPU from Linux's peak resident set of the process (VmHWM, reset after each phase), for
tools/gpu_check.py --cpu-smoke and bench/rehearsal_phases.py. Works under torchrun as asyppo.py does.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import asyppo  # noqa: E402

gpu_peak_gb = asyppo.peak_memory_gb


def peak_memory_gb(device):
    if device.type == "cuda":
        return gpu_peak_gb(device)
    gb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20  # kB -> GB
    Path("/proc/self/clear_refs").write_text("5")  # the next phase's peak starts from here
    return gb


if __name__ == "__main__":
    asyppo.peak_memory_gb = peak_memory_gb
    asyppo.main(sys.argv[1:])
