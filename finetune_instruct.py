"""Instruction finetuning: teach a pretrained model to follow instructions, then read and score its answers.

    python finetune_instruct.py                        # gpt2-medium, the book's 1,100 instructions, 2 epochs
    python finetune_instruct.py --ask "Name three primary colors." --ask "Rewrite 'it is hot' as a question."

Reading order: the loss (computed only where a target counts), the training loop (AdamW, validation
every --eval-every steps, the best-validation weights kept), the run (data and templates from data.py
and templates.py, the model, its answers to the test set), --ask, and the command line.
"""
import argparse
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import planner
from common import (ArgumentParser, RunLock, SEED, UserError, atomic_write, clock, non_negative_float,
                    non_negative_int, positive_float, positive_int, run_stage, side_by_side, writable_folder)
from data import (Example, collate, default_data, degenerate_answers, degenerate_note, length_grouped_batches,
                  load_entries, make_example, random_batches, split_entries)
from generate import answer
from load_gpt2 import add_init_args, check_preset, load_model, model_card, tokenizer_for
from loss_curve import write_loss_svg
from model import GPT, IGNORE, add_device_args, add_lora, autocast, device_and_dtype, merge_lora, save_checkpoint
from templates import TEMPLATES, Template, default_template, prompt_ids
from training import (STATE_FILE, best_weights, check_existing_run, check_finite, load_state, model_to_finetune,
                      read_inputs, report_model, restore, save_state, trainable_parameters)



MODEL_FILE, RESPONSES_FILE, METRICS_FILE = "model.pt", "test-responses.json", "metrics.json"
LOSS_SVG = "loss.svg"  # the training and validation loss at each evaluation, for a browser
# Flags that change what a resumed run computes; --epochs may grow, --device or --eval-every may change.
RESUME_MUST_MATCH = ("data", "init", "preset", "template", "trainable", "lora_rank", "lora_alpha", "mask_prompt",
                     "max_length", "batch_size", "lr", "weight_decay", "group_by_length", "seed", "dtype")


# ---------------------------------------------------------------------------------------------------
# Training

def target_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the targets that count, and their number; inputs, targets (B, T).

    The same loss as model(inputs, targets), but the LM head (the largest matmul of a small model:
    50,257 outputs per position for GPT-2) runs only where a target counts: padding, and the prompt
    under --mask-prompt, get no logits at all."""
    keep = targets != IGNORE  # (B, T)
    logits = model.lm_head(model.hidden(inputs)[keep])  # (N, V) for the N targets that count
    return F.cross_entropy(logits.float(), targets[keep]), logits.size(0)


@torch.no_grad()
def evaluate_loss(model: GPT, examples: Sequence[Example], batch_size: int, pad_id: int, mask_prompt: bool,
                  device: torch.device, dtype: torch.dtype) -> float:
    """Mean cross-entropy per target token over all the examples (batches of similar length)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        inputs, targets = collate([examples[i] for i in order[start:start + batch_size]], pad_id, mask_prompt)
        if (targets != IGNORE).any():
            with autocast(device, dtype):
                loss, n = target_loss(model, inputs.to(device), targets.to(device))
            total, count = total + loss.item() * n, count + n
    return total / count if count else math.nan


def train_step(model: GPT, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               device: torch.device, dtype: torch.dtype, where: str, kept: str) -> float:
    """One AdamW step on one batch (B, T); the batch's mean loss. where and kept: for the message if the
    loss is not finite."""
    model.train()
    with autocast(device, dtype):
        loss, _ = target_loss(model, inputs.to(device), targets.to(device))
    check_finite(loss, where, kept)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def progress_line(step: int, total_steps: int, epoch: int, epochs: int, interval: dict, val_loss: float | None,
                  eta: float, best: bool) -> str:
    """The figures of the steps since the last line: mean loss, tokens/s, ms/step, and the ETA."""
    mean_loss = sum(interval["losses"]) / len(interval["losses"])
    val_text = f"{val_loss:7.4f}" if val_loss is not None else "      -"
    return (f"step {step:>5}/{total_steps} | epoch {epoch}/{epochs} | loss {mean_loss:7.4f} | val {val_text} | "
            f"{interval['tokens'] / interval['seconds']:7.0f} tok/s | "
            f"{1000 * interval['seconds'] / len(interval['losses']):7.0f} ms/step | eta {clock(eta)}"
            + ("  (best so far)" if best else ""))


