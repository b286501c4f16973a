"""Preference tuning with DPO: teach an instruction-finetuned model which of two answers people prefer.

    python finetune_preference.py        # out/instruct/model.pt (finetune_instruct's), the book's preference data

Reading order: the data (the book's instruction entries, each with a preferred "chosen" and a
"rejected" answer, split as finetune_instruct splits them), the response log-probabilities and the
DPO loss, the reference log-probabilities (computed once), training (AdamW, validation, the best
weights kept, the state saved for --resume), the answers to the test set, and the command line.

Direct Preference Optimization (Rafailov et al., 2023) trains the policy pi, starting from the
reference model ref, on the loss

    -log sigmoid(beta * ((log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))))

where log pi(y) is the log-probability of a response's tokens given the prompt (prompt and padding
never count). beta * (log pi(y) - log ref(y)) is the "reward" of response y: the loss falls as the
chosen response's reward rises above the rejected one's, and beta sets how far pi may move from ref.

What differs from the recipe in "LLMs from scratch" (ch. 7, "DPO from scratch"), and why:
- The reference model never changes, so its log-probabilities do not either: they are computed
  once, before the first step, for every pair, and kept (a few numbers per pair). The book keeps a
  second model in memory and runs it on every batch: two of its four forward passes per step.
- Chosen and rejected responses go through the policy in one forward pass of 2B rows (one launch of
  every kernel instead of two; on a GPU that is faster, on a CPU the same).
- The LM head runs only where a response token is scored (never on the prompt or the padding), and
  its log-softmax is taken there only: the book computes (B, T, 50,257) log-probabilities per pass.
- Batches group pairs of similar length (as finetune_instruct does), and validation covers the
  whole validation split every --eval-every steps; the best validation loss's weights are saved.
"""
import argparse
import dataclasses
import json
import math
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (ArgumentParser, RunLock, SEED, UserError, atomic_write, clock, non_negative_float,
                    non_negative_int, positive_float, positive_int, run_stage, side_by_side, writable_folder)
from data import Example, collate, length_grouped_batches, load_entries, make_example, random_batches, split_entries
from download import DownloadError, fetch
from generate import answer
from load_gpt2 import add_init_args, check_preset, model_card, tokenizer_for
from loss_curve import write_loss_svg
from model import GPT, IGNORE, add_device_args, add_lora, autocast, device_and_dtype, merge_lora, save_checkpoint
from templates import TEMPLATES, Template, default_template, prompt_ids
from training import (STATE_FILE, best_weights, check_existing_run, check_finite, load_state, model_to_finetune,
                      report_model, restore, save_state, trainable_parameters)



PREFERENCE_RELPATH = "instruct/instruction-data-with-preference.json"  # one of download.KNOWN_FILES
MODEL_FILE, RESPONSES_FILE, METRICS_FILE = "model.pt", "test-responses.json", "metrics.json"
LOG_FILE = "metrics.jsonl"
LOSS_SVG = "loss.svg"  # metrics.jsonl's loss and reward margin, redrawn at each evaluation, for a browser
CURVES = (("train_loss", "training loss"), ("val_loss", "validation loss"),
          ("train_reward_margin", "training reward margin"), ("val_reward_margin", "validation reward margin"))
INSTRUCT_MODEL = "out/instruct/model.pt"  # finetune_instruct.py's default --out-dir


# ---------------------------------------------------------------------------------------------------
# Data: instruction entries with a "chosen" and a "rejected" response each

def check_pairs(entries: list[dict], source: str) -> tuple[list[dict], list[int]]:
    """The entries whose chosen and rejected responses differ, and the indices of those that do not
    (they carry no preference: their loss is ln 2 and their gradient zero, whatever the model).

    An entry without a non-empty chosen or rejected string is a UserError naming it."""
    kept, identical = [], []
    for i, entry in enumerate(entries):
        for field in ("chosen", "rejected"):
            if field not in entry:
                raise UserError(f"{source} entry {i} has no {field!r}; preference tuning needs a 'chosen' and a "
                                f"'rejected' response in every entry")
            if not isinstance(entry[field], str) or not entry[field].strip():
                raise UserError(f"{source} entry {i} has an empty or non-string {field!r}")
        if entry["chosen"].strip() == entry["rejected"].strip():
            identical.append(i)
        else:
            kept.append(entry)
    return kept, identical


def default_preference_data() -> Path:
    """The book's instruction-data-with-preference.json, downloaded once into the cache."""
    try:
        return fetch(PREFERENCE_RELPATH)
    except DownloadError as e:
        raise DownloadError(f"{e}; or pass --data with a local copy of instruction-data-with-preference.json") \
            from None


