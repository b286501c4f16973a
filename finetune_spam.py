"""Fine-tune GPT-2 into an SMS spam classifier, then use it: data, training, evaluation, prediction.

    python finetune_spam.py                  # GPT-2 124M, train its last block, 5 epochs
    python finetune_spam.py --predict "WINNER! Claim your prize now" --predict "see you at 6?"

Reading order: the data (download, parse, balance, split), the model (a 2-class head in place of the
LM head, which parts train, LoRA), the forward pass that reads each message's last real token (so a
batch is padded only to its own longest message, and the padding never changes a prediction), the
training loop (the frozen bottom of the model run once per message, see `cache_all_features`),
evaluation, prediction, the command line.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (ArgumentParser, RunLock, SEED, UserError, atomic_write, clock, non_negative_float, positive_float,
                    positive_int, run_stage, writable_folder)
from download import DownloadError, SMS_SPAM_SHA256, cache_dir, fetch
from load_gpt2 import add_init_args, check_preset, load_model, model_card, tokenizer_for
from loss_curve import write_loss_svg
from model import GPT, add_device_args, add_lora, autocast, device_and_dtype, merge_lora, save_checkpoint
from tokenizer_base import bos
from training import (STATE_FILE, best_weights, check_existing_run, check_finite, load_state, model_to_finetune,
                      read_inputs, report_model, restore, save_state, trainable_parameters)



LABELS = ("ham", "spam")  # class index = position: 0 ham, 1 spam (the positive class)
SMS_MEMBER = "SMSSpamCollection"  # the one member we take from the UCI zip
SMS_RELPATH = "sms_spam/SMSSpamCollection"  # where the extracted member is cached
SMS_ZIP_RELPATH = "sms_spam/sms_spam_collection.zip"
SMS_COUNTS = (5574, 747)  # messages, spam in the UCI file
SPLIT_SEED = 123  # fixed, so every run and every setting is scored on the same test messages
MAX_MEMBER_BYTES = 100_000_000  # the real member has 478 KB; refuse anything that unpacks to more


# ---------------------------------------------------------------------------------------------------
# Data: the UCI SMS Spam Collection, one `label<TAB>text` per line

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_zip_member(zip_path: Path, member: str = SMS_MEMBER) -> bytes:
    """The bytes of `member` in the zip, read by name: no path from the archive is ever written to.

    An archive holding any member that points outside its folder ('../x', '/x', 'C:x') is refused
    as a whole: it was not made by UCI."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for name in archive.namelist():
                parts = PurePosixPath(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise UserError(f"{zip_path} holds a member that points outside its folder ({name!r}); "
                                    f"refusing to read it")
            if member not in archive.namelist():
                raise UserError(f"{zip_path} has no member {member!r} (it holds: {', '.join(archive.namelist())})")
            if archive.getinfo(member).file_size > MAX_MEMBER_BYTES:
                raise UserError(f"{zip_path}: {member} unpacks to more than {MAX_MEMBER_BYTES} bytes; not the SMS data")
            return archive.read(member)  # checks the member's CRC
    except zipfile.BadZipFile as e:
        raise UserError(f"{zip_path} is not a readable zip file ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read {zip_path} ({e.strerror or e})") from None


def default_data() -> Path:
    """The cached SMSSpamCollection if it verifies; else download the UCI zip and extract it.

    A file placed in the cache that is not the UCI file is said so (with why), never used in silence."""
    path = cache_dir() / SMS_RELPATH
    rejected = ""
    if path.is_file():
        digest = _sha256(path.read_bytes())
        if digest == SMS_SPAM_SHA256:
            return path
        why = f"its sha256 is {digest}, not the UCI file's {SMS_SPAM_SHA256}"
        rejected = f" (the file there now is not it: {why})"
        print(f"note: {path} is not the UCI SMS Spam Collection ({why}); taking it from the UCI zip instead",
              file=sys.stderr)
    try:
        zip_path = fetch(SMS_ZIP_RELPATH)
    except DownloadError as e:
        raise DownloadError(f"{e}; or save the unzipped SMSSpamCollection as {path}{rejected}, or pass --data with "
                            f"a local copy of SMSSpamCollection or its zip") from None
    data = read_zip_member(zip_path)
    if _sha256(data) != SMS_SPAM_SHA256:
        raise UserError(f"{SMS_MEMBER} in {zip_path} is not the expected file (sha256 {_sha256(data)}); "
                        f"delete the zip to download it again")
    atomic_write(path, data)  # a crash never leaves a half-written file that looks cached
    return path


def parse_messages(text: str, source: str) -> list[tuple[int, str]]:
    """(label index, message) for every line `ham<TAB>text` or `spam<TAB>text`.

    Deliberately not CSV: messages contain unbalanced quotes, and a CSV reader then glues the
    following lines into one message. Every line must have the form, so nothing is lost silently."""
    messages = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): it also splits on \x0c, \u2028
        line = line.removesuffix("\r")
        if not line:
            continue
        label, tab, message = line.partition("\t")
        if not tab or label not in LABELS:
            raise UserError(f"{source} line {number} is not 'ham<TAB>text' or 'spam<TAB>text': {line[:60]!r}")
        if not message.strip():
            raise UserError(f"{source} line {number} has an empty message")
        messages.append((LABELS.index(label), message))
    return messages


