"""Workers of the Megatron-Core checkpoint tests: megatron-core 0.16.1 GPT models built on
the CPU (gloo) from a Hugging Face config.json, loading and saving ``torch_dist``
checkpoints with megatron-core's own ``dist_checkpointing``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import megatron_workers


def _init(rank: int, world: int, store: str, ep: int = 1, tp: int = 1) -> None:
    megatron_workers.init(rank, world, store, ep, tp)
    # megatron-core's checkpoint writer waits for CUDA before writing (no GPU here).
    torch.cuda.synchronize = lambda *args, **kwargs: None


def gpt_model(config: dict, ep: int = 1, tp: int = 1):
    """megatron-core's GPTModel (local layer spec) holding the transformers model that
    ``config`` (a config.json) describes: Llama-style attention, RMSNorm, RoPE, and, when it
    has routed experts, their softmax router (``_routing``), Qwen2-MoE's gated shared expert
    and the Qwen MoEs' dense layers (``moe_layer_freq`` a list, each layer's spec from
    ``get_gpt_decoder_block_spec``)."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec,
                                                          get_gpt_layer_local_spec)
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    layers = config["num_hidden_layers"]
    dense = {layer for layer in range(layers) if layer in (config.get("mlp_only_layers") or ())
             or (layer + 1) % config.get("decoder_sparse_step", 1)} if experts else set()
    moe = dict(moe_layer_freq=[int(layer not in dense) for layer in range(layers)]
               if dense else 1, num_moe_experts=experts,
               moe_ffn_hidden_size=config.get("moe_intermediate_size",
                                              config["intermediate_size"]),
               moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
               expert_model_parallel_size=ep, **_routing(config)) if experts else {}
    heads = config["num_attention_heads"]
    qk_norm = config["model_type"] in ("qwen3", "qwen3_moe")
    transformer = TransformerConfig(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads", heads),
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        ffn_hidden_size=config["intermediate_size"], use_cpu_initialization=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=bool(config.get("attention_bias") or config.get("qkv_bias"))
        or config["model_type"] == "qwen2",
        bias_activation_fusion=False, normalization="RMSNorm",
        layernorm_epsilon=config["rms_norm_eps"], qk_layernorm=qk_norm, hidden_dropout=0.0,
        attention_dropout=0.0, apply_rope_fusion=False, tensor_model_parallel_size=tp, **moe)
    spec = (get_gpt_decoder_block_spec(transformer, use_transformer_engine=False) if dense else
            get_gpt_layer_local_spec(num_experts=experts or None, moe_grouped_gemm=False,
                                     qk_layernorm=qk_norm))
    rope = config.get("rope_parameters") or {}
    model = GPTModel(config=transformer, transformer_layer_spec=spec,
                     vocab_size=config["vocab_size"],
                     max_sequence_length=config["max_position_embeddings"],
                     position_embedding_type="rope",
                     rotary_base=int(rope.get("rope_theta", config.get("rope_theta", 10000))),
                     share_embeddings_and_output_weights=config["tie_word_embeddings"])
    return model.eval()


def _routing(config: dict) -> dict:
    """megatron-core's router and shared-expert settings of a transformers MoE config:
    the top k of a softmax over the experts, renormalised over the k (Mixtral always,
    ``moe_router_pre_softmax=False``) or not (``norm_topk_prob`` false: the softmax's own
    probabilities, ``moe_router_pre_softmax=True``); Qwen2-MoE's shared expert of
    ``shared_expert_intermediate_size`` rows, its output scaled by
    sigmoid(``shared_expert_gate`` @ x) (``moe_shared_expert_gate``)."""
    settings = dict(moe_router_topk=config["num_experts_per_tok"],
                    moe_router_pre_softmax=not config.get("norm_topk_prob", True))
    if config.get("shared_expert_intermediate_size"):
        settings.update(moe_shared_expert_intermediate_size=config[
            "shared_expert_intermediate_size"], moe_shared_expert_gate=True)
    return settings


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def load_and_run(rank: int, world: int, store: str, folders: list[str], dense: str,
                 upcycled: list, ids: torch.Tensor, result: str) -> None:
    """Load each of ``folders`` (torch_dist checkpoints with their config.json) strictly
    into megatron-core's model; save, by folder, its logits on ``ids`` and its state dict,
    and the model with megatron-core's own ``dist_checkpointing.save`` into
    ``result``.N.saved (N: the folder's place in ``folders``); and, under "upcycled", what
    ``_upcycled`` finds of the ``upcycled`` folders (one process: megatron-core imports
    slowly)."""
    from megatron.core import dist_checkpointing

    _init(rank, world, store)
    found = {"upcycled": _upcycled(Path(dense), upcycled, ids)}
    for number, folder in enumerate(map(Path, folders)):
        model = gpt_model(_config(folder))
        _load(folder, model)
        found[str(folder)] = {
            "logits": megatron_workers.forward([model], ids),
            "state": {k: v.clone() for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor)}}
        Path(f"{result}.{number}.saved").mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), f"{result}.{number}.saved")
    torch.save(found, result)
    megatron_workers.finish()