def start_progress(resumed: dict | None, trainable: list, optimizer: torch.optim.Optimizer,
                   generator: torch.Generator, epochs: int) -> dict:
    """Where the run stands: from the saved state when resuming (weights, optimizer and batch order put
    back), else at its start."""
    if resumed is None:
        return {"epoch": 0, "step": 0, "train_losses": [], "val_losses": [],
                "best": {"val_loss": math.inf, "step": None}, "best_weights": {}, "tokens": 0, "padded_tokens": 0}
    restore(trainable, resumed["trainable"])
    optimizer.load_state_dict(resumed["optimizer"])
    generator.set_state(resumed["generator"])
    print(f"resuming after epoch {resumed['epoch']} of {epochs} (step {resumed['step']})")
    return {key: resumed[key] for key in PROGRESS_KEYS}


def log_evaluation(run: dict, step: int, epoch: int, val_loss: float, svg_path: Path) -> None:
    """One evaluation into run["val_losses"] (with the mean training loss of the steps since the last
    evaluation, and the tokens seen), and loss.svg redrawn from them all."""
    record = {"step": step, "epoch": epoch, "val_loss": val_loss, "tokens_seen": run["tokens"]}
    since = run["val_losses"][-1]["step"] if run["val_losses"] else 0
    if step > since:  # train_losses[i] is step i + 1's
        record["train_loss"] = sum(run["train_losses"][since:step]) / (step - since)
    run["val_losses"].append(record)
    write_loss_svg(svg_path, run["val_losses"], title="finetune_instruct.py: training and validation loss")


PROGRESS_KEYS = ("epoch", "step", "train_losses", "val_losses", "best", "best_weights", "tokens", "padded_tokens")


def train(model: GPT, splits: dict[str, list[Example]], args: argparse.Namespace, pad_id: int, device: torch.device,
          dtype: torch.dtype, state_path: Path, resumed: dict | None = None) -> dict:
    """AdamW over the training examples for args.epochs; validation every args.eval_every steps and at
    the end. The model ends with the weights of the best validation loss seen after training began.

    After each epoch the run's state goes to state_path (resumed: that state, to continue from). Ctrl-C
    stops the run (reported in the result; the best weights so far are in the model, if any validation
    has happened). A loss that is not finite stops it with a UserError."""
    examples, val = splits["train"], splits["val"]
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, betas=(0.9, 0.999), device_type=device.type)
    generator = torch.Generator().manual_seed(args.seed)
    total_steps = args.epochs * math.ceil(len(examples) / args.batch_size)
    trainable = trainable_parameters(model)
    lengths = [len(e.ids) - 1 for e in examples]
    interval = {"losses": [], "tokens": 0, "seconds": 0.0}
    run = start_progress(resumed, trainable, optimizer, generator, args.epochs)
    interrupted, t_start, first_step, first_tokens = False, time.perf_counter(), run["step"], run["tokens"]
    try:
        if resumed is None:
            val_loss = evaluate_loss(model, val, args.batch_size, pad_id, args.mask_prompt, device, dtype)
            log_evaluation(run, 0, 0, val_loss, state_path.parent / LOSS_SVG)
            print(f"step {0:>5}/{total_steps} | validation loss before finetuning {val_loss:.4f}")
        t_start = time.perf_counter()
        for epoch in range(run["epoch"] + 1, args.epochs + 1):
            batches = (length_grouped_batches(lengths, args.batch_size, generator) if args.group_by_length
                       else random_batches(len(examples), args.batch_size, generator))
            for index in batches:
                t0 = time.perf_counter()
                inputs, targets = collate([examples[i] for i in index], pad_id, args.mask_prompt)
                kept = f"{state_path} holds the run after epoch {epoch - 1}" if epoch > 1 else "nothing was saved"
                run["train_losses"].append(train_step(model, optimizer, inputs, targets, device, dtype,
                                                      f"step {run['step'] + 1} (epoch {epoch})", kept))
                run["step"] += 1
                step, n_tokens = run["step"], sum(lengths[i] for i in index)
                run["tokens"], run["padded_tokens"] = run["tokens"] + n_tokens, run["padded_tokens"] + inputs.numel()
                interval["losses"].append(run["train_losses"][-1])
                interval["tokens"] += n_tokens
                interval["seconds"] += time.perf_counter() - t0
                val_loss = None
                if step % args.eval_every == 0 or step == total_steps:
                    val_loss = evaluate_loss(model, val, args.batch_size, pad_id, args.mask_prompt, device, dtype)
                    log_evaluation(run, step, epoch, val_loss, state_path.parent / LOSS_SVG)
                    if val_loss < run["best"]["val_loss"]:  # one assignment: a Ctrl-C leaves the old best whole
                        run["best_weights"], run["best"] = best_weights(trainable), {"val_loss": val_loss,
                                                                                      "step": step}
                if step % args.log_every == 0 or val_loss is not None:
                    eta = (time.perf_counter() - t_start) / (step - first_step) * (total_steps - step)
                    print(progress_line(step, total_steps, epoch, args.epochs, interval, val_loss, eta,
                                        run["best"]["step"] == step), flush=True)
                    interval = {"losses": [], "tokens": 0, "seconds": 0.0}
            run["epoch"] = epoch
            if epoch < args.epochs:  # after the last one the run is done: nothing to resume
                save_state(state_path, trainable, optimizer, generator, run, args)
    except KeyboardInterrupt:  # a half-done step does not matter: the best weights below replace it
        interrupted = True
        print(f"\nCtrl-C: stopped at step {run['step']} of {total_steps}"
              + (f"; {state_path} holds the run after epoch {run['epoch']}" if run["epoch"] else ""))
    restore(trainable, run["best_weights"])
    seconds = time.perf_counter() - t_start
    best = run["best"]
    return {"steps": run["step"], "total_steps": total_steps, "train_losses": run["train_losses"],
            "val_losses": run["val_losses"], "best_step": best["step"],
            "best_val_loss": best["val_loss"] if best["step"] else None, "interrupted": interrupted,
            "epochs_done": run["epoch"], "train_seconds": seconds, "tokens": run["tokens"],
            "padded_tokens": run["padded_tokens"],
            "tokens_per_s": (run["tokens"] - first_tokens) / seconds if run["step"] > first_step else None}


