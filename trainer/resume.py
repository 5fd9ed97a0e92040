"""Stopping and resuming a run exactly: Ctrl-C/SIGTERM stop at the next optimizer step on every rank, the
resume state (model, optimizer, scaler, position in the data, RNGs, wandb id) and step-numbered checkpoints.
"""
import os
import random
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist

from model.checkpoint import atomic_write, load_strict, sidecar_path


def ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which saves at the next step and stops them;
    a worker that died of it would otherwise break the batch the save waits for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next optimizer step, on every rank at once."""

    def __init__(self, ddp: bool):
        self.signum, self.name, self.ddp = 0, "", ddp
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        # The flag travels on a CPU (gloo) group, so checking it every step never waits for the GPU.
        self.group = dist.new_group(backend="gloo") if ddp and dist.get_backend() != "gloo" else None

    def _handle(self, signum, frame):
        self.signum, self.name = signum, signal.Signals(signum).name

    def agreed(self) -> bool:
        if not self.ddp:
            return self.signum != 0
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)  # every rank stops at the same step
        if flag.item() and not self.signum:
            self.signum, self.name = int(flag.item()), signal.Signals(int(flag.item())).name
        return bool(flag.item())


def rng_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(path, model, optimizer, scaler, step, epoch, step_in_epoch, layout, wandb_id):
    """Everything an exact continuation needs, as tensors and plain values (loadable with weights_only=True),
    written atomically. Saved at optimizer-step boundaries, so the accumulation phase is always 0."""
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
             "step_in_epoch": step_in_epoch, "layout": layout, "rng": rng_state(), "wandb_id": wandb_id}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path, model, optimizer, scaler, layout, steps_per_epoch, master):
    """Restore a run saved by save_resume_state; returns (step, epoch, micro-batches to skip, wandb id).
    With another layout (ranks x batch x accumulation) the position in the epoch is mapped by samples seen."""
    if not path.is_file():
        raise SystemExit(f"--resume: {path} does not exist (a run saves it every --save_interval steps and when "
                         "stopped by Ctrl-C or SIGTERM); run without --resume to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"--resume: cannot read {path}: {type(e).__name__}: {e}") from None
    load_strict(model, state["model"], where=str(path))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    step, epoch, in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    old = state["layout"]
    if old != layout:
        global_old = old["world"] * old["batch_size"] * old["accumulation"]
        global_new = layout["world"] * layout["batch_size"] * layout["accumulation"]
        samples = in_epoch * global_old
        in_epoch_new = samples // global_new
        if master:
            print(f"resume: the layout changed from {old} to {layout}. The position in epoch {epoch}, "
                  f"{samples} samples (step {in_epoch} of {global_old}), maps to step {in_epoch_new} of "
                  f"{global_new}; this epoch's order is re-derived for the new layout, so up to one global batch "
                  "of it may repeat or be skipped. The result is not bit-identical to an uninterrupted run.")
        in_epoch = in_epoch_new
    if in_epoch >= steps_per_epoch:
        epoch, in_epoch = epoch + 1, 0
    if master:
        print(f"resumed from {path}: step {step}, epoch {epoch}, step {in_epoch} of the epoch")
    return step, epoch, in_epoch * layout["accumulation"], state.get("wandb_id")


def keep_step_checkpoint(latest, step, keep_last):
    """Copy the latest checkpoint (and sidecar) to {name}_step{step} and delete all but the newest keep_last."""
    stem = latest.with_suffix("")
    copy = stem.with_name(f"{stem.name}_step{step:08d}{latest.suffix}")
    for src, dst in ((latest, copy), (sidecar_path(latest), sidecar_path(copy))):
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    steps = sorted(latest.parent.glob(f"{stem.name}_step*{latest.suffix}"))
    for old in steps[:-keep_last]:
        old.unlink()
        sidecar_path(old).unlink(missing_ok=True)


def kill_for_tests(step: int):
    """The tests' way to interrupt a run: MINIMIND_TEST_SIGNAL="KILL:3" sends SIGKILL to this process right
    after step 3 (TERM, INT likewise). Does nothing when the variable is unset."""
    spec = os.environ.get("MINIMIND_TEST_SIGNAL")
    if spec and int(spec.split(":")[1]) == step:
        os.kill(os.getpid(), getattr(signal, "SIG" + spec.split(":")[0]))
