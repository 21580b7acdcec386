"""The training loop: one plain loop over optimizer steps, readable top to bottom.

Loss. Each optimizer step takes ``gradient_accumulation_steps`` micro-batches. The loss of the step is the sum
of token cross-entropies over every target token of all its micro-batches divided by their total count, which
is known before the first forward because the whole window is collated first. So 4 micro-batches of 1 give
the same loss and gradients as one batch of 4, however uneven the lengths (averaging per-micro-batch means,
as several frameworks did, weights the tokens of short sequences more). The loss is computed here from the
logits, not by the model, and only at the positions that have a target (``logits_to_keep``), which spares the
vocabulary projection of prompt and padding tokens.

Exact resume. The data order of epoch ``e`` is a permutation seeded by (seed, e), so the data position is a
function of the step; a checkpoint stores the adapter, optimizer, scheduler, step and every RNG state, and a
run resumed from step k computes the same losses, bit for bit, as one that never stopped. Evaluation runs
under ``torch.random.fork_rng`` so it draws nothing from the training streams.

Stops. SIGINT/SIGTERM (and :meth:`Trainer.request_stop`) finish the current step, save a checkpoint and
return. A non-finite loss or gradient norm stops before the optimizer step, saves the state from before that
step and raises :class:`TrainingDiverged` naming the step.

Several processes (torchrun). ``config.strategy`` shards the model with FSDP2 or wraps it in DDP
(:mod:`kbit.dist`). Micro-batch m of the run is then a *global* batch of ``per_device_train_batch_size x
world_size`` examples of the same data order, of which rank r takes the r-th slice; each rank divides its summed
loss by the global target count times ``1 / world_size``, so the gradient average the collectives compute is the
gradient of the global mean token loss, equal to a one-process run with the whole batch. A rank whose slice of
the epoch's last, short batch is empty runs an example without targets instead (every rank must take part in
the collectives). Loss, tokens and the stop flag are all-reduced; rank 0 alone logs and writes shared files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, Batch, Example, TokenizedData, collate
from ..dist import DistContext, apply_strategy, current_context, full_tensor, is_sharded, sync_gradients
from ..dist import checkpoint as dist_ckpt
from ..dist.oom import explain_out_of_memory, is_out_of_memory
from ..dist.shard import compute_device
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, build_config
from .metrics import MetricsLogger
from .progress import Progress, memory_gib
from .schedule import OptimizerFactory, build_optimizer, build_scheduler, lr_factor, warmup_steps

Callback = Callable[["Trainer", dict[str, Any]], None]
# cuda_graph: at most this many micro-batch shapes get a graph (each costs a capture and pool memory); the rest run
# eagerly. Packed or fixed-length batches have one or two shapes; padding to each batch's longest row has many.
MAX_GRAPHS = 8


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` did."""

    step: int  # optimizer steps completed (counting those before a resume)
    losses: list[float] = field(default_factory=list)  # train loss of each step this call ran, in order
    eval_loss: float | None = None  # the last evaluation's loss
    checkpoint: Path | None = None  # the last checkpoint written
    # "SIGINT", "SIGTERM" or "request" when stopped early; None when it ran to the end
    stopped_by: str | None = None
    output_dir: Path | None = None