@dataclasses.dataclass
class Pair:
    chosen: Example  # prompt + chosen response + end token
    rejected: Example  # the same prompt + rejected response + end token


def make_pair(tokenizer, template: Template, entry: dict, max_length: int, name: str) -> Pair:
    """An entry's two sequences; a response that does not fit in max_length tokens is a UserError (cut,
    it would compare two truncated answers, or none at all)."""
    pair = []
    for field in ("chosen", "rejected"):
        example, cut = make_example(tokenizer, template, {**entry, "output": entry[field]}, max_length)
        if cut:
            full = len(make_example(tokenizer, template, {**entry, "output": entry[field]}, 10**9)[0].ids) - 1
            raise UserError(f"{name}: its prompt and {field} response take {full} tokens, more than the "
                            f"{max_length} the model reads; shorten or remove the entry, or start from a model "
                            f"with a longer context")
        pair.append(example)
    return Pair(*pair)


def prepare(splits: dict[str, list[dict]], tokenizer, template: Template, max_length: int,
            source: str) -> dict[str, list[Pair]]:
    """Tokenized pairs of the train and validation splits."""
    pairs = {}
    for name in ("train", "val"):
        pairs[name] = [make_pair(tokenizer, template, e, max_length, f"{source} ({name} entry {i})")
                       for i, e in enumerate(splits[name])]
        if not pairs[name]:
            raise UserError(f"{source} leaves no {name} pair with different chosen and rejected responses")
    return pairs


def pair_length(pair: Pair) -> int:
    return max(len(pair.chosen.ids), len(pair.rejected.ids)) - 1


# ---------------------------------------------------------------------------------------------------
# Log-probabilities of responses, and the DPO loss

def score(model: GPT, hidden: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor, n: int,
          kind: str) -> torch.Tensor:
    """log p(response | prompt) of n sequences, (n,) float32, from the hidden states that predict their
    K scored tokens: hidden (K, C), targets (K,), owners (K,) the sequence each token belongs to. The sum
    of the tokens' log-probs, or with kind "mean" that sum / their number. The LM head and its
    log-softmax run on these K positions only, never on a prompt or padding."""
    token_logprobs = -F.cross_entropy(model.lm_head(hidden).float(), targets, reduction="none")  # (K,)
    total = torch.zeros(n, device=hidden.device).index_add(0, owners, token_logprobs)  # (n,)
    if kind == "sum":
        return total
    return total / torch.bincount(owners, minlength=n)


def response_logprobs(model: GPT, examples: Sequence[Example], pad_id: int, kind: str,
                      device: torch.device) -> torch.Tensor:
    """log p(response | prompt) of each example (its response tokens and end token), (N,) float32;
    the N examples as N rows of one forward pass, padded on the right to the longest."""
    inputs, targets = collate(examples, pad_id, mask_prompt=True)  # (N, T); prompt and padding IGNORE
    inputs, targets = inputs.to(device), targets.to(device)
    keep = targets != IGNORE  # (N, T)
    owners = keep.nonzero()[:, 0]  # (K,) the example each scored token belongs to
    return score(model, model.hidden(inputs)[keep], targets[keep], owners, len(examples), kind)


