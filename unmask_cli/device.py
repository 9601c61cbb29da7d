"""Device choice. The only CUDA-specific switches (mixed precision, channels_last, cuDNN autotuning) hang
off one :class:`DeviceSetup`; the training loop itself is the same code on every device."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from unmask_cli.errors import UnmaskError


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def choose_device(spec: str | None = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu. ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are checked."""
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise UnmaskError(f"unknown device '{spec}' (use auto, cpu, cuda, cuda:N or mps)") from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnmaskError(f"device '{spec}' requested but CUDA is not available "
                              "(no NVIDIA GPU/driver, or a CPU-only torch build); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UnmaskError(f"device '{spec}' requested but only {count} CUDA device(s) exist "
                              f"(cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UnmaskError(f"device '{spec}' requested but Apple MPS is not available; use --device cpu")
        return device
    raise UnmaskError(f"unsupported device '{spec}' (use auto, cpu, cuda, cuda:N or mps)")


@dataclass
class DeviceSetup:
    """Everything that differs between devices. ``amp`` and ``channels_last`` are only ever on for CUDA."""

    device: torch.device
    amp: bool
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """fp16 autocast on CUDA with AMP; a no-op context elsewhere."""
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A real loss scaler with AMP; a disabled one (pass-through scale/step) elsewhere. The initial scale
        is 2**10, not 2**16: errG is ~100 (lambda_rc=100), and 2**16 would overflow fp16 gradients and skip
        the first few generator steps while the scaler backs off."""
        return torch.amp.GradScaler(self.device.type if self.amp else "cpu", init_scale=2.0**10, enabled=self.amp)

    def module(self, net: nn.Module) -> nn.Module:
        return net.to(device=self.device, memory_format=self.memory_format)

    def batch(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, memory_format=self.memory_format,
                         non_blocking=self.device.type == "cuda")

    def describe(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        extras = [x for x, on in (("AMP fp16", self.amp), ("channels_last", self.channels_last)) if on]
        return name + (f", {', '.join(extras)}" if extras else "")


def setup_device(spec: str | None = "auto", amp: bool = True, inference: bool = False) -> DeviceSetup:
    """The one device and precision policy of train, eval and infer: on CUDA, AMP (if ``amp``),
    channels_last and cuDNN autotuning. ``inference`` (``unmask infer``) also runs channels_last on the
    CPU, as infer always has there: NCHW convolutions round differently in the last float bit, which can
    flip a uint8 output pixel, and a rerun with a newer unmask should write the same bytes."""
    device = choose_device(spec)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    return DeviceSetup(device=device, amp=cuda and amp, channels_last=cuda or (inference and device.type == "cpu"))
