"""Router rows of a merge, computed as mergekit-moe computes them (mergekit 0.1.5,
``mergekit/moe/router.py`` and ``scripts/moe.py``).

Rows come as one float32 tensor [layers, experts + shared experts, hidden]:

- ``random``: ``torch.randn`` of that shape from a CPU generator seeded with ``seed``:
  N(0, 1) rows, what mergekit-moe draws after ``--random-seed seed``.
- ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)) from the same generator, ``nn.Linear``'s
  default initialisation.
- ``cheap_embed``: for each expert, the base model's token embeddings of its positive
  prompts summed over tokens (padding masked) and prompts, divided by its norm; minus
  the same of its negative prompts; divided by the norm again. The same row in every
  layer.
- ``hidden`` (or ``hidden_last``): the base model (transformers, in bfloat16) runs each
  expert's prompts as one left-padded batch; the row of layer l is the hidden state
  entering layer l at the last token, averaged over the prompts; negative prompts are
  subtracted, then the row is divided by its norm.
- ``hidden_avg``: the same with the hidden states averaged over every position of the
  padded batch (padding included, as mergekit-moe averages them) instead of the last.

Prompts are tokenized as mergekit-moe does: the BOS token written before each prompt, no
other special tokens, padded on the left with the BOS token (or EOS when there is none).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import MoekitError, printable
from .config import ExpertSource

EMBEDDINGS = "model.embed_tokens.weight"


def gate_rows(mode: str, sources: Sequence[ExpertSource], base: Path, layers: int,
              hidden: int, seed: int, embeddings: Callable[[], torch.Tensor],
              device: str = "cpu", show_progress: bool | None = None) -> torch.Tensor:
    """The [layers, len(sources), hidden] float32 router rows of ``mode`` (see the module);
    ``embeddings`` reads the base model's token embeddings (``cheap_embed`` only)."""
    shape = (layers, len(sources), hidden)
    if mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden)
        draw = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        return draw * 2 * bound - bound
    tokenizer = _tokenizer(base)
    if mode == "cheap_embed":
        embed = embeddings()

        def rows(batch) -> torch.Tensor:
            return _cheap_embedding(embed, batch, layers)
    else:
        model = _model(base, device)

        def rows(batch) -> torch.Tensor:
            return _hidden_states(model, batch, average=mode == "hidden_avg")
    out = []
    shown = sys.stderr.isatty() if show_progress is None else show_progress
    with tqdm(total=len(sources), desc="router rows from prompts", unit="expert",
              disable=not shown, leave=False, file=sys.stderr) as bar:
        for source in sources:
            vec = rows(_tokenize(source.positive_prompts, tokenizer))
            if source.negative_prompts:
                vec -= rows(_tokenize(source.negative_prompts, tokenizer))
            vec /= vec.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
            out.append(vec)
            bar.update(1)
    return torch.stack(out, dim=0).permute(1, 0, 2)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoekitError("gate modes hidden and cheap_embed run the base model's tokenizer "
                          "(and model) with transformers: pip install 'moekit[merge]'") from None
    return transformers


def _tokenizer(base: Path):
    AutoTokenizer = _transformers().AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError) as err:
        raise MoekitError(f"cannot load the tokenizer of the base model "
                          f"{printable(str(base))}, which prompt gate modes need: "
                          f"{printable(' '.join(str(err).split()))}") from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise MoekitError(f"the tokenizer of the base model {printable(str(base))} has neither "
                          "a BOS nor an EOS token, which prompt gate modes pad the prompts "
                          "with (as mergekit-moe pads them)")
    return tokenizer


def _tokenize(prompts: Sequence[str], tokenizer):
    """The prompts as one padded batch; refused where a prompt gives no token (a base
    model without its tokenizer files, which transformers then makes empty), whose
    router row would be zeros."""
    batch = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    empty = [p for p, mask in zip(prompts, batch["attention_mask"]) if not mask.any()]
    if empty or batch["input_ids"].shape[-1] == 0:
        raise MoekitError(f"the tokenizer of the base model "
                          f"{printable(str(tokenizer.name_or_path))} gives no token for the "
                          f"prompt {printable(repr((empty or prompts)[0]))}: does that folder "
                          "hold its tokenizer files (tokenizer.json, tokenizer_config.json)?")
    return batch


def _cheap_embedding(embed: torch.Tensor, batch, layers: int) -> torch.Tensor:
    """Summed masked embeddings of a batch, normalised, repeated for every layer. Rows of
    the embedding are gathered where mergekit multiplies a one-hot matrix by it: each
    element of that product is one embedding value times 1 plus zeros, the same number."""
    h = embed.float()[batch["input_ids"]]
    summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    row = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return row.repeat(layers, 1)


def _model(base: Path, device: str):
    try:
        return _transformers().AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16,
                                                    device_map=device)
    except (OSError, ValueError) as err:
        raise MoekitError(f"cannot load the base model {printable(str(base))} with "
                          f"transformers for gate_mode hidden: {err}") from None


def _hidden_states(model, batch, average: bool) -> torch.Tensor:
    """[layers, hidden]: the hidden state entering each layer at the last token (or
    averaged over the positions), averaged over the batch (in the model's dtype)."""
    with torch.no_grad():
        output = model(**batch.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])
    if average:
        states = states.sum(dim=2) / states.shape[2]
    else:
        states = states[:, :, -1, :]
    return (states.sum(dim=1) / states.shape[1]).cpu()
