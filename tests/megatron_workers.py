"""Real Megatron-Core GPT models on the CPU (gloo), and the workers of the upcycling tests.

megatron-core 0.16 builds on the CPU with ``use_cpu_initialization`` and the local
(non-Transformer-Engine) layer spec, but its forward pass assumes CUDA in three places,
which ``_cpu_shims`` redirects to the CPU: ``torch.cuda.current_device()`` (attention
buffers), the CUDA RNG tracker's ``fork`` (dropout regions) and ``te_general_gemm``
(referenced in the router without Transformer Engine installed). The causal mask is passed
explicitly, since the default one is built on "cuda". TEGroupedMLP needs Transformer
Engine and a GPU, so only SequentialMLP models are built here.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moekit.upcycling import UpcycleSpec
from moekit.upcycling import megatron as moekit_megatron

from . import ep_workers
# The ranks end as every spawned gloo rank does. ``os._exit`` leaves the rendezvous store
# file behind, so each run gets a store file of its own (``spawn``).
from .ep_workers import finish


HIDDEN, DENSE_FFN, VOCAB, SEQ = 32, 64, 100, 8


def spawn(fn, world: int, folder: Path, *args) -> str:
    """Run ``fn(rank, world, store, *args, result)`` on ``world`` gloo ranks
    (``ep_workers.spawn``: a store file of its own) and return ``result``, the path in
    ``folder`` under which the ranks save what they found."""
    folder.mkdir(parents=True, exist_ok=True)
    result = str(folder / "result")
    ep_workers.spawn(fn, world, folder, *args, result)
    return result


def _cpu_shims() -> None:
    warnings.filterwarnings("ignore")
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    moe_utils.te_general_gemm = None


def init(rank: int, world: int, store: str, ep: int = 1, tp: int = 1) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    _cpu_shims()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             expert_model_parallel_size=ep)


def _config(bias: bool, ep: int, activation=F.silu, **moe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4,
                             ffn_hidden_size=DENSE_FFN, use_cpu_initialization=True,
                             gated_linear_unit=True, activation_func=activation,
                             add_bias_linear=bias, bias_activation_fusion=False,
                             normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
                             expert_model_parallel_size=ep, **moe)


def build(seed: int, bias: bool = False, ep: int = 1, experts: int = 0, top_k: int = 2,
          granularity: int = 1, pre_process: bool = True, post_process: bool = True,
          activation=F.silu, **routing):
    """A GPTModel (dense when ``experts`` is 0) with every parameter drawn from N(0, 0.2);
    ``routing`` are further MoE settings of its config (score function, scaling factor)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    moe = dict(num_moe_experts=experts, moe_router_topk=top_k,
               moe_ffn_hidden_size=DENSE_FFN // granularity,
               moe_token_dispatcher_type="allgather", **routing) if experts else {}
    spec = get_gpt_layer_local_spec(num_experts=experts or None, moe_grouped_gemm=False)
    torch.manual_seed(seed)
    model = GPTModel(config=_config(bias, ep, activation, **moe), transformer_layer_spec=spec,
                     vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type="learned_absolute", pre_process=pre_process,
                     post_process=post_process)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def forward(chunks, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a model given as consecutive pipeline chunks."""
    positions = torch.arange(ids.shape[1])[None]
    mask = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1]), diagonal=1).bool()
    hidden = None
    with torch.no_grad():
        for chunk in chunks:
            if hidden is not None:
                chunk.set_input_tensor(hidden)
            hidden = chunk(ids if chunk.pre_process else None,
                           positions if chunk.pre_process else None, attention_mask=mask)
    return hidden


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


VARIANTS = {
    "softmax": dict(experts=4, top_k=2, granularity=2),
    "softmax_bias": dict(bias=True, experts=4, top_k=2, granularity=2),
    "sigmoid": dict(experts=4, top_k=2, granularity=2, moe_router_score_function="sigmoid"),
    "scaling_factor": dict(bias=True, experts=4, top_k=2, granularity=2,
                           moe_router_topk_scaling_factor=2.5),
    "pre_softmax_every_expert": dict(experts=2, top_k=2, moe_router_pre_softmax=True),
    "gated_gelu": dict(experts=4, top_k=2, granularity=2, activation=F.gelu),
}
"""MoE models to upcycle (two layers each): their settings beside the defaults (SiLU
gated MLP, softmax after the top-k); the dense model shares their bias and activation."""


def upcycling_variants(rank: int, world: int, store: str, result: str) -> None:
    """For each of ``VARIANTS``: the dense logits against those of moekit's exact upcycling
    and of its Megatron scaling; which tensors of the latter differ from megatron-core's own
    upcycling; and whether the router biases it wrote are grouped like the weights."""
    init(rank, world, store)
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    found = {}
    for name, settings in VARIANTS.items():
        dense = build(0, **{k: settings[k] for k in ("bias", "activation") if k in settings})
        moe = build(1, **settings)
        g = settings.get("granularity", 1)
        theirs = upcycle_state_dict([moe], [dense])["model"]
        megatron_scaling = moekit_megatron.upcycle_state_dict(
            [moe], [dense], UpcycleSpec(settings["experts"], settings["top_k"],
                                        "granular" if g > 1 else "copy", g,
                                        scaling="megatron"))["model"]
        exact = moekit_megatron.upcycle_state_dict([moe], [dense])["model"]
        dense_logits = forward([dense], _ids())
        errors = {}
        for scaling, state in (("megatron", megatron_scaling), ("exact", exact)):
            moe.load_state_dict(state, strict=True)
            errors[scaling] = (forward([moe], _ids()) - dense_logits).abs().max().item()
        biases = [v for k, v in megatron_scaling.items() if k.endswith("router.bias")]
        found[name] = {
            "exact_error": errors["exact"], "megatron_error": errors["megatron"],
            "keys_match": theirs.keys() == megatron_scaling.keys(),
            "megatron_differ": sorted(k for k, v in theirs.items() if isinstance(v, torch.Tensor)
                                      and not torch.equal(v, megatron_scaling[k])),
            "router_biases_grouped": [torch.equal(b[0::g], b[i::g]) for b in biases
                                      for i in range(g)]}
    torch.save(found, result)
    finish()


def shared_experts(rank: int, world: int, store: str, result: str) -> None:
    """MoE models with shared experts of the dense MLP's size, gated
    (``moe_shared_expert_gate``, as Qwen2-MoE's) or not (as DeepSeek-V3's), each upcycled
    with ``shared_expert`` (G=2, virtual-group router): by gate, the largest difference of
    its logits from the dense ones."""
    init(rank, world, store)
    dense = build(0)
    found = {}
    for gate in (True, False):
        moe = build(1, experts=4, top_k=2, granularity=2,
                    moe_shared_expert_intermediate_size=DENSE_FFN, moe_shared_expert_gate=gate)
        state = moekit_megatron.upcycle_state_dict(
            [moe], [dense], UpcycleSpec(4, 2, "granular", 2, shared_expert=True))["model"]
        moe.load_state_dict(state, strict=True)
        found[gate] = (forward([moe], _ids()) - forward([dense], _ids())).abs().max().item()
    torch.save(found, result)
    finish()


def virtual_pipeline(rank: int, world: int, store: str, result: str) -> None:
    """Two model chunks: each MoE chunk from its dense chunk; the logits stay the dense ones."""
    init(rank, world, store)
    dense = [build(0, pre_process=True, post_process=False),
             build(1, pre_process=False, post_process=True)]
    moe = [build(2, experts=4, top_k=2, granularity=2, pre_process=True, post_process=False),
           build(3, experts=4, top_k=2, granularity=2, pre_process=False, post_process=True)]
    returned = moekit_megatron.load_and_upcycle_model(lambda: (7, 0.0), moe, dense, strict=True)
    error = (forward(moe, _ids()) - forward(dense, _ids())).abs().max().item()
    torch.save({"returned": returned, "error": error}, result)
    finish()


def expert_parallel(rank: int, world: int, store: str, result: str) -> None:
    """EP = world: each rank builds only its own experts, as megatron-core's own upcycling
    gives them (G=2, with biases); Drop-Upcycling draws depend on the global expert index
    only, so a rank's experts equal those of a one-rank run."""
    init(rank, world, store, ep=world)
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    dense = build(0, bias=True)
    granular = build(1, bias=True, ep=world, experts=4, top_k=2, granularity=2)
    theirs = upcycle_state_dict([granular], [dense])["model"]
    ours = moekit_megatron.upcycle_state_dict(
        [granular], [dense], UpcycleSpec(4, 2, "granular", 2, scaling="megatron"))["model"]
    granular.load_state_dict(ours, strict=True)
    experts = [k for k in ours if ".local_experts." in k and k.endswith(("weight", "bias"))]
    experts = experts + [k for k in ours if k.endswith("router.weight")]
    dropped = build(2, bias=True, ep=world, experts=4, top_k=2)
    drop = moekit_megatron.upcycle_state_dict(
        [dropped], [dense], UpcycleSpec(4, 2, "drop", drop_ratio=0.5))["model"]
    dropped.load_state_dict(drop, strict=True)
    local = dropped.decoder.layers[0].mlp.local_expert_indices
    fc1 = {e: drop[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight"]
           for j, e in enumerate(local)}
    torch.save({"megatron_equal": all(torch.equal(theirs[k], ours[k]) for k in experts),
                "n_expert_tensors": len(experts), "drop_fc1": fc1}, f"{result}.{rank}")
    finish()
