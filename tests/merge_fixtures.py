"""Tiny offline models for the merge tests: a word-level tokenizer built with
``tokenizers``, a seeded dense base model and seeded "fine-tunes" (the base with every
tensor perturbed), saved as Hugging Face folders, and mergekit-moe run on them."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

WORDS = ["code", "python", "loop", "math", "sum", "proof", "chat", "hello", "friend", "story"]


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over WORDS with BOS/EOS/UNK, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(folder))


def dense_config(model_type: str = "llama"):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=len(WORDS) + 3, hidden_size=32,
                                intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, tie_word_embeddings=False)


def save_models(root: Path, model_type: str = "llama", finetunes: int = 3,
                dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    """The base model and ``finetunes`` perturbed copies (seeded), each with the tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(dense_config(model_type)).to(dtype)
    paths = []
    for i in range(finetunes + 1):
        model = base
        if i:
            model = AutoModelForCausalLM.from_config(dense_config(model_type)).to(dtype)
            generator = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
                    p.copy_(q + 0.01 * torch.randn(q.shape, generator=generator).to(dtype))
        folder = root / ("base" if i == 0 else f"ft{i}")
        model.save_pretrained(str(folder))
        save_tokenizer(folder)
        paths.append(folder)
    return paths[0], paths[1:]


PROMPTS = [(["code python", "python loop"], ["chat"]), (["math sum", "proof"], []),
           (["hello friend", "chat story"], ["code"])]


def write_yaml(path: Path, base: Path, experts: list[Path], **fields) -> Path:
    """A mergekit-moe YAML over ``experts`` (prompts from PROMPTS) plus ``fields``."""
    config = {"base_model": str(base), "experts": [
        {"source_model": str(e), "positive_prompts": PROMPTS[i % 3][0],
         **({"negative_prompts": PROMPTS[i % 3][1]} if PROMPTS[i % 3][1] else {})}
        for i, e in enumerate(experts)], **fields}
    path.write_text(yaml.safe_dump(config))
    return path


def run_mergekit(config: Path, out: Path, seed: int = 0, device: str = "cpu") -> None:
    """mergekit-moe on ``config`` (its Python API, offline), as its CLI runs it with
    ``--random-seed seed --device device --i-understand-this-is-not-useful-without-training``."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    options = MergeOptions(random_seed=seed, device=device)
    options.apply_global_options()
    build(MoEMergeConfig.model_validate(yaml.safe_load(config.read_text())), str(out),
          merge_options=options, device=device, allow_all_same=True)
