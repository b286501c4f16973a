"""Benchmark of finetune_preference.py (DPO) against the recipe of "LLMs from scratch" (ch. 7, "DPO
from scratch"), both at GPT-2 124M size with random weights, in the same process, on this machine.

The book's recipe, re-implemented below from its description: every entry encoded as prompt,
prompt + chosen and prompt + rejected; batches of 8 from a shuffled DataLoader (drop_last), chosen
and rejected padded with <|endoftext|> to the batch's longest, a mask of the response tokens; the
policy and a frozen copy of it (the reference) each run on the chosen and on the rejected batch
(four forward passes, the full (B, T, 50,257) log-softmax in each); AdamW (lr 5e-6, weight decay
0.01); every 5 steps the DPO loss of 5 training and 5 validation batches (policy and reference
again). The reference runs under torch.no_grad() here, the cheapest fair reading of the recipe.
Both recipes run the same model class (model.GPT), so the figures compare the recipes only.

Ours is the stage's own code: the reference log-probs computed once (finetune_preference's
reference_logprobs), then its fit() (packed pairs, evaluations at step 0 and every 25 steps with
the state saved for --resume, and the best weights kept).

--preference-limit N runs N training steps of each (with the evaluations their schedules bring) and
scales each recipe's time to one epoch; 0 runs the whole epoch of both.

    python tests/bench.py preference --preference-limit 20
    python tests/bench.py preference --preference-preset mini --preference-limit 5    # a smoke run
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import finetune_preference as fp  # noqa: E402

from model import GPT, get_config  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402


BOOK_BATCH, BOOK_EVAL_FREQ, BOOK_EVAL_ITER, BOOK_LR, BOOK_WEIGHT_DECAY, BOOK_BETA = 8, 5, 5, 5e-6, 0.01, 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preference-preset", default="gpt2",
                        help="model size of both recipes (random weights); mini for a smoke run")
    parser.add_argument("--preference-limit", type=int, default=20,
                        help="training steps of each recipe to run and scale to one epoch; 0 runs the whole epoch")


# ---------------------------------------------------------------------------------------------------
# The book's recipe

def book_format_input(entry: dict) -> str:
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


class BookPreferenceDataset(torch.utils.data.Dataset):
    def __init__(self, data: list[dict], tokenizer):
        self.encoded = []
        for entry in data:
            prompt = book_format_input(entry)
            self.encoded.append({
                "prompt": tokenizer.encode(prompt),
                "chosen": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['chosen']}"),
                "rejected": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['rejected']}"),
            })

    def __getitem__(self, index):
        return self.encoded[index]

    def __len__(self):
        return len(self.encoded)


def book_collate(batch, pad_token_id=50256):
    """Chosen and rejected padded to the batch's longest sequence (of either kind) plus one, each with
    a mask that is True on the response tokens only (not the prompt, its response header, padding)."""
    longest = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))
    out = {"chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    for item in batch:
        for key in ("chosen", "rejected"):
            sequence = item[key]
            padded = torch.tensor(sequence + [pad_token_id] * (longest - len(sequence)))
            mask = torch.ones(longest, dtype=torch.bool)
            mask[len(sequence):] = False
            mask[:len(item["prompt"]) + 2] = False  # the prompt and the "\n\n" of the response header
            out[key].append(padded)
            out[f"{key}_mask"].append(mask)
    return {key: torch.stack(value) for key, value in out.items()}


def book_logprobs(logits, labels, selection_mask):
    """The mean log-probability of the masked tokens of each row: log-softmax over the whole (B, T, V)."""
    labels, mask = labels[:, 1:], selection_mask[:, 1:]
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    picked = torch.gather(log_probs, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T - 1)
    return (picked * mask).sum(-1) / mask.sum(-1)


def book_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses.mean(), (policy_chosen - ref_chosen).detach().mean(), (policy_rejected - ref_rejected).detach().mean()


def book_dpo_loss_batch(batch, policy, reference, beta):
    policy_chosen = book_logprobs(policy(batch["chosen"])[0], batch["chosen"], batch["chosen_mask"])
    policy_rejected = book_logprobs(policy(batch["rejected"])[0], batch["rejected"], batch["rejected_mask"])
    with torch.no_grad():
        ref_chosen = book_logprobs(reference(batch["chosen"])[0], batch["chosen"], batch["chosen_mask"])
        ref_rejected = book_logprobs(reference(batch["rejected"])[0], batch["rejected"], batch["rejected_mask"])
    return book_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def book_evaluate(policy, reference, train_loader, val_loader, beta, eval_iter):
    policy.eval()
    with torch.no_grad():
        for loader in (train_loader, val_loader):
            for i, batch in enumerate(loader):
                if i >= eval_iter:
                    break
                book_dpo_loss_batch(batch, policy, reference, beta)
    policy.train()


def time_book_recipe(splits: dict[str, list[dict]], preset: str, steps: int) -> dict:
    tokenizer = get_tokenizer()
    torch.manual_seed(123)
    policy = GPT(get_config(preset))
    reference = GPT(get_config(preset))
    reference.load_state_dict(policy.state_dict())
    reference.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(123)
    train_loader = torch.utils.data.DataLoader(BookPreferenceDataset(splits["train"], tokenizer), BOOK_BATCH,
                                               shuffle=True, drop_last=True, collate_fn=book_collate,
                                               generator=generator)
    val_loader = torch.utils.data.DataLoader(BookPreferenceDataset(splits["val"], tokenizer), BOOK_BATCH,
                                             collate_fn=book_collate)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY)
    steps = steps or len(train_loader)
    losses, global_step = [], 0
    policy.train()
    t0 = time.perf_counter()
    for batch in train_loader:
        optimizer.zero_grad()
        loss, _, _ = book_dpo_loss_batch(batch, policy, reference, BOOK_BETA)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        global_step += 1
        if global_step % BOOK_EVAL_FREQ == 0:
            book_evaluate(policy, reference, train_loader, val_loader, BOOK_BETA, BOOK_EVAL_ITER)
        if global_step == steps:
            break
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": steps, "epoch_steps": len(train_loader),
            "epoch_s": seconds * len(train_loader) / steps, "first_loss": losses[0], "last_loss": losses[-1]}


# ---------------------------------------------------------------------------------------------------
# Ours

def time_ours(preset: str, steps: int) -> dict:
    args = fp.parse_args(["--init", "random", "--preset", preset, "--device", "cpu"])
    _, splits, _ = fp.read_splits(args)
    tokenizer, template = get_tokenizer(), fp.TEMPLATES["alpaca"]
    torch.manual_seed(123)
    model = GPT(get_config(preset))
    pairs = fp.prepare(splits, tokenizer, template, model.config.block_size, "the book's data")
    epoch_steps = math.ceil(len(pairs["train"]) / args.batch_size)
    all_train = len(pairs["train"])
    if steps:  # the first `steps` batches' pairs: the reference sweep and fit() then cover only those
        pairs["train"] = pairs["train"][:steps * args.batch_size]
    steps = math.ceil(len(pairs["train"]) / args.batch_size)
    pairs["train_sample"] = pairs["train"][:len(pairs["val"])]
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    refs = {name: fp.reference_logprobs(model, part, args.batch_size, tokenizer.eos_id, args.logprobs, cpu,
                                        torch.float32) for name, part in pairs.items()}
    sweep_s = time.perf_counter() - t0
    sweep_train_s = sweep_s * len(pairs["train"]) / sum(len(p) for p in pairs.values())  # its training share
    with tempfile.TemporaryDirectory() as out_dir:
        result = fp.fit(model, pairs, refs, args, tokenizer.eos_id, cpu, torch.float32, Path(out_dir), None)
    losses = result["train_losses"]
    scale = epoch_steps / steps
    epoch_s = (sweep_s - sweep_train_s) + sweep_train_s * all_train / len(pairs["train"]) \
        + result["train_seconds"] * scale
    return {"seconds": sweep_s + result["train_seconds"], "sweep_s": sweep_s, "steps": steps,
            "epoch_steps": epoch_steps, "epoch_s": epoch_s, "first_loss": losses[0], "last_loss": losses[-1],
            "evaluations": len(result["history"])}


def run(args: argparse.Namespace) -> list[dict]:
    preset, limit = args.preference_preset, args.preference_limit
    # the book trains on every entry of its split, pairs with identical responses included
    book_splits = fp.split_entries(fp.load_entries(fp.default_preference_data()))
    book = time_book_recipe(book_splits, preset, limit)
    ours = time_ours(preset, limit)
    rows = []
    for name, r, note in (
            ("book recipe (ch. 7 DPO)", book, "policy and reference on chosen and rejected each step; 5+5 "
                                              "evaluation batches every 5 steps"),
            ("ours (finetune_preference.py)", ours, f"reference once ({ours['sweep_s']:.1f} s), packed pairs, "
                                                    f"{ours['evaluations']} evaluations with state.pt saved")):
        rows.append({"benchmark": "preference", "setting": name, "model": f"{preset} (random weights)",
                     "steps_run": r["steps"], "seconds": round(r["seconds"], 1), "epoch_steps": r["epoch_steps"],
                     "epoch_s": round(r["epoch_s"], 1), "first_loss": round(r["first_loss"], 4),
                     "last_loss": round(r["last_loss"], 4), "note": note})
    rows[1]["note"] += f"; one epoch {book['epoch_s'] / ours['epoch_s']:.1f}x faster (target 4x)"
    return rows
