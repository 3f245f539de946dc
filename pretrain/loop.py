"""The training loop: accumulate micro-batches to a global batch in tokens, clip, step, validate,
log, checkpoint; resume; stop on max tokens/steps, on SIGUSR1/SIGTERM (after saving) or on a NaN/inf
loss (without saving, so the last checkpoint is the last good state)."""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

import models
from checkpoints_util import save as ckpt
from pretrain import batches, metrics, strategy
from pretrain.config import ConfigError, PretrainConfig
from pretrain.schedule import lr_at, set_lr
from pretrain.signals import StopRequest


_HISTORY = 100_000  # newest per-step losses kept in Result.losses


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stops without saving."""


@dataclass
class Result:
    step: int
    tokens_seen: int
    exit_code: int = 0
    stopped_by: str = "done"                                   # "done" | "SIGUSR1" | "SIGTERM"
    losses: dict[int, float] = field(default_factory=dict)     # step -> train loss (this call's newest 100k steps)
    val_losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    tensorboard_dir: Path | None = None


@dataclass
class Steps:
    """How one optimizer step is made of micro-batches, and how many steps the run has."""
    micro_batches: int        # per rank, per optimizer step (gradient accumulation)
    tokens_per_step: int      # global, = train.global_batch_tokens
    total: int                # optimizer steps of the whole run (the cosine schedule's end)


def plan_steps(cfg: PretrainConfig, world_size: int) -> Steps:
    t = cfg.train
    per_micro = t.micro_batch_size * cfg.data.seq_len * world_size
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of train.micro_batch_size x "
            f"data.seq_len x world size = {t.micro_batch_size} x {cfg.data.seq_len} x {world_size} = {per_micro}")
    limits = [n for n in (t.max_steps, None if t.max_tokens is None else t.max_tokens // t.global_batch_tokens)
              if n is not None]
    return Steps(t.global_batch_tokens // per_micro, t.global_batch_tokens, min(limits))


def micro_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch `[B, T + 1]` (inputs [:, :-1], targets [:, 1:])."""
    logits = model(batch[:, :-1])
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def accumulate_gradients(fabric: L.Fabric, model, micro_batches, nan: bool = False) -> torch.Tensor:
    """Forward/backward over the micro-batches of one step; returns the step's mean loss (detached).

    Each micro loss is divided by the number of micro-batches, so the summed gradients equal those of
    one batch holding all of them (all have the same token count). Gradient sync (DDP all-reduce,
    FSDP reduce-scatter) happens on the last micro-batch only.
    """
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    total = None
    for i, batch in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=i < n - 1):
            loss = micro_loss(model, batch)
            if nan and i == 0:
                loss = loss * float("nan")
            fabric.backward(loss / n)
        value = loss.detach()
        total = value if total is None else total + value
    return total / n


@torch.no_grad()
def validate(fabric: L.Fabric, model, val_batches: list[torch.Tensor]) -> float:
    model.eval()
    total = torch.zeros((), device=fabric.device, dtype=torch.float64)
    for batch in val_batches:
        total += micro_loss(model, fabric.to_device(batch)).double()
    model.train()
    summed = fabric.all_reduce(torch.stack([total, torch.tensor(float(len(val_batches)), device=fabric.device,
                                                                dtype=torch.float64)]), reduce_op="sum")
    return float(summed[0] / summed[1])


def resolve_resume(cfg: PretrainConfig) -> Path | None:
    """The checkpoint to resume from (read from the filesystem only, before any process group exists)."""
    out_dir = Path(cfg.out_dir)
    existing = ckpt.latest_checkpoint(out_dir)
    if cfg.resume == "none":
        if existing is not None:
            raise ConfigError(f"out_dir={out_dir} already holds checkpoints (newest: {existing.name}); use "
                              f"--resume auto to continue that run, or another --out_dir")
        return None
    if cfg.resume == "auto":
        return existing
    path = Path(cfg.resume)
    if not ckpt.is_complete(path):
        raise ConfigError(f"resume={path}: not a complete checkpoint (a step-XXXXXXXX folder with trainer.json)")
    return path