# ---------------------------------------------------------------------------------------------------
# Answers to the test set, shown beside the references


def show_examples(entries: list[dict], n: int = 3) -> None:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 6) // 2)
    for entry in entries[:n]:
        print(f"\n{entry['instruction']}" + (f"\n  input: {entry['input']}" if entry["input"] else ""))
        print(side_by_side(entry["output"], entry["model_response"], ("reference:", "model:"), width))


# ---------------------------------------------------------------------------------------------------
# Training run: data in, a finetuned model, its answers to the test set and the metrics out

def prepare(splits: dict[str, list[dict]], tokenizer, template: Template, max_length: int,
            mask_prompt: bool) -> tuple[dict[str, list[Example]], dict]:
    """Tokenized train and validation examples, and a summary of them."""
    examples, truncated, left_out = {}, 0, 0
    for name in ("train", "val"):
        examples[name] = []
        for entry in splits[name]:
            example, cut = make_example(tokenizer, template, entry, max_length)
            truncated += cut
            if mask_prompt and example.prompt_len > max_length:
                left_out += 1  # its prompt fills --max-length: no target is left to learn
                continue
            examples[name].append(example)
    for name, what in (("train", "training"), ("val", "validation")):
        if not examples[name]:
            raise UserError(f"with --mask-prompt and --max-length {max_length} no {what} example keeps a "
                            f"response token; raise --max-length")
    lengths = [len(e.ids) - 1 for part in examples.values() for e in part]
    summary = {"train": len(examples["train"]), "val": len(examples["val"]), "test": len(splits["test"]),
               "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths), "truncated": truncated,
               "left_out": left_out}
    return examples, summary


def remove_old_results(out_dir: Path) -> None:
    """Called before a run writes its first file: an old run's (--force) answers and metrics go, so the
    folder never pairs them with the new model."""
    for name in (RESPONSES_FILE, METRICS_FILE):
        (out_dir / name).unlink(missing_ok=True)


def starting_model(args: argparse.Namespace, device: torch.device) -> tuple[GPT, dict]:
    """The --init model, with LoRA adapters under --trainable lora, and the model's card."""
    model, card = model_to_finetune(args.init, args.preset, args.seed, device, "--init random --preset mini --lr 3e-4")
    if model.config.num_classes is not None:
        raise UserError(f"{args.init} is a classifier; instruction finetuning needs a language model")
    if args.max_length and args.max_length > model.config.block_size:
        raise UserError(f"--max-length {args.max_length} is longer than the model's context of "
                        f"{model.config.block_size} tokens")
    if args.trainable == "lora":
        model.requires_grad_(False)
        add_lora(model, args.lora_rank, args.lora_alpha)  # only LoRA's A and B train
    return model, card


