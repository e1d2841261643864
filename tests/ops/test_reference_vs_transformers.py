"""The reference layer against transformers' own MoE blocks (Mixtral, Qwen3-MoE, Qwen2-MoE
with a gated shared expert, DeepSeek-V3 with group-limited sigmoid routing and a
correction bias): same output, router logits, selection and gradients, fp32, tiny random
configs built in memory (nothing downloaded).

HF keeps fused expert weights gate_up_proj [E, 2F, D] (gate rows first) and down_proj
[E, D, F]; ours are w_gate / w_up [E, F, D] and w_down [E, D, F].

Shape legend: T tokens, D d_model, F ffn width, E experts, S shared experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from moespec.reference import moe_layer_reference, switch_loss  # noqa: E402
from moespec.spec.schema import LayerSpec  # noqa: E402

ATOL = 1e-5


def randomize(module: nn.Module, seed: int) -> None:
    """HF leaves expert weights uninitialised (torch.empty) outside from_pretrained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(module.parameters()) + list(module.buffers()):
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_()


def routed_params(experts: nn.Module, f: int) -> dict[str, Tensor]:
    gate_up, down = experts.gate_up_proj, experts.down_proj
    return {
        "experts.0.w_gate": leaf(gate_up[:, :f]),
        "experts.0.w_up": leaf(gate_up[:, f:]),
        "experts.0.w_down": leaf(down),
    }


def routed_grads_match(experts: nn.Module, params: dict[str, Tensor]) -> None:
    want_gate_up = torch.cat([params["experts.0.w_gate"].grad, params["experts.0.w_up"].grad], dim=1)
    torch.testing.assert_close(experts.gate_up_proj.grad, want_gate_up, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(experts.down_proj.grad, params["experts.0.w_down"].grad, atol=ATOL, rtol=1e-4)


def run_both(
    block: nn.Module, params: dict[str, Tensor], layer: LayerSpec, d: int, seed: int = 0
) -> tuple[Any, Tensor, Tensor]:
    """Forward + backward of the same loss through HF and the reference; checks y and dL/dx."""
    x = torch.randn(2, 7, d, generator=torch.Generator().manual_seed(seed))
    r = torch.randn(2, 7, d, generator=torch.Generator().manual_seed(seed + 1))
    x_hf, x_ref = leaf(x), leaf(x)
    y_hf = block(x_hf)
    y_ref, _, stats = moe_layer_reference(x_ref, params, layer, d, training=False)
    torch.testing.assert_close(y_ref, y_hf, atol=ATOL, rtol=1e-4)
    (y_hf * r).sum().backward()
    (y_ref * r).sum().backward()
    torch.testing.assert_close(x_ref.grad, x_hf.grad, atol=ATOL, rtol=1e-4)
    return stats, x, r


def eager(config: Any) -> Any:
    config._experts_implementation = "eager"  # the plain per-expert loop, no warning
    return config


def check_router(gate: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], x: Tensor, stats: Any) -> None:
    logits, weights, idx = gate(x.reshape(-1, x.shape[-1]))
    torch.testing.assert_close(stats.routing.logits_TE, logits, atol=ATOL, rtol=1e-4)
    # HF may return the top-k unsorted (DeepSeek-V3 uses sorted=False): compare as sets.
    order = idx.sort(-1).indices
    ours = stats.routing.topk_idx_TK.sort(-1).indices
    assert torch.equal(idx.gather(1, order), stats.routing.topk_idx_TK.gather(1, ours))
    torch.testing.assert_close(
        stats.routing.topk_weight_TK.gather(1, ours), weights.gather(1, order), atol=ATOL, rtol=1e-4
    )


@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
def test_mixtral(order: str) -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

    d, f, e, k = 48, 32, 8, 2
    cfg = eager(
        transformers.MixtralConfig(
            hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k
        )
    )
    block = MixtralSparseMoeBlock(cfg).float()
    randomize(block, 0)
    params = {"router.weight": leaf(block.gate.weight), **routed_params(block.experts, f)}
    layer = LayerSpec.model_validate(
        {
            "experts": {"routed": [{"kind": "glu", "activation": "silu", "d_ff": f, "count": e}]},
            "router": {"kind": "topk", "k": k, "order": order, "renormalize": order == "softmax_then_topk"},
        }
    )
    stats, x, _ = run_both(block, params, layer, d)
    check_router(block.gate, x, stats)
    routed_grads_match(block.experts, params)
    torch.testing.assert_close(params["router.weight"].grad, block.gate.weight.grad, atol=ATOL, rtol=1e-4)
    # HF's load-balancing loss divides the top-k counts by T only: k times ours.
    rt = stats.routing
    ours = switch_loss(rt.probs_TE, rt.selected_TE(), k)
    hf = load_balancing_loss_func((rt.logits_TE,), num_experts=e, top_k=k)
    torch.testing.assert_close(k * ours, hf)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen3_moe(norm: bool) -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    d, f, e, k = 100, 24, 6, 3
    cfg = eager(
        transformers.Qwen3MoeConfig(
            hidden_size=d, moe_intermediate_size=f, num_experts=e, num_experts_per_tok=k, norm_topk_prob=norm
        )
    )
    block = Qwen3MoeSparseMoeBlock(cfg).float()
    randomize(block, 1)
    params = {"router.weight": leaf(block.gate.weight), **routed_params(block.experts, f)}
    layer = LayerSpec.model_validate(
        {
            "experts": {"routed": [{"kind": "glu", "activation": "silu", "d_ff": f, "count": e}]},
            "router": {"kind": "topk", "k": k, "renormalize": norm},
        }
    )
    stats, x, _ = run_both(block, params, layer, d, seed=3)
    check_router(block.gate, x, stats)
    routed_grads_match(block.experts, params)
    torch.testing.assert_close(params["router.weight"].grad, block.gate.weight.grad, atol=ATOL, rtol=1e-4)


