"""The pretraining app, top to bottom: `fit` = `setup`, then `train`, which calls `train_step`, `validate`
and `save` (pretrain/step.py, pretrain/checkpoint.py) until max tokens/steps, a stop signal (SIGUSR1 or
SIGTERM: save, then stop) or a non-finite loss (stop without saving: the newest checkpoint stays the last
good state)."""
from __future__ import annotations

import dataclasses
import errno
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import models
from amp_common.dist import PeerLostError, collective_failure
from checkpoints_util import store
from checkpoints_util.layout import remove_partial
from pretrain import batches, init_from, metrics, resume, strategy
from pretrain.checkpoint import DataState, ModelState, TrainState
from pretrain.config import ConfigError, PretrainConfig
from pretrain.lock import LockedError, RunLock
from pretrain.logs import RunLog
from pretrain.schedule import lr_at, set_lr
from pretrain.signals import StopRequest
from pretrain.step import NonFiniteLossError, StepResult, train_step, validate

_HISTORY = 100_000  # newest per-step losses kept in Result.losses


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


def plan_steps(cfg: PretrainConfig, world_size: int, step: int = 0, tokens_seen: int = 0) -> Steps:
    """The step plan of a run that stands at `step` with `tokens_seen` (a resume; 0, 0: fresh).

    train.max_tokens counts tokens seen and is never exceeded: the run ends after the last whole step that
    fits the budget, `step + (max_tokens - tokens_seen) // global_batch_tokens` (so a global batch changed on
    resume changes the steps left, and with them where the cosine schedule ends). train.max_steps counts
    steps; the smaller limit wins."""
    t = cfg.train
    per_micro = t.micro_batch_size * cfg.data.seq_len * world_size
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of train.micro_batch_size x "
            f"data.seq_len x world size = {t.micro_batch_size} x {cfg.data.seq_len} x {world_size} = {per_micro}")
    by_tokens = None
    if t.max_tokens is not None:
        by_tokens = step + max(0, t.max_tokens - tokens_seen) // t.global_batch_tokens
    limits = [n for n in (t.max_steps, by_tokens) if n is not None]
    return Steps(t.global_batch_tokens // per_micro, t.global_batch_tokens, min(limits))


@dataclass
class Run:
    """Everything `setup` builds and `train` uses."""
    cfg: PretrainConfig
    fabric: object
    plan: strategy.Plan
    model_config: object
    steps: Steps
    model: object
    optimizer: object
    train_data: batches.BatchStream
    val_data: list
    val_sequences: int
    state: TrainState
    log: RunLog
    lock: RunLock
    resumed_from: Path | None
    result: Result
    init_from: dict | None = None   # where the initial weights came from (--init.from), for trainer.json


def fit(cfg: PretrainConfig) -> Result:
    """Train as `cfg` says. Stop signals are handled from the first line on (also during model set-up and
    checkpoint loading, which can take minutes at scale), so a SLURM USR1 does not kill a starting job (unless
    start-up and the first step outlast system.stop_grace_s, see pretrain/signals.py). A collective whose peer
    stopped answering (system.collective_timeout_s) or died raises `PeerLostError` (exit 4)."""
    with StopRequest(cfg.system.stop_grace_s) as stop:
        try:
            run = setup(cfg)
            try:
                result = train(run, stop)
            except (NonFiniteLossError, KeyboardInterrupt):  # every rank: the loss is all-reduced; Ctrl-C reaches all
                strategy.end_process_group(run.fabric)
                raise
            finally:
                run.log.close()
                run.lock.release()
        except RuntimeError as e:
            line = collective_failure(e)
            if line is None:
                raise
            strategy.abandon_process_group()
            raise PeerLostError(line) from None
    strategy.end_process_group(run.fabric)
    return result


# -------------------------------------------------------------------------------------------- setup
def setup(cfg: PretrainConfig) -> Run:
    torch.set_flush_denormal(True)  # denormals made some CPU steps take seconds
    p = strategy.plan(cfg)
    model_config = init_from.model_config(cfg)  # the named config, or init.from's
    if cfg.data.seq_len > model_config.block_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's block_size {model_config.block_size} "
                          f"({cfg.model.name}); raise it with --model.overrides '{{block_size: {cfg.data.seq_len}}}'")
    fabric = strategy.build_fabric(cfg, p, model_config)
    fabric.launch()
    lock = _claim_out_dir(fabric, Path(cfg.out_dir))
    try:
        return _build(cfg, fabric, p, model_config, lock)
    except BaseException:
        lock.release()
        raise


