"""pretrain.py --plan: the activation count against what autograd really keeps, for every family; the
whole memory figure against a real run's peak; the plan's output, plan.json, and its advice."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import planner
import pretrain
from model import GPT, get_config



REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["tiny", "mistral-tiny", "llama-tiny", "phi-2-tiny", "phi-3-tiny"]


def saved_for_backward(model: GPT, idx: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward, each storage
    counted once and the weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(kept.values())


def estimate(config, tokens: int, block_size: int, checkpointing: bool = False) -> float:
    per_block = planner.block_activations(config, tokens, block_size, half=False)
    blocks = config.n_layer * tokens * config.n_embd * 4 + per_block if checkpointing else config.n_layer * per_block
    return blocks + planner.head_activations(config, tokens, half=False)[0]


@pytest.mark.parametrize("preset", FAMILIES)
def test_activation_estimate_matches_what_autograd_keeps(preset):
    # a context longer than the *-tiny presets' windows (64), so the window's mask counts too
    B, T = 2, 128
    torch.manual_seed(0)
    model = GPT(get_config(preset, block_size=T))
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    measured = saved_for_backward(model, idx)
    assert estimate(model.config, B * T, T) == pytest.approx(measured, rel=0.03)
    # Activation checkpointing: each block keeps its input; one block is recomputed at a time in backward.
    pretrain.checkpoint_activations(model)
    kept = saved_for_backward(model, idx)
    one_block = planner.block_activations(model.config, B * T, T, half=False)
    assert kept + one_block == pytest.approx(estimate(model.config, B * T, T, checkpointing=True), rel=0.05)
    assert measured - kept > 0.8 * (model.config.n_layer - 1) * one_block  # the blocks' activations are gone


def test_activation_checkpointing_changes_memory_not_the_loss():
    torch.manual_seed(0)
    model = GPT(get_config("mini", block_size=64))
    idx = torch.randint(0, 50257, (4, 64))
    plain_kept = saved_for_backward(model, idx)
    loss = model(idx, idx)[1]
    loss.backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pretrain.checkpoint_activations(model)
    kept = saved_for_backward(model, idx)
    loss_ck = model(idx, idx)[1]
    loss_ck.backward()
    assert loss_ck.item() == loss.item()
    assert all(torch.allclose(p.grad, g, atol=1e-7) for p, g in zip(model.parameters(), plain_grads))
    logits = 4 * 4 * 64 * 50257  # the loss's log-softmax, the same either way
    assert kept - logits < 0.5 * (plain_kept - logits)


def run_and_plan(tmp_path: Path, flags: list[str]) -> tuple[dict, int]:
    """plan.json for these flags, and the peak memory a real run with them reports."""
    common = [sys.executable, str(REPO / "pretrain.py"), *flags, "--device", "cpu"]
    subprocess.run([*common, "--plan", "--out-dir", str(tmp_path / "plan")], check=True, capture_output=True,
                   timeout=300)
    run = subprocess.run([*common, "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / "plan" / "plan.json").read_text()), records[-1]["peak_memory"]


@pytest.mark.needs_files("gpt2/encoder.json", "gpt2/vocab.bpe", "text/the-verdict.txt")  # a subprocess
def test_planned_memory_is_within_20_percent_of_a_real_runs_peak(verdict_text, tmp_path):
    """The mini model (16M parameters) on the CPU, where weights, AdamW's state and the activations
    outweigh the runtime: plan.json's bytes_per_process against the run's own peak RSS."""
    plan, peak = run_and_plan(tmp_path, ["--data", str(verdict_text), "--preset", "mini", "--block-size", "128",
                                         "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
                                         "--eval-batches", "1", "--sample-tokens", "0"])
    assert plan["memory"]["baseline"] < 0.5 * plan["bytes_per_process"]  # the model's own memory dominates
    assert plan["bytes_per_process"] == pytest.approx(peak, rel=0.2), (plan["memory"], peak)


@pytest.fixture(scope="module")
def verdict_text(offline_cache) -> Path:
    return offline_cache / "text" / "the-verdict.txt"


def test_plan_prints_every_figure_writes_plan_json_and_trains_nothing(tmp_path, capsys):
    plan = pretrain.main(pretrain.parse_args(["--plan", "--preset", "gpt2", "--block-size", "1024", "--batch-size",
                                              "8", "--grad-accum", "4", "--max-steps", "1000",
                                              "--out-dir", str(tmp_path), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(json.dumps(plan))
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert 124e6 < plan["parameters"] < 125e6 and plan["tokens_per_step"] == 8 * 1024 * 4
    mem = plan["memory"]
    assert mem["weights"] == 4 * plan["parameters"] and mem["optimizer"] == 8 * plan["parameters"]
    assert plan["bytes_per_process"] == mem["total"] > mem["weights"] + mem["gradients"] + mem["optimizer"]
    assert plan["activations_with_checkpointing"] < 0.4 * mem["activations"]
    assert plan["flops_per_step"] == plan["flops_per_token"] * plan["tokens_per_step"]
    assert [d["device"] for d in plan["devices"]] == ["this CPU", "H100", "H200", "A100", "L4"]
    # 1000 steps, and 41 evaluations (step 0, every 25 steps) of 8 batches: forward passes, a third of a step's FLOPs
    assert plan["eval_tokens"] == 41 * 8 * 8 * 1024
    for d in plan["devices"]:
        evaluating = plan["flops_per_token"] / 3 * plan["eval_tokens"] / d["sustained_flops_per_s"]
        assert d["seconds_per_step"] > 0
        assert d["seconds_per_run"] == pytest.approx(1000 * d["seconds_per_step"] + evaluating)
    h100 = next(d for d in plan["devices"] if d["device"] == "H100")
    assert h100["dtype"] == "bfloat16" and h100["fits"]
    for words in ("parameters", "weights", "gradients", "optimizer state", "activations", "FLOPs", "A100", "H100",
                  "H200", "L4", "this CPU", "40 %", "plan.json"):
        assert words in out, words


def test_plan_says_what_makes_a_big_run_fit(tmp_path):
    """Mistral 7B on 8 GPUs with DDP needs ~16 bytes per parameter in every process: it fits no GPU
    alone; FSDP's shards fit an 80 GB one, and the advice must fit when applied."""
    args = pretrain.parse_args(["--plan", "--preset", "mistral-7b", "--block-size", "4096", "--batch-size", "1",
                                "--plan-processes", "8", "--out-dir", str(tmp_path), "--device", "cpu"])
    plan = pretrain.plan_main(args)
    h100 = next(d for d in plan["devices"] if d["device"] == "H100")
    assert h100["fits"] is False and "--strategy fsdp" in h100["fits_with"]
    config, _ = planner.init_config(args.init, args.preset)
    sharded = planner.memory_per_process(config, batch_size=1, block_size=4096, processes=8, strategy="fsdp",
                                          dtype=torch.bfloat16, baseline=planner.CUDA_CONTEXT_BYTES)
    assert sharded["total"] <= 80e9 < h100["bytes_per_process"]
    assert sharded["weights"] == pytest.approx(h100["memory"]["weights"] / 8)


