"""Workers of the DeepSeek-V3 Megatron-Core checkpoint tests: megatron-core 0.16.1's GPT
model with multi-latent attention, dense first layers, routed and shared experts, built on
the CPU (gloo) from a Hugging Face config.json with the local (non-Transformer-Engine)
layer specs that ``get_gpt_decoder_block_spec`` gives.

megatron-core 0.16.1's local MLA does not build as it ships, for two reasons this module
works around without touching a parameter or a key:

- ``MultiLatentAttention.__init__`` tests ``isinstance(self.linear_proj, TELinear)`` when
  ``megatron.core.extensions.transformer_engine`` imports, which it does without
  Transformer Engine installed, leaving ``TELinear`` None (a TypeError): its module's
  ``HAVE_TE`` is set False, the value it has where that import fails.
- It builds the core attention with ``k_channels`` and ``v_channels``, which the local
  ``DotProductAttention`` does not accept (only Transformer Engine's does):
  ``_DotProductAttention`` takes and drops them (the base ``Attention`` first builds one
  without them, which MLA replaces). It computes as megatron-core's own does:
  with ``kv_channels`` = v_head_dim (MLATransformerConfig's default) its output has the
  value's width, and the softmax scale comes from MLASelfAttention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import megatron_checkpoint_workers, megatron_workers


def _dot_product_attention():
    """megatron-core's local DotProductAttention, taking MLA's channel arguments."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class _DotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            assert v_channels in (None, self.config.kv_channels), v_channels

    return _DotProductAttention


def mla_model(config: dict, ep: int = 1, mtp: int = 0):
    """megatron-core's GPTModel holding the transformers DeepSeek-V3 that ``config``
    describes: MLA (q LoRA or not, RMSNorm on the latents), sigmoid routing over
    ``n_group`` groups with the score-correction bias (``expert_bias``), top-k weights
    renormalised then scaled by ``routed_scaling_factor``, shared experts, and the first
    ``first_k_dense_replace`` layers dense (``moe_layer_freq`` a list), and ``mtp``
    multi-token-prediction layers (``mtp_num_layers``, each with the last decoder layer's
    spec as ``get_gpt_mtp_block_spec`` gives it); the experts over ``ep`` expert-parallel
    ranks. (transformers' DeepSeek-V3 config declares ``num_nextn_predict_layers`` 1
    whether or not the files hold the layer, so the checkpoint says: ``mtp_layers``.)"""
    import megatron.core.transformer.multi_latent_attention as multi_latent_attention
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    multi_latent_attention.HAVE_TE = False
    layers, dense = config["num_hidden_layers"], config["first_k_dense_replace"]
    transformer = MLATransformerConfig(
        num_layers=layers, hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        ffn_hidden_size=config["intermediate_size"], q_lora_rank=config["q_lora_rank"],
        kv_lora_rank=config["kv_lora_rank"], qk_head_dim=config["qk_nope_head_dim"],
        qk_pos_emb_head_dim=config["qk_rope_head_dim"], v_head_dim=config["v_head_dim"],
        rope_type="rope", rotary_base=config["rope_parameters"]["rope_theta"],
        rotary_scaling_factor=1.0, use_cpu_initialization=True, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        normalization="RMSNorm", layernorm_epsilon=config["rms_norm_eps"], qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0, apply_rope_fusion=False,
        num_moe_experts=config["n_routed_experts"], moe_router_topk=config["num_experts_per_tok"],
        moe_ffn_hidden_size=config["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=config["n_shared_experts"]
        * config["moe_intermediate_size"],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=config["routed_scaling_factor"],
        moe_router_num_groups=config["n_group"], moe_router_group_topk=config["topk_group"],
        moe_layer_freq=[0] * dense + [1] * (layers - dense),
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
        expert_model_parallel_size=ep, mtp_num_layers=mtp or None)
    spec = get_gpt_decoder_block_spec(transformer, use_transformer_engine=False,
                                      normalization="RMSNorm")
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = _dot_product_attention()
    mtp = (get_gpt_mtp_block_spec(transformer, spec, use_transformer_engine=False)
           if transformer.mtp_num_layers else None)
    model = GPTModel(config=transformer, transformer_layer_spec=spec, mtp_block_spec=mtp,
                     vocab_size=config["vocab_size"],
                     max_sequence_length=config["max_position_embeddings"],
                     position_embedding_type="rope",
                     share_embeddings_and_output_weights=config["tie_word_embeddings"])
    return model.eval()


def mtp_layers(iteration: Path) -> int:
    """The multi-token-prediction layers a torch_dist checkpoint holds (``mtp.layers.N.…``),
    which Megatron-LM's ``--mtp-num-layers`` gives the model it loads into."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(iteration)).read_metadata().state_dict_metadata
    return len({key.split(".")[2] for key in keys if key.startswith("mtp.layers.")})


def forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits of ``model`` on ``ids`` and those of each of its multi-token-prediction
    layers ([batch, sequence, vocabulary], as its output layer gives them). A model with MTP
    layers computes their losses in its forward, which then needs labels (``ids`` here,
    which change no logits), and returns no logits: they are taken from its output layer,
    which scores the MTP layers' hidden states first and then the main model's (copied
    there: the loss then turns them into probabilities in place)."""
    if not model.mtp_process:
        return megatron_workers.forward([model], ids), []
    scored = []
    hook = model.output_layer.register_forward_hook(
        lambda module, inputs, output: scored.append(output[0].transpose(0, 1).clone()))
    positions = torch.arange(ids.shape[1])[None]
    mask = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1]), diagonal=1).bool()
    with torch.no_grad():
        model(ids, positions, attention_mask=mask, labels=ids)
    hook.remove()
    return scored[-1], scored[:-1]