def pack_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Each pair as one row: its prompt once, then the chosen response, then the rejected one.

    A rejected token may attend to the prompt and the rejected tokens before it, never to the chosen
    response, and its position continues from the prompt's: each response sees exactly what it sees
    in a sequence of its own, so the log-probs are the same, for prompt + chosen + rejected tokens
    instead of twice the prompt. A response's last token is only a target, never an input.
    Returns ids and positions (B, T), mask (B, T, T), and for the 2B responses' K scored tokens: where
    (K,) (the index in the flattened (B * T) row that predicts each), targets (K,) and owners (K,)
    (chosen of pair b: b; rejected: B + b)."""
    B = len(pairs)
    parts = [(p.chosen.ids[:p.chosen.prompt_len], p.chosen.ids[p.chosen.prompt_len:],
              p.rejected.ids[p.rejected.prompt_len:]) for p in pairs]
    T = max(len(prompt) + len(chosen) + len(rejected) - 2 for prompt, chosen, rejected in parts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
    where, targets, owners = [], [], []
    for b, (prompt, chosen, rejected) in enumerate(parts):
        P, C, R = len(prompt), len(chosen), len(rejected)
        ids[b, :P + C + R - 2] = torch.tensor(prompt + chosen[:-1] + rejected[:-1])
        positions[b, :P + C + R - 2] = torch.cat([torch.arange(P + C - 1), torch.arange(P, P + R - 1)])
        segment[b, :P], segment[b, P:P + C - 1], segment[b, P + C - 1:P + C + R - 2] = 0, 1, 2
        # target k of a response is predicted by the token before it: the prompt's last for k = 0
        where += [b * T + P - 1] + [b * T + P + k - 1 for k in range(1, C)]
        where += [b * T + P - 1] + [b * T + P + C - 1 + k - 1 for k in range(1, R)]
        targets += chosen + rejected
        owners += [b] * C + [B + b] * R
    slots = torch.arange(T)
    mask = (slots[None, :] <= slots[:, None]) & (segment[:, None, :] >= 0)  # causal, real keys: (B, T, T)
    mask &= ~((segment[:, :, None] == 2) & (segment[:, None, :] == 1))  # rejected never sees chosen
    mask |= torch.eye(T, dtype=torch.bool)  # a padding query sees itself: a finite, unused output
    return {"ids": ids, "positions": positions, "mask": mask, "where": torch.tensor(where),
            "targets": torch.tensor(targets), "owners": torch.tensor(owners)}


def packable(model: GPT, pairs: Sequence[Pair]) -> bool:
    """Whether the pairs fit pack_pairs' rows (not with a sliding window, whose mask is by slot)."""
    return model.config.sliding_window is None and max(
        len(p.chosen.ids) + len(p.rejected.ids) - p.chosen.prompt_len - 2 for p in pairs) <= model.config.block_size


def pair_logprobs(model: GPT, pairs: Sequence[Pair], pad_id: int, kind: str,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs (B,) each, from one forward pass: packed rows sharing the prompt
    (see pack_pairs), else the 2B sequences as rows of their own."""
    if not packable(model, pairs):
        logprobs = response_logprobs(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, kind,
                                     device)
        return logprobs[:len(pairs)], logprobs[len(pairs):]
    batch = {key: value.to(device) for key, value in pack_pairs(pairs, pad_id).items()}
    hidden = model.hidden(batch["ids"], attention_mask=batch["mask"], positions=batch["positions"])  # (B, T, C)
    logprobs = score(model, hidden.flatten(0, 1)[batch["where"]], batch["targets"], batch["owners"], 2 * len(pairs),
                     kind)
    return logprobs[:len(pairs)], logprobs[len(pairs):]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean DPO loss over a batch, and each pair's chosen and rejected rewards (B,), detached.

    A reward is beta * (log pi(y) - log ref(y)): how much more likely the policy makes the response
    than the reference did, in units scaled by beta."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def evaluation_batches(pairs: Sequence[Pair], batch_size: int) -> list[list[int]]:
    """Batches of similar length in a fixed order: the reference sweep and every evaluation use these,
    so before any update the policy's numbers equal the reference's exactly."""
    order = sorted(range(len(pairs)), key=lambda i: pair_length(pairs[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def reference_logprobs(model: GPT, pairs: Sequence[Pair], batch_size: int, pad_id: int, kind: str,
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (starting) model's chosen and rejected log-probs of every pair, (N, 2) float32 on the CPU."""
    model.eval()
    refs = torch.zeros(len(pairs), 2)
    for index in evaluation_batches(pairs, batch_size):
        with autocast(device, dtype):
            chosen, rejected = pair_logprobs(model, [pairs[i] for i in index], pad_id, kind, device)
        refs[index] = torch.stack([chosen, rejected], 1).float().cpu()
    return refs


@torch.no_grad()
def evaluate(model: GPT, pairs: Sequence[Pair], refs: torch.Tensor, args: argparse.Namespace, pad_id: int,
             device: torch.device, dtype: torch.dtype) -> dict:
    """Mean loss, rewards, reward margin and reward accuracy (the share of pairs whose chosen reward
    is above the rejected one's) over the pairs."""
    model.eval()
    sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_margin": 0.0,
            "reward_accuracy": 0.0}
    for index in evaluation_batches(pairs, args.batch_size):
        with autocast(device, dtype):
            chosen, rejected = pair_logprobs(model, [pairs[i] for i in index], pad_id, args.logprobs, device)
        ref = refs[index].to(device)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen.float(), rejected.float(), ref[:, 0], ref[:, 1],
                                                          args.beta)
        sums["loss"] += loss.item() * len(index)
        sums["chosen_reward"] += chosen_rewards.sum().item()
        sums["rejected_reward"] += rejected_rewards.sum().item()
        sums["reward_margin"] += (chosen_rewards - rejected_rewards).sum().item()
        sums["reward_accuracy"] += (chosen_rewards > rejected_rewards).sum().item()
    return {key: value / len(pairs) for key, value in sums.items()}