def test_finetune_instruct_plans_with_the_same_planner(tmp_path):
    """finetune_instruct.py --plan: its batch and context, and with LoRA only the adapters' gradients and
    AdamW state (and no weight gradients for the frozen matrices in the FLOPs)."""
    import finetune_instruct
    flags = ["--plan", "--init", "random", "--preset", "tiny", "--batch-size", "4", "--max-length", "64",
             "--device", "cpu"]
    full = finetune_instruct.main(finetune_instruct.parse_args([*flags, "--out-dir", str(tmp_path / "all")]))
    lora = finetune_instruct.main(finetune_instruct.parse_args([*flags, "--trainable", "lora",
                                                                "--out-dir", str(tmp_path / "lora")]))
    assert json.loads((tmp_path / "lora" / "plan.json").read_text())["trainable_parameters"] == \
        lora["trainable_parameters"]
    assert full["tokens_per_step"] == lora["tokens_per_step"] == 4 * 64
    assert lora["trainable_parameters"] < 0.1 * lora["parameters"] == 0.1 * full["trainable_parameters"]
    assert lora["memory"]["gradients"] == 4 * lora["trainable_parameters"]
    assert lora["memory"]["optimizer"] == 8 * lora["trainable_parameters"]
    assert lora["flops_per_token"] < full["flops_per_token"]
