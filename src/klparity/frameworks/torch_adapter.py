"""PyTorch adapter: ``torch.nn.KLDivLoss`` and ``torch.nn.functional.kl_div``.

The student goes in as ``log_softmax(s / T)``, the target as ``softmax(t / T)`` (or
``log_softmax(t / T)`` with ``log_target=True``), all computed by torch in the tested dtype.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks.base import RUNTIME, Adapter, Api, GradOutput, Output

REDUCTIONS = ("none", "sum", "mean", "batchmean", "default")
ENTRIES = ("torch.nn.KLDivLoss", "torch.nn.functional.kl_div")


def relayout(x: Any, layout: str) -> Any:
    """Same values as ``x`` in a non-contiguous memory layout (or ``x`` itself for contiguous)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":  # class axis outermost in memory; a permuted view of it
        out = x.movedim(-1, 0).contiguous().movedim(0, -1)
    elif layout == "strided":  # every other element of a buffer twice as wide
        buf = x.new_full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"))
        buf[..., ::2] = x
        out = buf[..., ::2]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if out.is_contiguous():
        raise ValueError(f"layout {layout!r} does not apply to shape {tuple(x.shape)}")
    return out


def to_float64(x: Any) -> NDArray[np.float64]:
    """A tensor's values as a float64 NumPy array on the host (exact for every tested dtype)."""
    import torch

    return np.asarray(x.detach().to("cpu", torch.float64).numpy(), np.float64)


def loss(api: Api, red: str, inp: Any, tgt: Any) -> tuple[Any, tuple[str, ...]]:
    """One reduction of the torch API on given input and target tensors (``'default'``: no reduction
    argument), and the warnings it raised."""
    import torch

    kwargs: dict[str, Any] = {"log_target": bool(api.option("log_target", False))}
    if red != "default":
        kwargs["reduction"] = red
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if api.entry == "torch.nn.KLDivLoss":
            res = torch.nn.KLDivLoss(**kwargs)(inp, tgt)
        else:  # looked up at call time, so a patched F.kl_div is the one called
            res = torch.nn.functional.kl_div(inp, tgt, **kwargs)
    return res, tuple(str(w.message) for w in caught)


class TorchAdapter(Adapter):
    """``torch.nn.KLDivLoss`` / ``F.kl_div``: every reduction, ``log_target`` both ways."""

    name = "torch"
    module = "torch"
    distribution = "torch"
    extra = "torch"
    id_prefixes = ("torch",)
    dtypes = ("float16", "bfloat16", "float32", "float64")
    layouts = ("contiguous", "transposed", "strided")
    _mod: ModuleType | None = None

    def version(self) -> str:
        """torch's own ``__version__``, build label included (2.13.0+cpu, 2.14.1+cu130: a build change
        is a change), read from ``torch/version.py`` without importing torch; the distribution's
        metadata drops the label of some builds (the CUDA wheels say 2.14.1)."""
        plain = super().version()
        try:
            source = Path(str(importlib.metadata.distribution(self.distribution).locate_file("torch/version.py")))
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", source.read_text(), re.MULTILINE)
        except (importlib.metadata.PackageNotFoundError, OSError):
            return plain
        return found.group(1) if found else plain

    def _torch(self) -> ModuleType:
        if TorchAdapter._mod is None:
            import torch

            if RUNTIME.threads is not None:
                torch.set_num_threads(RUNTIME.threads)
                try:
                    torch.set_num_interop_threads(1)
                except RuntimeError:  # already started: only settable once per process
                    pass
            TorchAdapter._mod = torch
        return TorchAdapter._mod

    def devices(self) -> tuple[str, ...]:
        return ("cpu", "gpu") if self._torch().cuda.is_available() else ("cpu",)

    def device_names(self) -> dict[str, str]:
        torch = self._torch()
        names = {"cpu": f"cpu ({torch.get_num_threads()} threads)"}
        if torch.cuda.is_available():
            names["gpu"] = f"cuda:0 {torch.cuda.get_device_name(0)}"
        return names

    def apis(self, dtype: str) -> tuple[Api, ...]:
        return tuple(
            Api("torch", entry, "torch", REDUCTIONS, (("log_target", lt),))
            for entry in ENTRIES
            for lt in (False, True)
        )

    def compute_dtype(self, api: Api, dtype: str) -> str:
        return dtype

    def run(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
    ) -> dict[str, Output]:
        _, _, inp, tgt = self._pipeline(api, teacher, student, temperature, device, layout, grad=False)
        out: dict[str, Output] = {}
        for red in api.reductions:
            res, caught = loss(api, red, inp, tgt)
            out[red] = Output(
                value=to_float64(res),
                dtype=str(res.dtype).removeprefix("torch."),
                warnings=caught,
            )
        return out

    def _pipeline(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
        *,
        grad: bool,
    ) -> tuple[Any, Any, Any, Any]:
        """(teacher, student, input, target) tensors, as a distillation user builds them."""
        torch = self._torch()
        fn = torch.nn.functional
        dev = "cuda" if device == "gpu" else "cpu"
        tdtype = getattr(torch, str(teacher.dtype))
        # float64 -> dtype is exact: the values are already representable in dtype.
        t = torch.from_numpy(teacher.astype(np.float64)).to(dev).to(tdtype).requires_grad_(grad)
        s = torch.from_numpy(student.astype(np.float64)).to(dev).to(tdtype).requires_grad_(grad)
        log_target = bool(api.option("log_target", False))
        inp = relayout(fn.log_softmax(s / temperature, dim=-1), layout)
        tgt = fn.log_softmax(t / temperature, dim=-1) if log_target else fn.softmax(t / temperature, dim=-1)
        return t, s, inp, relayout(tgt, layout)

    def run_grad(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
    ) -> dict[str, GradOutput]:
        """Each reduction's gradients w.r.t. both logits (``autograd.grad``; 'none' differentiates the sum)."""
        torch = self._torch()
        t, s, inp, tgt = self._pipeline(api, teacher, student, temperature, device, layout, grad=True)
        seen_t, seen_i = to_float64(tgt), to_float64(inp)
        out: dict[str, GradOutput] = {}
        for red in api.reductions:
            res, caught = loss(api, red, inp, tgt)
            g_s, g_t = torch.autograd.grad(res, (s, t), grad_outputs=torch.ones_like(res), retain_graph=True)
            out[red] = GradOutput(
                student=to_float64(g_s),
                teacher=None if g_t is None else to_float64(g_t),
                dtype=str(g_s.dtype).removeprefix("torch."),
                seen_target=seen_t,
                seen_input=seen_i,
                warnings=caught,
            )
        return out
