"""Activation offloading: tensors saved for backward wait in CPU memory instead of on the GPU.

    with activation_offloading(enabled):     # a recipe's loop wraps forward + loss in this
        loss, n = loss_fn(model, batch)
    loss.backward()                          # saved tensors come back as backward reaches them

API (also used by the distributed recipes):
- `activation_offloading(enabled, **options)`: an `OffloadActivations` when enabled, else a
  no-op context. The key is `enable_activation_offloading` in `TrainConfig`.
- `OffloadActivations(min_bytes=2**20, prefetch=2, max_inflight=4, pin_memory=True)`: the
  `torch.autograd.graph.saved_tensors_hooks` doing it; `num_packed`, `num_unpacked`,
  `num_offloaded` and `bytes_offloaded` count what went through it.

On a CUDA device, each saved activation of at least `min_bytes` (1 MiB: smaller ones cost a
pinned buffer, a copy and an event each for little memory) is copied into pinned CPU memory
on a side stream (overlapped with compute), and its GPU memory is released once the copy has
read it (at most `max_inflight` copies outstanding); backward copies it back on the side
stream, fetching the next `prefetch` tensors ahead (in reverse order of saving, the order
backward mostly needs them). Parameters (and views of them),
tensor subclasses (NF4, DTensor), expanded tensors and small ones stay where they are. CPU
tensors stay too: on a CPU run the hooks are installed and counted, and backward receives the
very tensors forward saved, so the losses are bit-identical to a run without offloading.

With activation checkpointing, a checkpointed block saves only its inputs through these hooks
(its own hooks take over inside the block, and recomputation runs after this context), so the
two compose: the block inputs wait on the CPU and the rest is recomputed.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Any, ContextManager

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

_side_streams: dict[torch.device, Any] = {}


def activation_offloading(enabled: bool, **options: Any) -> ContextManager:
    """The context the train step runs forward + loss in: offloading when `enabled`."""
    return OffloadActivations(**options) if enabled else contextlib.nullcontext()


def wants_offload(t: torch.Tensor, min_bytes: int) -> bool:
    """Whether `t` is an activation worth moving (any device): a plain dense tensor of at least
    `min_bytes` that is not a parameter or a view of one (weights stay where they live)."""
    if type(t) is not torch.Tensor or isinstance(t._base, nn.Parameter):
        return False  # Parameter / Buffer / NF4 / DTensor, or e.g. weight.t() saved by a matmul
    num_bytes = t.numel() * t.element_size()
    if num_bytes < min_bytes:
        return False
    # An expanded tensor (stride 0) would be materialised at full size on the CPU.
    return t.untyped_storage().nbytes() >= num_bytes


def _side_stream(device: torch.device) -> Any:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class _Offloaded:
    """One saved activation in pinned CPU memory; `fetch()` gives it back on its GPU."""

    __slots__ = ("index", "cpu", "device", "stream", "copied", "gpu", "ready", "__weakref__")

    def __init__(self, t: torch.Tensor, *, index: int, pin_memory: bool) -> None:
        self.index = index  # order of saving in its forward
        self.device = t.device
        self.stream = _side_stream(t.device)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully computed
        with torch.cuda.stream(self.stream):
            self.cpu = torch.empty_like(t, device="cpu", pin_memory=pin_memory)  # same strides
            self.cpu.copy_(t, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(self.stream)
        self.gpu: torch.Tensor | None = None
        self.ready: Any = None

    def prefetch(self) -> None:
        """Start the copy back to the GPU (the side stream is already ordered after the copy
        out, and the pinned buffer stays alive until the copy has read it)."""
        if self.gpu is not None:
            return
        with torch.cuda.stream(self.stream):
            self.gpu = self.cpu.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.ready)
        gpu, self.gpu = self.gpu, None  # autograd owns it now: freed when its node is done
        gpu.record_stream(compute)  # allocated on the side stream, used on the compute stream
        return gpu


class OffloadActivations(saved_tensors_hooks):
    """saved_tensors_hooks that offload large CUDA activations to the CPU (see the module doc)."""

    def __init__(self, *, min_bytes: int = 2**20, prefetch: int = 2, max_inflight: int = 4,
                 pin_memory: bool = True) -> None:
        self.min_bytes, self.prefetch, self.pin_memory = min_bytes, prefetch, pin_memory
        self.num_packed = self.num_unpacked = self.num_offloaded = self.bytes_offloaded = 0
        self._order: list[weakref.ref[_Offloaded]] = []  # in saving order, for prefetching
        # GPU tensors whose copy out may still run, held so their memory is not reused: the
        # oldest past `max_inflight` is let go once compute has waited for its copy, so later
        # compute kernels (the next users of that memory) run after the copy has read it.
        self.max_inflight = max_inflight
        self._inflight: collections.deque[tuple[torch.Tensor, Any]] = collections.deque()
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "OffloadActivations":
        super().__enter__()
        return self  # `with OffloadActivations() as ctx:` to read the counts afterwards

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        while self._inflight:  # forward is over: release what it offloaded
            self._release_oldest()

    def _release_oldest(self) -> None:
        t, copied = self._inflight.popleft()
        torch.cuda.current_stream(t.device).wait_event(copied)

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Offloaded:
        self.num_packed += 1
        if not (t.is_cuda and wants_offload(t, self.min_bytes)):
            return t  # stays where it is, exactly as without hooks
        saved = _Offloaded(t, index=len(self._order), pin_memory=self.pin_memory)
        self._order.append(weakref.ref(saved))
        self._inflight.append((t, saved.copied))
        if len(self._inflight) > self.max_inflight:
            self._release_oldest()
        self.num_offloaded += 1
        self.bytes_offloaded += t.numel() * t.element_size()
        return saved

    def _unpack(self, saved: torch.Tensor | _Offloaded) -> torch.Tensor:
        self.num_unpacked += 1
        if isinstance(saved, torch.Tensor):
            return saved
        saved.prefetch()  # this one's copy first on the side stream
        # Backward needs activations roughly in reverse order of saving: start the next ones'
        # copies now so they overlap with this node's compute.
        for i in range(saved.index - 1, max(saved.index - 1 - self.prefetch, -1), -1):
            ahead = self._order[i]()
            if ahead is not None:
                ahead.prefetch()
        return saved.fetch()
