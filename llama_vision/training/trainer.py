"""The training loop for every stage (image pretrain/anneal/SFT/DPO, video, text): wiring,
one optimizer step, the loop, the final save. The parts live beside it: build.py (the
model), parallelize.py (wrapping), objectives.py (loss per stage), train_state.py
(checkpointed state), data.py, optim.py, schedule.py, flops.py, metrics.py.

Same code on 2 CPU processes (gloo) and N nodes x 8 GPUs (NCCL): tensor parallel through
fairscale's layers, data parallel by summing gradients over the DP group with the loss
divided by the GLOBAL target count (so DP=N equals DP=1 with the full batch), AdamW state
for trainable parameters only, sharded across DP ranks (ZeRO-1).
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import model_parallel as mp
from llama_vision.data.batch import batch_fingerprint
from llama_vision.tokenizer import load_tokenizer

from .build import build_training_model, is_gate  # noqa: F401 - is_gate: part of this module's API
from .checkpointing import CheckpointManager
from .dcp_checkpoint import DistributedCheckpointer
from .data import build_loader
from .eval_hook import harness_tasks, run_harness
from .flops import step_flops, step_shape_from_batch, trainable_from_model
from .metrics import MetricsLogger, ThroughputMeter, estimate_mfu, global_batch_line, peak_flops_for_device
from .objectives import build_objective
from .optim import build_stage_optimizer, group_lr_multiplier_of
from .media_sync import embedding_tables, projector_blank, unattended_images, uniform_media
from .parallelize import parallelize, uses_fsdp
from .precision import apply_precision, resolve_precision
from .profiling import StepProfiler, peak_memory_bytes, reset_peak_memory
from .schedule import build_lr_scheduler
from .train_config import TrainConfig
from .train_state import Progress, TrainState
from .validation import build_eval_loader, eval_enabled, validate


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = mp.process_device(cfg.device)
        if world > 1 or cfg.tp > 1:
            mp.init_model_parallel(cfg.tp, device=self.device)
        self.rank = int(os.environ.get("RANK", "0"))
        self.out = Path(cfg.output_dir)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        # Precision before moving: the frozen trunk reaches the device already in its
        # storage dtype (half the bytes in bf16), and before the optimizer is built.
        self.precision = resolve_precision(cfg, self.device)
        self.fsdp = uses_fsdp(cfg)
        # Built on the meta device: checkpoint tensors stay memory-mapped (in their storage
        # dtype) until placed -- under FSDP each unit is sharded before it is moved, so no
        # rank ever holds the whole model -- and only what no checkpoint provides is
        # initialised (no random full-size trunk that the checkpoint then overwrites).
        model = apply_precision(build_training_model(cfg, self.tokenizer, lazy=True, precision=self.precision), self.precision)
        # By name, before FSDP replaces the parameters with sharded ones (names are kept).
        plan = mp.shard_plan(model, "runtime")
        # FSDP moves each unit to the mesh device itself, as it shards it (one unit whole at a
        # time); the other modes move the whole model.
        self.model = parallelize(model if self.fsdp else model.to(self.device), cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        tp_dims = {n: plan.get(n) for n, _ in self.model.named_parameters()}
        self.tp_dims = {id(p): tp_dims[n] for n, p in self.model.named_parameters() if p.requires_grad}
        self._tile_size = cfg.data.tile_size or self.model.args.vision_chunk_size
        self._projector_blank = projector_blank(self.model)  # a LLaVA model's dummy image (media_sync)
        on_gpu_bf16 = cfg.dtype == "bf16" and self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu_bf16 else nullcontext
        self.objective = build_objective(cfg, self.model, self.autocast)
        self._flop_groups = trainable_from_model(self.model)
        o = cfg.optim
        self.optimizer = build_stage_optimizer(self.model.named_parameters(), o, shards=self.fsdp,
                                               lr_multiplier_of=group_lr_multiplier_of(self.model, o.group_lr_multipliers))
        self.scheduler = build_lr_scheduler(self.optimizer, o.warmup_steps, cfg.max_steps, o.min_lr_ratio)
        self.loader = build_loader(cfg, self.tokenizer, self.model.args, mp.dp_rank(), mp.dp_size())
        # Checked now (a config error should not wait for the first validation); each
        # validation reads the held-out set from its start with a fresh loader.
        self.validating = eval_enabled(cfg)
        self.harness = harness_tasks(cfg.eval_harness)  # benchmark tasks by generation (none: off)
        self.ckpt = DistributedCheckpointer(
            CheckpointManager(self.out, keep_last=cfg.keep_last, rank=self.rank, world_size=world, barrier=mp.barrier),
            async_save=cfg.checkpoint_async,
        )
        self.progress = Progress()
        layout = {"world_size": world, "tp": mp.tp_size(), "dp": mp.dp_size(), "data_parallel": cfg.data_parallel if mp.dp_size() > 1 else "none",
                  "num_workers": cfg.data.num_workers}
        self.train_state = TrainState(self.progress, self.model, self.optimizer, self.scheduler, self.loader, self.objective,
                                      tp_dims=tp_dims, dp_sharded=self.fsdp, layout=layout)
        self._nonfinite_streak = 0
        if self.rank == 0:
            tqdm.write(global_batch_line(cfg, world, mp.tp_size(), mp.dp_size()))

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def reference(self) -> dict[str, torch.Tensor] | None:
        """DPO: the reference policy's trainable tensors (None for other stages)."""
        return getattr(self.objective, "reference", None)

    def resume(self) -> bool:
        # Rank 0 picks the checkpoint for everybody: on a shared filesystem ranks can see
        # different "latest" directories (a commit racing a directory listing cache).
        found = None
        if self.rank == 0:
            try:
                # output_dir's own progress first (a resumed run preempted again), then resume_from.
                latest = self.ckpt.latest() or (self.ckpt.checked(self.cfg.resume_from) if self.cfg.resume_from else None)
                found = ("ok", None if latest is None else str(latest))
            except ValueError as e:  # an unusable checkpoint: every rank must stop, not wait
                found = ("error", str(e))
        status, latest = mp.broadcast_object(found)
        if status == "error":
            raise ValueError(latest)
        if latest is None:
            return False
        self.train_state.load(self.ckpt, latest)
        return True

    # --- one optimizer step ---------------------------------------------------------------
    def train_step(self, it) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        # Micro-batches stay on the host until their turn, so device memory holds one at a
        # time (the global target count below needs all of them first).
        micro = [next(it) for _ in range(cfg.grad_accum_steps)]
        if mp.tp_size() > 1:
            fingerprint = torch.cat([batch_fingerprint(b) for b in micro]).to(self.device)
            mp.assert_same_across_tp(fingerprint, f"step {self.step + 1}: the batch (samples {micro[0].keys[:4]}...)")
        # Under FSDP every rank must run the same modules (media_sync).
        plans = (uniform_media(micro, self._tile_size, self.model.args.vocab_size, self.device, self._projector_blank)
                 if self.fsdp else [(b, False) for b in micro])
        # Normalise by the global number of targets (tokens, or pairs for DPO); the same
        # collective sums the model FLOPs of the step over the replicas.
        flops = step_flops(self.model.args, [s for b in micro for s in step_shape_from_batch(b)], self._flop_groups).total
        targets = float(sum(self.objective.num_targets(b) for b in micro))
        totals = mp.all_reduce_sum(torch.tensor([targets, float(flops)], dtype=torch.float64, device=self.device), "dp")
        count = totals[0].float()
        total = torch.zeros((), device=self.device)
        for batch, every_table in plans:
            with embedding_tables(self.model, every_table), unattended_images(self.model, self.fsdp and self._projector_blank is not None):
                # uint8 tiles (data.tile_dtype) are normalised on the device, after the copy.
                loss_sum = self.objective.loss_sum(batch.to(self.device, non_blocking=True).normalized())
                # A text-only micro-batch under a frozen decoder touches nothing trainable:
                # nothing to differentiate (sync_gradients fills in zeros where other ranks
                # have gradients).
                if loss_sum.requires_grad:
                    (loss_sum / count.clamp(min=1)).backward()
            total += loss_sum.detach()
        mp.sync_gradients(self.params, reduce_dtype=self.precision.reduce_dtype, dp_sharded=self.fsdp)
        grad_norm = mp.global_grad_norm(self.params, self.tp_dims, dp_sharded=self.fsdp)
        loss = mp.all_reduce_sum(total, "dp") / count.clamp(min=1)
        lr = self.scheduler.get_last_lr()[0]
        # Identical on every rank (summed loss, all-reduced gradients), so all ranks agree.
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:
            self._apply_update(grad_norm)
        else:
            # inf x clip scale 0 = NaN: applying it would poison the weights (and a
            # checkpoint written after it). Skip the update, keep the step count moving.
            self.progress.skipped_nonfinite += 1
        self._nonfinite_streak = 0 if finite else self._nonfinite_streak + 1
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        if finite:
            self.objective.after_optimizer_step(self.step)
        elif self._nonfinite_streak >= cfg.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"step {self.step}: {self._nonfinite_streak} consecutive steps with a non-finite loss or gradient "
                f"(loss {float(loss)}, grad norm {float(grad_norm)}); stopping (max_consecutive_nonfinite="
                f"{cfg.max_consecutive_nonfinite}). Resume from the last checkpoint with a lower lr or check the data."
            )
        lm_batches = [getattr(b, "chosen", b) for b in micro]
        real_tokens = sum(b.real_tokens for b in lm_batches)
        return {
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "skipped_samples": self._skipped_total(),
            "skipped_nonfinite": self.progress.skipped_nonfinite,
            "step_time_s": time.perf_counter() - t0,
            "tokens": real_tokens,
            # Packing / token budgets: the padded share of the micro-batches, and the samples
            # (a packed row holds several).
            "padding_fraction": 1.0 - real_tokens / max(1, sum(b.padded_tokens for b in lm_batches)),
            "samples": sum(len(b.keys) for b in lm_batches),
            "images": sum(int(b.num_images.sum()) for b in lm_batches),
            **self.objective.step_metrics(count),
            # One GPU's share of the mean replica's work (a replica is TP GPUs).
            "flops_per_gpu": float(totals[1]) / mp.dp_size() / mp.tp_size(),
            "_finite": finite,
        }

    def _apply_update(self, grad_norm: torch.Tensor) -> None:
        """Clip to optim.grad_clip (global norm), step the optimizer and the schedule."""
        if self.cfg.optim.grad_clip is not None:
            scale = (self.cfg.optim.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
            for p in self.params:
                if p.grad is not None:
                    mp.local_tensor(p.grad).mul_(scale)
        self.optimizer.step()
        self.scheduler.step()

    def _mfu(self, rates: dict) -> dict:
        """Model FLOPs utilisation over the meter's window: one GPU's share of the
        replica's model FLOPs per second (llama_vision.training.flops) over its peak."""
        peak = self.cfg.peak_flops_per_device or peak_flops_for_device(self.device)
        value = estimate_mfu(rates["flops_per_s"], 1.0, peak) if peak else None
        return {} if value is None else {"mfu": value}

    def _peak_memory(self) -> dict:
        """Peak memory of every rank since the run started (GiB; CUDA: allocated, CPU: the
        process's peak RSS), in global rank order, and their maximum. Collective."""
        peaks = [b for row in mp.all_gather_object(mp.all_gather_object(peak_memory_bytes(self.device), "tp"), "dp") for b in row]
        return {"peak_memory_gib": max(peaks) / 2**30, **{f"peak_memory_gib/rank_{r}": b / 2**30 for r, b in enumerate(peaks)}}

    def _skipped_total(self) -> int:
        skipped = torch.tensor(float(sum(self.loader.skipped.values())), device=self.device)
        return int(mp.all_reduce_sum(skipped, "dp"))

    # --- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg
        resumed = (resume or bool(cfg.resume_from)) and self.resume()
        logger = MetricsLogger(self.out, rank=self.rank, tensorboard=cfg.tensorboard, resume_step=self.step if resumed else None)
        meter = ThroughputMeter()
        self.model.train()
        it = iter(self.loader)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train[{cfg.stage}]", disable=self.rank != 0, dynamic_ncols=True)
        last = {}
        profiler = StepProfiler(self.out, cfg.profile_steps, rank=self.rank)
        reset_peak_memory(self.device)
        try:
            while self.step < cfg.max_steps:
                last = self.train_step(it)
                profiler.step()
                finite = last.pop("_finite")
                validating = self.validating and self.step % cfg.eval_every == 0
                if validating:  # in the same metrics row as this step's training metrics
                    loader = build_eval_loader(cfg, self.tokenizer, self.model.args)
                    last.update(validate(self.objective, loader, self.device, cfg.eval_max_batches, fsdp=self.fsdp, tile_size=self._tile_size,
                                                projector=self._projector_blank))
                scoring = bool(self.harness) and (self.step % cfg.eval_harness.every == 0 or self.step == cfg.max_steps)
                if scoring:
                    last.update(run_harness(self.model, self.tokenizer, self.harness, cfg.eval_harness, self.out, self.step,
                                            self.rank, self.autocast))
                meter.update(last["tokens"], last["images"], last["step_time_s"], last["flops_per_gpu"])
                rates = meter.summary()
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or not finite or validating or scoring:
                    logger.log(self.step, **{**last, **rates, **self._mfu(rates), **self._peak_memory()})
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", skipped=last["skipped_samples"])
                # A skipped step writes no checkpoint: the next one that trained does.
                if finite and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps):
                    self.train_state.save(self.ckpt, self.step)
            self.ckpt.wait()  # an async save of the last step is committed before the run ends
        finally:
            profiler.close()
            bar.close()
            logger.close()
        if cfg.save_final:
            self.save_final()
        return {"step": self.step, **last}

    def save_final(self) -> Path:
        """The whole model in Meta format at output_dir/final (what infer_* and the next
        stage's init_from read), tokenizer beside it. Tensors keep their stored dtype
        (training.precision): frozen ones frozen_param_dtype, trained ones float32.

        With LoRA: the model with every adaptor MERGED into its base weight (in the base's
        stored dtype: a bf16 trunk gets bf16(W + s B A)), so inference and the next stage
        read it unchanged, plus final/lora.safetensors + final/lora_config.json (the
        adaptors alone, whole, with init_from / init_text_from as their base). Written
        before params.json, which comes last: a final/ with params.json is complete."""
        from llama_vision.checkpoint import save_lora, save_meta_checkpoint
        from llama_vision.checkpoint.lora import LORA_CONFIG, LORA_FILE
        from llama_vision.model.lora import has_lora, merged_state_dict
        from llama_vision.model.trainability import trainable_groups

        final = self.out / "final"
        keep = mp.dp_rank() == 0
        if self.rank == 0:
            final.mkdir(parents=True, exist_ok=True)
            (final / "params.json").unlink(missing_ok=True)
            for stale in (LORA_FILE, LORA_CONFIG):
                (final / stale).unlink(missing_ok=True)
        mp.barrier()
        # FSDP: each tensor gathered over the DP ranks in turn (rank 0 of each TP group keeps them).
        tensors = mp.full_state_dict(self.model, keep=keep) if self.fsdp else None
        source = self.model
        if has_lora(self.model):
            state = (tensors if tensors is not None else self.model.state_dict()) if keep else {}
            also = sorted(g for g, ps in trainable_groups(self.model).items() if g != "lora" and any(p.requires_grad for _, p in ps))
            save_lora(self.model, final, state=state, targets=list(self.cfg.lora.targets) or None,
                      base_checkpoint=self.cfg.init_from, init_text_from=self.cfg.init_text_from,
                      extra={"also_trained": also, "stage": self.cfg.stage, "step": self.step}, write=keep)
            tensors = merged_state_dict(self.model, state)
            if mp.tp_size() == 1:
                source = tensors  # the plain model's keys: saved with its own (LoRA-free) plan
        if isinstance(source, dict):
            save_meta_checkpoint(source, self.model.args, final, write=keep)
        else:
            save_meta_checkpoint(
                self.model, final, tp_rank=mp.tp_rank(), tp_world=mp.tp_size(), write=keep, state_dict=tensors
            )
        if self.rank == 0 and Path(self.cfg.tokenizer).is_file():
            shutil.copyfile(self.cfg.tokenizer, final / "tokenizer.model.tmp")
            os.replace(final / "tokenizer.model.tmp", final / "tokenizer.model")
        mp.barrier()
        return final


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    return Trainer(cfg).fit(resume=resume)
