"""Count host syncs and kernel launches of CUDA code, without a GPU (fake CUDA tensors).

Every aten op that reaches the dispatcher is recorded, attributed to the innermost named
region, and classified::

    from torch._subclasses.fake_tensor import FakeTensorMode
    from bench.cuda_trace import CudaTrace

    with FakeTensorMode(allow_non_fake_inputs=True):
        augment = build_augmentation("cifar", K=4).to("cuda")
        images = torch.empty(512, 3, 32, 32, dtype=torch.uint8, device="cuda")
        with CudaTrace() as trace:
            with trace.region("augment"):
                views = augment(images)
    trace.syncs      # [(region, op, reason), ...]  -- want []
    trace.launches   # {"augment": 95}
    print(trace.summary())

It also works on a real GPU (then the ops really run); with fake tensors no GPU, driver or
memory is needed, only a CUDA build of torch (the PyPI wheel).

**Host syncs** (the host waits for the device), each with a reason:

- ``aten._local_scalar_dense`` on a CUDA tensor: ``.item()``, ``bool(t)``, ``.tolist()``, ``if t:``;
  ``aten.is_nonzero`` / ``aten.equal`` on CUDA tensors.
- a copy device -> CPU (``aten._to_copy`` / ``aten.copy_``).
- a copy CPU -> device that is not ``non_blocking=True`` (pageable or blocking copies wait).
- ops whose output shape depends on the data: ``nonzero``, ``masked_select``, ``unique``,
  boolean-mask indexing (``aten.index`` / ``index_put`` with a bool index), ``repeat_interleave``
  without ``output_size``, ``masked_scatter``.
- linear-algebra kernels that read an error code back on the host: ``_linalg_check_errors``,
  ``linalg_*_ex(check_errors=True)``, ``_linalg_svd`` and ``_linalg_eigh`` on CUDA (cuSOLVER
  ``info`` checks inside the kernel, which no Python-level search shows).

**Launches** (an approximation of kernel launches): every recorded op that touches a CUDA
tensor (argument or result), except ops that only make views or read metadata (``prim.*`` ops, and any op whose
schema returns an alias, e.g. ``view``, ``expand``, ``permute``, ``slice``, ``select``,
``unsqueeze``, ``t``, ``as_strided``, ``detach``, ``alias``, ``_unsafe_view``) and ops that only
allocate (``empty``, ``empty_like``, ``empty_strided``, ``new_empty*``, ``resize_``) or only
read a scalar (``_local_scalar_dense``). A copy, a fill (``zeros`` is ``empty`` + ``zero_``) and a
``_to_copy`` each count one. Fused or composite kernels that run several kernels inside
(cuDNN, cuBLAS, cuSOLVER) count one, so the figure is a lower bound for those.

With fake tensors a sync op has no data to return. ``placeholders=True`` (the default) lets the
traced code run on: ``_local_scalar_dense`` returns ``True`` / ``1`` / ``1.0`` (by dtype), and
boolean-mask indexing / ``nonzero`` behave as if every element were selected. Results computed
after a sync are then meaningless, but the op counts show what a real run would launch.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CudaTrace", "OpRecord", "NO_REGION", "ensure_fake_kernels"]

NO_REGION = "-"
"""The region of ops recorded outside any :meth:`CudaTrace.region`."""

aten = torch.ops.aten

_ALLOCATION_ONLY = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "empty_permuted",
    "resize_",
    "_local_scalar_dense",
    "lift_fresh",
    "lift_fresh_copy",
    "record_stream",
}
_DATA_DEPENDENT_SHAPE = {
    "nonzero",
    "nonzero_static",  # fixed shape, but listed by the same search; see _sync_reason
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "masked_scatter",
    "masked_scatter_",
}
_HOST_CHECKED_LINALG = {"_linalg_check_errors", "_linalg_svd", "_linalg_eigh", "linalg_eigh", "linalg_eig"}


@dataclass(frozen=True)
class OpRecord:
    """One dispatched aten op: where it ran, what it is, whether it counts as a launch or a sync."""

    region: str
    op: str  # e.g. "aten.mul.Tensor"
    launch: bool
    sync: str | None  # the reason it blocks the host, or None


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _on_cuda(tensors: list[torch.Tensor], device_type: str = "cuda") -> bool:
    return any(t.device.type == device_type for t in tensors)


def _copy_sync(src: torch.Tensor, dst_device: torch.device, non_blocking: bool) -> str | None:
    if src.device.type == "cuda" and dst_device.type == "cpu":
        return "device-to-host copy"
    if src.device.type == "cpu" and dst_device.type == "cuda" and not non_blocking:
        return "blocking host-to-device copy (not non_blocking)"
    return None


def _has_bool_index(indices: object) -> bool:
    return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(indices))


def _sync_reason(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object,
                 device_type: str = "cuda") -> str | None:
    name = func._schema.name.split("::")[-1]
    inputs = _tensors((args, kwargs))
    if name == "_local_scalar_dense":
        return "reads a device value on the host (.item()/bool()/.tolist())" if _on_cuda(inputs, device_type) else None
    if name in ("is_nonzero", "equal"):
        return "returns a Python bool from device data" if _on_cuda(inputs, device_type) else None
    if name == "_to_copy":
        src = args[0]
        dst = kwargs.get("device") or src.device
        return _copy_sync(src, torch.device(dst), bool(kwargs.get("non_blocking", False)))
    if name == "copy_":
        dst, src = args[0], args[1]
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        return _copy_sync(src, dst.device, non_blocking)
    if not _on_cuda(inputs + _tensors(out), device_type):
        return None
    if name in _DATA_DEPENDENT_SHAPE and name != "nonzero_static":
        return "output shape depends on the data"
    if name in ("index", "_index_put_impl_", "index_put", "index_put_") and _has_bool_index(args[1]):
        return "boolean-mask indexing (output shape depends on the data)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
        return "repeat_interleave without output_size"
    if name in _HOST_CHECKED_LINALG:
        return "cuSOLVER/linalg error code read on the host"
    if name.startswith("linalg_") and name.endswith("_ex") and kwargs.get("check_errors", False):
        return "linalg error code read on the host (check_errors=True)"
    return None


def _is_launch(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object, device_type: str = "cuda") -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _ALLOCATION_ONLY or func.is_view or func.namespace != "aten":
        return False  # prim.* ops (prim.device, ...) read metadata
    if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
        return False  # returns a view of an input (metadata only)
    return _on_cuda(_tensors((args, kwargs)) + _tensors(out), device_type)


def _placeholder_scalar(t: torch.Tensor) -> bool | int | float:
    if t.dtype == torch.bool:
        return True
    return 1.0 if (t.dtype.is_floating_point or t.dtype.is_complex) else 1


def _select_all(mask: torch.Tensor) -> list[torch.Tensor]:
    """Long indices that select every element of ``mask``'s shape (what nonzero gives for all-True)."""
    grids = torch.meshgrid(*[torch.arange(n, device=mask.device) for n in mask.shape], indexing="ij")
    return [g.reshape(-1) for g in grids]