def save_finetuned(out_dir: Path, model: GPT, card: dict, template: Template, args: argparse.Namespace,
                   result: dict) -> Path:
    """The best weights as a plain GPT (LoRA merged in) that generate.py --init and --ask load."""
    merge_lora(model)  # a no-op unless --trainable lora
    remove_old_results(out_dir)
    path = out_dir / MODEL_FILE
    save_checkpoint(path, model, **model_card(card), template=template.name, init=args.init,
                    trainable=args.trainable, step=result["best_step"], val_loss=result["best_val_loss"])
    print(f"saved the weights of step {result['best_step']} (validation loss {result['best_val_loss']:.4f}) "
          f"to {path}")
    return path


UNTRAINED_ADVICE = ("the model has not learned to answer yet: train it longer or with a larger --lr (a random "
                    "model: --init random --preset mini --lr 3e-4 --epochs 4)")


def answer_test_set(model: GPT, tokenizer, template: Template, test: list[dict], args: argparse.Namespace,
                    device: torch.device, dtype: torch.dtype, out_dir: Path, metrics: dict) -> list[dict] | None:
    """The test entries, each with the model's answer, written to OUT_DIR/test-responses.json; their
    figures go into metrics. None after a Ctrl-C (metrics say so)."""
    print(f"answering the {len(test)} test instructions (at most {args.max_new_tokens} new tokens each)")
    t_answers = time.perf_counter()
    prompts = [prompt_ids(tokenizer, template, e["instruction"], e["input"]) for e in test]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        responses = answer(model, prompts, tokenizer, template, max_new_tokens=args.max_new_tokens,
                           batch_size=args.answer_batch_size, device=device, dtype=dtype,
                           temperature=args.temperature, top_k=args.top_k, generator=generator)
    except KeyboardInterrupt:
        print("\nCtrl-C: stopped answering")
        metrics["interrupted"] = True
        return None
    metrics["answers_seconds"] = time.perf_counter() - t_answers
    tested = [{**entry, "model_response": r} for entry, r in zip(test, responses)]
    atomic_write(out_dir / RESPONSES_FILE, json.dumps(tested, indent=4, ensure_ascii=False))
    metrics["test_responses"] = str(out_dir / RESPONSES_FILE)
    counts = degenerate_answers(responses)
    metrics.update(empty_answers=counts["empty"], repeating_answers=counts["repeating"])
    note = degenerate_note(counts, len(responses), UNTRAINED_ADVICE)
    if note:
        print(note, file=sys.stderr)
    return tested