def _build(cfg: PretrainConfig, fabric, p: strategy.Plan, model_config, lock: RunLock) -> Run:
    """Everything after the run folder is ours: the resume choice, model, optimizer, data, state, log."""
    steps = plan_steps(cfg, fabric.world_size)
    choice = resume.choose(cfg, fabric)  # moves nothing: a refused resume leaves the run folder as it was
    resumed_from = choice.path
    model = strategy.setup_model(fabric, p, model_config, cfg.seed)
    optimizer = fabric.setup_optimizers(_build_optimizer(cfg, model, model_config))
    vocab = model_config.padded_vocab_size
    train_data = batches.BatchStream(cfg, fabric.global_rank, fabric.world_size, vocab)
    val_data, val_sequences = batches.validation_batches(cfg, fabric.global_rank, fabric.world_size, vocab,
                                                         fabric.print)
    state = TrainState()
    if resumed_from is not None:
        _load(resumed_from, model, optimizer, train_data, state, model_config)
        resume.settle(choice, cfg, fabric)  # everything that could refuse the checkpoint has accepted it
        fabric.print(f"resumed from {resumed_from} at step {state.step} ({state.tokens_seen:,} tokens)")
        steps = plan_steps(cfg, fabric.world_size, state.step, state.tokens_seen)
        _print_budget(fabric, cfg, state, steps)
    elif cfg.resume == "auto":
        fabric.print(f"no checkpoint in {cfg.out_dir}: starting fresh")
    init = init_from.start(cfg, fabric, model, resumed_from)
    log = RunLog(fabric, Path(cfg.out_dir), steps.total, None if resumed_from is None else state.step,
                 cfg.logging.tensorboard)
    _print_start(fabric, cfg, p, model_config, steps, optimizer)
    return Run(cfg, fabric, p, model_config, steps, model, optimizer, train_data, val_data, val_sequences, state,
               log, lock, resumed_from, Result(step=state.step, tokens_seen=state.tokens_seen,
                                               tensorboard_dir=log.tensorboard_dir), init)


def _claim_out_dir(fabric, out_dir: Path) -> RunLock:
    """Rank 0 creates out_dir, locks it and removes partial checkpoints; every rank learns the outcome."""
    lock, problem = RunLock(out_dir), None
    if fabric.global_rank == 0:
        try:
            if out_dir.exists() and not out_dir.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder")
            out_dir.mkdir(parents=True, exist_ok=True)
            warning = lock.acquire()
            if warning:
                fabric.print(f"warning: {warning}")
            remove_partial(out_dir)
        except LockedError as e:
            problem = str(e)
        except OSError as e:
            problem = f"{out_dir}: cannot use it as out_dir ({e.strerror or e})"
    problem = fabric.broadcast(problem, src=0)
    if problem:
        lock.release()
        raise ConfigError(problem)
    return lock


def _build_optimizer(cfg: PretrainConfig, model, model_config):
    from optim.build import build_optimizer

    o = cfg.optimizer
    extra = {}
    if o.name == "adam_mini":
        extra = dict(implementation=o.implementation, **dataclasses.asdict(o.adam_mini))
    return build_optimizer(strategy.optimizer_target(model), model_config, o.name, lr=o.lr, betas=tuple(o.betas),
                           eps=o.eps, weight_decay=o.weight_decay, **extra)