def load_messages(path: Path) -> list[tuple[int, str]]:
    """Messages from the SMSSpamCollection file, or from the zip it ships in."""
    if not path.is_file():
        raise UserError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    data = read_zip_member(path) if zipfile.is_zipfile(path) else path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (bad byte at offset {e.start})") from None
    messages = parse_messages(text, str(path))
    counts = (len(messages), sum(label for label, _ in messages))
    if _sha256(data) == SMS_SPAM_SHA256:
        assert counts == SMS_COUNTS, f"parsed {counts} (messages, spam) from the UCI file, expected {SMS_COUNTS}"
    if min(counts[1], counts[0] - counts[1]) < 10:
        raise UserError(f"{path} has {counts[1]} spam and {counts[0] - counts[1]} ham messages; "
                        f"need at least 10 of each")
    return messages


def balance_and_split(messages: list[tuple[int, str]], seed: int = SPLIT_SEED,
                      fractions: tuple[float, float] = (0.7, 0.1)) -> dict[str, list[tuple[int, str]]]:
    """Undersample the larger class (ham) to the size of the smaller, shuffle, split 70/10/20."""
    rng = random.Random(seed)
    by_label = [[m for m in messages if m[0] == label] for label in range(len(LABELS))]
    n = min(len(group) for group in by_label)
    chosen = [m for group in by_label for m in rng.sample(group, n)]
    rng.shuffle(chosen)
    n_train, n_val = int(fractions[0] * len(chosen)), int(fractions[1] * len(chosen))
    return {"train": chosen[:n_train], "val": chosen[n_train:n_train + n_val], "test": chosen[n_train + n_val:]}


@dataclasses.dataclass
class Split:
    tokens: list[torch.Tensor]  # one (T_i,) int64 tensor per message, no padding
    labels: torch.Tensor  # (N,) int64
    features: list[torch.Tensor] | None = None  # cached (T_i, C) hidden states entering the first trainable block


# ---------------------------------------------------------------------------------------------------
# Model: GPT-2 with a 2-class head; the parts that train; LoRA

TRAINABLE = ("last_block", "last_two_blocks", "all", "head", "lora")


def make_classifier(model: GPT, trainable: str, lora_rank: int, lora_alpha: float) -> int:
    """Give the model a fresh 2-class head (unless it already is a spam classifier), choose what trains,
    and return the index of the first block that trains (n_layer when no block does)."""
    if model.config.num_classes != len(LABELS):
        # The LM head was tied to the token embedding; the new head is its own Linear(C, 2) with bias,
        # matching GPT(config) for a config with num_classes=2, so the checkpoint reloads as is.
        model.lm_head = nn.Linear(model.config.n_embd, len(LABELS), device=model.transformer.wte.weight.device)
        model.config = dataclasses.replace(model.config, num_classes=len(LABELS))
    n_layer = model.config.n_layer
    model.requires_grad_(trainable == "all")
    model.lm_head.requires_grad_(True)
    if trainable in ("last_block", "last_two_blocks"):
        start = n_layer - (1 if trainable == "last_block" else 2)
        if start < 0:
            raise UserError(f"--trainable {trainable} needs at least 2 blocks; this model has {n_layer}")
        model.transformer.h[start:].requires_grad_(True)
        model.transformer.ln_f.requires_grad_(True)
        return start
    if trainable == "head":
        return n_layer
    if trainable == "lora":
        add_lora(model, lora_rank, lora_alpha)  # LoRA's own A, B are created trainable; all else stays frozen
    return 0


