"""Where a run computes (``runtime.device``), its numeric policy, and how batches get there.

Device. ``auto`` is the local rank's GPU when CUDA is present and the CPU otherwise; ``cuda`` is the local
rank's GPU (``LOCAL_RANK`` under torchrun); ``cuda:N`` is that GPU; ``cpu`` is the CPU. The LM is moved there
once (``gsae.stages.load_lm``); everything else (SAEs, training batches, evaluation, steering, probing) follows
the LM's device, so the pieces can never end up on two devices.

Numeric policy (the same on every device):

* compute: the LM and the SAEs hold float32 weights and compute in float32. On CUDA, float32 matmuls may use
  TF32 tensor cores (``runtime.tf32``, default on: 10-bit mantissa products, float32 accumulation); on CPU
  nothing changes, so CPU runs stay bit-identical to earlier ones. No autocast: the gradient g is a
  difference of nearly equal logits' effects and half-precision compute would blur it.
* storage: harvested x and g are stored in ``harvest.dtype`` (float32, float16 or bfloat16) and read back as
  float32; the harvest refuses a float16 shard in which g underflows (``gsae.harvest.MAX_UNDERFLOW``).
* statistics (FVU, means, norms) accumulate in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ConfigError, Profile, RuntimeConfig


def resolve_device(setting: str = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` a ``runtime.device`` setting means on this machine for this local rank."""
    if setting == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if setting == "auto":
        return torch.device("cuda", local_rank) if available else torch.device("cpu")
    if not available:
        raise ConfigError(f"runtime.device={setting!r} but no CUDA device is visible (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda}); use device 'auto' or 'cpu'")
    index = local_rank if setting == "cuda" else int(setting.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"runtime.device={setting!r} (rank-local index {index}) but only "
                          f"{torch.cuda.device_count()} CUDA devices are visible; lower --nproc_per_node or the index")
    return torch.device("cuda", index)


def configure(rt: RuntimeConfig, device: torch.device) -> None:
    """Apply the numeric policy for ``device`` (TF32 on CUDA when ``rt.tf32``; nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # The CUDA flags only: the process-wide set_float32_matmul_precision could also change CPU kernels.
        torch.backends.cuda.matmul.allow_tf32 = rt.tf32
        torch.backends.cudnn.allow_tf32 = rt.tf32


def setup(p: Profile) -> torch.device:
    """Resolve and configure this process's device for profile ``p`` (rank-aware under torchrun)."""
    from .distributed import current

    device = resolve_device(p.runtime.device, current().local_rank)
    configure(p.runtime, device)
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(t: Tensor | None, device: torch.device | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """``t`` on ``device`` (as ``dtype``). A CPU -> CUDA copy goes through pinned memory without blocking the
    host, and converts AFTER the copy (half-precision rows cross the bus at half the bytes). On CPU this is
    exactly ``t.to(dtype)`` (a no-op when nothing changes). None (no gradient) stays None."""
    if t is None:
        return None
    if device is None or device.type == "cpu" or t.device == device:
        return t if dtype is None else t.to(dtype)
    if t.device.type == "cpu":
        t = t.pin_memory()
    t = t.to(device, non_blocking=True)
    return t if dtype is None else t.to(dtype)