def _checkpoint_state(model, optimizer, data, state: TrainState) -> dict:
    """The checkpoint's Stateful entries (see pretrain/checkpoint.py)."""
    from optim.state import OptimizerState

    return {"model": ModelState(strategy.state_dict_module(model)),
            "optimizer": OptimizerState(optimizer.optimizer, load_hparams=False),  # this run's config wins
            "data": DataState(data), "trainer": state}


def _load(path: Path, model, optimizer, data, state: TrainState, model_config) -> None:
    from checkpoints_util.layout import MODEL_CONFIG_FILE, CheckpointError
    from checkpoints_util.reader import load_model_config

    saved = dataclasses.asdict(load_model_config(path / MODEL_CONFIG_FILE))
    now = dataclasses.asdict(model_config)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise CheckpointError(f"{path / MODEL_CONFIG_FILE}: the checkpoint's model differs from this run's in "
                              + ", ".join(f"{k} ({saved.get(k)!r} vs {now.get(k)!r})" for k in diff[:5]))
    store.load_checkpoint(path, _checkpoint_state(model, optimizer, data, state))  # resume.choose verified it


def _print_budget(fabric, cfg: PretrainConfig, state: TrainState, steps: Steps) -> None:
    """On a resume whose tokens seen are not step x this run's global batch (the batch changed): what that does
    to the schedule."""
    if state.tokens_seen == state.step * steps.tokens_per_step:
        return
    left = max(0, steps.total - state.step)
    budget = "" if cfg.train.max_tokens is None else f" (train.max_tokens={cfg.train.max_tokens:,}: never exceeded)"
    fabric.print(f"the global batch is now {steps.tokens_per_step:,} tokens; the checkpoint's {state.step} steps saw "
                 f"{state.tokens_seen:,}: {left} more steps, {state.tokens_seen + left * steps.tokens_per_step:,} "
                 f"tokens in all{budget}; the cosine schedule now ends at step {steps.total} (warm-up unchanged: "
                 f"steps 1-{cfg.optimizer.warmup_steps}), so the learning rate jumps at the change")


def _print_start(fabric, cfg, p, model_config, steps: Steps, optimizer) -> None:
    from optim.build import optimizer_state_bytes
    from optim.layout import Partition, format_layout

    opt = optimizer.optimizer
    impl = getattr(opt, "implementation", None)
    name = cfg.optimizer.name + (f" [{impl}]" if impl else "")
    if cfg.optimizer.name == "adam_mini":
        a = cfg.optimizer.adam_mini
        fabric.print(format_layout(opt.layouts, Partition(a.embedding_blocks, a.value_blocks), per_layer=False))
        opt.init_state()
        fabric.print(f"optimizer state: {optimizer_state_bytes(opt) / 2**20:,.1f} MiB on this rank "
                     f"(first moment in {a.momentum_dtype})")
    fabric.print(f"model {model_config.name}: {models.count_params(model_config):,} parameters, "
                 f"{models.flops_per_token(model_config, cfg.data.seq_len):.3g} training FLOPs/token | "
                 f"{p.describe()} | optimizer {name} | {steps.total} steps x {steps.tokens_per_step:,} tokens "
                 f"({steps.micro_batches} micro-batches of {cfg.train.micro_batch_size} x {cfg.data.seq_len} per "
                 f"rank)")
    if metrics.peak_flops(fabric.device, cfg.logging.peak_flops) is None and p.accelerator == "cuda":
        fabric.print("MFU not reported: unknown GPU peak FLOP/s; set logging.peak_flops")