# ---------------------------------------------------------------------------------------------------
# Training: the state of a run, saved at every evaluation for --resume

# Flags that change what a resumed run computes; --epochs may grow, --device or --eval-every may change.
RESUME_MUST_MATCH = ("data", "init", "preset", "template", "trainable", "lora_rank", "lora_alpha", "batch_size",
                     "lr", "weight_decay", "beta", "logprobs", "group_by_length", "seed", "dtype")


def epoch_batches(pairs: Sequence[Pair], args: argparse.Namespace, generator: torch.Generator) -> list[list[int]]:
    if args.group_by_length:
        return length_grouped_batches([pair_length(p) for p in pairs], args.batch_size, generator)
    return random_batches(len(pairs), args.batch_size, generator)


def record_evaluation(model: GPT, pairs: dict[str, list[Pair]], refs: dict[str, torch.Tensor], step: int,
                      args: argparse.Namespace, pad_id: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One metrics.jsonl record: the train metrics over the fixed training sample, then validation's."""
    record = {"step": step}
    for split, part in (("train", "train_sample"), ("val", "val")):
        for key, value in evaluate(model, pairs[part], refs[part], args, pad_id, device, dtype).items():
            record[f"{split}_{key}"] = value
    return record


def training_step(model: GPT, optimizer: torch.optim.Optimizer, batch: list[Pair], ref: torch.Tensor,
                  args: argparse.Namespace, pad_id: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One AdamW step on a batch; ref (B, 2) its reference log-probs. Returns the loss, or raises on a
    loss that is not finite (before the update)."""
    model.train()
    with autocast(device, dtype):
        chosen, rejected = pair_logprobs(model, batch, pad_id, args.logprobs, device)
    ref = ref.to(device)
    loss, _, _ = dpo_loss(chosen.float(), rejected.float(), ref[:, 0], ref[:, 1], args.beta)
    if not torch.isfinite(loss):  # fit stops the run: no update from it
        return loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def fit(model: GPT, pairs: dict[str, list[Pair]], refs: dict[str, torch.Tensor], args: argparse.Namespace,
        pad_id: int, device: torch.device, dtype: torch.dtype, out_dir: Path, resumed: dict | None) -> dict:
    """AdamW over the training pairs for args.epochs; an evaluation (a metrics.jsonl record, and the
    state for --resume) at step 0 and every args.eval_every steps and at the end. The model ends with
    the weights of the best validation loss seen after training began.

    Ctrl-C stops the run (the best weights so far are then in the model, if any); a loss that is not
    finite stops it with a UserError (state.pt keeps the last evaluation's state)."""
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, betas=(0.9, 0.999), device_type=device.type)
    trainable = trainable_parameters(model)
    train = pairs["train"]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(args.seed)
    progress = {"step": 0, "generator": generator.get_state(), "history": [], "best_step": None,
                "best_val_loss": math.inf, "best_weights": {}, "refs": refs}
    if resumed is not None:
        restore(trainable, resumed["trainable"])
        optimizer.load_state_dict(resumed["optimizer"])
        progress = {key: resumed[key] for key in progress}
        print(f"resuming at step {progress['step']} of {total_steps}")
    step, history, interrupted = progress["step"], progress["history"], False  # history is progress's list
    train_losses = []  # each step's loss, of the steps this process runs
    interval = {"losses": [], "tokens": 0, "seconds": 0.0}
    t_start = time.perf_counter()
    try:
        if not history:
            evaluation_point(model, pairs, refs, 0, trainable, optimizer, progress, args, pad_id, device, dtype,
                             out_dir)
            print(f"step {0:>5}/{total_steps} | validation loss before tuning {history[-1]['val_loss']:.4f} "
                  f"(ln 2 = {math.log(2):.4f}: the policy is the reference)")
        while step < total_steps:
            epoch, done = divmod(step, steps_per_epoch)
            generator.set_state(progress["generator"])  # the state this epoch's order was drawn from
            batches = epoch_batches(train, args, generator)
            for index in batches[done:]:
                t0 = time.perf_counter()
                loss = training_step(model, optimizer, [train[i] for i in index], refs["train"][index], args, pad_id,
                                     device, dtype)
                check_finite(loss, f"step {step + 1}", "no model was saved", lower="--lr or --beta")
                step += 1
                train_losses.append(loss.item())
                interval["losses"].append(train_losses[-1])
                interval["tokens"] += sum(len(train[i].chosen.ids) + len(train[i].rejected.ids) - 2 for i in index)
                interval["seconds"] += time.perf_counter() - t0
                if step % steps_per_epoch == 0:
                    progress["generator"] = generator.get_state()  # the next epoch's order starts here
                evaluated = step % args.eval_every == 0 or step == total_steps
                if evaluated:
                    evaluation_point(model, pairs, refs, step, trainable, optimizer, progress, args, pad_id, device,
                                     dtype, out_dir)
                if step % args.log_every == 0 or evaluated:
                    print_progress(step, total_steps, epoch + 1, interval, history[-1] if evaluated else None,
                                   progress, args)
                    interval = {"losses": [], "tokens": 0, "seconds": 0.0}
    except KeyboardInterrupt:  # a half-done step does not matter: the best weights below replace it
        interrupted = True
        print(f"\nCtrl-C: stopped at step {step} of {total_steps}")
    restore(trainable, progress["best_weights"])  # {} when no evaluation after training began
    return {"steps": step, "total_steps": total_steps, "history": history, "train_losses": train_losses,
            "best_step": progress["best_step"],
            "best_val_loss": progress["best_val_loss"] if progress["best_step"] else None,
            "interrupted": interrupted, "train_seconds": time.perf_counter() - t_start}


def evaluation_point(model: GPT, pairs: dict[str, list[Pair]], refs: dict[str, torch.Tensor], step: int,
                     trainable: list, optimizer: torch.optim.Optimizer, progress: dict, args: argparse.Namespace,
                     pad_id: int, device: torch.device, dtype: torch.dtype, out_dir: Path) -> None:
    """Evaluate, log the record, keep the best weights, and save the state for --resume (at step 0 too,
    so that a run stopped before its first evaluation resumes without recomputing the reference)."""
    record = record_evaluation(model, pairs, refs, step, args, pad_id, device, dtype)
    progress["history"].append(record)
    atomic_write(out_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in progress["history"]))
    write_loss_svg(out_dir / LOSS_SVG, progress["history"], series=CURVES,
                   title="finetune_preference.py: DPO loss and reward margin (chosen minus rejected)")
    if step > 0 and record["val_loss"] < progress["best_val_loss"]:  # the best weights are tuned ones
        progress["best_weights"] = best_weights(trainable)
        progress.update(best_step=step, best_val_loss=record["val_loss"])
    progress["step"] = step
    save_state(out_dir / STATE_FILE, trainable, optimizer, None, progress, args)  # progress has the generator


def print_progress(step: int, total_steps: int, epoch: int, interval: dict, record: dict | None, progress: dict,
                   args: argparse.Namespace) -> None:
    mean_loss = sum(interval["losses"]) / len(interval["losses"])
    eta = interval["seconds"] / len(interval["losses"]) * (total_steps - step)
    val = (f"val loss {record['val_loss']:.4f} margin {record['val_reward_margin']:+.3f} "
           f"acc {record['val_reward_accuracy']:4.0%}" if record else "val loss      -")
    print(f"step {step:>5}/{total_steps} | epoch {epoch}/{args.epochs} | loss {mean_loss:.4f} | {val} | "
          f"{interval['tokens'] / max(interval['seconds'], 1e-9):6.0f} tok/s | "
          f"{1000 * interval['seconds'] / len(interval['losses']):6.0f} ms/step | eta {clock(eta)}"
          + ("  (best so far)" if record and progress["best_step"] == step else ""), flush=True)


# ---------------------------------------------------------------------------------------------------
# Training run: data in, a tuned model, its answers to the test set and the metrics out

def read_splits(args: argparse.Namespace) -> tuple[Path, dict[str, list[dict]], list[int]]:
    """The book's split of the data (the same test items as finetune_instruct's), with the train and
    validation pairs whose two responses are the same left out; their entry indices are returned."""
    data_path = Path(args.data) if args.data else default_preference_data()
    entries = load_entries(data_path)
    _, identical = check_pairs(entries, str(data_path))
    splits = split_entries(entries)
    test_start = len(splits["train"])
    test_end = test_start + len(splits["test"])
    for name in ("train", "val"):
        splits[name], _ = check_pairs(splits[name], str(data_path))
    return data_path, splits, [i for i in identical if not test_start <= i < test_end]


def starting_model(args: argparse.Namespace, device: torch.device) -> tuple[GPT, dict]:
    """The --init model, with LoRA adapters under --trainable lora, and load_model's extra."""
    if args.init == INSTRUCT_MODEL and not Path(INSTRUCT_MODEL).is_file():
        raise UserError(f"{INSTRUCT_MODEL} does not exist; finetune a model on instructions first (python "
                        f"finetune_instruct.py), or name one with --init (--init random --preset mini to try the "
                        f"pipeline)")
    model, extra = model_to_finetune(args.init, args.preset, args.seed, device, "--init random --preset mini")
    if model.config.num_classes is not None:
        raise UserError(f"{args.init} is a classifier; preference tuning needs a language model")
    if args.trainable == "lora":
        model.requires_grad_(False)
        add_lora(model, args.lora_rank, args.lora_alpha)  # only LoRA's A and B train
    return model, extra


def compare_answers(path: Path, tested: list[dict], n_show: int = 3) -> dict:
    """The answers of another run (finetune_instruct's test-responses.json) and ours to the same test
    items, side by side; how many changed."""
    try:
        theirs = {(e["instruction"], e.get("input", "")): e["model_response"]
                  for e in json.loads(path.read_text(encoding="utf-8"))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"--compare {path} is not a test-responses.json (a JSON list of entries with instruction, "
                        f"input and model_response)") from None
    pairs = [(e, theirs[(e["instruction"], e["input"])]) for e in tested if (e["instruction"], e["input"]) in theirs]
    changed = sum(before != e["model_response"] for e, before in pairs)
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 6) // 2)
    print(f"\n--compare: {len(pairs)} of the {len(tested)} test items are in {path}; {changed} answers changed")
    for entry, before in pairs[:n_show]:
        print(f"\n{entry['instruction']}" + (f"\n  input: {entry['input']}" if entry["input"] else ""))
        print(side_by_side(before, entry["model_response"], ("before (--compare):", "preference-tuned:"), width))
    return {"path": str(path), "items": len(pairs), "changed": changed}


