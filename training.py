"""What the finetunes' training loops share: the model they start from and the line that describes
it, the weights that train, a loss that must stay finite, the best weights kept aside and put back
at the end, the state --resume continues from, and the texts a script takes from its flags or from
stdin.

    from training import best_weights, check_finite, model_to_finetune, report_model, restore, trainable_parameters
    model, card = model_to_finetune("gpt2", None, 123, device, "--init random --preset mini --lr 3e-4")
    trainable = trainable_parameters(model)
    n_trainable = report_model(model, args, device, dtype)  # prints "model: gpt2, ...M parameters; training ..."
    check_finite(loss, f"step {step}", "nothing was saved")  # UserError if the loss is nan or inf
    best = best_weights(trainable)  # after a validation that improved
    restore(trainable, best)  # the model ends with the best weights seen
"""
import argparse
import io
import sys
from pathlib import Path

import torch
import torch.nn as nn

from common import UserError, atomic_write, refuse_changed_flags
from download import DownloadError, cache_dir
from load_gpt2 import GPT2_REPOS, load_model



def model_to_finetune(init: str, preset: str | None, seed: int, device: torch.device,
                   offline: str) -> tuple[nn.Module, dict]:
    """The --init model and its card, after seeding torch (a random init, a new head and LoRA's matrices
    draw from it). A download that fails says where the files go in the cache, and how to run without
    them: `offline`, the flags of a small model from scratch, or a local file."""
    torch.manual_seed(seed)
    try:
        return load_model(init, preset=preset, device=device)
    except DownloadError as e:
        repo = GPT2_REPOS.get(init)
        place = (f"; or put {repo}'s config.json and model.safetensors in {cache_dir() / 'hf' / repo}"
                 if repo else "")
        raise DownloadError(f"{e}{place}; or run without downloading weights: {offline} (a small model from "
                            f"scratch), or --init PATH to a local checkpoint or model.safetensors") from None


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every weight the optimizer updates: what a run keeps, saves and restores."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def check_finite(loss: torch.Tensor, where: str, kept: str, lower: str = "--lr") -> None:
    """Stop the run with one sentence when the loss is nan or inf: every later step would be too.

    where: the step it happened at ('step 12 (epoch 1)'); kept: what is still on disk; lower: the flags
    whose smaller value may keep it finite."""
    if not torch.isfinite(loss):
        raise UserError(f"the loss became {loss.item()} at {where}, so training stopped; {kept}; try a lower {lower}")


def best_weights(trainable: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights, name -> tensor. The caller binds the new dict in one assignment,
    so a Ctrl-C while copying leaves the previous best intact."""
    return {name: p.detach().clone() for name, p in trainable}


@torch.no_grad()
def restore(trainable: list[tuple[str, nn.Parameter]], weights: dict[str, torch.Tensor]) -> None:
    """Put saved weights back into the model (a no-op when none were saved)."""
    if weights:
        for name, p in trainable:
            p.copy_(weights[name])


STATE_FILE = "state.pt"  # an unfinished run's state, for --resume; a run that finishes removes it


def check_existing_run(out_dir: Path, args: argparse.Namespace, finished: tuple[Path, ...]) -> None:
    """Refuse to start over a run in out_dir unless --force (replace it) or --resume (continue it): an
    unfinished run holds STATE_FILE, a finished one any of the files `finished` (its model, its results)."""
    if args.force or args.resume:
        return
    if (out_dir / STATE_FILE).exists():
        raise UserError(f"{out_dir} holds an unfinished run ({STATE_FILE}); add --resume to continue it, --force to "
                        f"replace it, or choose another --out-dir")
    for path in finished:
        if path.exists():
            raise UserError(f"{out_dir} already holds a run ({path if path.parent != out_dir else path.name}); add "
                            f"--force to replace it, or choose another --out-dir")


def save_state(path: Path, trainable: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
               generator: torch.Generator | None, progress: dict, args: argparse.Namespace) -> None:
    """Everything --resume needs, written atomically: the trainable weights (the frozen ones come back
    from --init and the seed exactly), the optimizer, the batch order's generator, the command's flags
    and the loop's progress (any tensors too: finetune_preference keeps its reference log-probs there).

    generator None: the loop keeps the state its epoch's order was drawn from in progress itself (a
    state saved in mid-epoch must draw that epoch's order again, not the next one)."""
    buffer = io.BytesIO()
    torch.save({"trainable": {name: p.detach().cpu() for name, p in trainable},
                "optimizer": optimizer.state_dict(),
                **({"generator": generator.get_state()} if generator is not None else {}),
                "args": vars(args), **progress}, buffer)
    atomic_write(path, buffer.getvalue())


def load_state(path: Path, args: argparse.Namespace, must_match: tuple[str, ...],
               why_missing: str = "a finished run keeps no state") -> dict:
    """The state saved by save_state, checked against this command's flags: those in must_match change
    what a resumed run computes, so they must be the run's own (--epochs may grow). why_missing: the
    likely reason when there is no state at path."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_args = state["args"]
    except FileNotFoundError:
        raise UserError(f"--resume: {path} does not exist ({why_missing}); start a run without --resume") from None
    except Exception:  # truncated, not ours: unusable either way
        raise UserError(f"--resume: {path} is not a readable training state; start again with --force") from None
    refuse_changed_flags(saved_args, args, must_match, path.parent, "start a new run with --force or another --out-dir")
    return state


def report_model(model: nn.Module, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                 model_type: str | None = None, size: str = "", then: str = "") -> int:
    """Print the run's 'model: ...' line (--init and --preset, the model's size, what trains, where)
    and return the number of trainable weights. model_type, size (after the parameter count) and then
    (at the end) are a stage's own details."""
    n_trainable = sum(p.numel() for _, p in trainable_parameters(model))
    print(f"model: {args.init}{' ' + args.preset if args.preset else ''}"
          f"{f' ({model_type})' if model_type else ''}, {model.num_params() / 1e6:.1f}M parameters{size}; "
          f"training {args.trainable}: {n_trainable / 1e6:.2f}M parameters on {device} "
          f"({str(dtype).removeprefix('torch.')}){then}")
    return n_trainable


def read_inputs(values: list[str], flag: str, what: str, verb: str) -> list[str]:
    """The texts a repeatable flag names (--ask, --predict); '-' reads one text per line of stdin,
    blank lines skipped. An empty text, or nothing at all, is a UserError: there is nothing to do."""
    texts = []
    for text in values:
        if text == "-":
            texts += [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        elif not text.strip():
            raise UserError(f"{flag} got an empty {what}; there is nothing to {verb}")
        else:
            texts.append(text)
    if not texts:
        raise UserError(f"stdin held no {what} to {verb} ({flag} - reads one {what} per line)")
    return texts