def resolve_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: as configured, else on for CUDA GPUs that support bf16 and off on CPUs (where float32
    matmuls are several times faster than bf16 ones without AVX512-BF16/AMX)."""
    if config.bf16 is not None:
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def default_output_dir(config: TrainConfig, job: str = "run") -> Path:
    """``output_dir`` when given, else ``runs/<run_name>`` (``runs/<job>-<date>-<time>`` without a name)."""
    if config.output_dir is not None:
        return Path(config.output_dir).expanduser()
    return Path("runs") / (config.run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}")


class Trainer:
    """Trains the trainable parameters (LoRA) of ``model`` on ``train_data`` as ``config`` says.

    ``train_data`` / ``eval_data``: :class:`kbit.data.TokenizedData`, a list of :class:`kbit.data.Example`, or
    anything :func:`kbit.data.load_dataset` reads (tokenized here with ``tokenizer``). ``optimizer``: an
    optimizer over the trainable parameters, or a factory called with them; default: ``config.optim``.
    ``callbacks`` are called as ``callback(trainer, record)`` after every step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        train_data: Any = None,
        eval_data: Any = None,
        config: TrainConfig | dict[str, Any] | None = None,
        *,
        optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config if isinstance(config, TrainConfig) else build_config(overrides=config)
        cfg = self.config
        self.model = model
        self.tokenizer = tokenizer
        self.device = compute_device(model)  # a model sharded with cpu_offload keeps its shards on the host
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters; call kbit.add_lora(model) first")
        self.dist: DistContext = current_context(self.device)
        if train_data is None:
            raise ValueError("train_data is required")
        self.train_examples = self._examples(train_data, pack=cfg.packing)
        self.eval_examples = self._examples(eval_data, pack=False) if eval_data is not None else None
        self.pad_token_id = _pad_token_id(tokenizer)

        self.use_bf16 = resolve_bf16(cfg, self.device)
        self.mask_dtype = torch.bfloat16 if self.use_bf16 else getattr(model, "dtype", torch.float32)
        forward_args = inspect.signature(model.forward).parameters  # read before the fast path re-binds forward
        self.keep_logits = "logits_to_keep" in forward_args
        self.no_cache = {"use_cache": False} if "use_cache" in forward_args else {}
        self.fast_path_line = ""
        self.fused_loss = False  # the model computes the summed loss from hidden states (no full logits)
        if cfg.fast_path if cfg.fast_path is not None else self.device.type == "cuda":
            from ..models.patch import apply_fast_path, uses_fused_loss

            self.fast_path_line = apply_fast_path(model)
            self.fused_loss = uses_fused_loss(model)
        # After the fast path (the plan's probe measures the patched layers), before FSDP shards them.
        self.memory_plan = self._plan_memory(model)
        self.gradient_checkpointing = any(mode != "none" for mode in self.memory_plan.modes)
        # FSDP shards `model` in place (its parameters become DTensor shards); DDP returns a wrapper to call.
        self.forward_model, self.strategy = apply_strategy(model, self.dist, cfg.strategy, cfg.cpu_offload)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.strategy == "fsdp" and cfg.optim != "adamw" and optimizer is None:
            raise ConfigError(
                f"optim: {cfg.optim} does not handle FSDP's sharded parameters yet; use optim adamw with "
                "strategy fsdp (its state is sharded like the LoRA weights)"
            )

        # The data schedule: micro-batch m is global batch m % per_epoch of epoch m // per_epoch.
        self.batch_size = cfg.per_device_train_batch_size
        self.accum = cfg.gradient_accumulation_steps
        self.batches_per_epoch = math.ceil(len(self.train_examples) / (self.batch_size * self.dist.world_size))
        self.total_steps = (
            cfg.max_steps
            if cfg.max_steps > 0
            else max(1, math.ceil(cfg.num_train_epochs * self.batches_per_epoch / self.accum))
        )
        self._orders: dict[int, list[int]] = {}

        if optimizer is None:
            self.optimizer = build_optimizer(self.params, cfg)
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = optimizer(self.params)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        # CUDA graphs: one GraphedStep per micro-batch shape, all sharing one memory pool (None: eager)
        self.graphs: dict[tuple, Any] | None = self._check_graphable(model) if cfg.cuda_graph else None
        self.graph_pool = torch.cuda.graph_pool_handle() if self.graphs is not None else None
        self.callbacks = list(callbacks)
        # one folder for all ranks: rank 0's (a default name holds the time, which may differ by a second)
        self.output_dir = Path(self.dist.broadcast_object(str(default_output_dir(cfg))))
        self.step = 0
        self.stop_reason: str | None = None
        self.last_checkpoint: Path | None = None
        self.metrics: MetricsLogger | None = None
        self._rng_before_step: dict[str, Any] | None = None

    def _check_graphable(self, model: torch.nn.Module) -> dict:
        """An empty table of graphs, or a ConfigError saying why ``cuda_graph: true`` cannot run here."""
        from .cuda_graph import check_graphable

        if self.device.type != "cuda":
            raise ConfigError(f"cuda_graph: needs a CUDA GPU, the model is on {self.device}; set cuda_graph: false")
        if self.dist.distributed:
            raise ConfigError("cuda_graph: one process only for now (a torchrun job runs eager); set cuda_graph: false")
        if not self.fused_loss:
            raise ConfigError(
                "cuda_graph: needs the fast path's fused loss (fast_path: true on a supported family); set "
                "cuda_graph: false"
            )
        try:
            check_graphable(model)
        except ValueError as e:
            raise ConfigError(f"cuda_graph: {str(e).removeprefix('cuda graph: ')}") from None
        return {}

    def _plan_memory(self, model: torch.nn.Module):
        """Choose what each decoder layer keeps for the backward (:mod:`kbit.models.memory_plan`) and apply it."""
        from ..estimate import OPTIMIZER_BYTES
        from ..models.memory_plan import apply_plan, free_device_bytes, plan_memory, step_bytes

        cfg = self.config
        mode = cfg.resolved_memory_plan(self.device.type)
        self._plan_mode = mode  # a speed plan may fall back to recomputing every layer (_fall_back_to_full)
        if cfg.memory_plan != "auto":
            why = "as configured"
        elif cfg.gradient_checkpointing is not None:
            why = f"from gradient_checkpointing: {str(cfg.gradient_checkpointing).lower()}"
        else:
            why = f"memory_plan auto on {self.device.type.upper()}"
        if mode == "speed" and is_sharded(model):  # the probe would run FSDP's hooks out of order
            mode, why = "full", "speed is not planned for a model that FSDP already shards"
        batch = cfg.per_device_train_batch_size
        seq_len = min(cfg.max_seq_len, max((len(e.input_ids) for e in self.train_examples), default=1))
        free = reserve = None
        if mode == "speed" and self.device.type == "cuda":
            free = free_device_bytes(self.device)
            if self.dist.distributed:  # one plan on every rank: the tightest rank's memory decides
                free = -int(self.dist.all_reduce([-free], op="max")[0])
            reserve = step_bytes(model, batch, seq_len, OPTIMIZER_BYTES.get(cfg.optim, 8.0), self.fused_loss)
        try:
            plan = plan_memory(
                model,
                mode,
                batch,
                seq_len,
                free_bytes=free,
                reserve_bytes=reserve or 0,
                autocast=self.autocast,
                why=why,
                weight_pieces=cfg.cuda_graph,  # plan memory's row pieces cost launches: free inside a graph
            )
            apply_plan(model, plan)  # checkpointing per layer, and the MLP pieces of the recomputed layers
        except ValueError as e:
            raise ConfigError(f"memory_plan: {e}") from None
        if mode == "memory" and self.device.type == "cuda" and not is_sharded(model):
            from ..models.offload import offload_input_embeddings

            # the frozen input embedding table (1 GiB for an 8B model) waits in host memory; rows go over per step
            plan = dataclasses.replace(plan, line=f"{plan.line}; {offload_input_embeddings(model)}")
        return plan

    def _can_fall_back(self) -> bool:
        """True when an out-of-memory error in forward/backward may be retried with every layer recomputed: the
        plan was chosen for speed, kept some layers, and this is one process (ranks must agree on a plan)."""
        return self._plan_mode == "speed" and "none" in self.memory_plan.modes and not self.dist.distributed

    def _fall_back_to_full(self, progress: Progress) -> None:
        """The speed plan kept too many layers: recompute every layer from now on (a line says so)."""
        from ..models.memory_plan import apply_plan

        self.optimizer.zero_grad(set_to_none=True)  # the failed attempt's partial gradients
        if self.graphs:
            self.graphs.clear()  # captured with the old plan: capture again under the new one
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        kept = self.memory_plan.modes.count("none")
        modes = tuple("full" if m == "none" else m for m in self.memory_plan.modes)
        plan = dataclasses.replace(self.memory_plan, modes=modes)
        apply_plan(self.model, plan)
        line = (
            f"memory plan: out of memory in step {self.step + 1} with {kept} layers kept; "
            f"recomputing every layer from now on (memory_plan: full sets this from the start)"
        )
        self.memory_plan = dataclasses.replace(plan, line=line)
        self.gradient_checkpointing = True
        progress.write(line)

    # ---- data ----------------------------------------------------------------------------------------------

    def _examples(self, data: Any, pack: bool) -> list[Example]:
        if isinstance(data, TokenizedData):
            return data.examples
        if isinstance(data, list) and data and all(isinstance(e, Example) for e in data):
            return data
        if self.tokenizer is None:
            raise ValueError("pass a tokenizer to tokenize raw records, or give kbit.data.TokenizedData")
        from ..data import load_dataset, pack_examples, tokenize_records

        records = load_dataset(data, self.config.format)
        tokenized = tokenize_records(
            records, self.tokenizer, self.config.max_seq_len, train_on_prompt=self.config.train_on_prompt
        )
        return pack_examples(tokenized.examples, self.config.max_seq_len) if pack else tokenized.examples

    def _order(self, epoch: int) -> list[int]:
        """The example order of ``epoch``: a permutation seeded by (seed, epoch), alike on every machine."""
        if epoch not in self._orders:
            order = list(range(len(self.train_examples)))
            random.Random(f"kbit-train:{self.config.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is all the loop needs
        return self._orders[epoch]

    def micro_batch(self, m: int) -> Batch:
        """This rank's part of micro-batch number ``m`` of the run (epochs follow one another)."""
        epoch, position = divmod(m, self.batches_per_epoch)
        size = self.batch_size * self.dist.world_size
        indices = self._order(epoch)[position * size : (position + 1) * size]
        return self._rank_slice([self.train_examples[i] for i in indices], self.batch_size)

    def _rank_slice(self, examples: list[Example], size: int) -> Batch:
        """This rank's ``size`` examples of a global batch; an example without targets when none is left."""
        mine = examples[self.dist.rank * size : (self.dist.rank + 1) * size]
        if not mine:  # the short last batch: run a forward that adds nothing, so the collectives stay in step
            first = examples[0]
            mine = [Example(first.input_ids, [IGNORE_INDEX] * len(first.labels), first.position_ids)]
        return collate(mine, self.pad_token_id)

    def data_position(self, step: int) -> dict[str, Any]:
        """Where the data stands after ``step`` optimizer steps (saved in checkpoints, checked on resume)."""
        epoch, position = divmod(step * self.accum, self.batches_per_epoch)
        return {
            "epoch": epoch,
            "micro_batch_in_epoch": position,
            "num_examples": len(self.train_examples),
            "num_tokens": sum(len(e.input_ids) for e in self.train_examples),
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.accum,
            "seed": self.config.seed,
            "world_size": self.dist.world_size,
        }

    # ---- loss ----------------------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy of the target tokens of ``batch``, their count); the model gets no labels."""
        batch = batch.to(self.device)
        inputs = batch.model_inputs(self.mask_dtype)
        del inputs["labels"]
        targets = batch.labels[:, 1:]  # (B, T-1): the logits at position t predict token t+1
        n_targets = int((targets != IGNORE_INDEX).sum())
        if self.fused_loss:  # num_items_in_batch=1: transformers' convention for "return the sum"
            with self.autocast():
                out = self.forward_model(**inputs, **self.no_cache, labels=batch.labels, num_items_in_batch=1)
            return out.loss.float(), n_targets
        with self.autocast():
            if self.keep_logits:
                keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (K,) positions with a target
                logits = self.forward_model(**inputs, **self.no_cache, logits_to_keep=keep).logits  # (B, K, V)
                targets = targets[:, keep]
            else:
                logits = self.forward_model(**inputs, **self.no_cache).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss, int((targets != IGNORE_INDEX).sum())

    def accumulate(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Forward and backward over one step's micro-batches; returns the step's mean loss per target token.

        Each micro-batch's summed loss is divided by the target-token count of the whole window (over all ranks),
        so the accumulated gradient is that of the window's mean token loss. Gradients are synchronised across
        ranks once, after the window's last micro-batch.
        """
        local = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        n_targets = int(self.dist.all_reduce([local])[0]) if self.dist.distributed else local
        if n_targets == 0:
            raise ValueError(f"step {self.step + 1}: its micro-batches hold no target token; check the labels")
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            if self.graphs is not None:
                loss = self._graphed_micro_batch(batch, self.dist.world_size / n_targets)
                if loss is not None:
                    total += loss
                    continue
            with sync_gradients(self.forward_model, sync=i == len(micro_batches) - 1):
                loss_sum, _ = self.loss_sum(batch)
                loss = loss_sum / n_targets
                # x world_size: the collectives average the ranks' gradients, the global loss is their sum
                (loss * self.dist.world_size).backward()
            total += loss.detach()
        if self.dist.distributed:
            total = self.dist.all_reduce(total.reshape(1))[0].to(total.dtype)
        return total

    def _graphed_micro_batch(self, batch: Batch, scale: float) -> torch.Tensor | None:
        """One micro-batch's forward and backward (its summed loss times ``scale``) through the CUDA graph of its
        shape, capturing it on the shape's second micro-batch; returns the scaled loss, or None once there are
        ``MAX_GRAPHS`` shapes (the caller runs it eagerly)."""
        from .cuda_graph import GraphedStep

        # One unpadded sequence per row: no attention mask at all, so the captured attention runs causal (kernels
        # without a mask). Read on the host copy of the batch: no synchronisation.
        whole = batch.position_ids is None and bool(batch.attention_mask.all())
        inputs = batch.to(self.device).model_inputs(self.mask_dtype)
        if whole:
            del inputs["attention_mask"]
        inputs["scale"] = torch.tensor(scale, dtype=torch.float32, device=self.device)
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            graph = self.graphs[key] = GraphedStep(self._graph_body, self.params, 1, packed=not whole,
                                                   pool=self.graph_pool)  # fmt: skip
        return graph.step(inputs).clone()

    def _graph_body(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """What a micro-batch's graph captures: the fused summed loss, scaled, and its backward."""
        inputs = {k: v for k, v in b.items() if k not in ("scale", "labels")}
        with self.autocast():
            out = self.forward_model(**inputs, **self.no_cache, labels=b["labels"], num_items_in_batch=1)
        loss = out.loss.float() * b["scale"]
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy per target token over the eval data (None without eval data)."""
        if not self.eval_examples:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # evaluation must not move the training RNG streams
            size = self.config.per_device_eval_batch_size
            step = size * self.dist.world_size  # a global batch per step; this rank evaluates its slice
            for start in range(0, len(self.eval_examples), step):
                batch = self._rank_slice(self.eval_examples[start : start + step], size)
                loss_sum, n = self.loss_sum(batch)
                total, count = total + loss_sum.item(), count + n
        if self.dist.distributed:
            total, count = self.dist.all_reduce([total, count]).tolist()
        self.model.train(was_training)
        return total / max(count, 1)

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run (or resume) training to ``total_steps``; returns early, with a checkpoint, when stopped."""
        cfg = self.config
        resumed_from = self._resume_point()
        if self.dist.is_main:
            ckpt.remove_partial(self.output_dir)
        self.dist.barrier()
        if resumed_from is not None:
            self.load_checkpoint(resumed_from)
        resume_step = self.step if resumed_from is not None else None
        if self.dist.is_main:
            self.metrics = MetricsLogger(self.output_dir, cfg.report_to, resume_step=resume_step)
            self._print_header(resumed_from)
        else:  # other ranks keep the records in memory only (they are the same values)
            self.metrics = _RankMetrics()
        result = TrainResult(step=self.step, output_dir=self.output_dir)
        if cfg.eval_on_start and self.step == 0 and self.eval_examples:
            result.eval_loss = self._log_eval()

        self.model.train()
        progress = Progress(self.total_steps, initial=self.step, enabled=None if self.dist.is_main else False)
        window: list[tuple[float, int, float]] = []  # (loss, tokens, seconds) since the last log line
        try:
            with _stop_on_signals(self):
                while self.step < self.total_steps and self.stop_reason is None:
                    self._rng_before_step = ckpt.rng_state()
                    t0 = time.perf_counter()
                    first = self.step * self.accum
                    micro = [self.micro_batch(m) for m in range(first, first + self.accum)]
                    # out of memory: one line naming this rank, its micro-batches and kbit's estimate for it
                    retry = False
                    with explain_out_of_memory(self.dist, self.model, micro, step=self.step + 1,
                                               strategy=self.strategy, optim=cfg.optim, cpu_offload=cfg.cpu_offload,
                                               gradient_checkpointing=self.gradient_checkpointing):  # fmt: skip
                        try:
                            loss = self.accumulate(micro).item()
                        except (torch.OutOfMemoryError, RuntimeError) as error:
                            if not (is_out_of_memory(error) and self._can_fall_back()):
                                raise
                            retry = True  # acted on below, once this frame no longer holds the failed graph
                        if not retry:
                            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                            # Under FSDP the norm is a DTensor over the shards; its full value is the global norm.
                            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm)).item()
                            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                                self._diverged(loss, grad_norm)
                            lr = self.optimizer.param_groups[0]["lr"]
                            self.optimizer.step()
                    if retry:
                        self._fall_back_to_full(progress)
                        ckpt.set_rng_state(self._rng_before_step)  # the same dropout masks as a first try
                        continue
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=self.graphs is None)  # graphs add into fixed tensors
                    self.step += 1
                    tokens = sum(int(b.attention_mask.sum()) for b in micro)
                    memory = memory_gib(self.device)
                    if self.dist.distributed:  # global tokens, the largest rank's memory, a stop asked anywhere
                        tokens, stops = (int(v) for v in self.dist.all_reduce([tokens, self.stop_reason is not None]))
                        memory = float(self.dist.all_reduce([memory], op="max")[0])
                        if stops and self.stop_reason is None:
                            self.stop_reason = "another rank"
                    seconds = time.perf_counter() - t0
                    result.losses.append(loss)
                    window.append((loss, tokens, seconds))
                    record = {
                        "step": self.step,
                        "loss": loss,
                        "learning_rate": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens / seconds,
                        "memory_gib": memory,
                        "epoch": self.step * self.accum / self.batches_per_epoch,
                    }
                    progress.update(self.step, loss, lr, record["tokens_per_s"], record["memory_gib"])
                    if self.step % cfg.logging_steps == 0 or self.step in (1, self.total_steps):
                        self._log_train(record, window, progress)
                        window = []
                    if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                        result.eval_loss = self._log_eval(progress)
                    for callback in self.callbacks:
                        callback(self, record)
                    if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                if self.stop_reason is None and self.eval_examples:
                    result.eval_loss = self._log_eval(progress)
                if self.last_checkpoint is None or self.last_checkpoint.name != f"checkpoint-{self.step}":
                    self.save_checkpoint()
                result.checkpoint = self.last_checkpoint
                self.metrics.plot()
        finally:
            progress.close()
            self.metrics.close()
        result.step, result.stopped_by = self.step, self.stop_reason
        if self.stop_reason is not None and self.dist.is_main:
            print(
                f"stopped by {self.stop_reason} after step {self.step}; saved {result.checkpoint}; "
                "continue with --resume (resume=True)",
                flush=True,
            )
        return result

    def request_stop(self, reason: str = "request") -> None:
        """Finish the current step, save a checkpoint and return from train()."""
        self.stop_reason = self.stop_reason or reason

    def _log_train(self, record: dict[str, Any], window: list[tuple[float, int, float]], progress) -> None:
        # The logged loss and speed are averages over the steps since the last log line.
        record = dict(record)
        record["loss"] = sum(w[0] for w in window) / len(window)
        record["tokens_per_s"] = sum(w[1] for w in window) / sum(w[2] for w in window)
        self.metrics.log(record)
        if not self.dist.is_main:
            return
        width = len(str(self.total_steps))
        progress.write(
            f"step {self.step:>{width}}/{self.total_steps} | loss {record['loss']:.4f} | "
            f"lr {record['learning_rate']:.2e} | grad norm {record['grad_norm']:.3f} | "
            f"{record['tokens_per_s']:,.0f} tok/s | mem {record['memory_gib']:.2f} GiB"
        )

    def _log_eval(self, progress: Progress | None = None) -> float | None:
        t0 = time.perf_counter()
        loss = self.evaluate()
        if loss is not None:
            self.metrics.log({"step": self.step, "eval_loss": loss})
        if loss is not None and self.dist.is_main:
            line = f"step {self.step}: eval loss {loss:.4f} ({time.perf_counter() - t0:.1f} s)"
            if progress is not None:
                progress.write(line)
            else:
                print(line, flush=True)
        return loss

    def _print_header(self, resumed_from: Path | None) -> None:
        cfg = self.config
        trainable = sum(p.numel() for p in self.params)
        ranks = f" per rank x {self.dist.world_size} ranks ({self.strategy})" if self.dist.distributed else ""
        lines = [
            f"training {trainable:,d} parameters on {len(self.train_examples)} sequences "
            f"({self.batches_per_epoch} micro-batches of {self.batch_size}{ranks} per epoch), "
            f"{self.total_steps} steps of {self.accum} micro-batch(es)",
            f"device {self.device}, {'bf16 autocast' if self.use_bf16 else 'no autocast'}, optimizer "
            f"{type(self.optimizer).__name__}, lr {cfg.learning_rate:g} ({cfg.lr_scheduler_type}, warmup "
            f"{warmup_steps(cfg, self.total_steps)} steps)",
            self.memory_plan.line,
            f"output: {self.output_dir} (metrics.jsonl, loss_curve.png, checkpoints); {self.metrics.tensorboard_note}",
        ]
        if self.fast_path_line:
            lines.insert(2, self.fast_path_line)
        if self.graphs is not None:
            lines.insert(3, f"cuda graphs: each micro-batch shape's forward and backward captured on its second use "
                            f"and replayed (at most {MAX_GRAPHS} shapes; the optimizer runs eagerly)")  # fmt: skip
        if resumed_from is not None:
            lines.append(f"resumed from {resumed_from} at step {self.step}")
        print("\n".join(lines), flush=True)

    def _diverged(self, loss: float, grad_norm: float) -> None:
        """Save the state from before this step, then raise TrainingDiverged."""
        self.optimizer.zero_grad(set_to_none=True)
        path = self.save_checkpoint(rng=self._rng_before_step)
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        raise TrainingDiverged(
            f"{what} at step {self.step + 1}: stopped before updating the weights, the last good state is in "
            f"{path}. Lower learning_rate (now {self.config.learning_rate:g}), check the data of this step, "
            f"keep max_grad_norm > 0, or train in bf16 rather than fp16; then resume from it"
        )

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoint-<step>`` (atomic), plot the losses, and rotate old checkpoints.

        Under FSDP every rank writes its shards of the trainable parameters and optimizer state (DCP, in
        ``sharded/``); with several ranks each also writes its RNG state. Rank 0 writes the rest.
        """
        rng = rng or ckpt.rng_state()
        sharded = is_sharded(self.model)

        def write_rank_files(folder: Path) -> None:  # called on every rank inside the temporary folder
            if sharded:
                dist_ckpt.save_sharded(folder, self.model, self.optimizer)
            if self.dist.distributed:
                dist_ckpt.save_rank_rng(folder, self.dist, rng)

        state = {
            "step": self.step,
            # FSDP: the optimizer state is in the shards; otherwise every rank holds the same, rank 0 saves it
            "optimizer": None if sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": self.data_position(self.step),
        }
        info = {
            "step": self.step,
            "total_steps": self.total_steps,
            **state["data"],
            "config": self.config.to_dict(),
        }
        path = ckpt.save_checkpoint(
            self.output_dir,
            self.step,
            self.model,
            state,
            info,
            keep=self.config.save_total_limit,
            dist=self.dist,
            write_rank_files=write_rank_files,
        )
        self.last_checkpoint = path
        if self.metrics is not None:
            self.metrics.plot()
        return path

    def _resume_point(self) -> Path | None:
        resume = self.config.resume
        if resume is False:
            existing = ckpt.latest_checkpoint(self.output_dir)
            if existing is not None:
                raise ConfigError(
                    f"output_dir {self.output_dir} already holds {existing.name}; pass --resume to "
                    "continue that run, or choose another output_dir / run_name"
                )
            return None
        if resume is True:
            path = ckpt.latest_checkpoint(self.output_dir)
            if path is None:
                raise ConfigError(f"resume: no complete checkpoint in {self.output_dir} to resume from")
            return path
        return Path(resume)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore adapter, optimizer, scheduler, step and RNG states from a complete checkpoint."""
        path = Path(path)
        state = ckpt.load_state(path)
        saved, now = state["data"], self.data_position(state["step"])
        changed = [k for k in saved if k not in ("epoch", "micro_batch_in_epoch") and saved[k] != now.get(k)]
        if changed:
            details = ", ".join(f"{k} {saved[k]} -> {now.get(k)}" for k in changed)
            raise ConfigError(
                f"resume: the data or batching changed since {path.name} ({details}); "
                "an exact resume needs the same data, batch sizes and seed"
            )
        if is_sharded(self.model):  # this rank's LoRA and optimizer shards, in place
            dist_ckpt.load_sharded(path, self.model, self.optimizer)
        else:
            if state["optimizer"] is None:
                raise ConfigError(
                    f"resume: {path.name} is a sharded (FSDP) checkpoint; resume it with strategy fsdp under torchrun"
                )
            ckpt.load_weights(self.model, path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows today's config (a lower learning_rate after a divergence takes effect).
        self.scheduler.base_lrs = [self.config.learning_rate for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * lr_factor(
                state["step"],
                self.total_steps,
                warmup_steps(self.config, self.total_steps),
                self.config.lr_scheduler_type,
            )
        rank_rng = dist_ckpt.load_rank_rng(path, self.dist) if self.dist.distributed else None
        ckpt.set_rng_state(rank_rng or state["rng"])
        self.step = state["step"]
        self.last_checkpoint = path


class _RankMetrics:
    """What ranks other than 0 keep instead of a MetricsLogger: the records in memory, no files."""

    tensorboard_note = "TensorBoard: rank 0 only"

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def plot(self) -> None:
        return None

    def close(self) -> None:
        return None


def _pad_token_id(tokenizer: Any) -> int:
    if tokenizer is None:
        return 0
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return 0


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM ask the trainer to stop after the current step; a second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if trainer.stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop(name)
        print(
            f"\n{name}: finishing step {trainer.step + 1}, then saving a checkpoint "
            "(Ctrl-C again aborts without saving)",
            flush=True,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
