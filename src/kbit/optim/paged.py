"""Paged optimizers: state in pinned host memory, streamed through the GPU chunk by chunk on side streams.

Why not bitsandbytes' way: its paged optimizers allocate state with ``cudaMallocManaged`` and leave eviction
to the driver, which can ask for more managed memory than the GPU has free (and hang it). kbit pages
explicitly and never uses managed memory. The flat state (:mod:`kbit.optim.flat`) lives in page-locked host
memory; a step walks its chunks (1/24 of the state each by default, whole parameters where they fit) through
two GPU staging sets (:mod:`kbit.optim.staging`): the upload of the next chunk and the download of the
previous one overlap the update of this one. The GPU holds two chunks of state (under 10% of it) plus the
float32 states of small tensors. Measured on the H100 (bench/README.md): 2 sets of 1/24 take 2.31 ms for the
8B-shape LoRA state against 3.27 ms for 3 sets of 1/36, whose extra chunks cost the host more than the
overlap wins.

Cost: the state crosses the host link twice a step, so a step takes at least state bytes / link bandwidth
(about 2 ms per 85 MB each way at 41 GB/s duplex), however fast the update kernel is; and each chunk costs the
host one launch, two copies (more for a chunk of a parameter larger than a chunk) and a few events.

``transfer="mapped"`` (an alternative, measured by ``bench/optim_step.py``): no staging and no copies; the
update kernel reads and writes the pinned host state in place over the link, in one launch, so the host work of
a step is the unpaged one's and the GPU holds no state at all. The link floor is the same.

On CPU (and without Triton) the paged classes are the plain ones: ``PagedAdamW8bit`` steps exactly as
:class:`~kbit.optim.AdamW8bit`, ``PagedAdamW`` as ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..kernels.dispatch import use_triton
from .adamw8bit import STATE8_SPECS, AdamW8bit, check_hyperparameters
from .flat import FlatStates, blocks_of, build_layout, standalone_state_dict, synchronize
from .fused import FusedUpdate
from .plan import ParamSet, groups_key
from .staging import PagedStates

CHUNKS = 24  # default chunk: 1/24 of the state (whole parameters packed up to it)
STAGING_SETS = 2  # two sets of 1/24: 8.3% of the state on the GPU (fewer chunks: less host work per step)
MIN_CHUNK_BLOCKS = 1024  # 256 Ki elements: smaller copies would be dominated by their fixed cost
TRANSFERS = ("copy", "mapped")


def new_paged_bucket(
    params: list[torch.Tensor],
    device: torch.device,
    specs: dict[str, tuple[torch.dtype, bool]],
    chunk_blocks: int | None,
    sets: int | None,
    transfer: str,
) -> PagedStates | FlatStates:
    """Paged flat states for ``params``: ``transfer="copy"`` streams chunks of ``chunk_blocks`` (default 1/24 of
    the state) through ``sets`` (default 2) staging sets; ``"mapped"`` lets the kernel use host memory in place."""
    if transfer == "mapped":
        return FlatStates(build_layout(params, device), specs, device, pinned=device.type == "cuda")
    if chunk_blocks is None:
        total = sum(blocks_of(p.numel()) for p in params)
        chunk_blocks = max(MIN_CHUNK_BLOCKS, -(-total // CHUNKS))
    return PagedStates(params, device, specs, chunk_blocks, STAGING_SETS if sets is None else sets)


def check_transfer(transfer: str) -> str:
    """``transfer`` if it is one of :data:`TRANSFERS`, else a ValueError listing them."""
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
    return transfer


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with its 8-bit states in pinned host memory on CUDA (small fp32 ones on the GPU)."""

    def __init__(
        self,
        *args,
        chunk_blocks: int | None = None,
        staging_sets: int | None = None,
        transfer: str = "copy",
        **kwargs,
    ):
        """As AdamW8bit; ``chunk_blocks``: most 256-element blocks per chunk (default 1/24 of the state);
        ``staging_sets``: GPU staging buffers (default 2); ``transfer``: "copy" (chunks through staging) or
        "mapped" (the kernel reads and writes the pinned host state in place: no GPU copy, one launch)."""
        super().__init__(*args, **kwargs)
        self.chunk_blocks = chunk_blocks
        self.staging_sets = staging_sets
        self.transfer = check_transfer(transfer)

    def _new_bucket(self, params: list[torch.Tensor], device: torch.device) -> PagedStates | FlatStates:
        return new_paged_bucket(params, device, STATE8_SPECS, self.chunk_blocks, self.staging_sets, self.transfer)


class PagedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with its moments (in the parameter dtype) in pinned host memory on CUDA.

    The update is torch's single-tensor AdamW in one fused launch a chunk (float32 math, one rounding to the
    moment dtype per step); on CPU this is ``torch.optim.AdamW`` itself. State dicts are torch's AdamW format.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        chunk_blocks: int | None = None,
        staging_sets: int | None = None,
        transfer: str = "copy",
    ):
        check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.chunk_blocks = chunk_blocks
        self.staging_sets = staging_sets
        self.transfer = check_transfer(transfer)
        self._reset_plan()

    def _reset_plan(self) -> None:
        self._params: ParamSet | None = None
        self._fusion: FusedUpdate | None = None  # made on the first CUDA step (it imports Triton)
        self._step_tensors: list[torch.Tensor] = []

    @property
    def _buckets(self) -> dict:
        return self._fusion.buckets if self._fusion is not None else {}

    def _new_bucket(self, params: list[torch.Tensor], device: torch.device) -> PagedStates | FlatStates:
        specs = {"exp_avg": (params[0].dtype, True), "exp_avg_sq": (params[0].dtype, True)}
        return new_paged_bucket(params, device, specs, self.chunk_blocks, self.staging_sets, self.transfer)

    def _init_state(self, p: torch.Tensor) -> None:
        self.state[p]["step"] = torch.tensor(0.0)  # torch's format: a float32 CPU scalar

    def _activate(self, ps: ParamSet) -> None:
        """The set of parameters with gradients changed: initialise state, regroup, (re)build the paged buckets."""
        ps.activate(self.state, self._init_state, lambda s: int(s["step"].item()), contiguous=True)
        self._step_tensors = [s["step"] for s in ps.states]
        if self._fusion is None:
            self._fusion = FusedUpdate(self._new_bucket, None, torch_order=True)
        self._fusion.activate(self, ps, ps.active)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """torch's AdamW step; on CUDA with the moments paged in from host memory."""
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None or not use_triton(first):
            ps = ParamSet(self)  # torch's AdamW does not check for mixed devices; kbit's optimizers all do
            ps.refresh()
            ps.check_devices()
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._params is None or self._params.key != groups_key(self.param_groups):
            self._params = ParamSet(self)
        ps = self._params
        if not ps.ready(self._activate):
            return loss
        torch._foreach_add_(self._step_tensors, 1.0)  # one call for every parameter's CPU step counter
        self._fusion.step(ps)
        return loss

    def state_dict(self) -> dict:
        """torch's AdamW state dict, every state tensor a standalone copy."""
        return standalone_state_dict(self, self._buckets)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's AdamW loader; the flat buffers are rebuilt from the loaded state at the next step."""
        synchronize(self._buckets)
        self._reset_plan()
        super().load_state_dict(state_dict)
