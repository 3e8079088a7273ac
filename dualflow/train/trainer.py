"""The training loop: build this rank's part of the model, step, reduce, update, report, checkpoint.

One optimizer step:
1. this data-parallel rank's share of the next global batch;
2. the engine's forward/backward over the micro-batches (pipeline schedule or local loop), leaving the
   gradients of ``loss / (micro-batches * dp)``;
3. global loss (non-finite -> stop, naming the step, the rank and the last good checkpoint);
4. non-expert gradients summed over the data-parallel group, global-norm clipping;
5. AdamW at the scheduled learning rate (ZeRO-1: owners update, then broadcast);
6. balancing biases nudged from the expert loads summed over all ranks;
7. metrics on rank 0; validation every ``val_every``; a checkpoint every ``checkpoint.every``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from dualflow.launcher.config import to_toml
from dualflow.train.checkpoint import CheckpointManager
from dualflow.train.config import TrainConfig
from dualflow.train.data import BatchLoader, load_streams, validation_batches
from dualflow.train.engine import Engine, LocalEngine
from dualflow.train.experts import GroupedExperts, per_expert_views
from dualflow.train.metrics import MetricsLog, peak_flops, peak_memory_mb
from dualflow.train.model import Stage
from dualflow.train.mtp import Objective
from dualflow.train.optim import AdamW, learning_rate
from dualflow.train.parallel import (
    ParallelLayout,
    broadcast_owned,
    clip_divisor,
    gradient_norm,
    is_expert,
    reduce_gradients,
    zero1_owners,
)
from dualflow.train.partition import balanced_partition, num_stages, rank_stages, stage_costs
from dualflow.train.profile import profiled


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class Summary:
    """What a run did: the global loss of every step it ran, validation losses by step, the last step."""

    losses: dict[int, float]
    val_losses: dict[int, float]
    last_step: int
    resumed_from: int | None
    checkpoint: Path | None


def build_stages(cfg: TrainConfig, topo: ParallelLayout) -> list[Stage]:
    """This rank's stage modules, in the order the pipeline runtime expects them, initialised."""
    par, m = cfg.parallel, cfg.model
    dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
    experts = topo.expert_ids(m.n_routed_experts)
    n = 1 if par.pp == 1 else num_stages(par.schedule, par.pp)
    ids = (0,) if par.pp == 1 else rank_stages(par.schedule, par.pp, topo.pp_rank)
    embed_cost, layer_costs, head_cost = stage_costs(m, cfg.data.seq_len)
    parts = balanced_partition(layer_costs, n, embed_cost, head_cost)
    built: dict[int, Stage] = {}
    for s in sorted(ids):  # stage 0 first: a tied head on this rank borrows its embedding
        first = built.get(0)
        built[s] = Stage(m, parts[s], first=s == 0, last=s == n - 1, expert_ids=experts, compute_dtype=dtype,
                         tied_embed=first.embed if first is not None else None)
    for stage in built.values():
        stage.init_weights(cfg.train.seed)
        stage.to(topo.device)
    return [built[s] for s in ids]


def named_parameters(stages: list[Stage]) -> dict[str, nn.Parameter]:
    params: dict[str, nn.Parameter] = {}
    for stage in stages:
        for name, p in stage.named_parameters():
            if params.setdefault(name, p) is not p:
                raise RuntimeError(f"two different parameters are both named {name!r} on this rank")
    return params


