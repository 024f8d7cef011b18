"""PyTorch adapter: ``torch.nn.KLDivLoss`` and ``torch.nn.functional.kl_div``.

The student goes in as ``log_softmax(s / T)``, the target as ``softmax(t / T)`` (or
``log_softmax(t / T)`` with ``log_target=True``), all computed by torch in the tested dtype.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import re
import warnings
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks.base import RUNTIME, Adapter
from klparity.model import Api, ErrorProfile, GradOutput, Output, Row

REDUCTIONS = ("none", "sum", "mean", "batchmean", "default")
ENTRIES = ("torch.nn.KLDivLoss", "torch.nn.functional.kl_div")
DIST_ENTRY = "torch.distributions.kl_divergence"
METRICS_ENTRY = "torchmetrics.functional.kl_divergence"


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


def _torch_tensor(torch: Any, x: NDArray[np.generic]) -> Any:
    """The array as a CPU tensor sharing its memory (bfloat16 through an int16 view)."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


#: Lanes of the vectors torch's CPU softmax / log_softmax backward accumulates a row sum in (AVX2
#: float32; AVX-512's 16 lanes only halve the sequential part, CUDA's block reductions are trees).
SUM_LANES: Final = 8


class TorchAdapter(Adapter):
    """``torch.nn.KLDivLoss`` / ``F.kl_div``: every reduction, ``log_target`` both ways."""

    #: Its own rows of the error model (``klparity.numerics.errormodel``).
    error_profile: ClassVar[ErrorProfile] = ErrorProfile(
        rows={
            "float16": Row(2, 3, "float32", "torch CPU rounds each elementwise op to float16 but sums "
                           "reduced-precision tensors in float32 (acc_type)"),
            "bfloat16": Row(2, 3, "float32", "as float16: bfloat16 elementwise, float32 sums"),
        },
        grad_rows={
            "float16": Row(2, 10, "float32", "backward ops rounded to float16 on CPU, class sums in float32 "
                           "(acc_type)"),
            "bfloat16": Row(2, 10, "float32", "as float16: bfloat16 ops, float32 class sums"),
        },
    )

    name = "torch"
    module = "torch"
    distribution = "torch"
    extra = "torch"
    id_prefixes = ("torch",)
    import_names = ("torch",)
    short_names = (("torch.nn.functional.", "F."),)
    plot_style = "o-"
    #: the scale tier: the functional KL both ways, float32 and bfloat16
    scale_apis = tuple(
        (Api("torch", "torch.nn.functional.kl_div", "torch", ("sum", "batchmean"), (("log_target", lt),)),
         ("float32", "bfloat16"))
        for lt in (False, True)
    )  # fmt: skip
    #: measured with VmHWM on 2**23 and 2**25 elements: 5.05 (log_softmax input, target, and kl_div's
    #: three elementwise temporaries)
    scale_arrays = 5.5
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

    def class_sum_roundings(self, n: int) -> float:
        """torch's CPU kernels reduce a row with ``vec::reduce_all``: sequentially over vectors of
        ``SUM_LANES`` lanes, then a tree over the lanes, so ceil(n / 8) + 3 roundings, not log2 n
        (measured: a uniform target over 32000 classes puts a 2e-5 relative error on the float32 sum)."""
        return math.ceil(n / SUM_LANES) + math.log2(SUM_LANES)

    def devices(self) -> tuple[str, ...]:
        return ("cpu", "gpu") if self._torch().cuda.is_available() else ("cpu",)

    def device_names(self) -> dict[str, str]:
        torch = self._torch()
        names = {"cpu": f"cpu ({torch.get_num_threads()} threads)"}
        if torch.cuda.is_available():
            names["gpu"] = f"cuda:0 {torch.cuda.get_device_name(0)}"
        return names

    def apis(self, dtype: str) -> tuple[Api, ...]:
        kl_div = tuple(
            Api("torch", entry, "torch", REDUCTIONS, (("log_target", lt),))
            for entry in ENTRIES
            for lt in (False, True)
        )
        dist = tuple(
            Api("torch", DIST_ENTRY, "torch_distributions", ("none",), (("from", f),)) for f in ("logits", "probs")
        )
        metrics = tuple(
            Api("torch", METRICS_ENTRY, "torchmetrics", ("none", "sum", "mean", "default"), (("log_prob", lp),),
                requires=("torchmetrics", "torchmetrics"))
            for lp in (False, True)
        )  # fmt: skip
        return kl_div + dist + metrics

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
        if api.entry == DIST_ENTRY:
            return self._run_distributions(api, teacher, student, temperature, device, layout)
        if api.entry == METRICS_ENTRY:
            return self._run_torchmetrics(api, teacher, student, temperature, device, layout)
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

    def logits(self, teacher: NDArray[np.generic], student: NDArray[np.generic], temperature: float, device: str,
                layout: str) -> tuple[Any, Any]:  # fmt: skip
        """(teacher, student) logits / T as tensors of the arrays' dtype on ``device``, in ``layout``."""
        torch = self._torch()
        dev = "cuda" if device == "gpu" else "cpu"
        tdtype = getattr(torch, str(teacher.dtype))
        t = torch.from_numpy(teacher.astype(np.float64)).to(dev).to(tdtype)
        s = torch.from_numpy(student.astype(np.float64)).to(dev).to(tdtype)
        return relayout(t / temperature, layout), relayout(s / temperature, layout)

    def _run_distributions(self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic],
                           temperature: float, device: str, layout: str) -> dict[str, Output]:  # fmt: skip
        """kl_divergence(Categorical(teacher), Categorical(student)), built from logits / T or their softmax;
        without argument validation (its default raises on a NaN logit: a pinned fact)."""
        torch = self._torch()
        zt, zs = self.logits(teacher, student, temperature, device, layout)
        cat = torch.distributions.Categorical
        if api.option("from") == "probs":
            p = cat(probs=torch.softmax(zt, dim=-1), validate_args=False)
            q = cat(probs=torch.softmax(zs, dim=-1), validate_args=False)
        else:
            p, q = cat(logits=zt, validate_args=False), cat(logits=zs, validate_args=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = torch.distributions.kl_divergence(p, q)
        return {"none": Output(to_float64(res), str(res.dtype).removeprefix("torch."),
                               tuple(str(w.message) for w in caught))}  # fmt: skip

    def _run_torchmetrics(self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic],
                          temperature: float, device: str, layout: str) -> dict[str, Output]:  # fmt: skip
        """torchmetrics.functional.kl_divergence(teacher, student, log_prob, reduction) on (rows, C): a
        (B, S, C) batch reshaped to (B·S, C) as a user must (it takes 2-D only); 'none' reshaped back."""
        import torchmetrics.functional as tmf

        torch = self._torch()
        zt, zs = self.logits(teacher, student, temperature, device, layout)
        log_prob = bool(api.option("log_prob", False))
        f = torch.log_softmax if log_prob else torch.softmax
        c = zt.shape[-1]
        p, q = f(zt, dim=-1).reshape(-1, c), f(zs, dim=-1).reshape(-1, c)
        out: dict[str, Output] = {}
        for red in api.reductions:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if red == "default":
                    res = tmf.kl_divergence(p, q, log_prob=log_prob)
                else:
                    res = tmf.kl_divergence(p, q, log_prob=log_prob, reduction=red)  # type: ignore[arg-type]
            if red == "none":
                res = res.reshape(zt.shape[:-1])
            out[red] = Output(to_float64(res), str(res.dtype).removeprefix("torch."),
                              tuple(str(w.message) for w in caught))  # fmt: skip
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

    def run_scale(
        self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic], temperature: float
    ) -> dict[str, Output]:
        """``TorchAdapter.run`` on contiguous CPU tensors, for ``api.reductions``, without the float64 copies."""
        import torch

        fn = torch.nn.functional
        t, s = _torch_tensor(torch, teacher), _torch_tensor(torch, student)
        log_target = bool(api.option("log_target", False))
        inp = fn.log_softmax(s / temperature, dim=-1)
        tgt = fn.log_softmax(t / temperature, dim=-1) if log_target else fn.softmax(t / temperature, dim=-1)
        out: dict[str, Output] = {}
        for red in api.reductions:
            res, caught = loss(api, red, inp, tgt)
            out[red] = Output(value=to_float64(res),
                              dtype=str(res.dtype).removeprefix("torch."), warnings=caught)  # fmt: skip
        return out

    def run_user_loss(
        self,
        call: Callable[[Any, Any, Any], Any],
        takes: str,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        key: Hashable = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None, str]:
        torch = self._torch()
        tdtype = getattr(torch, str(teacher.dtype))
        tt = torch.from_numpy(teacher.astype(np.float64)).to(tdtype)
        ss = torch.from_numpy(student.astype(np.float64)).to(tdtype).requires_grad_(True)
        fs, ft = ss, tt
        if takes == "probs":
            fs, ft = torch.softmax(ss / temperature, -1), torch.softmax(tt / temperature, -1)
        elif takes == "log_probs":
            fs, ft = torch.log_softmax(ss / temperature, -1), torch.log_softmax(tt / temperature, -1)
        out = call(fs, ft, temperature)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the loss returned {type(out).__name__}, not a torch.Tensor")
        grad = None
        if out.requires_grad:
            (g,) = torch.autograd.grad(out.sum(), ss, allow_unused=True)
            grad = None if g is None else g.detach().to(torch.float64).numpy()
        return out.detach().to(torch.float64).numpy(), grad, str(out.dtype).removeprefix("torch.")

    @contextlib.contextmanager
    def small_work(self) -> Iterator[None]:
        """torch on one intra-op thread while it lasts (restored after): a user-loss check's cases are a few
        hundred elements, where a thread pool only costs (8x slower measured on a busy 2-core machine)."""
        torch = self._torch()
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def torch_module() -> ModuleType:
    """torch, imported through the adapter (thread settings applied before first use): for probes."""
    return TorchAdapter()._torch()
