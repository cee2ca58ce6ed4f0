"""Run the trainer with its per-phase memory metrics on CPU too:  python tools/with_cpu_memory.py ASYPPO_ARGS

asyppo.py logs memory/{rollout,values,update,sync}_gb and memory/peak_gb on GPUs only (the CUDA allocator's peaks).
This wrapper supplies them on CPU from Linux's peak resident set of the process (VmHWM, reset after each phase), for
tools/gpu_check.py --cpu-smoke and bench/rehearsal_phases.py. Works under torchrun as asyppo.py does.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import asyppo  # noqa: E402

gpu_phase_memory = asyppo.phase_memory


def phase_memory(metrics, phase, device):
    if device.type == "cuda":
        return gpu_phase_memory(metrics, phase, device)
    gb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20  # kB -> GB
    Path("/proc/self/clear_refs").write_text("5")  # the next phase's peak starts from here
    metrics[f"memory/{phase}_gb"] = gb
    metrics["memory/peak_gb"] = max(gb, metrics.get("memory/peak_gb", 0.0))
    # the merged metrics keep the max over ranks; this key is this rank's alone (bench/efficiency.py reads it)
    metrics[f"memory/peak_gb_rank{asyppo.dist.get_rank()}"] = metrics["memory/peak_gb"]


if __name__ == "__main__":
    asyppo.phase_memory = phase_memory
    asyppo.main(sys.argv[1:])
