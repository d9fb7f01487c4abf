"""The training loop for every stage (image pretrain/anneal/SFT/DPO, video, text).

Same code on 2 CPU processes (gloo) and N nodes x 8 GPUs (NCCL): tensor parallel through
fairscale's layers, data parallel by summing gradients over the DP group with the loss
divided by the GLOBAL target count (so DP=N equals DP=1 with the full batch), AdamW state
for trainable parameters only, sharded across DP ranks (ZeRO-1).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import model_parallel as mp
from llama_vision.data.batch import batch_fingerprint
from llama_vision.model import build_model, set_trainable
from llama_vision.tokenizer import load_tokenizer

from .checkpointing import CheckpointManager, capture_rng_state, restore_rng_state
from .data import build_loader
from .objectives import build_objective
from .flops import step_flops, step_shape_from_batch, trainable_from_model
from .metrics import MetricsLogger, ThroughputMeter, estimate_mfu, peak_flops_for_device
from .optim import split_decay_params
from .schedule import build_lr_scheduler
from .train_config import TrainConfig


def load_model_params(path: str) -> dict:
    """A Meta params.json or a YAML of the same keys."""
    p = Path(path)
    if p.is_dir():
        p = p / "params.json"
    if not p.is_file():
        raise FileNotFoundError(f"model params not found: {p}")
    return json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())


def build_training_model(cfg: TrainConfig, tokenizer):
    """Params + tokenizer -> model with initial weights, new modalities and trainability."""
    params = {**load_model_params(cfg.model), **cfg.model_overrides}
    if params.get("vocab_size") in (None, "auto"):
        params["vocab_size"] = tokenizer.n_words
    if params["vocab_size"] != tokenizer.n_words:
        raise ValueError(f"model vocab_size {params['vocab_size']} != tokenizer n_words {tokenizer.n_words} ({cfg.tokenizer})")
    if cfg.stage.startswith("video"):
        # The stage's `video:` block shapes the aggregator, also when `model` is a video
        # checkpoint's params.json (the previous stage's shape): a trained aggregator at
        # another frames_per_group / group count is resized when init_from is loaded.
        params.pop("video", None)
    torch.manual_seed(cfg.seed)
    model = build_model(params, seed=cfg.seed)  # the same weights at every TP degree
    if cfg.stage.startswith("video") and "video" not in model.modalities:
        from llama_vision.model.video import VideoConfig, add_video_adapters

        v = cfg.video
        add_video_adapters(model, VideoConfig(
            num_frames=v.num_frames, frames_per_group=v.frames_per_group, tiles_per_frame=v.tiles_per_frame,
            n_latents=v.n_latents, depth=v.depth, heads=v.heads, every_k_image_layers=v.every_k_image_layers,
        ))
    if cfg.init_from:
        from llama_vision.checkpoint import load_into

        # Video SFT continues a video pretraining: a checkpoint without the video weights
        # would silently start it from a fresh aggregator, so only earlier stages may lack them.
        missing_ok = () if cfg.stage == "video_sft" else _new_module_prefixes(model)
        load_into(model, cfg.init_from, allow_missing_prefixes=missing_ok)
    if cfg.init_text_from:
        from llama_vision.checkpoint import load_text_trunk_into

        load_text_trunk_into(model, cfg.init_text_from)
    from llama_vision.model import trainable_groups

    groups = trainable_groups(model)
    # A modality group the model does not have (video in an image stage) must stay off.
    set_trainable(model, **{g: on for g, on in vars(cfg.trainable).items() if on or g in groups})
    apply_init(model, cfg.init)
    if cfg.activation_checkpointing:
        model.text_model.checkpoint_activations = True
        model.vision_model.vision_encoder.transformer.checkpoint_activations = True
        model.vision_model.vision_encoder.global_transformer.checkpoint_activations = True
    return model


def is_gate(name: str) -> bool:
    """A tanh gate parameter (`...gate_attn`, `...gate`, `..._embedding_gate`)."""
    return name.rsplit(".", 1)[-1].startswith("gate") or name.endswith("_gate")


@torch.no_grad()
def apply_init(model, init) -> None:
    """The stage's `init:` start values (see InitConfig) on the trainable parameters."""
    if init.gates is not None:
        for name, p in model.named_parameters():
            if p.requires_grad and is_gate(name):
                p.fill_(init.gates)
    if init.vision_pos_embed_scale != 1.0:
        encoder = model.vision_model.vision_encoder
        for p in (encoder.positional_embedding, encoder.pre_tile_pos_embed.embedding, encoder.post_tile_pos_embed.embedding):
            if p.requires_grad:
                p.mul_(init.vision_pos_embed_scale)