def save_expert_parallel(rank: int, world: int, store: str, config_folder: str, ids: torch.Tensor,
                         out: str, result: str) -> None:
    """Build megatron-core's model at EP = ``world``, every weight drawn from N(0, 0.2)
    (each expert from a seed of its layer and global index), run it on ``ids`` and save it
    with megatron-core's ``dist_checkpointing.save`` into ``out``; each rank saves its
    experts' weights and the logits into ``result``.RANK."""
    from megatron.core import dist_checkpointing

    _init(rank, world, store, ep=world)
    model = gpt_model(_config(Path(config_folder)), ep=world)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        for (layer, e), local in _local_experts(model).items():
            torch.manual_seed(1000 * layer + e)
            for p in local.parameters():
                p.normal_(0.0, 0.2)
    logits = megatron_workers.forward([model], ids)
    dist_checkpointing.save(model.sharded_state_dict(), out)
    torch.save({"experts": _expert_weights(model), "logits": logits}, f"{result}.{rank}")
    megatron_workers.finish()


def resave_tensor_parallel(rank: int, world: int, store: str, folder: str, out: str,
                           result: str) -> None:
    """Load the torch_dist checkpoint ``folder`` strictly into megatron-core's model at
    tensor-parallel size ``world`` (megatron-core reshards it on load) and save it with
    megatron-core's ``dist_checkpointing.save`` into ``out``: each rank its shards."""
    from megatron.core import dist_checkpointing

    _init(rank, world, store, tp=world)
    model = gpt_model(_config(Path(folder)), tp=world)
    _load(Path(folder), model)
    dist_checkpointing.save(model.sharded_state_dict(), out)
    megatron_workers.finish()


def resave_with_training_state(rank: int, world: int, store: str, folder: str, out: str,
                               result: str) -> None:
    """Load the torch_dist checkpoint ``folder`` strictly into megatron-core's model, take
    one step of torch's Adam at learning rate 0 (the weights stay as loaded; the moments
    are made, from seeded gradients) and save the model with its optimizer state (under
    megatron-core's ``optimizer.state.KEY.`` names, made by its own
    ``optim_state_to_sharding_state``) and an ``rng_state`` object beside it, as a
    Megatron-LM training checkpoint holds them, into ``out``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                             optim_state_to_sharding_state)

    _init(rank, world, store)
    model = gpt_model(_config(Path(folder)))
    _load(Path(folder), model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator).to(parameter.dtype)
    optimizer.step()
    state = model.sharded_state_dict()
    optimizer_state = optimizer.state_dict()
    optim_state_to_sharding_state(
        optimizer_state, get_param_id_to_sharded_param_map(state, model.parameters()),
        exclude_keys=("step",))
    rng = ShardedObject("rng_state", {"torch": torch.get_rng_state()}, (world,), (rank,),
                        replica_id=0)
    dist_checkpointing.save({"model": state, "optimizer": optimizer_state, "rng_state": rng},
                            out)
    megatron_workers.finish()


def load_expert_parallel(rank: int, world: int, store: str, folders: list[str],
                         ids: torch.Tensor, result: str) -> None:
    """Load each of ``folders`` (torch_dist checkpoints with their config.json) strictly
    into megatron-core's model at EP = ``world``; each rank saves, by folder, its logits
    on ``ids`` and the weights of the experts it holds into ``result``.RANK."""
    _init(rank, world, store, ep=world)
    found = {}
    for folder in map(Path, folders):
        model = gpt_model(_config(folder), ep=world)
        _load(folder, model)
        found[str(folder)] = {"logits": megatron_workers.forward([model], ids),
                              "experts": _expert_weights(model)}
    torch.save(found, f"{result}.{rank}")
    megatron_workers.finish()


def _local_experts(model) -> dict[tuple[int, int], torch.nn.Module]:
    """The experts this expert-parallel rank holds, by (layer, global expert index); a
    dense layer (``mlp_only_layers``) holds none."""
    return {(layer, e): local for layer, block in enumerate(model.decoder.layers)
            if hasattr(block.mlp, "local_expert_indices")
            for e, local in zip(block.mlp.local_expert_indices, block.mlp.experts.local_experts)}


def _expert_weights(model) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """A copy of the weights of the experts this rank holds, by (layer, global expert)."""
    return {index: {name: p.detach().clone() for name, p in local.named_parameters()}
            for index, local in _local_experts(model).items()}


def _load(folder: Path, model) -> None:
    """Load the torch_dist checkpoint ``folder`` strictly into ``model``, as Megatron-LM
    does: the model's sharded state dict under "model", the common state beside it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    iteration = (folder / "latest_checkpointed_iteration.txt").read_text().strip()
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                     str(folder / f"iter_{int(iteration):07d}"),
                                     strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(loaded["model"], strict=True)


def _upcycled(dense: Path, upcycled: list, ids: torch.Tensor) -> dict:
    """For each (folder, spec) of ``upcycled``: load the folder (moekit's upcycling of the
    dense model written in Megatron-Core's layout) strictly into megatron-core's MoE
    model, and list the tensors that differ from ``moekit.upcycling.megatron``'s in-memory
    upcycling with ``spec`` of the dense megatron-core model loaded from ``dense``; with the
    logits of both models on ``ids``."""
    from moekit.upcycling import megatron as moekit_megatron

    dense_model = gpt_model(_config(dense))
    _load(dense, dense_model)
    found = {"dense_logits": megatron_workers.forward([dense_model], ids)}
    for folder, spec in map(tuple, upcycled):
        moe = gpt_model(_config(Path(folder)))
        expected = moekit_megatron.upcycle_state_dict([moe], [dense_model], spec)["model"]
        _load(Path(folder), moe)
        state = moe.state_dict()
        found[folder] = {
            "differ": sorted(k for k, v in expected.items() if isinstance(v, torch.Tensor)
                             and not torch.equal(v, state[k])),
            "compared": sum(isinstance(v, torch.Tensor) for v in expected.values()),
            "logits": megatron_workers.forward([moe], ids)}
    return found