def load_and_run(rank: int, world: int, store: str, folders: list[str], ids: torch.Tensor,
                 result: str) -> None:
    """Load each of ``folders`` (moekit's torch_dist checkpoints with their config.json:
    a DeepSeek-V3 into ``mla_model``, another into the Llama-style model of
    ``megatron_checkpoint_workers``) strictly as Megatron-LM does (the model's sharded
    state dict under "model", the common state beside it). Save into ``result``, by
    folder, the model's logits on ``ids``, its state dict and the common state the load
    returned; and the model with megatron-core's own ``dist_checkpointing.save`` into
    ``result``.N.saved (N: the folder's place in ``folders``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    megatron_checkpoint_workers._init(rank, world, store)
    found = {}
    for number, folder in enumerate(map(Path, folders)):
        config = json.loads((folder / "config.json").read_text())
        tracker = (folder / "latest_checkpointed_iteration.txt").read_text().strip()
        iteration = folder / f"iter_{int(tracker):07d}"
        model = (mla_model(config, mtp=mtp_layers(iteration))
                 if config["model_type"] == "deepseek_v3"
                 else megatron_checkpoint_workers.gpt_model(config))
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iteration),
                                         strict=StrictHandling.RAISE_ALL)
        model.load_state_dict(loaded.pop("model"), strict=True)
        Path(f"{result}.{number}.saved").mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), f"{result}.{number}.saved")
        logits, mtp_logits = forward(model, ids)
        found[str(folder)] = {
            "logits": logits, "mtp_logits": mtp_logits, "common": loaded,
            "state": {k: v.clone() for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor)}}
    torch.save(found, result)
    megatron_workers.finish()


def save_expert_parallel(rank: int, world: int, store: str, config_folder: str,
                         ids: torch.Tensor, out: str, mtp: int, result: str) -> None:
    """Build ``mla_model`` with ``mtp`` multi-token-prediction layers at EP = ``world``,
    every weight and the routers' expert bias drawn from N(0, 0.2) (each expert from a seed
    of its HF layer, an MTP layer's after the decoder's, and global index), run it on
    ``ids`` and save it with megatron-core's ``dist_checkpointing.save`` into ``out``; each
    rank saves its experts' weights (by HF layer and global index) and the logits into
    ``result``.RANK."""
    from megatron.core import dist_checkpointing

    megatron_checkpoint_workers._init(rank, world, store, ep=world)
    model = mla_model(json.loads((Path(config_folder) / "config.json").read_text()), ep=world,
                      mtp=mtp)
    torch.manual_seed(0)
    experts = {}
    blocks = [*model.decoder.layers,
              *(layer.transformer_layer for layer in (model.mtp.layers if mtp else ()))]
    moe = {layer: block.mlp for layer, block in enumerate(blocks) if hasattr(block.mlp, "router")}
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        for mlp in moe.values():
            mlp.router.expert_bias.normal_(0.0, 0.2)
        for layer, mlp in moe.items():
            for e, local in zip(mlp.local_expert_indices, mlp.experts.local_experts):
                torch.manual_seed(1000 * layer + e)
                for p in local.parameters():
                    p.normal_(0.0, 0.2)
                experts[(layer, e)] = {n: p.clone() for n, p in local.named_parameters()}
    logits, _ = forward(model, ids)
    dist_checkpointing.save(model.sharded_state_dict(), out)
    torch.save({"experts": experts, "logits": logits}, f"{result}.{rank}")
    megatron_workers.finish()


def load_expert_parallel(rank: int, world: int, store: str, folder: str, ids: torch.Tensor,
                         result: str) -> None:
    """Load ``folder`` (moekit's torch_dist checkpoint of a DeepSeek-V3) strictly into
    ``mla_model`` at EP = ``world``; each rank saves its logits and its MTP layers' on
    ``ids`` (``forward``) and the global indices of the experts it holds, by HF layer
    (an MTP layer's after the decoder's), into ``result``.RANK."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    megatron_checkpoint_workers._init(rank, world, store, ep=world)
    folder = Path(folder)
    model = mla_model(json.loads((folder / "config.json").read_text()), ep=world,
                      mtp=mtp_layers(folder / "iter_0000000"))
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                     str(folder / "iter_0000000"), strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(loaded["model"], strict=True)
    blocks = [*model.decoder.layers,
              *(mtp.transformer_layer for mtp in (model.mtp.layers if model.mtp_process else ()))]
    held = {layer: list(block.mlp.local_expert_indices)
            for layer, block in enumerate(blocks) if hasattr(block.mlp, "router")}
    logits, mtp_logits = forward(model, ids)
    torch.save({"logits": logits, "mtp_logits": mtp_logits, "experts": held}, f"{result}.{rank}")
    megatron_workers.finish()


def load_with_moekit(rank: int, world: int, store: str, folder: str, result: str) -> None:
    """Load ``folder`` (moekit's Megatron-Core folder of a DeepSeek-V3) in the transformers
    layout with moekit's ``load_experts`` on a 1-D ep mesh of ``world`` ranks and its
    ``load_sharded`` on a (1, ``world``) (dp, ep) mesh; each rank saves the local tensors
    of each ("experts", "sharded") into ``result``.RANK."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import moekit

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ep = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    dp_ep = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    found = {how: {key: value.to_local() if isinstance(value, DTensor) else value
                   for key, value in load(folder, mesh, layout="transformers").items()}
             for how, load, mesh in (("experts", moekit.load_experts, ep),
                                     ("sharded", moekit.load_sharded, dp_ep))}
    torch.save(found, f"{result}.{rank}")
    megatron_workers.finish()