class Trainer:
    """A training run of ``cfg`` on this process (call on every rank; the process group is already up)."""

    def __init__(self, cfg: TrainConfig, device: torch.device | None = None, engine: Engine | None = None) -> None:
        # routing groups aligned with expert-parallel ranks or nodes take their number from the layout
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or cfg.parallel.world)
        self.cfg = cfg = dataclasses.replace(cfg, model=cfg.model.resolve_groups(cfg.parallel.dp, local))
        self.device = device or torch.device("cpu")
        self.topo = topo = ParallelLayout.build(cfg.parallel, self.device)
        torch.manual_seed(cfg.train.seed + topo.rank)
        run, par = cfg.train, cfg.parallel
        self.run_dir = Path(run.run_dir)
        self.log = MetricsLog(self.run_dir, run.steps, run.log_every, enabled=topo.rank == 0)
        streams = load_streams(cfg.data)
        self.loader = BatchLoader(streams.train, cfg.data.seq_len, run.global_batch, dp_rank=topo.dp_rank,
                                  dp_size=par.dp, seed=cfg.data.seed, vocab_size=cfg.model.vocab_size)
        self.val = validation_batches(streams.val, cfg.data.seq_len, run.global_batch, run.val_batches,
                                      dp_rank=topo.dp_rank, dp_size=par.dp)
        self.stages = build_stages(cfg, topo)
        self.fp8_experts: list[GroupedExperts] = []
        self.objective = Objective(cfg.model)
        self.val_metrics: dict[str, float] = {}
        self.fp8_report = self._setup_fp8() if run.fp8 else None
        self._setup_exchange()
        self.compile_report = self._setup_compile()
        # train.fp8_weight_snapshots: compiled FP8 layers read their weights' FP8 copies from snapshots made
        # once per optimizer step (refreshed by _weights_changed), not quantized again for every micro-batch
        self.fp8_snapshots = run.fp8 and run.fp8_weight_snapshots and any(
            getattr(s, "compiler", None) is not None for s in self.stages)
        if self.fp8_snapshots:
            from dualflow.fp8.nn import enable_fp8_snapshots

            # expert-parallel experts run eagerly (their row counts change): no snapshot to keep for them
            compiled = (lambda m: not isinstance(m, GroupedExperts)) if par.dp > 1 else None
            for stage in self.stages:
                enable_fp8_snapshots(stage, where=compiled)
        self.engine = engine or self._build_engine()
        self.params = named_parameters(self.stages)
        # Each distinct parameter enters the gradient norm once: a DualPipe rank's second module is
        # the first module of its mirror rank.
        self.counted = set(named_parameters(self.stages[:1])) if par.schedule == "dualpipe" and par.pp > 1 \
            else set(self.params)
        self.owners = zero1_owners(self.params, par.dp) if par.zero1 else {}
        owned = [n for n in self.params if self.owners.get(n, topo.dp_rank) == topo.dp_rank]
        self.optimizer = AdamW(self.params, cfg.optim, owned)
        self.routers = {lid: r for stage in self.stages for lid, r in stage.moe_routers().items()}
        # the model's shape beside its weights in every checkpoint: what `dualflow export-hf` reads
        self.checkpoints = CheckpointManager(Path(cfg.checkpoint.dir or self.run_dir / "checkpoints"),
                                             cfg.checkpoint.keep, files={"model.toml": to_toml(cfg.model)})
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.resumed_from: int | None = None

    # ------------------------------------------------------------------------------------------- set-up
    def _setup_fp8(self) -> str:
        from dualflow.fp8 import Fp8Recipe, convert_to_fp8
        from dualflow.fp8.gemm import BackendUnavailable, resolve_backend
        from dualflow.fp8.moe import wgrad_backend
        from dualflow.fp8.quant import resolve_quant_backend

        recipe = Fp8Recipe(backend=self.cfg.train.fp8_backend, wgrad_backend=self.cfg.train.fp8_wgrad_backend,
                           quant_backend=self.cfg.train.fp8_quant_backend)
        try:  # said now, not at the first quantization
            resolve_quant_backend(recipe.quant_backend, self.device)
        except RuntimeError as exc:
            raise ValueError(f"train.fp8_quant_backend={recipe.quant_backend!r}: {exc}") from None
        for op in ("dense", "contiguous"):  # a backend this device cannot run: said now, not at the first GEMM
            try:
                resolve_backend(recipe.backend, self.device, op)
            except BackendUnavailable as exc:
                raise ValueError(f"train.fp8_backend={recipe.backend!r}: {exc}") from None
        try:
            wgrad_backend(recipe, self.device)
        except BackendUnavailable as exc:
            raise ValueError(f"train.fp8_wgrad_backend={recipe.wgrad_backend!r}: {exc}") from None
        reports = [convert_to_fp8(stage, recipe) for stage in self.stages]
        grouped = [m for stage in self.stages for m in stage.modules() if isinstance(m, GroupedExperts)]
        for experts in grouped:  # the routed experts' grouped GEMMs (nn.Linear conversion does not see them)
            experts.enable_fp8(recipe)
        self.fp8_experts = grouped
        converted = sum(len(r.converted) for r in reports)
        kept = sorted({name.split(".")[-1] for r in reports for name, _ in r.skipped})
        return (f"FP8: {converted} linear layers converted, the routed experts of {len(grouped)} MoE layer(s) run as "
                f"grouped FP8 GEMMs; kept in high precision: {', '.join(kept) or 'none'}")

    def _setup_exchange(self) -> None:
        if self.cfg.parallel.dp == 1:
            return
        from dualflow.train.ep import ExpertParallelExchange

        exchange = ExpertParallelExchange(self.topo.dp_group, self.cfg.model.dim, self.cfg.model.n_routed_experts,
                                          fp8=self.cfg.train.fp8 and self.cfg.train.fp8_dispatch,
                                          checks=self.cfg.parallel.comm_checks)
        for stage in self.stages:
            stage.set_exchange(exchange)

    def _setup_compile(self) -> str:
        from dualflow.train.compile import PhaseCompiler, compile_unavailable_reason

        mode = self.cfg.train.compile
        why_not = "train.compile = 'off'" if mode == "off" else compile_unavailable_reason(self.device)
        if why_not is not None and (mode != "on" or self.device.type == "cuda"):
            if mode == "on":
                raise ValueError(f"train.compile = 'on', but torch.compile cannot run here: {why_not}")
            return f"compile: off ({why_not})"
        compiler = PhaseCompiler(on_fallback=self.log.info)
        for stage in self.stages:
            stage.compiler = compiler
            stage.phases()  # wraps every phase now, so that the report below lists them all
        return compiler.summary()

    def _build_engine(self) -> Engine:
        par = self.cfg.parallel
        scale = 1.0 / (par.microbatches * par.dp)
        if par.pp == 1:
            local = LocalEngine(self.stages[0], par.microbatches, scale, self.objective)
            why_not = self._why_no_graph()
            if why_not is None:
                from dualflow.train.graphs import GraphedEngine

                return GraphedEngine(local, on_fallback=self.log.info)
            if self.cfg.train.cuda_graph == "on":
                raise ValueError(f"train.cuda_graph = 'on', but the step cannot be a CUDA graph: {why_not}")
            return local
        from dualflow.train.pipeline import PipelinedEngine

        return PipelinedEngine(self.stages, self.topo, par, scale, self.objective)

    def _why_no_graph(self) -> str | None:
        par = self.cfg.parallel
        if self.cfg.train.cuda_graph == "off":
            return "train.cuda_graph = 'off'"
        if self.device.type != "cuda":
            return f"the device is {self.device.type}, not a CUDA GPU"
        if par.pp > 1 or par.dp > 1:
            return (f"parallel.pp={par.pp}, parallel.dp={par.dp}: pipeline and expert-parallel exchanges wait on "
                    "the host; graphs need one process holding the whole model")
        if self.cfg.model.mtp_depth:
            return (f"model.mtp_depth={self.cfg.model.mtp_depth}: the per-depth losses are collected on the host at "
                    "every call, which a replayed graph skips")
        return None

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs, as global-named tensors (see checkpoint.py)."""
        state: dict[str, torch.Tensor] = {}
        for stage in self.stages:
            state.update({f"model.{k}": v for k, v in stage.state_dict().items()})
        experts = self.topo.expert_ids(self.cfg.model.n_routed_experts) if any(map(is_expert, self.params)) else ()
        for key, value in self.optimizer.state_dict().items():
            # moments of stacked experts are saved per expert, under the names the model's state_dict uses
            name, _, kind = key.rpartition(".")
            state.update({f"optim.{n}.{kind}": v for n, v in per_expert_views(name, value, experts).items()}
                         if name else {f"optim.{key}": value})
        state.update({f"data.{k}": v for k, v in self.loader.state_dict().items()})
        state["train.step"] = torch.tensor(self.step, dtype=torch.int64)
        state[f"rng.cpu.rank{self.topo.rank}"] = torch.get_rng_state()
        if self.device.type == "cuda":
            state[f"rng.cuda.rank{self.topo.rank}"] = torch.cuda.get_rng_state(self.device)
        return state

    def resume(self) -> bool:
        """Restore the latest complete checkpoint, if there is one (every rank)."""
        path = self.checkpoints.latest()
        found = self.topo.all_reduce([-1.0 if path is None else float(self.checkpoints.step_of(path))], "min")[0]
        if path is None or found != self.checkpoints.step_of(path):
            if path is not None or found >= 0:
                raise RuntimeError("ranks see different latest checkpoints; the checkpoint directory must be "
                                   "shared by all ranks")
            return False
        state = self.state_dict()  # model and optimizer entries alias the live tensors: loaded in place
        self.checkpoints.load(path, state)
        self.loader.load_state_dict({"position": state["data.position"]})
        self.step = int(state["train.step"])
        torch.set_rng_state(state[f"rng.cpu.rank{self.topo.rank}"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"rng.cuda.rank{self.topo.rank}"], self.device)
        self._weights_changed()
        self.last_checkpoint, self.resumed_from = path, self.step
        self.log.info(f"resumed from {path} (step {self.step})")
        return True

    def load_model_state(self, state: dict[str, torch.Tensor], source: str = "the given weights",
                         optional: tuple[str, ...] = ()) -> None:
        """Copy model weights by global name (``dualflow.train.hf.from_hf`` gives them) into this rank's stages.

        Every rank takes the entries it holds; those whose names start with one of ``optional`` may be
        absent (they keep their values). A missing or misshapen entry on any rank stops every rank before
        anything is copied, with the entries named.
        """
        own = {k: v for stage in self.stages for k, v in stage.state_dict().items()
               if k in state or not any(k.startswith(prefix) for prefix in optional)}
        problems = [f"{k!r} is missing" for k in own if k not in state]
        problems += [f"{k!r} has shape {tuple(state[k].shape)} in {source}, {tuple(v.shape)} here"
                     for k, v in own.items() if k in state and state[k].shape != v.shape]
        if self.topo.all_reduce([float(bool(problems))], "max")[0] and not problems:
            problems = ["another rank found the weights incompatible (see its error)"]
        if problems:
            raise ValueError(f"cannot initialise from {source}: " + "; ".join(problems[:8]))
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])
        self._weights_changed()

    def _start_fresh(self, discard: bool) -> None:
        found = self.checkpoints.list()
        if found and not discard:
            raise FileExistsError(f"{self.checkpoints.root} holds checkpoints of an earlier run (latest: "
                                  f"{found[-1].name}); pass --resume to continue it, --fresh to delete them and "
                                  "start over, or set train.run_dir / checkpoint.dir to another directory")
        self.topo.all_reduce([0.0])  # every rank has looked before rank 0 deletes anything
        if found and self.topo.rank == 0:
            for path in found:
                self.checkpoints.delete(path)
            self.log.info(f"starting over: deleted {len(found)} checkpoint(s) of an earlier run in "
                          f"{self.checkpoints.root}")

    def save(self) -> Path:
        path = self.checkpoints.save(self.step, self.state_dict())
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------------------------------- loop
    def validate(self) -> float:
        for stage in self.stages:
            stage.eval()
        total, count = 0.0, 0
        self.objective.take()
        for x, y in self.val:
            s, c = self.engine.evaluate(x.to(self.device), y.to(self.device))
            total, count = total + float(s), count + c
        for stage in self.stages:
            stage.train()
        losses, accuracies = self.objective.take()
        total, count, *mtp = self.topo.all_reduce([total, float(count), *losses, *accuracies])
        d = self.cfg.model.mtp_depth
        self.val_metrics = {**{f"val_mtp_loss_{k + 1}": v / count for k, v in enumerate(mtp[:d])},
                            **{f"val_mtp_acc_{k + 1}": v / count for k, v in enumerate(mtp[d:])}}
        return total / count

    def _weights_changed(self) -> None:
        """Drop the FP8 copies of the weights and rewrite the compiled layers' snapshots. The optimizer's
        in-place update already invalidates the copies; a ZeRO-1 broadcast or a checkpoint load writes
        through other views, so say it explicitly. The snapshots are refreshed here, after every change,
        and are read by compiled phases only."""
        if self.cfg.train.fp8:
            from dualflow.fp8 import invalidate_fp8_caches
            from dualflow.fp8.nn import refresh_fp8_snapshots

            for stage in self.stages:
                invalidate_fp8_caches(stage)
                if self.fp8_snapshots:
                    refresh_fp8_snapshots(stage)

    def _check_finite(self, local_loss: float, loss: float) -> None:
        if math.isfinite(loss):
            return
        world = self.topo.cfg.world
        first = int(self.topo.all_reduce([self.topo.rank if not math.isfinite(local_loss) else world], "min")[0])
        where = f"rank {first}" if first < world else "an unknown rank"
        last = str(self.last_checkpoint) if self.last_checkpoint else "none (no checkpoint was written yet)"
        raise TrainingDiverged(f"loss is {loss} at step {self.step + 1}, first non-finite on {where}; "
                               f"last good checkpoint: {last}")

    def _update_balance(self) -> float:
        """Sum each MoE layer's expert loads over all ranks, nudge the biases; return the worst max/mean."""
        m = self.cfg.model
        loads = torch.zeros(m.n_layers + m.mtp_depth, m.n_routed_experts, dtype=torch.float64)
        for lid, router in self.routers.items():
            loads[lid] += router.load.double().cpu()
        flat = self.topo.all_reduce(loads.flatten().tolist())
        loads = torch.tensor(flat, dtype=torch.float64).view_as(loads)
        for lid, router in self.routers.items():
            router.update_bias(loads[lid].to(router.load))
        moe = loads[m.n_dense_layers:]
        return float((moe.max(-1).values / moe.mean(-1).clamp(min=1e-9)).max()) if len(moe) else 1.0

    def train_step(self) -> dict[str, float]:
        cfg, topo = self.cfg, self.topo
        start = time.perf_counter()
        x, y = self.loader.next()
        local_sum, local_count = self.engine.step(x.to(self.device), y.to(self.device))
        for experts in self.fp8_experts:  # malformed expert offsets, recorded on the device (a bug if ever)
            experts.check_fp8_errors()
        total, count, *mtp = topo.all_reduce([float(local_sum), float(local_count), *self.objective.take()[0]])
        loss = total / count
        self._check_finite(float(local_sum), loss)
        reduce_gradients(self.params, topo)
        grad_norm = gradient_norm(self.params, self.counted, topo)
        lr = learning_rate(self.step, cfg.train.steps, cfg.optim)
        self.optimizer.step(lr, grad_divisor=clip_divisor(grad_norm, cfg.optim.grad_clip))
        broadcast_owned(self.params, self.owners, topo)
        self._weights_changed()
        if not getattr(self.engine, "keeps_grads", False):  # a graphed step owns (and rewrites) the gradients
            for p in self.params.values():
                p.grad = None
        balance = self._update_balance()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = cfg.train.global_batch * cfg.data.seq_len
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed, "expert_load_max_over_mean": balance,
                **{f"mtp_loss_{k + 1}": v / count for k, v in enumerate(mtp)}}

    def _mfu(self, tokens_per_s: float) -> float | None:
        peak = peak_flops(self.device, self.cfg.train.fp8)
        if peak is None:
            return None
        embed, layers, head = stage_costs(self.cfg.model, self.cfg.data.seq_len)
        return 3 * (embed + sum(layers) + head) * tokens_per_s / (peak * self.topo.cfg.world)

    def train(self, resume: bool = False, fresh: bool = False) -> Summary:
        """Run to ``train.steps``.

        ``resume``: continue from the latest checkpoint of the run directory, if any. Otherwise the run starts
        at step 0, and a checkpoint directory that already holds checkpoints is refused unless ``fresh``
        (then they are deleted): a forgotten ``--resume`` must not silently mix two runs.
        """
        cfg = self.cfg
        if resume:
            self.resume()
        else:
            self._start_fresh(fresh)
        self.log.start(self.step)
        if self.step == 0:
            self.log.info(f"model: {cfg.model.num_params() / 1e6:.2f}M parameters "
                          f"({cfg.model.num_params(active=True) / 1e6:.2f}M active per token); "
                          f"{cfg.parallel.pp} pipeline x {cfg.parallel.dp} data/expert-parallel ranks, "
                          f"schedule {cfg.parallel.schedule}, {cfg.parallel.microbatches} micro-batches")
            if self.fp8_report:
                self.log.info(self.fp8_report)
            self.log.info(self.compile_report)
        losses, val_losses = {}, {}
        if self.step == 0:
            val_losses[0] = self.validate()
            self.log.write({"step": 0, "val_loss": val_losses[0], **self.val_metrics})
            self.log.info(f"step     0/{cfg.train.steps} initial validation loss {val_losses[0]:.4f}")
        while self.step < cfg.train.steps:
            sync = torch.cuda.synchronize if self.device.type == "cuda" else None
            with profiled(self.step + 1 == cfg.train.profile_step, self.run_dir / f"profile-rank{self.topo.rank}.txt",
                          cfg.train.profile_trace, sync):
                record = self.train_step()
            losses[self.step] = record["loss"]
            record["mfu"] = self._mfu(record["tokens_per_s"])
            record["peak_memory_mb"] = peak_memory_mb(self.device)
            if self.step % cfg.train.val_every == 0 or self.step == cfg.train.steps:
                record["val_loss"] = val_losses[self.step] = self.validate()
                record.update(self.val_metrics)
            self.log.step(record)
            every = cfg.checkpoint.every
            if cfg.checkpoint.enabled and ((every and self.step % every == 0) or self.step == cfg.train.steps):
                self.save()
        png = self.log.plot(self.run_dir / "loss.png")
        if png is not None:
            self.log.info(f"loss curve: {png}; metrics: {self.log.path}")
        return Summary(losses, val_losses, self.step, self.resumed_from, self.last_checkpoint)