class JsonlLog:
    """`<out_dir>/train_log.jsonl`: one JSON record per logged step/validation, rank 0 only."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.is_file():
            # a resumed run drops what the previous attempt logged after its last checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and
                    json.loads(ln).get("step", 0) <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif enabled and keep_until_step is None and path.is_file():
            path.unlink()

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def fit(cfg: PretrainConfig) -> Result:
    """Train as `cfg` says. Stop signals are handled from the first line on (also during model set-up and
    checkpoint loading, which can take minutes at scale), so a SLURM USR1 never kills a starting job."""
    with StopRequest() as stop:
        return _fit(cfg, stop)


def _fit(cfg: PretrainConfig, stop: StopRequest) -> Result:
    torch.set_flush_denormal(True)  # denormals made some CPU steps take seconds
    p = strategy.plan(cfg)
    model_config = models.get_config(cfg.model.name, **cfg.model.overrides)
    if cfg.data.seq_len > model_config.block_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's block_size "
                          f"{model_config.block_size} ({cfg.model.name})")
    resume_path = resolve_resume(cfg)
    resume_step = ckpt.read_trainer_state(resume_path)["step"] if resume_path else None
    out_dir = Path(cfg.out_dir)

    fabric = strategy.build_fabric(cfg, p, model_config, tb_purge_step=None if resume_step is None else resume_step + 1)
    fabric.launch()
    steps = plan_steps(cfg, fabric.world_size)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(out_dir)
    fabric.seed_everything(cfg.seed)  # same seed on every rank: identical initial weights

    model = strategy.setup_model(fabric, p, model_config)
    from optim.build import build_optimizer, optimizer_state_bytes

    o = cfg.optimizer
    optimizer = build_optimizer(strategy.optimizer_target(model), model_config, o.name, lr=o.lr,
                                betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    optimizer_name = o.name + (f" [{optimizer.implementation}]" if hasattr(optimizer, "implementation") else "")
    optimizer = fabric.setup_optimizers(optimizer)

    rank, world = fabric.global_rank, fabric.world_size
    train_loader = batches.make_loader(cfg, "train", cfg.train.micro_batch_size, rank, world, shuffle=True)
    data_vocab = getattr(train_loader, "vocab_size", None)
    if data_vocab is not None and data_vocab > model_config.padded_vocab_size:
        raise ConfigError(f"data.dir={cfg.data.dir} was tokenised with a {data_vocab:,}-piece vocabulary, but model "
                          f"{cfg.model.name} has {model_config.padded_vocab_size:,} embeddings; set "
                          f"--model.overrides '{{vocab_size: {data_vocab}}}'")
    train = batches.BatchStream(train_loader, model_config.padded_vocab_size, cfg.data.seq_len)
    val_batches = load_val_batches(fabric, cfg, rank, world)

    step, tokens_seen = 0, 0
    if resume_path is not None:
        trainer = ckpt.load_checkpoint(fabric, resume_path, {"model": model, "optimizer": optimizer, "loader": train,
                                                             "model_config": dataclasses.asdict(model_config)})
        step, tokens_seen = int(trainer["step"]), int(trainer["tokens_seen"])
        fabric.print(f"resumed from {resume_path} at step {step} ({tokens_seen:,} tokens)")
    elif cfg.resume == "auto":
        fabric.print(f"no checkpoint in {out_dir}: starting fresh")

    n_params = models.count_params(model_config)
    flops_tok = models.flops_per_token(model_config, cfg.data.seq_len)
    peak = metrics.peak_flops(fabric.device, cfg.logging.peak_flops)
    fabric.print(f"model {cfg.model.name}: {n_params:,} parameters, {flops_tok:.3g} training FLOPs/token | "
                 f"{p.strategy} x {world} {p.accelerator} ({p.precision}) | optimizer {optimizer_name} | "
                 f"{steps.total} steps x {steps.tokens_per_step:,} tokens ({steps.micro_batches} micro-batches "
                 f"of {cfg.train.micro_batch_size} x {cfg.data.seq_len} per rank)")
    if peak is None and p.accelerator == "cuda":
        fabric.print("MFU not reported: unknown GPU peak FLOP/s; set logging.peak_flops")

    result = Result(step=step, tokens_seen=tokens_seen)
    tb_dir = out_dir / "tensorboard" if cfg.logging.tensorboard else None
    result.tensorboard_dir = tb_dir
    log = JsonlLog(out_dir / "train_log.jsonl", rank == 0, resume_step)
    if step >= steps.total:
        fabric.print(f"nothing to do: the run is already at step {step} of {steps.total}")
        result.last_checkpoint = resume_path
        return result

    def save(reason: str) -> Path:
        state = {"model": model, "optimizer": optimizer, "loader": train,
                 "trainer": {"tokens_seen": tokens_seen, "model_name": cfg.model.name, "optimizer": o.name,
                             "precision": p.precision, "loss": result.losses.get(step),
                             "val_loss": result.val_losses.get(step), "reason": reason},
                 "config": cfg.to_dict(), "model_config": dataclasses.asdict(model_config)}
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(fabric, out_dir, step, state, keep_last=cfg.checkpoint.keep_last)
        fabric.print(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        result.last_checkpoint = path
        return path

    thr = metrics.Throughput()
    window_losses: list[float] = []
    saved_at = step if resume_path is not None else None
    first_step = step + 1  # always logged: the console shows at once that training runs
    stop_now = False
    while step < steps.total:
        lr = lr_at(step + 1, o.lr, o.min_lr, o.warmup_steps, steps.total)
        set_lr(optimizer, lr)
        thr.start_step()
        micro = [fabric.to_device(train.next()) for _ in range(steps.micro_batches)]
        loss = accumulate_gradients(fabric, model, micro, nan=cfg.debug.nan_at_step == step + 1)
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=o.grad_clip or math.inf,
                                          error_if_nonfinite=False)
        # One small all-reduce per step: the global mean loss and grad norm, and which stop signals
        # any rank has received (so that all ranks stop after the same step, with the same exit code).
        usr1 = stop.signum == signal.SIGUSR1 or cfg.debug.stop_at_step == step + 1
        term = stop.signum == signal.SIGTERM
        agreed = fabric.all_reduce(torch.tensor([float(loss), float(grad_norm), float(usr1), float(term)],
                                                device=fabric.device, dtype=torch.float64),
                                   reduce_op="sum").tolist()
        loss_v, norm_v = agreed[0] / world, agreed[1] / world
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            last = ckpt.latest_checkpoint(out_dir)
            raise NonFiniteLossError(
                f"non-finite training loss at step {step + 1} (loss {loss_v}, grad norm {norm_v}, lr {lr:.3g}); "
                f"stopped without updating the weights or saving. The newest checkpoint is "
                f"{last or 'none'}; resume from it with a lower optimizer.lr (or check the data).")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += steps.tokens_per_step
        thr.end_step(steps.tokens_per_step)
        result.losses[step] = loss_v
        if len(result.losses) > _HISTORY:  # bounded memory on million-step runs
            del result.losses[next(iter(result.losses))]
        window_losses.append(loss_v)
        stop_now = agreed[2] > 0 or agreed[3] > 0
        stop_signal = signal.SIGTERM if agreed[3] > 0 else signal.SIGUSR1

        if step % cfg.logging.interval == 0 or step == steps.total or stop_now or step == first_step:
            tps, sps = thr.report()
            rec = {"step": step, "loss": sum(window_losses) / len(window_losses), "lr": lr,
                   "grad_norm": norm_v, "tokens_seen": tokens_seen, "tokens_per_s": tps,
                   "tokens_per_s_per_device": tps / world, "s_per_step": sps,
                   "max_memory_bytes": metrics.max_memory_bytes(fabric.device),
                   "optimizer_state_bytes": optimizer_state_bytes(optimizer.optimizer)}
            m = metrics.mfu(flops_tok, tps, peak, world)
            if m is not None:
                rec["mfu"] = m
            window_losses.clear()
            log.write(rec)
            fabric.log_dict({"train/loss": rec["loss"], "train/lr": lr, "train/grad_norm": norm_v,
                             "train/tokens_seen": tokens_seen, "perf/tokens_per_s": tps,
                             "perf/tokens_per_s_per_device": tps / world, "perf/s_per_step": sps,
                             "perf/max_memory_gib": rec["max_memory_bytes"] / 2**30,
                             "perf/optimizer_state_gib": rec["optimizer_state_bytes"] / 2**30,
                             **({"perf/mfu": m} if m is not None else {})}, step=step)
            eta = (steps.total - step) * thr.mean_step_seconds()
            fabric.print(f"step {step:>6}/{steps.total} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                         f"gnorm {norm_v:.3f} | {metrics.human(tps)} tok/s ({metrics.human(tps / world)}/dev) | "
                         + (f"MFU {m:.1%} | " if m is not None else "")
                         + f"{sps:.2f} s/step | mem {rec['max_memory_bytes'] / 2**30:.2f} GiB | "
                         f"ETA {metrics.duration(eta)}")

        if step == steps.total or (cfg.eval.interval and step % cfg.eval.interval == 0):
            val = validate(fabric, model, val_batches)
            result.val_losses[step] = val
            log.write({"step": step, "val_loss": val})
            fabric.log_dict({"val/loss": val}, step=step)
            fabric.print(f"step {step:>6}/{steps.total} | val loss {val:.4f} ({len(val_batches)} batches/rank)")

        if stop_now or step == steps.total or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
            if saved_at != step:
                save("signal" if stop_now else ("end" if step == steps.total else "interval"))
                saved_at = step
        if stop_now:
            break

    result.step, result.tokens_seen = step, tokens_seen
    if stop_now:
        result.stopped_by = signal.Signals(stop_signal).name
        result.exit_code = 0 if stop_signal == signal.SIGUSR1 else 128 + int(stop_signal)
        fabric.print(f"stopped by {result.stopped_by} after step {step}; checkpoint {result.last_checkpoint}")
    else:
        fabric.print(f"done: {step} steps, {tokens_seen:,} tokens, {metrics.duration(thr.total_seconds)} training "
                     f"time; last checkpoint {result.last_checkpoint}")
    if tb_dir is not None:
        fabric.print(f"TensorBoard logs: {tb_dir}  (tensorboard --logdir {tb_dir})")
    for logger in fabric.loggers:
        logger.finalize("success")
    return result


def load_val_batches(fabric: L.Fabric, cfg: PretrainConfig, rank: int, world: int) -> list[torch.Tensor]:
    """The fixed validation batches of this rank (the same count on all ranks: they come from one schedule)."""
    bs = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    loader = batches.make_loader(cfg, "val", bs, rank, world, shuffle=False)
    n = cfg.eval.batches
    if n > loader.steps_per_epoch:
        fabric.print(f"eval.batches={n} but the val split holds {loader.steps_per_epoch} batches of {bs} x "
                     f"{cfg.data.seq_len} per rank: using {loader.steps_per_epoch}")
        n = loader.steps_per_epoch
    return batches.take_batches(loader, n)