def default_compare(args: argparse.Namespace) -> Path | None:
    """--compare's default: the test answers beside the --init checkpoint, when there are some."""
    if args.compare:
        return Path(args.compare)
    beside = Path(args.init).parent / RESPONSES_FILE
    return beside if Path(args.init).is_file() and beside.is_file() else None


def write_answers(model: GPT, splits: dict[str, list[dict]], tokenizer, template: Template, args: argparse.Namespace,
                  device: torch.device, dtype: torch.dtype, out_dir: Path, metrics: dict) -> list[dict] | None:
    """The test entries, each with the model's model_response, written to RESPONSES_FILE; None on Ctrl-C."""
    print(f"answering the {len(splits['test'])} test instructions (at most {args.max_new_tokens} new tokens each)")
    t_answers = time.perf_counter()
    prompts = [prompt_ids(tokenizer, template, e["instruction"], e["input"]) for e in splits["test"]]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        responses = answer(model, prompts, tokenizer, template, max_new_tokens=args.max_new_tokens,
                           batch_size=args.answer_batch_size, device=device, dtype=dtype, generator=generator)
    except KeyboardInterrupt:
        print("\nCtrl-C: stopped answering")
        metrics["interrupted"] = True
        return None
    metrics["answers_seconds"] = time.perf_counter() - t_answers
    tested = [{**entry, "model_response": r} for entry, r in zip(splits["test"], responses)]
    atomic_write(out_dir / RESPONSES_FILE, json.dumps(tested, indent=4, ensure_ascii=False))
    metrics["test_responses"] = str(out_dir / RESPONSES_FILE)
    return tested