def train_main(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    device, dtype = device_and_dtype(args.device, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (outside autocast) on tensor cores
    out_dir = writable_folder(args.out_dir)
    with RunLock(out_dir):
        check_existing_run(out_dir, args, tuple(out_dir / name for name in (MODEL_FILE, METRICS_FILE, RESPONSES_FILE)))
        resumed = load_state(out_dir / STATE_FILE, args, RESUME_MUST_MATCH) if args.resume else None
        data_path = Path(args.data) if args.data else default_data()
        splits = split_entries(load_entries(data_path))
        model, card = starting_model(args, device)
        tokenizer, template = tokenizer_for(card), TEMPLATES[args.template or default_template(card)]
        max_length = args.max_length or model.config.block_size
        examples, data = prepare(splits, tokenizer, template, max_length, args.mask_prompt)
        print(f"data: {data_path}: {sum(len(s) for s in splits.values())} entries; train {data['train']}, "
              f"validation {data['val']}, test {data['test']}; template {template.name}; "
              f"{data['mean_tokens']:.1f} tokens per example on average, longest {data['max_tokens']}; "
              f"{data['truncated']} cut to --max-length {max_length}"
              + (f"; {data['left_out']} left out (no response token within --max-length)" if data["left_out"] else ""))
        n_trainable = report_model(model, args, device, dtype, card["model_type"],
                                   size=f", context {model.config.block_size}")
        metrics = {"data": {"path": str(data_path), **data}, "template": template.name,
                   "model": {"init": args.init, "preset": args.preset, "model_type": card["model_type"],
                             "params": model.num_params(), "trainable_params": n_trainable},
                   "settings": vars(args), "interrupted": False, "checkpoint": None, "train_seconds": 0.0}

        if args.epochs:
            pad_id = tokenizer.eos_id  # any id: padding is never attended to nor learned
            metrics.update(train(model, examples, args, pad_id, device, dtype, out_dir / STATE_FILE, resumed))
            if metrics["steps"]:
                print(f"trained {metrics['steps']} steps in {clock(metrics['train_seconds'])} "
                      f"({metrics['tokens_per_s']:.0f} tokens/s with validation); padding was "
                      f"{metrics['padded_tokens'] / metrics['tokens'] - 1:.1%} of the tokens computed")
            if metrics["best_step"] is None:
                if not metrics["interrupted"]:
                    raise UserError("the validation loss was never finite, so nothing was saved; try a lower --lr")
                print("nothing was saved: Ctrl-C came before the first validation")
                return metrics
            metrics["checkpoint"] = str(save_finetuned(out_dir, model, card, template, args, metrics))
            if not metrics["interrupted"]:
                (out_dir / STATE_FILE).unlink(missing_ok=True)  # the model holds what training made
        else:
            remove_old_results(out_dir)
        if not metrics["interrupted"]:
            tested = answer_test_set(model, tokenizer, template, splits["test"], args, device, dtype, out_dir, metrics)
        metrics["seconds"] = time.perf_counter() - t0
        atomic_write(out_dir / METRICS_FILE, json.dumps(metrics, indent=2))
    if metrics["interrupted"]:
        if (out_dir / STATE_FILE).exists():
            print(f"{out_dir / STATE_FILE} holds the run after epoch {metrics['epochs_done']}; continue it with the "
                  f"same command plus --resume")
        elif metrics["checkpoint"]:
            print(f"no {RESPONSES_FILE} was written; to write it: python finetune_instruct.py --init "
                  f"{out_dir / MODEL_FILE} --epochs 0 --out-dir OTHER_DIR"
                  + (f" --data {args.data}" if args.data else ""))
        return metrics
    show_examples(tested)
    print(f"\nwrote {out_dir / RESPONSES_FILE} ({metrics['answers_seconds']:.0f} s of answers) and "
          f"{out_dir / METRICS_FILE} ({metrics['seconds']:.0f} s in all). Score the answers with:\n"
          f"python evaluate.py answers {shlex.quote(str(out_dir / RESPONSES_FILE))}")
    return metrics


# ---------------------------------------------------------------------------------------------------
# --ask: answer instructions with a saved model, streaming the text

def ask_main(args: argparse.Namespace) -> dict:
    instructions = read_inputs(args.ask, "--ask", "instruction", "answer")
    device, dtype = device_and_dtype(args.device, args.dtype)
    path = Path(args.checkpoint) if args.checkpoint else Path(args.out_dir) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; finetune a model first with python finetune_instruct.py "
                        f"(or name one with --checkpoint)")
    model, card = load_model(str(path), device=device)
    if model.config.num_classes is not None:
        raise UserError(f"{path} is a classifier; --ask needs a language model")
    tokenizer = tokenizer_for(card)
    template = TEMPLATES[args.template or default_template(card)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    answers = []
    for instruction in instructions:
        prompt = prompt_ids(tokenizer, template, instruction)
        if len(prompt) >= model.config.block_size:
            raise UserError(f"an instruction of {len(prompt)} tokens leaves no room for an answer in the model's "
                            f"context of {model.config.block_size} tokens")
        print(f"> {instruction}", flush=True)
        answers += answer(model, [prompt], tokenizer, template, max_new_tokens=args.max_new_tokens, batch_size=1,
                          device=device, dtype=dtype, temperature=args.temperature, top_k=args.top_k,
                          generator=generator, on_text=lambda i, piece: print(piece, end="", flush=True))
        note = degenerate_note(degenerate_answers(answers[-1:]), 1, UNTRAINED_ADVICE)
        print("\n" if note is None else f"({'an empty answer' if not answers[-1].strip() else 'a repeated word'})\n",
              flush=True)
        if note:
            print(note, file=sys.stderr)
    return {"answers": [{"instruction": i, "model_response": a} for i, a in zip(instructions, answers)]}


# ---------------------------------------------------------------------------------------------------
# Command line

LAPTOP_HELP = """\
examples:
  python finetune_instruct.py                       # the book's run: gpt2-medium, all weights, 2 epochs
  python finetune_instruct.py --init gpt2                          # a laptop: GPT-2 124M, ~3x less work
  python finetune_instruct.py --trainable lora --lr 1e-4          # LoRA: small optimizer state
  python finetune_instruct.py --init random --preset mini --lr 3e-4   # no weights to download (learns little)
  python finetune_instruct.py --ask "Name three primary colors."   # answer with the finetuned model
  python evaluate.py answers out/instruct/test-responses.json      # score the test answers
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=LAPTOP_HELP)
    p.add_argument("--data", default=None,
                   help="a JSON list or JSONL of {instruction, input, output} entries; when not given, the book's "
                        "instruction-data.json (1,100 entries), downloaded once into the cache. Split as the book "
                        "does: the first 85%% train, the next 10%% test, the rest validation")
    add_init_args(p, "gpt2-medium")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="prompt format; when not given, the one the model was finetuned with, else its family's "
                        "own (mistral, phi3), else alpaca (the book's)")
    p.add_argument("--trainable", default="all", choices=("all", "lora"),
                   help="every weight, or LoRA adapters on every block's matrices (the saved model has them "
                        "merged in; LoRA usually wants a larger --lr)")
    p.add_argument("--lora-rank", type=positive_int, default=16, help="rank of the LoRA update")
    p.add_argument("--lora-alpha", type=positive_float, default=32.0, help="the LoRA update is scaled by alpha / rank")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=False,
                   help="learn only the responses: the prompt's tokens are left out of the loss")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="cut longer examples to this many tokens (their count is reported); default: the model's "
                        "context")
    p.add_argument("--epochs", type=non_negative_int, default=2,
                   help="passes over the training examples; 0 answers the test set with the --init model as it is")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per step (and per validation batch)")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="AdamW learning rate (constant)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch examples of similar length together (less padding, the same examples per epoch)")
    p.add_argument("--eval-every", type=positive_int, default=50,
                   help="steps between validation losses (also after the last step); the best one's weights are kept")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between progress lines")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer, in tokens")
    p.add_argument("--answer-batch-size", type=positive_int, default=16,
                   help="test prompts answered together (KV cache memory grows with it)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 answers greedily; higher samples")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=SEED, help="seed of a random init, LoRA, the batch order and sampling")
    add_device_args(p, ("auto", "float32", "bfloat16"), "autocast precision")
    p.add_argument("--out-dir", default="out/instruct",
                   help=f"run folder: {MODEL_FILE} (the finetuned model; python generate.py --init loads it), "
                        f"{RESPONSES_FILE} (the test entries with a model_response each), {METRICS_FILE}, {LOSS_SVG} "
                        f"(the loss curves, for a browser), and {STATE_FILE} while a run is unfinished (for --resume)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help=f"continue the unfinished run in OUT_DIR after its last finished epoch ({STATE_FILE}): repeat "
                        f"its command and add --resume (--epochs may grow)")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a run already in OUT_DIR")
    p.add_argument("--ask", action="append", metavar="INSTRUCTION",
                   help="answer INSTRUCTION with the finetuned model instead of training; repeatable; - reads one "
                        "instruction per line from stdin")
    p.add_argument("--checkpoint", default=None, help=f"the model --ask uses; default: OUT_DIR/{MODEL_FILE}")
    p.add_argument("--plan", action="store_true",
                   help="print what training needs (memory, FLOPs, time on this CPU and on A100, H100, H200, L4) "
                        "and whether it fits, write OUT_DIR/plan.json, and train nothing (pretrain.py's planner; "
                        "every batch is taken as long as --max-length, else the model's context)")
    args = p.parse_args(argv)
    check_preset(p, args.init, args.preset)
    if args.resume and args.force:
        p.error("--resume continues a run and --force replaces it; choose one")
    if args.init == "random" and args.preset is None and not args.ask:
        p.error("--init random needs --preset and, to learn in a few epochs, a larger --lr (for example "
                "--preset mini --lr 3e-4)")
    return args


def plan_main(args: argparse.Namespace) -> dict:
    """--plan: the model's config without its weights; with --trainable lora only the adapters train."""
    config, what = planner.init_config(args.init, args.preset)
    trainable = None
    if args.trainable == "lora":
        with torch.device("meta"):  # shapes only
            model = GPT(config)
        model.requires_grad_(False)
        add_lora(model, args.lora_rank, args.lora_alpha)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = planner.make_plan(config, batch_size=args.batch_size, block_size=args.max_length or config.block_size,
                              dtype_name=args.dtype, device=device_and_dtype(args.device, args.dtype)[0],
                              trainable_params=trainable, what=what)
    return planner.report_plan(plan, args.out_dir)


def main(args: argparse.Namespace) -> dict:
    if args.plan:
        return plan_main(args)
    return ask_main(args) if args.ask else train_main(args)


if __name__ == "__main__":
    run_stage(main, parse_args)