def test_qwen2_moe_gated_shared_expert() -> None:
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    d, f, fs, e, k = 48, 16, 40, 8, 4
    cfg = eager(
        transformers.Qwen2MoeConfig(
            hidden_size=d,
            moe_intermediate_size=f,
            shared_expert_intermediate_size=fs,
            num_experts=e,
            num_experts_per_tok=k,
            norm_topk_prob=False,
        )
    )
    block = Qwen2MoeSparseMoeBlock(cfg).float()
    randomize(block, 2)
    sh = block.shared_expert
    params = {
        "router.weight": leaf(block.gate.weight),
        **routed_params(block.experts, f),
        "shared.w_up": leaf(sh.up_proj.weight[None]),
        "shared.w_gate": leaf(sh.gate_proj.weight[None]),
        "shared.w_down": leaf(sh.down_proj.weight[None]),
        "shared.gate": leaf(block.shared_expert_gate.weight[0]),
    }
    layer = LayerSpec.model_validate(
        {
            "experts": {
                "routed": [{"kind": "glu", "activation": "silu", "d_ff": f, "count": e}],
                "shared": {"kind": "glu", "activation": "silu", "d_ff": fs, "gate": True},
            },
            "router": {"kind": "topk", "k": k},
        }
    )
    stats, x, _ = run_both(block, params, layer, d, seed=5)
    check_router(block.gate, x, stats)
    routed_grads_match(block.experts, params)
    for ours, theirs in [
        ("shared.w_up", sh.up_proj.weight),
        ("shared.w_gate", sh.gate_proj.weight),
        ("shared.w_down", sh.down_proj.weight),
        ("shared.gate", block.shared_expert_gate.weight),
    ]:
        torch.testing.assert_close(params[ours].grad.reshape(theirs.shape), theirs.grad, atol=ATOL, rtol=1e-4)


def test_deepseek_v3_group_limited_sigmoid() -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    d, f, e, k, s = 48, 16, 8, 3, 2
    cfg = eager(
        transformers.DeepseekV3Config(
            hidden_size=d,
            moe_intermediate_size=f,
            n_routed_experts=e,
            num_experts_per_tok=k,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            n_shared_experts=s,
        )
    )
    block = DeepseekV3MoE(cfg).float()
    randomize(block, 4)
    with torch.no_grad():  # a correction bias of both signs, large enough to change selections
        block.gate.e_score_correction_bias.mul_(0.3 * math.sqrt(e))
    sh = block.shared_experts
    params = {
        "router.weight": leaf(block.gate.weight),
        "router.expert_bias": block.gate.e_score_correction_bias.detach().clone(),
        **routed_params(block.experts, f),
        # DeepSeek fuses the S shared experts into one FFN of width S*F.
        "shared.w_up": leaf(sh.up_proj.weight.reshape(s, f, d)),
        "shared.w_gate": leaf(sh.gate_proj.weight.reshape(s, f, d)),
        "shared.w_down": leaf(sh.down_proj.weight.reshape(d, s, f).permute(1, 0, 2)),
    }
    layer = LayerSpec.model_validate(
        {
            "experts": {
                "routed": [{"kind": "glu", "activation": "silu", "d_ff": f, "count": e}],
                "shared": {"kind": "glu", "activation": "silu", "d_ff": f, "count": s},
            },
            "router": {
                "kind": "topk",
                "k": k,
                "score": "sigmoid",
                "renormalize": True,
                "scaling_factor": 2.5,
                "groups": {"n_groups": 4, "topk_groups": 2, "group_score": "top2_sum"},
                "expert_bias": {},
            },
        }
    )
    stats, x, _ = run_both(block, params, layer, d, seed=7)
    check_router(block.gate, x, stats)
    routed_grads_match(block.experts, params)
    torch.testing.assert_close(params["router.weight"].grad, block.gate.weight.grad, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(
        params["shared.w_up"].grad.reshape(s * f, d), sh.up_proj.weight.grad, atol=ATOL, rtol=1e-4
    )
    down_grad = params["shared.w_down"].grad.permute(1, 0, 2).reshape(d, s * f)
    torch.testing.assert_close(down_grad, sh.down_proj.weight.grad, atol=ATOL, rtol=1e-4)