_META_LIBRARY: torch.library.Library | None = None


def _cudnn_grid_sampler_meta(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return image.new_empty((image.shape[0], image.shape[1], grid.shape[1], grid.shape[2]))


def ensure_fake_kernels() -> None:
    """Give shape-only (Meta) kernels to CUDA ops that lack one, so fake CUDA tensors can run them.

    ``F.grid_sample`` on CUDA dispatches to ``aten.cudnn_grid_sampler``, which has no Meta kernel
    in torch 2.14. Registered once per process, only where no Meta kernel exists.
    """
    global _META_LIBRARY
    if _META_LIBRARY is not None:
        return
    _META_LIBRARY = torch.library.Library("aten", "IMPL")  # kept alive: dropping it unregisters
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::cudnn_grid_sampler", "Meta"):
        _META_LIBRARY.impl("cudnn_grid_sampler", _cudnn_grid_sampler_meta, "Meta")


class CudaTrace(TorchDispatchMode):
    """Record every aten op; classify host syncs; count launches per named region.

    Attributes:
        records: every :class:`OpRecord`, in dispatch order.
        syncs: ``[(region, op, reason), ...]`` of the ops that block the host.
        launches: ``{region: count}`` of ops counted as kernel launches (see the module docstring).

    Args:
        placeholders: let fake-tensor code run past a sync (see the module docstring).
        device_type: the device whose tensors count. ``"cpu"`` classifies real CPU ops as if they
            ran on the GPU, for code that fake CUDA tensors cannot run: autograd's backward needs a
            real CUDA context, so the backward pass is traced on CPU tensors (the same ops and
            custom backward functions; only copies between host and device cannot show there).
    """

    def __init__(self, placeholders: bool = True, device_type: str = "cuda") -> None:
        super().__init__()
        ensure_fake_kernels()
        self.placeholders = placeholders
        self.device_type = device_type
        self.records: list[OpRecord] = []
        self._stack: list[str] = []

    # ------------------------------------------------------------------ API
    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Attribute the ops run inside to ``name`` (regions nest; the innermost wins)."""
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    @property
    def syncs(self) -> list[tuple[str, str, str]]:
        return [(r.region, r.op, r.sync) for r in self.records if r.sync is not None]

    @property
    def launches(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            counts.setdefault(r.region, 0)
            counts[r.region] += r.launch
        return counts

    def summary(self) -> str:
        """One line per region: launches and syncs; then each sync."""
        lines = []
        by_region = Counter(r.region for r in self.records if r.sync is not None)
        for region, n in self.launches.items():
            lines.append(f"{region}: {n} launches, {by_region.get(region, 0)} host syncs")
        lines += [f"  sync in {region}: {op} -- {reason}" for region, op, reason in self.syncs]
        return "\n".join(lines)

    # -------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        out = None
        try:
            out = func(*args, **kwargs)
        except (
            torch._subclasses.fake_tensor.DataDependentOutputException,
            torch._subclasses.fake_tensor.DynamicOutputShapeException,
        ):
            if not self.placeholders:
                raise
            out = self._placeholder(func, name, args, kwargs)
        region = self._stack[-1] if self._stack else NO_REGION
        self.records.append(
            OpRecord(region, str(func), _is_launch(func, args, kwargs, out, self.device_type),
                     _sync_reason(func, args, kwargs, out, self.device_type))
        )
        return out

    def _placeholder(self, func, name: str, args: tuple, kwargs: dict):  # noqa: ANN001, ANN202
        if name == "_local_scalar_dense":
            return _placeholder_scalar(args[0])
        if name == "nonzero":
            return torch.stack(_select_all(args[0]), dim=1)
        if name == "masked_select":
            src, mask = torch.broadcast_tensors(args[0], args[1])
            return src.reshape(-1).clone()
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices: list = []
            for t in args[1]:
                if isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8):
                    indices += _select_all(t)
                else:
                    indices.append(t)
            return func(args[0], indices, *args[2:], **kwargs)
        raise RuntimeError(f"CudaTrace has no placeholder for {func}")