# -------------------------------------------------------------------------------------------- train
def train(run: Run, stop: StopRequest) -> Result:
    fabric, cfg, state, result = run.fabric, run.cfg, run.state, run.result
    if state.step >= run.steps.total:
        fabric.print(f"nothing to do: the run is already at step {state.step} of {run.steps.total}")
        result.last_checkpoint = run.resumed_from
        return result
    thr = metrics.Throughput()
    window: list[float] = []
    saved_at = state.step if run.resumed_from is not None else None
    first = state.step + 1  # always logged: the console shows at once that training runs
    while state.step < run.steps.total:
        lr, out = _one_step(run, thr)
        window.append(out.loss)
        stop_signal = _agreed_stop(fabric, stop)
        if stop_signal:
            stop.acknowledge()  # the step ended (the ranks answered): the save may take its time now
        last = state.step == run.steps.total
        if state.step % cfg.logging.interval == 0 or last or stop_signal or state.step == first:
            run.log.log(_train_record(run, lr, out.grad_norm, window, thr))
            window.clear()
        if last or (cfg.eval.interval and state.step % cfg.eval.interval == 0):
            result.val_losses[state.step] = validate(fabric, run.model, run.val_data)
            run.log.log({"step": state.step, "val_loss": result.val_losses[state.step],
                         "val_sequences": run.val_sequences})
        if (stop_signal or last or (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0)) \
                and saved_at != state.step:
            late = stop.requested and not stop_signal  # a signal after this step's agreement
            if late:
                stop.acknowledge()  # the main thread is saving, not stuck
            save(run, "signal" if stop_signal else ("end" if last else "interval"))
            if late and not last:
                stop.rearm()  # it stops after the next step, which gets stop_grace_s again
            saved_at = state.step
        if stop_signal:
            return _stopped(run, stop_signal)
    fabric.print(f"done: {state.step} steps, {state.tokens_seen:,} tokens, {metrics.duration(thr.total_seconds)} "
                 f"training time; last checkpoint {result.last_checkpoint}")
    _print_tensorboard(run)
    return result


def _one_step(run: Run, thr: metrics.Throughput) -> tuple[float, StepResult]:
    """One optimizer step with the scheduled learning rate; records the loss. Returns the lr and the result."""
    cfg, state, result = run.cfg, run.state, run.result
    o = cfg.optimizer
    lr = lr_at(state.step + 1, o.lr, o.min_lr, o.warmup_steps, run.steps.total)
    set_lr(run.optimizer, lr)
    thr.start_step()
    micro = [run.fabric.to_device(run.train_data.next()) for _ in range(run.steps.micro_batches)]
    try:
        out = train_step(run.fabric, run.model, run.optimizer, micro, o.grad_clip)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"non-finite training loss at step {state.step + 1} ({e}, lr {lr:.3g}); stopped "
                                 f"without updating the weights or saving. {_advice(cfg)}") from None
    state.step += 1
    state.tokens_seen += run.steps.tokens_per_step
    thr.end_step(run.steps.tokens_per_step)
    result.step, result.tokens_seen = state.step, state.tokens_seen
    result.losses[state.step] = out.loss
    if len(result.losses) > _HISTORY:  # bounded memory on million-step runs
        del result.losses[next(iter(result.losses))]
    return lr, out


def _agreed_stop(fabric, stop: StopRequest) -> int | None:
    """The stop signal any rank received (SIGTERM wins over SIGUSR1), the same on every rank: one tiny
    all-reduce per step, so that all ranks save after the same step and exit with the same code."""
    flags = torch.tensor([stop.signum == signal.SIGUSR1, stop.signum == signal.SIGTERM], dtype=torch.float64,
                         device=fabric.device)
    usr1, term = fabric.all_reduce(flags, reduce_op="sum").tolist()
    return signal.SIGTERM if term else (signal.SIGUSR1 if usr1 else None)


