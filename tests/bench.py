"""Benchmarks, one subcommand per stage, each printing a table. Not collected by pytest.

    python tests/bench.py tokenizer     # BPE training vs a naive trainer, encoding and preparation MB/s
    python tests/bench.py generate --hf-python VENV/bin/python   # decoding: KV cache, no cache, transformers
    python tests/bench.py train-step    # one GPT-2 124M training step on this CPU: tokens/s and MFU
    python tests/bench.py train         # pretrain.py's step: small preset, GPT-2 124M, 2-process DDP
    python tests/bench.py load --hf-python VENV/bin/python       # load time and peak RSS vs transformers
    python tests/bench.py families --hf-python VENV/bin/python   # Mistral-shaped decoding vs transformers
    python tests/bench.py spam          # finetune_spam.py vs the book's recipe; accuracy; settings table
    python tests/bench.py instruct      # finetune_instruct.py vs the book's ch. 7 recipe; gpt2-medium figures
    python tests/bench.py preference --preference-limit 20   # finetune_preference.py (DPO) vs the book's recipe
    python tests/bench.py evaluate      # choice items/s vs a forward per choice; contamination MB/s and memory; perplexity
    python tests/bench.py serve --hf-python VENV/bin/python      # serve.py vs transformers serve, 1/4/8 streaming clients
    python tests/bench.py rag --ref-python VENV/bin/python   # BM25: build, index size, query p50/p95 vs rank_bm25, bm25s
    python tests/bench.py gpu           # CUDA only: bf16 compiled decoding and training MFU

The measurements themselves live in tests/bench_parts/<stage>.py. transformers is never imported
here: comparisons run it in a subprocess with the Python of a throwaway venv that has it (--hf-python).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: model.py & co.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/, for bench_parts

import bench_parts.evaluate as evaluate_bench  # noqa: E402
import bench_parts.families as families_bench  # noqa: E402
import bench_parts.generate as generate_bench  # noqa: E402
import bench_parts.instruct as instruct_bench  # noqa: E402
import bench_parts.serve as serve_bench  # noqa: E402
import bench_parts.load as load_bench  # noqa: E402
import bench_parts.preference as preference_bench  # noqa: E402
import bench_parts.rag as rag_bench  # noqa: E402
import bench_parts.spam as spam_bench  # noqa: E402
import bench_parts.tokenizer as tokenizer_bench  # noqa: E402
import bench_parts.train as train_bench  # noqa: E402

from tokenizer import UserError



def gpu(args: argparse.Namespace) -> list[dict]:
    """Everything that needs CUDA, in one run: bf16 decoding (eager, compiled) and the compiled
    context-1024 bf16 training step, as MFU of a measured bf16 matmul peak."""
    return generate_bench.run_gpu(args) + train_bench.run(args)


# subcommand -> (the function adding its flags, the function returning its rows)
BENCHMARKS = {
    "tokenizer": (tokenizer_bench.add_arguments, tokenizer_bench.run),
    "generate": (generate_bench.add_arguments, generate_bench.run_generate),
    # GPT-2 124M, context 128, batch 4, fp32 on the CPU: the train benchmark's gpt2 case alone
    "train-step": (lambda parser: train_bench.add_arguments(parser, cases=("gpt2",)), train_bench.run),
    "train": (train_bench.add_arguments, train_bench.run),
    "load": (load_bench.add_arguments, load_bench.run),
    "families": (families_bench.add_arguments, families_bench.run),
    "spam": (spam_bench.add_arguments, spam_bench.run),
    "instruct": (instruct_bench.add_arguments, instruct_bench.run),
    "preference": (preference_bench.add_arguments, preference_bench.run),
    "evaluate": (evaluate_bench.add_arguments, evaluate_bench.run),
    "serve": (serve_bench.add_arguments, serve_bench.run),
    "rag": (rag_bench.add_arguments, rag_bench.run),
    "gpu": (lambda parser: (generate_bench.add_arguments(parser, gpu=True),
                            train_bench.add_arguments(parser, cases=("gpu",))), gpu),
}


def print_table(rows: list[dict]) -> None:
    """A Markdown table whose columns are every key the rows use, in order of first use."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    show = lambda value: f"{value:.4g}" if isinstance(value, float) else str(value)
    cells = [[show(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(r[i]) for r in cells)) for i, column in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_arguments, _) in BENCHMARKS.items():
        add_arguments(commands.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args()
    rows = BENCHMARKS[args.benchmark][1](args)
    print_table(rows)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