def tune(model: GPT, extra: dict, splits: dict[str, list[dict]], tokenizer, template: Template,
         args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out_dir: Path, source: str,
         resumed: dict | None) -> dict:
    """Reference log-probs (or the resumed run's), training, and the best weights saved as MODEL_FILE."""
    pairs = prepare(splits, tokenizer, template, model.config.block_size, source)
    pairs["train_sample"] = pairs["train"][:len(pairs["val"])]  # the fixed sample the train_* metrics cover
    pad_id = tokenizer.eos_id  # any id: padding is never attended to nor scored
    if resumed is not None:
        refs = resumed["refs"]
    else:
        t0 = time.perf_counter()
        refs = {name: reference_logprobs(model, part, args.batch_size, pad_id, args.logprobs, device, dtype)
                for name, part in pairs.items()}
        print(f"reference log-probs of {sum(len(p) for p in pairs.values())} pairs computed once in "
              f"{time.perf_counter() - t0:.1f} s")
    result = fit(model, pairs, refs, args, pad_id, device, dtype, out_dir, resumed)
    if result["best_step"] is None:
        if not result["interrupted"]:
            raise UserError("the validation loss was never finite, so no model was saved; try a lower --lr")
        print("no model was saved: Ctrl-C came before the first evaluation after training began")
        return result
    merge_lora(model)  # a no-op unless --trainable lora
    save_checkpoint(out_dir / MODEL_FILE, model, **model_card(extra), template=template.name, init=args.init,
                    trainable=args.trainable, step=result["best_step"], val_loss=result["best_val_loss"],
                    beta=args.beta, logprobs=args.logprobs)
    print(f"saved the weights of step {result['best_step']} (validation loss {result['best_val_loss']:.4f}) to "
          f"{out_dir / MODEL_FILE}")
    return {**result, "checkpoint": str(out_dir / MODEL_FILE)}