def _new_module_prefixes(model) -> tuple[str, ...]:
    """State-dict prefixes of modalities added on top of the image model (absent from an
    image-stage checkpoint)."""
    return tuple(p + "." for name, m in model.modalities.items() if name != "image" for p in m.trainable_modules)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.tp > 1:
            mp.init_model_parallel(cfg.tp)
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        self.out = Path(cfg.output_dir)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.model = build_training_model(cfg, self.tokenizer).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        plan = mp.shard_plan(self.model, "runtime")
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.tp_dims = {id(p): plan.get(names[id(p)]) for p in self.params}
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cfg.dtype == "bf16" and self.device.type == "cuda" else nullcontext
        )
        self.objective = build_objective(cfg, self.model, self.autocast)
        self._flop_groups = trainable_from_model(self.model)
        self.optimizer = mp.zero_redundancy_adamw(self._param_groups(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio)
        self.loader = build_loader(cfg, self.tokenizer, self.model.args, mp.dp_rank(), mp.dp_size())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.ckpt = CheckpointManager(self.out, keep_last=cfg.keep_last, rank=self.rank, world_size=world, barrier=mp.barrier)
        self.step = 0
        self.skipped_nonfinite = 0  # steps skipped for a non-finite loss or gradient, in all
        self._nonfinite_streak = 0
        if self.rank == 0:
            tqdm.write(global_batch_line(cfg, world, mp.tp_size(), mp.dp_size()))

    @property
    def reference(self) -> dict[str, torch.Tensor] | None:
        """DPO: the reference policy's trainable tensors (None for other stages)."""
        return getattr(self.objective, "reference", None)

    def _param_groups(self) -> list[dict]:
        """Decay / no-decay groups of the trainable parameters; tanh gates get their own
        group at lr x optim.gate_lr_multiplier (no decay: decay would pull them to 0)."""
        o = self.cfg.optim
        decay, no_decay = split_decay_params(self.model.named_parameters())
        groups = [
            {"params": [p for _, p in decay], "weight_decay": o.weight_decay},
            {"params": [p for n, p in no_decay if not is_gate(n)], "weight_decay": 0.0},
            {"params": [p for n, p in no_decay if is_gate(n)], "weight_decay": 0.0, "lr": o.lr * o.gate_lr_multiplier},
        ]
        return [g for g in groups if g["params"]]

    # --- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        optim = self.optimizer.optim if hasattr(self.optimizer, "optim") else self.optimizer
        return {
            "step": self.step,
            "trainable": trainable,
            "optimizer": optim.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "skipped_nonfinite": self.skipped_nonfinite,
            **self.objective.state_dict(),
        }

    def resume(self) -> bool:
        # Rank 0 picks the checkpoint for everybody: on a shared filesystem ranks can see
        # different "latest" directories (a commit racing a directory listing cache).
        latest = self.ckpt.latest() if self.rank == 0 else None
        latest = mp.broadcast_object(None if latest is None else str(latest))
        if latest is None:
            return False
        state = self.ckpt.load(latest, rank=self.rank)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t)
        self.objective.load_state_dict(state)
        optim = self.optimizer.optim if hasattr(self.optimizer, "optim") else self.optimizer
        optim.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The scheduler owns the learning rate: put its value into the param groups it
        # drives. At DP > 1 those are the ZeRO wrapper's, which are copied into the inner
        # optimizer at every step and are not part of the inner state loaded above.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.loader.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
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
        # Normalise by the global number of targets (tokens, or pairs for DPO); the same
        # collective sums the model FLOPs of the step over the replicas.
        flops = step_flops(self.model.args, [s for b in micro for s in step_shape_from_batch(b)], self._flop_groups).total
        totals = torch.tensor([float(sum(self.objective.num_targets(b) for b in micro)), float(flops)], dtype=torch.float64, device=self.device)
        mp.all_reduce_sum(totals, "dp")
        count = totals[0].float()
        total = torch.zeros((), device=self.device)
        for batch in micro:
            batch = batch.to(self.device, non_blocking=True)
            loss_sum = self.objective.loss_sum(batch)
            # A text-only micro-batch under a frozen decoder touches nothing trainable:
            # nothing to differentiate (sync_gradients fills in zeros where other ranks
            # have gradients).
            if loss_sum.requires_grad:
                (loss_sum / count.clamp(min=1)).backward()
            total += loss_sum.detach()
        mp.sync_gradients(self.params)
        grad_norm = mp.global_grad_norm(self.params, self.tp_dims)
        mp.all_reduce_sum(total, "dp")
        loss = total / count.clamp(min=1)
        lr = self.scheduler.get_last_lr()[0]
        # Identical on every rank (summed loss, all-reduced gradients), so all ranks agree.
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:
            self._nonfinite_streak = 0
            if cfg.optim.grad_clip is not None:
                scale = (cfg.optim.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.optimizer.step()
            self.scheduler.step()
        else:
            # inf x clip scale 0 = NaN: applying it would poison the weights (and a
            # checkpoint written after it). Skip the update, keep the step count moving.
            self.skipped_nonfinite += 1
            self._nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if finite:
            self.objective.after_optimizer_step(self.step)
        elif self._nonfinite_streak >= cfg.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"step {self.step}: {self._nonfinite_streak} consecutive steps with a non-finite loss or gradient "
                f"(loss {float(loss)}, grad norm {float(grad_norm)}); stopping (max_consecutive_nonfinite="
                f"{cfg.max_consecutive_nonfinite}). Resume from the last checkpoint with a lower lr or check the data."
            )
        lm_batches = [getattr(b, "chosen", b) for b in micro]
        return {
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "skipped_samples": self._skipped_total(),
            "skipped_nonfinite": self.skipped_nonfinite,
            "step_time_s": time.perf_counter() - t0,
            "tokens": sum(int(b.lengths.sum()) for b in lm_batches),
            "images": sum(int(b.num_images.sum()) for b in lm_batches),
            **self.objective.step_metrics(count),
            # One GPU's share of the mean replica's work (a replica is TP GPUs).
            "flops_per_gpu": float(totals[1]) / mp.dp_size() / mp.tp_size(),
            "_finite": finite,
        }

    def _mfu(self, rates: dict) -> dict:
        """Model FLOPs utilisation over the meter's window: one GPU's share of the
        replica's model FLOPs per second (llama_vision.training.flops: text tokens,
        patches, cross-attention K/V per vision token, attention, backward only where
        gradients flow) over that GPU's peak."""
        peak = self.cfg.peak_flops_per_device or peak_flops_for_device(self.device)
        value = estimate_mfu(rates["flops_per_s"], 1.0, peak) if peak else None
        return {} if value is None else {"mfu": value}

    def _skipped_total(self) -> int:
        skipped = torch.tensor(float(sum(self.loader.skipped.values())), device=self.device)
        return int(mp.all_reduce_sum(skipped, "dp"))

    # --- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg
        resumed = resume and self.resume()
        logger = MetricsLogger(self.out, rank=self.rank, tensorboard=cfg.tensorboard, resume_step=self.step if resumed else None)
        meter = ThroughputMeter()
        self.model.train()
        it = iter(self.loader)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train[{cfg.stage}]", disable=self.rank != 0, dynamic_ncols=True)
        last = {}
        try:
            while self.step < cfg.max_steps:
                last = self.train_step(it)
                finite = last.pop("_finite")
                meter.update(last["tokens"], last["images"], last["step_time_s"], last["flops_per_gpu"])
                rates = meter.summary()
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or not finite:
                    logger.log(self.step, **{**last, **rates, **self._mfu(rates)})
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", skipped=last["skipped_samples"])
                # A skipped step writes no checkpoint: the next one that trained does.
                if finite and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps):
                    self.ckpt.save(self.step, self.state())
        finally:
            bar.close()
            logger.close()
        if cfg.save_final:
            self.save_final()
        return {"step": self.step, **last}

    def save_final(self) -> Path:
        """The whole model in Meta format at output_dir/final (what infer_* and the next
        stage's init_from read), tokenizer beside it."""
        from llama_vision.checkpoint import save_meta_checkpoint

        final = self.out / "final"
        save_meta_checkpoint(self.model, final, tp_rank=mp.tp_rank(), tp_world=mp.tp_size(), write=mp.dp_rank() == 0)
        if self.rank == 0 and Path(self.cfg.tokenizer).is_file():
            shutil.copyfile(self.cfg.tokenizer, final / "tokenizer.model.tmp")
            os.replace(final / "tokenizer.model.tmp", final / "tokenizer.model")
        mp.barrier()
        return final


def global_batch_line(cfg: TrainConfig, world: int, tp: int, dp: int) -> str:
    """What one optimizer step consumes: samples (pairs for DPO) and at most how many tokens."""
    samples = cfg.micro_batch_size * cfg.grad_accum_steps * dp
    unit = "preference pairs" if cfg.stage == "dpo" else "samples"
    return (
        f"global batch: {cfg.micro_batch_size} micro-batch x {cfg.grad_accum_steps} accumulation x {dp} data-parallel "
        f"(world {world} / TP {tp}) = {samples:,} {unit}, up to {samples * cfg.data.max_seq_len:,} tokens "
        f"(max_seq_len {cfg.data.max_seq_len})"
    )


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    return Trainer(cfg).fit(resume=resume)
