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

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moekit.upcycling import UpcycleSpec
from moekit.upcycling import megatron as moekit_megatron

from .ep_workers import finish

HIDDEN, DENSE_FFN, VOCAB, SEQ = 32, 64, 100, 8


def _cpu_shims() -> None:
    warnings.filterwarnings("ignore")
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    moe_utils.te_general_gemm = None


def init(rank: int, world: int, store: str, ep: int = 1) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    _cpu_shims()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)


def _config(bias: bool, ep: int, **moe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4,
                             ffn_hidden_size=DENSE_FFN, use_cpu_initialization=True,
                             gated_linear_unit=True, activation_func=F.silu,
                             add_bias_linear=bias, bias_activation_fusion=False,
                             normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
                             expert_model_parallel_size=ep, **moe)


def build(seed: int, bias: bool = False, ep: int = 1, experts: int = 0, top_k: int = 2,
          granularity: int = 1, pre_process: bool = True, post_process: bool = True):
    """A GPTModel (dense when ``experts`` is 0) with every parameter drawn from N(0, 0.2)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    moe = dict(num_moe_experts=experts, moe_router_topk=top_k,
               moe_ffn_hidden_size=DENSE_FFN // granularity,
               moe_token_dispatcher_type="allgather") if experts else {}
    spec = get_gpt_layer_local_spec(num_experts=experts or None, moe_grouped_gemm=False)
    torch.manual_seed(seed)
    model = GPTModel(config=_config(bias, ep, **moe), transformer_layer_spec=spec,
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


def exact_and_megatron_parity(rank: int, world: int, store: str, bias: bool, result: str) -> None:
    """One chunk, G=2: moekit's exact upcycling keeps the dense logits; its Megatron
    scaling reproduces megatron-core's own state dict tensor for tensor."""
    init(rank, world, store)
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    dense = build(0, bias)
    moe = build(1, bias, experts=4, top_k=2, granularity=2)
    theirs = upcycle_state_dict([moe], [dense])["model"]
    ours_megatron = moekit_megatron.upcycle_state_dict(
        [moe], [dense], UpcycleSpec(4, 2, "granular", 2, scaling="megatron"))["model"]
    # megatron-core leaves the router bias (present with add_bias_linear) ungrouped;
    # moekit groups it like the weight, so it is compared apart.
    tensors = sorted(k for k, v in theirs.items() if isinstance(v, torch.Tensor)
                     and not k.endswith("router.bias"))
    same = [k for k in tensors if torch.equal(theirs[k], ours_megatron[k])]
    biases = [ours_megatron[k] for k in ours_megatron if k.endswith("router.bias")]
    grouped = all(torch.equal(b[0::2], b[1::2]) for b in biases)
    moe.load_state_dict(ours_megatron, strict=True)
    megatron_logits = forward([moe], _ids())
    fresh = build(1, bias, experts=4, top_k=2, granularity=2)
    moekit_megatron.load_and_upcycle_model(lambda: (7, 0.0), [fresh], [dense], strict=True)
    exact_logits = forward([fresh], _ids())
    dense_logits = forward([dense], _ids())
    torch.save({"same": same, "tensors": tensors, "router_biases": len(biases),
                "grouped": grouped, "keys_match": theirs.keys() == ours_megatron.keys(),
                "exact_error": (exact_logits - dense_logits).abs().max().item(),
                "megatron_error": (megatron_logits - dense_logits).abs().max().item()}, result)
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