def _train_record(run: Run, lr: float, grad_norm: float, window: list[float], thr: metrics.Throughput) -> dict:
    """The training record of the logging window that ends at this step (loss: the window's mean)."""
    from optim.build import optimizer_state_bytes

    fabric, state = run.fabric, run.state
    tps, sps = thr.report()
    rec = {"step": state.step, "loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm,
           "tokens_seen": state.tokens_seen, "tokens_per_s": tps, "tokens_per_s_per_device": tps / fabric.world_size,
           "s_per_step": sps, "max_memory_bytes": metrics.max_memory_bytes(fabric.device),
           "optimizer_state_bytes": optimizer_state_bytes(run.optimizer.optimizer),
           "eta_s": thr.eta_seconds(run.steps.total - state.step)}  # None at the first step
    peak = metrics.peak_flops(fabric.device, run.cfg.logging.peak_flops)
    mfu = metrics.mfu(models.flops_per_token(run.model_config, run.cfg.data.seq_len), tps, peak, fabric.world_size)
    if mfu is not None:
        rec["mfu"] = mfu
    return rec


def save(run: Run, reason: str) -> Path:
    """Write the checkpoint of the current step (collective); keep-last never deletes the checkpoint just
    written or the one this run resumed from."""
    fabric, state, result, cfg = run.fabric, run.state, run.result, run.cfg
    _check_finite_weights(run)
    impl = getattr(run.optimizer.optimizer, "implementation", None)
    meta = {"trainer": {"tokens_seen": state.tokens_seen, "world_size": fabric.world_size,
                        "strategy": run.plan.strategy, "precision": run.plan.precision, "optimizer": cfg.optimizer.name,
                        "optimizer_implementation": impl, "model_name": run.model_config.name,
                        "loss": result.losses.get(state.step), "val_loss": result.val_losses.get(state.step),
                        "reason": reason, "init_from": run.init_from},
            "config": cfg.to_dict(), "model_config": dataclasses.asdict(run.model_config)}
    t0 = time.perf_counter()
    try:
        path = store.save_checkpoint(Path(cfg.out_dir), state.step,
                                     _checkpoint_state(run.model, run.optimizer, run.train_data, state), meta)
    except KeyboardInterrupt:
        if fabric.global_rank == 0:
            remove_partial(Path(cfg.out_dir))  # this save's .tmp-step-* folder (we hold the run's lock)
        raise
    if fabric.global_rank == 0:
        store.prune(Path(cfg.out_dir), cfg.checkpoint.keep_last, {path, *([run.resumed_from] if run.resumed_from
                                                                         else [])})
        resume.follow_branch(Path(cfg.out_dir), path)
    fabric.barrier()
    fabric.print(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
    result.last_checkpoint = path
    return path


def _check_finite_weights(run: Run) -> None:
    """Never write NaN/inf weights into a checkpoint (they would be resumed from): one flag per rank from its
    local shards, one all-reduce."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in run.model.parameters()]
    bad = torch.stack([torch.isfinite(t).all().logical_not() for t in local]).any().to(torch.float64)
    if run.fabric.all_reduce(bad.to(run.fabric.device), reduce_op="sum").item():
        raise NonFiniteLossError(f"non-finite weights after step {run.state.step}: not saved. {_advice(run.cfg)}")


def _advice(cfg: PretrainConfig) -> str:
    from checkpoints_util.layout import latest_checkpoint

    return (f"The newest checkpoint is {latest_checkpoint(cfg.out_dir) or 'none'}; resume from it with a lower "
            f"optimizer.lr (or check the data).")


def _stopped(run: Run, signum: int) -> Result:
    result = run.result
    result.stopped_by = signal.Signals(signum).name
    result.exit_code = 0 if signum == signal.SIGUSR1 else 128 + int(signum)
    run.fabric.print(f"stopped by {result.stopped_by} after step {run.state.step}; checkpoint "
                     f"{result.last_checkpoint}")
    _print_tensorboard(run)
    return result


def _print_tensorboard(run: Run) -> None:
    if run.log.tensorboard_dir is not None:
        run.fabric.print(f"TensorBoard logs: {run.log.tensorboard_dir}  (tensorboard --logdir "
                         f"{run.log.tensorboard_dir})")