# ---------------------------------------------------------------------------------------------------
# The forward pass, split at the first trainable block

def pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (T_i, ...) tensors to the longest of this batch: (B, T, ...) and lengths (B,).

    The pad value is never seen: under causal attention a token attends only to itself and to
    earlier tokens, so nothing to the right of a message's last token changes its hidden state."""
    lengths = torch.tensor([len(s) for s in seqs])
    return nn.utils.rnn.pad_sequence(seqs, batch_first=True), lengths


def bottom(model: GPT, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Token ids (B, T) -> hidden states entering block `start` (B, T, C): the model up to that block."""
    return model.run_blocks(model.embed(ids), 0, start)


def top(model: GPT, x: torch.Tensor, lengths: torch.Tensor, start: int) -> torch.Tensor:
    """Hidden states entering block `start` (B, T, C) -> class logits (B, 2) at each message's last token.

    Reading the last real token, not position -1, is what makes right padding harmless: under causal
    attention no position sees the ones to its right. The classifier reads that one position, so the
    final block runs at it alone (model.run_block_at: keys and values from every position, the query,
    attention output and MLP at the last token only), about a quarter of the block's work."""
    n_layer = model.config.n_layer
    last = (lengths.to(x.device) - 1)[:, None]  # (B, 1)
    if start < n_layer:
        x = model.run_blocks(x, start, n_layer - 1)  # (B, T, C)
        h = model.run_block_at(n_layer - 1, x, last)  # (B, 1, C)
    else:
        h = x[torch.arange(x.size(0), device=x.device)[:, None], last]  # (B, 1, C)
    return model.lm_head(model.transformer.ln_f(h))[:, 0]  # the norm works per position, so after the gather


def batch_logits(model: GPT, split: Split, index: list[int], start: int, device: torch.device) -> torch.Tensor:
    """Class logits (B, 2) for the messages `index` of a split, from its cached features if it has them."""
    if split.features is not None:
        x, lengths = pad_batch([split.features[i] for i in index])
        return top(model, x.to(device), lengths, start)
    ids, lengths = pad_batch([split.tokens[i] for i in index])
    return top(model, bottom(model, ids.to(device), start), lengths, start)


@torch.no_grad()
def cache_features(model: GPT, split: Split, start: int, batch_size: int, device: torch.device,
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """The hidden states entering block `start` for every message, (T_i, C) each, unpadded.

    Messages are batched by length, so almost no padding is computed."""
    model.eval()
    order = sorted(range(len(split.tokens)), key=lambda i: len(split.tokens[i]))
    features: list[torch.Tensor] = [torch.empty(0)] * len(order)
    for i in range(0, len(order), batch_size):
        index = order[i:i + batch_size]
        ids, lengths = pad_batch([split.tokens[j] for j in index])
        with autocast(device, dtype):
            x = bottom(model, ids.to(device), start).float()  # (B, T, C)
        for row, j in enumerate(index):
            features[j] = x[row, :lengths[row]]
    return features


# ---------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_classifier(model: GPT, split: Split, start: int, batch_size: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Spam probabilities (N,) and mean cross-entropy of a split; batches of similar length."""
    model.eval()
    order = sorted(range(len(split.tokens)), key=lambda i: len(split.tokens[i]))
    probs, loss = torch.empty(len(order)), 0.0
    for i in range(0, len(order), batch_size):
        index = order[i:i + batch_size]
        with autocast(device, dtype):
            logits = batch_logits(model, split, index, start, device).float().cpu()
        loss += F.cross_entropy(logits, split.labels[index], reduction="sum").item()
        probs[index] = logits.softmax(-1)[:, 1]
    return probs, loss / len(order)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, and precision, recall, F1 of spam (the positive class); confusion [[TN, FP], [FN, TP]]."""
    pred = (probs > 0.5).long()
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "confusion": [[tn, fp], [fn, tp]]}


def format_metrics(m: dict) -> str:
    """The test metrics as a small table."""
    (tn, fp), (fn, tp) = m["confusion"]
    width = max(len(str(v)) for v in (tn, fp, fn, tp))
    return "\n".join([
        f"accuracy {m['accuracy']:.2%}  precision {m['precision']:.2%}  recall {m['recall']:.2%}  F1 {m['f1']:.2%}",
        f"{'':12} {'pred ham':>{width + 9}} {'pred spam':>{width + 9}}",
        f"{'true ham':12} {tn:>{width + 9}} {fp:>{width + 9}}",
        f"{'true spam':12} {fn:>{width + 9}} {tp:>{width + 9}}",
    ])


# ---------------------------------------------------------------------------------------------------
# Training

LOSS_SVG = "loss.svg"  # the history's curves, redrawn after each epoch, for a browser
CURVES = (("train_loss", "training loss"), ("val_loss", "validation loss"),
          ("train_accuracy", "training accuracy"), ("val_accuracy", "validation accuracy"))
# Flags that change what a resumed run computes; --epochs may grow, --device or --eval-every may change.
RESUME_MUST_MATCH = ("data", "init", "preset", "trainable", "lora_rank", "lora_alpha", "batch_size", "lr",
                     "weight_decay", "seed", "dtype")


def cache_all_features(model: GPT, splits: dict[str, Split], start: int, batch_size: int, device: torch.device,
                       dtype: torch.dtype) -> float:
    """Give every split the hidden states entering block `start`; the seconds that took.

    Blocks below `start` are frozen and, with no dropout, deterministic, so those hidden states are the
    same every epoch. Computed once per message (batched by length, no padding), they let training run
    only the top: the same losses as recomputing the whole model every step, for a fraction of the work
    (last_block on GPT-2 124M: 1 block per step instead of 12)."""
    t0 = time.perf_counter()
    for split in splits.values():
        split.features = cache_features(model, split, start, batch_size, device, dtype)
    seconds = time.perf_counter() - t0
    print(f"features: hidden states entering block {start} of {sum(len(s.tokens) for s in splits.values())} "
          f"messages computed once in {seconds:.1f} s")
    return seconds


def resume_progress(resumed: dict | None, trainable: list, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, epochs: int) -> dict:
    """Where the run stands: from the saved state when resuming (weights, optimizer and batch order put
    back), else at its start."""
    progress = {"epoch": 0, "step": 0, "history": [], "losses": [],
                "best": {"val_accuracy": -1.0, "val_loss": math.inf, "epoch": 0}, "best_weights": {}}
    if resumed is None:
        return progress
    restore(trainable, resumed["trainable"])
    optimizer.load_state_dict(resumed["optimizer"])
    generator.set_state(resumed["generator"])
    print(f"resuming after epoch {resumed['epoch']} of {epochs}")
    return {key: resumed[key] for key in progress}


def epoch_row(model: GPT, splits: dict[str, Split], start: int, batch_size: int, device: torch.device,
              dtype: torch.dtype, epoch: int, t_epoch: float) -> dict:
    """Loss and accuracy on the training and validation splits after an epoch that began at t_epoch."""
    train_probs, train_loss = evaluate_classifier(model, splits["train"], start, batch_size, device, dtype)
    val_probs, val_loss = evaluate_classifier(model, splits["val"], start, batch_size, device, dtype)
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            "train_accuracy": classification_metrics(train_probs, splits["train"].labels)["accuracy"],
            "val_accuracy": classification_metrics(val_probs, splits["val"].labels)["accuracy"],
            "seconds": time.perf_counter() - t_epoch}


def train_epoch(model: GPT, splits: dict[str, Split], start: int, args: argparse.Namespace, optimizer, order: list[int],
                progress: dict, epoch: int, total_steps: int, device: torch.device, dtype: torch.dtype,
                state_path: Path) -> None:
    """One pass over the training messages in `order`, a progress line (with validation loss) every
    args.eval_every steps; the step count and losses go into progress."""
    train = splits["train"]
    t_interval, interval_losses = time.perf_counter(), []
    for i in range(0, len(order), args.batch_size):
        model.train()
        index = order[i:i + args.batch_size]
        with autocast(device, dtype):
            logits = batch_logits(model, train, index, start, device)
        loss = F.cross_entropy(logits.float(), train.labels[index].to(device))
        check_finite(loss, f"epoch {epoch}, step {progress['step'] + 1}",
                     f"{state_path} holds the run after epoch {epoch - 1}" if epoch > 1 else "nothing was saved")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress["step"] += 1
        progress["losses"].append(loss.item())
        interval_losses.append(loss.item())
        step = progress["step"]
        if step % args.eval_every == 0 or step == total_steps:
            _, val_loss = evaluate_classifier(model, splits["val"], start, args.batch_size, device, dtype)
            ms = 1000 * (time.perf_counter() - t_interval) / len(interval_losses)
            print(f"epoch {epoch}/{args.epochs} step {step:5d}/{total_steps} | loss "
                  f"{sum(interval_losses) / len(interval_losses):.4f} | val loss {val_loss:.4f} | {ms:6.1f} ms/step "
                  f"| {1000 * args.batch_size / ms:6.1f} msg/s | eta {clock(ms / 1000 * (total_steps - step))}")
            t_interval, interval_losses = time.perf_counter(), []


def train(model: GPT, splits: dict[str, Split], start: int, args: argparse.Namespace, device: torch.device,
          dtype: torch.dtype, cache: bool, state_path: Path, resumed: dict | None = None) -> dict:
    """Train with AdamW for args.epochs; keep the weights of the epoch with the best validation accuracy
    (among equal accuracies, the lowest validation loss).

    cache: train on cached hidden states entering block `start` (see cache_all_features). After each
    epoch the state goes to state_path (resumed: that state, to continue from). Ctrl-C stops the run;
    the model then holds the best weights of the finished epochs, if any. A loss that is not finite
    stops the run with a UserError."""
    feature_seconds = cache_all_features(model, splits, start, args.batch_size, device, dtype) if cache else 0.0
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, betas=(0.9, 0.999), device_type=device.type)
    generator = torch.Generator().manual_seed(args.seed)
    total_steps = args.epochs * math.ceil(len(splits["train"].tokens) / args.batch_size)
    trainable = trainable_parameters(model)
    progress = resume_progress(resumed, trainable, optimizer, generator, args.epochs)
    best, interrupted = progress["best"], False
    t_train = time.perf_counter()
    try:
        for epoch in range(progress["epoch"] + 1, args.epochs + 1):
            t_epoch = time.perf_counter()
            order = torch.randperm(len(splits["train"].tokens), generator=generator).tolist()
            train_epoch(model, splits, start, args, optimizer, order, progress, epoch, total_steps, device, dtype,
                        state_path)
            row = epoch_row(model, splits, start, args.batch_size, device, dtype, epoch, t_epoch)
            progress["history"].append(row)
            write_loss_svg(state_path.parent / LOSS_SVG, progress["history"], series=CURVES, x="epoch", top_x=None,
                           title="finetune_spam.py: loss and accuracy after each epoch")
            improved = math.isfinite(row["val_loss"]) and \
                (row["val_accuracy"], -row["val_loss"]) > (best["val_accuracy"], -best["val_loss"])
            if improved:
                best.update(val_accuracy=row["val_accuracy"], val_loss=row["val_loss"], epoch=epoch)
                progress["best_weights"] = best_weights(trainable)
            print(f"epoch {epoch}/{args.epochs} | train acc {row['train_accuracy']:7.2%} "
                  f"| val acc {row['val_accuracy']:7.2%} | val loss {row['val_loss']:.4f} | {row['seconds']:.1f} s"
                  + ("  (best so far)" if improved else ""))
            progress["epoch"] = epoch
            save_state(state_path, trainable, optimizer, generator, progress, args)
    except KeyboardInterrupt:  # a half-done step does not matter: the best weights below replace it
        interrupted = True
        print(f"\nCtrl-C: stopped in epoch {progress['epoch'] + 1}; {state_path} holds the run after epoch "
              f"{progress['epoch']}" if progress["epoch"] else "\nCtrl-C: stopped before the first epoch ended")
    restore(trainable, progress["best_weights"])
    return {"history": progress["history"], "best_epoch": best["epoch"], "losses": progress["losses"],
            "feature_seconds": feature_seconds, "train_seconds": time.perf_counter() - t_train,
            "interrupted": interrupted, "epochs_done": progress["epoch"]}


def message_ids(tokenizer, text: str, block_size: int) -> tuple[torch.Tensor, bool]:
    """A message as its model reads it, (T,) int64, and whether it was cut to fit the context.

    It starts as the model family's texts do (bos(tokenizer)); a longer one keeps that start and
    its last tokens, which the classifier reads."""
    start, ids = bos(tokenizer), tokenizer.encode_ordinary(text)
    keep = block_size - len(start)
    return torch.tensor(start + ids[-keep:]), len(ids) > keep


def prepare_splits(messages: list[tuple[int, str]], tokenizer, block_size: int) -> tuple[dict[str, Split], dict]:
    """Balanced, split and tokenized data, and a summary of it."""
    splits, n_truncated, lengths = {}, 0, []
    for name, part in balance_and_split(messages).items():
        tokens = []
        for _, text in part:
            ids, truncated = message_ids(tokenizer, text, block_size)
            tokens.append(ids)
            n_truncated += truncated
            lengths.append(len(ids))
        splits[name] = Split(tokens, torch.tensor([label for label, _ in part]))
    summary = {"messages": len(messages), "spam": sum(label for label, _ in messages),
               **{name: len(s.tokens) for name, s in splits.items()},
               "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths), "truncated": n_truncated}
    return splits, summary


def train_main(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    device, dtype = device_and_dtype(args.device, args.dtype)
    out_dir = writable_folder(args.out_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out_dir / "classifier.pt"
    writable_folder(checkpoint.parent, "--checkpoint's folder")
    state_path = out_dir / STATE_FILE
    with RunLock(out_dir):
        check_existing_run(out_dir, args, (checkpoint,))
        resumed = load_state(state_path, args, RESUME_MUST_MATCH) if args.resume else None
        data_path = Path(args.data) if args.data else default_data()
        messages = load_messages(data_path)

        model, card = model_to_finetune(args.init, args.preset, args.seed, device,
                                        "--init random --preset mini --trainable all --lr 3e-4")
        start = make_classifier(model, args.trainable, args.lora_rank, args.lora_alpha)
        model.to(device)
        splits, data = prepare_splits(messages, tokenizer_for(card), model.config.block_size)
        print(f"data: {data['messages']} messages ({data['spam']} spam) from {data_path}; balanced and split into "
              f"train {data['train']}, val {data['val']}, test {data['test']}; "
              f"{data['mean_tokens']:.1f} tokens on average, longest {data['max_tokens']}"
              + (f" ({data['truncated']} kept their last {model.config.block_size})" if data["truncated"] else ""))
        n_trainable = report_model(model, args, device, dtype)

        # Caching needs a frozen bottom (start > 0) that gives the same output every epoch (no dropout).
        cache = start > 0 and model.config.dropout == 0
        result = train(model, splits, start, args, device, dtype, cache, state_path, resumed)
        metrics = {"data": data, "init": args.init, "preset": args.preset, "trainable": args.trainable,
                   "trainable_params": n_trainable, "cached_features": cache, **result,
                   "checkpoint": str(checkpoint)}
        if result["epochs_done"] == 0:  # Ctrl-C in the first epoch: nothing worth saving
            return metrics
        merge_lora(model)  # a no-op unless --trainable lora; the test score is then the merged model's, as saved
        if not result["interrupted"]:
            probs, _ = evaluate_classifier(model, splits["test"], start, args.batch_size, device, dtype)
            metrics["test"] = classification_metrics(probs, splits["test"].labels)
            print(f"test ({data['test']} messages, weights of epoch {result['best_epoch']}):\n"
                  f"{format_metrics(metrics['test'])}")
        metrics["seconds"] = time.perf_counter() - t0
        save_checkpoint(checkpoint, model, labels=list(LABELS), test=metrics.get("test"), init=args.init,
                        trainable=args.trainable, **model_card(card))
        atomic_write(out_dir / "metrics.json", json.dumps({k: v for k, v in metrics.items() if k != "losses"},
                                                          indent=2))
        if not result["interrupted"]:
            state_path.unlink(missing_ok=True)  # the classifier holds what a finished run made: no state to keep
    what = "the best weights so far" if result["interrupted"] else "the classifier"
    print(f"saved {what} to {checkpoint} and the metrics to {out_dir / 'metrics.json'} "
          f"({metrics['seconds']:.0f} s in all)" + ("; continue with the same command plus --resume"
                                                    if result["interrupted"] else ""))
    return metrics


# ---------------------------------------------------------------------------------------------------
# Prediction

def predict_main(args: argparse.Namespace) -> dict:
    """Print `spam|ham  probability  text` for each --predict text (`-` reads one text per line of stdin)."""
    texts = read_inputs(args.predict, "--predict", "text", "classify")
    device, dtype = device_and_dtype(args.device, args.dtype)
    path = Path(args.checkpoint) if args.checkpoint else Path(args.out_dir) / "classifier.pt"
    if not path.is_file():
        raise UserError(f"{path} does not exist; train a classifier first with python finetune_spam.py "
                        f"(or name it with --checkpoint)")
    model, card = load_model(str(path), device=device)
    if model.config.num_classes != len(LABELS):
        raise UserError(f"{path} is not a spam classifier; train one with python finetune_spam.py")
    tokenizer, tokens = tokenizer_for(card), []
    for text in texts:
        ids, truncated = message_ids(tokenizer, text, model.config.block_size)
        if truncated:
            print(f"note: a text is longer than the model's context of {model.config.block_size} tokens; "
                  f"classifying its last tokens", file=sys.stderr)
        tokens.append(ids)
    probs, _ = evaluate_classifier(model, Split(tokens, torch.zeros(len(tokens), dtype=torch.long)), 0, args.batch_size,
                        device, dtype)
    if not torch.isfinite(probs).all():
        raise UserError(f"{path} gives no valid probabilities (its weights are not finite); train it again")
    predictions = []
    for text, p in zip(texts, probs.tolist()):
        label = LABELS[int(p > 0.5)]
        predictions.append({"text": text, "label": label, "spam_probability": p})
        print(f"{label:4} {max(p, 1 - p):7.2%}  {text}")
    return {"predictions": predictions}


# ---------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None,
                   help="SMSSpamCollection or its zip; when not given, the UCI zip is downloaded once into the cache")
    add_init_args(p, "gpt2")
    p.add_argument("--trainable", default="last_block", choices=TRAINABLE,
                   help="what trains: the last block(s) with the final norm and head, everything, the head "
                        "only, or LoRA adapters on every block's matrices (plus the head; LoRA usually wants a "
                        "larger --lr than full fine-tuning)")
    p.add_argument("--lora-rank", type=positive_int, default=16, help="rank of the LoRA update")
    p.add_argument("--lora-alpha", type=positive_float, default=32.0, help="the LoRA update is scaled by alpha / rank")
    p.add_argument("--epochs", type=positive_int, default=5, help="passes over the training messages")
    p.add_argument("--batch-size", type=positive_int, default=8, help="messages per step (and per evaluation batch)")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--eval-every", type=positive_int, default=50,
                   help="steps between progress lines (with validation loss)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the initialisation and the batch order "
                                                         "(the data split is fixed)")
    add_device_args(p, ("auto", "float32", "bfloat16"), "autocast precision")
    p.add_argument("--out-dir", default="out/spam",
                   help="run folder: metrics.json, loss.svg (loss and accuracy per epoch, for a browser), state.pt "
                        "(an unfinished run's state after each epoch, for --resume; removed when the run finishes) "
                        "and, by default, the classifier")
    p.add_argument("--checkpoint", default=None,
                   help="classifier file written by training and read by --predict; when not given, "
                        "OUT_DIR/classifier.pt")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the unfinished run in OUT_DIR after its last finished epoch: repeat its command "
                        "and add --resume (--epochs may grow)")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="start a new run even if OUT_DIR already holds a classifier or an unfinished run, "
                        "replacing them")
    p.add_argument("--predict", action="append", metavar="TEXT",
                   help="classify TEXT with the saved classifier instead of training; repeatable; - reads one "
                        "text per line from stdin")
    args = p.parse_args(argv)
    check_preset(p, args.init, args.preset)
    if args.resume and args.force:
        p.error("--resume continues a run and --force replaces it; choose one")
    return args


def main(args: argparse.Namespace) -> dict:
    return predict_main(args) if args.predict else train_main(args)


if __name__ == "__main__":
    run_stage(main, parse_args)
