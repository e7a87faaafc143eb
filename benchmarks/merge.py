"""Benchmark ``moekit merge`` against ``mergekit-moe`` on the same YAML: time and peak memory.

Builds a synthetic Llama-shaped bf16 base model and ``--experts`` synthetic "fine-tunes" of
its shape (default 0.5 GiB each) with a small word-level tokenizer, merges them into a
Mixtral checkpoint with ``gate_mode: random`` by both tools (mergekit-moe with
``--random-seed 0``, moekit with ``--seed 0``), reports each one's wall time and peak RSS,
and checks with ``moekit verify`` that the two outputs hold the same weights.

    .venv/bin/python benchmarks/merge.py [--size-gib 0.5] [--experts 4] [--json F]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import folder_bytes, run_measured, write_figures, write_synthetic
from upcycle import llama_tensors

VOCAB = 4096


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with BOS/EOS/UNK (mergekit-moe loads the base model's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "hello"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=0.5, help="size of each model")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    layer_bytes = 2 * (4 * args.hidden ** 2 + 3 * args.hidden * args.inter)
    layers = max(1, round(args.size_gib * 2**30 / layer_bytes))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": args.hidden, "intermediate_size": args.inter,
              "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
              "dtype": "bfloat16", "tie_word_embeddings": False}
    tensors = llama_tensors(layers, args.hidden, args.inter, VOCAB)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moekit-bench-") as tmp:
        root = Path(tmp)
        size = write_synthetic(root / "base", tensors, config)
        save_tokenizer(root / "base")
        experts = []
        for i in range(args.experts):
            write_synthetic(root / f"ft{i}", tensors, config)
            experts.append({"source_model": str(root / f"ft{i}")})
        merge_yaml = root / "moe.yml"
        merge_yaml.write_text(yaml.safe_dump({
            "base_model": str(root / "base"), "gate_mode": "random", "dtype": "bfloat16",
            "experts_per_token": 2, "experts": experts}))
        print(f"{args.experts + 1} models of {size / 2**30:.2f} GiB, {layers} layers "
              f"(H={args.hidden}, I={args.inter}), bf16")
        mergekit = Path(sys.executable).parent / "mergekit-moe"
        rows = {}
        for name, cmd in (
                ("mergekit-moe", [str(mergekit), str(merge_yaml), str(root / "mergekit"),
                                  "--random-seed", "0", "--device", "cpu"]),
                ("moekit merge", [sys.executable, "-m", "moekit.cli", "merge", str(merge_yaml),
                                  str(root / "moekit"), "--seed", "0"])):
            seconds, peak = run_measured(cmd)
            rows[name] = {"seconds": seconds, "peak_rss_bytes": peak}
        written = folder_bytes(root / "moekit")
        same = subprocess.run([sys.executable, "-m", "moekit.cli", "verify",
                               str(root / "mergekit"), str(root / "moekit")],
                              capture_output=True, text=True).returncode == 0
        base = rows["mergekit-moe"]["seconds"]
        print(f"output: {written / 2**30:.2f} GiB; the same weights: {'yes' if same else 'NO'}")
        print(f"{'':16}{'seconds':>10}{'ratio':>8}{'peak RSS MiB':>14}")
        for name, row in rows.items():
            row["ratio"] = row["seconds"] / base
            print(f"{name:16}{row['seconds']:10.2f}{row['ratio']:8.2f}"
                  f"{row['peak_rss_bytes'] / 2**20:14.0f}")
        write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores", rows,
                      model_bytes=size, output_bytes=written, baseline="mergekit-moe",
                      experts=args.experts, same_weights=same)
        if not same:
            sys.exit("the two outputs differ")


if __name__ == "__main__":
    main()
