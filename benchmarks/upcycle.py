"""Benchmark ``moekit upcycle``: peak memory and time of upcycling a dense checkpoint.

Builds a synthetic Llama-shaped bf16 checkpoint (default about 2 GiB), upcycles it into an
8-expert Mixtral checkpoint, and reports moekit's peak RSS against the output size and the
largest tensor, and its time as a ratio to ``cp -r`` of the output it wrote (the same
bytes), measured in the same run because the machines are shared and noisy.

    .venv/bin/python benchmarks/upcycle.py [--size-gib 2] [--experts 8] [--method copy] [--json F]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from common import drop_written, folder_bytes, run_measured, write_figures, write_synthetic


def llama_tensors(layers: int, hidden: int, inter: int, vocab: int = 4096
                  ) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama-shaped dense checkpoint."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (hidden,)),
                *((f"{p}.self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"),
                (f"{p}.post_attention_layernorm.weight", (hidden,)),
                (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
                (f"{p}.mlp.up_proj.weight", (inter, hidden)),
                (f"{p}.mlp.down_proj.weight", (hidden, inter))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--method", default="copy", choices=["copy", "granular", "drop"])
    parser.add_argument("--granularity", type=int, default=1)
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    layer_bytes = 2 * (4 * args.hidden ** 2 + 3 * args.hidden * args.inter)
    layers = max(1, round(args.size_gib * 2**30 / layer_bytes))
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moekit-bench-") as tmp:
        dense, moe, copy = (Path(tmp) / n for n in ("dense", "moe", "copy"))
        config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                  "hidden_size": args.hidden, "intermediate_size": args.inter,
                  "num_hidden_layers": layers, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "vocab_size": 4096, "rms_norm_eps": 1e-5}
        size = write_synthetic(dense, llama_tensors(layers, args.hidden, args.inter), config)
        print(f"dense checkpoint: {size / 2**30:.2f} GiB, {layers} layers (H={args.hidden}, "
              f"I={args.inter}), bf16")
        upcycle = [sys.executable, "-m", "moekit.cli", "upcycle", str(dense), str(moe),
                   "--experts", str(args.experts), "--top-k", str(args.top_k),
                   "--method", args.method]
        if args.method == "granular":
            upcycle += ["--granularity", str(args.granularity)]
        seconds, peak = run_measured(upcycle)
        written = folder_bytes(moe)
        cp_seconds, _ = run_measured(["cp", "-r", str(moe), str(copy)])
        drop_written(copy)
        largest = 2 * args.hidden * args.inter // args.granularity
        print(f"output: {written / 2**30:.2f} GiB ({args.experts} experts, {args.method})")
        print(f"{'':28}{'seconds':>10}{'GB/s':>8}{'ratio':>8}")
        print(f"{'cp -r of the output':28}{cp_seconds:10.2f}{written / cp_seconds / 1e9:8.2f}"
              f"{1.0:8.2f}")
        print(f"{'moekit upcycle':28}{seconds:10.2f}{written / seconds / 1e9:8.2f}"
              f"{seconds / cp_seconds:8.2f}")
        print(f"moekit peak RSS: {peak / 2**20:.0f} MiB = {100 * peak / written:.1f} % of the "
              f"output, {100 * peak / size:.1f} % of the dense input (largest tensor "
              f"{largest / 2**20:.0f} MiB)")
        write_figures(args.json, f"{platform.machine()} {os.cpu_count()} cores",
                      {"cp -r of the output": {"seconds": cp_seconds, "ratio": 1.0},
                       "moekit upcycle": {"seconds": seconds, "ratio": seconds / cp_seconds,
                                          "peak_rss_bytes": peak}},
                      dense_bytes=size, output_bytes=written, baseline="cp -r of the output",
                      method=args.method, experts=args.experts)


if __name__ == "__main__":
    main()