def train_main(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    device, dtype = device_and_dtype(args.device, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (outside autocast) on tensor cores
    out_dir = writable_folder(args.out_dir)
    if args.compare and not Path(args.compare).is_file():  # found out before the run, not after it
        raise UserError(f"--compare {args.compare} does not exist; name a test-responses.json written by "
                        f"finetune_instruct.py")
    with RunLock(out_dir):
        check_existing_run(out_dir, args, tuple(out_dir / name for name in (MODEL_FILE, METRICS_FILE, RESPONSES_FILE,
                                                                             LOG_FILE)))
        if args.force:  # what describes the old run goes now; its model stays until the new one replaces it
            for name in (METRICS_FILE, RESPONSES_FILE, LOG_FILE, STATE_FILE):
                (out_dir / name).unlink(missing_ok=True)
        resumed = (load_state(out_dir / STATE_FILE, args, RESUME_MUST_MATCH, "a finished run keeps no state, and an "
                              "unfinished one saves it at its first evaluation") if args.resume else None)
        data_path, splits, identical = read_splits(args)
        model, extra = starting_model(args, device)
        tokenizer, template = tokenizer_for(extra), TEMPLATES[args.template or default_template(extra)]
        print(f"data: {data_path}: train {len(splits['train'])} pairs, validation {len(splits['val'])}, test "
              f"{len(splits['test'])} instructions; template {template.name}"
              + (f"; {len(identical)} pairs left out, their chosen and rejected responses being the same (entries "
                 f"{', '.join(map(str, identical[:8]))}{' ...' if len(identical) > 8 else ''})" if identical else ""))
        n_trainable = report_model(model, args, device, dtype, extra["model_type"],
                                   then=f"; DPO beta {args.beta}, {args.logprobs} log-probs")
        metrics = {"data": {"path": str(data_path), **{k: len(v) for k, v in splits.items()},
                            "identical_left_out": identical},
                   "template": template.name, "settings": vars(args), "checkpoint": None, "interrupted": False,
                   "train_seconds": 0.0,
                   "model": {"init": args.init, "preset": args.preset, "model_type": extra["model_type"],
                             "params": model.num_params(), "trainable_params": n_trainable}}
        if args.epochs:
            metrics.update(tune(model, extra, splits, tokenizer, template, args, device, dtype, out_dir,
                                str(data_path), resumed))
            if not metrics["interrupted"]:
                (out_dir / STATE_FILE).unlink(missing_ok=True)  # the model holds what tuning made
        if not metrics["interrupted"]:
            tested = write_answers(model, splits, tokenizer, template, args, device, dtype, out_dir, metrics)
            compare = default_compare(args)
            if tested is not None and compare is not None:
                metrics["compare"] = compare_answers(compare, tested)
        metrics["seconds"] = time.perf_counter() - t0
        atomic_write(out_dir / METRICS_FILE, json.dumps({k: v for k, v in metrics.items() if k != "history"},
                                                        indent=2))
    if metrics["interrupted"]:
        print(f"stopped; continue with the same command plus --resume (from the last evaluation in {out_dir})")
        return metrics
    print(f"\nwrote {out_dir / RESPONSES_FILE}, {out_dir / LOG_FILE} and {out_dir / METRICS_FILE} "
          f"({metrics['seconds']:.0f} s in all). Score the answers with:\n"
          f"python evaluate.py answers {shlex.quote(str(out_dir / RESPONSES_FILE))}")
    return metrics


# ---------------------------------------------------------------------------------------------------
# Command line

EXAMPLES = """\
examples:
  python finetune_instruct.py && python finetune_preference.py   # the book's two steps: instructions, then DPO
  python finetune_preference.py --logprobs sum --beta 0.1         # the DPO paper's (and TRL's) log-probs
  python finetune_preference.py --trainable lora --lr 5e-5        # LoRA: small optimizer state
  python finetune_preference.py --init random --preset mini --out-dir out/pref-try   # no model needed
  python evaluate.py answers out/preference/test-responses.json   # score the tuned model's answers
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES)
    p.add_argument("--data", default=None,
                   help="a JSON list or JSONL of {instruction, input, output, chosen, rejected} entries; when not "
                        "given, the book's instruction-data-with-preference.json (1,100 entries), downloaded once "
                        "into the cache. Split as finetune_instruct splits: the first 85%% train, the next 10%% "
                        "test, the rest validation; pairs whose chosen and rejected are the same are left out")
    add_init_args(p, INSTRUCT_MODEL, "the model to tune (its weights are also the frozen reference)")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="prompt format; when not given, the one the model was finetuned with, else its family's "
                        "own (mistral, phi3), else alpaca (the book's)")
    p.add_argument("--beta", type=positive_float, default=0.1,
                   help="DPO's beta: rewards are beta * (log pi - log ref); a larger beta keeps the model closer "
                        "to the reference")
    p.add_argument("--logprobs", default="mean", choices=("mean", "sum"),
                   help="a response's log-probability: mean, the average over its tokens (the book's: long and "
                        "short responses weigh alike, and rewards are per token); sum, the total (the DPO paper's "
                        "and TRL's: rewards grow with length, so a suitable --beta is smaller)")
    p.add_argument("--trainable", default="all", choices=("all", "lora"),
                   help="every weight, or LoRA adapters on every block's matrices (the saved model has them "
                        "merged in; LoRA usually wants a larger --lr)")
    p.add_argument("--lora-rank", type=positive_int, default=16, help="rank of the LoRA update")
    p.add_argument("--lora-alpha", type=positive_float, default=32.0, help="the LoRA update is scaled by alpha / rank")
    p.add_argument("--epochs", type=non_negative_int, default=1,
                   help="passes over the training pairs; 0 answers the test set with the --init model as it is")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step (and per evaluation batch)")
    p.add_argument("--lr", type=positive_float, default=5e-6, help="AdamW learning rate (constant)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay (matrices only)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch pairs of similar length together (less padding, the same pairs per epoch)")
    p.add_argument("--eval-every", type=positive_int, default=25,
                   help=f"steps between evaluations (also at step 0 and after the last): a {LOG_FILE} record, the "
                        f"best weights kept, and {STATE_FILE} saved for --resume")
    p.add_argument("--log-every", type=positive_int, default=5, help="steps between progress lines")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer, in tokens")
    p.add_argument("--answer-batch-size", type=positive_int, default=16,
                   help="test prompts answered together (KV cache memory grows with it)")
    p.add_argument("--compare", default=None, metavar="RESPONSES_JSON",
                   help="another run's test-responses.json (finetune_instruct's) to show beside the tuned model's "
                        "answers; default: the one beside the --init checkpoint, if any")
    p.add_argument("--seed", type=int, default=SEED, help="seed of a random init, LoRA and the batch order")
    add_device_args(p, ("auto", "float32", "bfloat16"), "autocast precision")
    p.add_argument("--out-dir", default="out/preference",
                   help=f"run folder: {MODEL_FILE} (the tuned model), {RESPONSES_FILE} (the test entries with a "
                        f"model_response each), {LOG_FILE} (one record per evaluation), {LOSS_SVG} (its curves, for a "
                        f"browser), {METRICS_FILE}, "
                        f"{STATE_FILE} while a run is unfinished (for --resume)")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a run already in OUT_DIR")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help=f"continue the unfinished run in OUT_DIR from its last evaluation ({STATE_FILE}): repeat the "
                        "run's command and add --resume")
    args = p.parse_args(argv)
    check_preset(p, args.init, args.preset)
    if args.init == "random" and args.preset is None:
        p.error("--init random needs --preset (for example --preset mini)")
    if args.resume and args.force:
        p.error("--resume continues a run and --force replaces it; choose one")
    return args


def main(args: argparse.Namespace) -> dict:
    return train_main(args)


if __name__ == "__main__":
    run_stage(main, parse_args)
