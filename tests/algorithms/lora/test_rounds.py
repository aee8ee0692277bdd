"""Rounds through the Algorithm protocol on a real PEFT model, as the engine runs them: one shared
client network loaded with each plan (strict=False), trained, its upload keys returned; after two
rounds the server model of an exact rule outputs the p-weighted mean of the clients' outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedmoe.algorithms.base import ClientResult
from fedmoe.algorithms.lora import FFALoRA, FLoRA, FedExLoRA

SAMPLES = {0: 3, 1: 7, 2: 2}


def _model(conv1d: bool):
    torch.manual_seed(0)
    layer = Conv1D(5, 7) if conv1d else nn.Linear(7, 5)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["0"], fan_in_fan_out=conv1d, use_rslora=conv1d)
    return get_peft_model(nn.Sequential(layer).double(), cfg)


def _round(algo, state, ctx, net, x, seed):
    gen = torch.Generator().manual_seed(seed)
    results, outs = [], []
    for cid, n in SAMPLES.items():
        plan = algo.configure_client(state, cid, None)
        net.load_state_dict(plan.weights, strict=False)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.2)
        for _ in range(3):
            opt.zero_grad()
            y = torch.randn(8, 5, generator=gen, dtype=torch.float64)
            nn.functional.mse_loss(net(torch.randn(8, 7, generator=gen, dtype=torch.float64)), y).backward()
            opt.step()
        outs.append(net(x).detach())
        sd = net.state_dict()
        results.append(ClientResult(client_id=cid, num_samples=n, weights={k: sd[k].clone() for k in plan.upload_keys}))
    p = [n / sum(SAMPLES.values()) for n in SAMPLES.values()]
    return algo.aggregate(state, results, ctx), sum(w * o for w, o in zip(p, outs))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(
    "make",
    [FedExLoRA, lambda: FedExLoRA(in_place=True), FFALoRA, lambda: FLoRA(seed=1),
     lambda: FLoRA(client_ranks=[1, 3, 2], in_place=True)],
    ids=["fedex", "fedex-in-place", "ffa", "flora", "flora-mixed-ranks-in-place"],
)
def test_exact_rules_over_two_rounds_through_the_protocol(kit, make, conv1d):
    net = _model(conv1d)
    layers = kit.peft_layers(net)
    template = {k: v.detach().clone() for k, v in net.state_dict().items()}
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    ctx = kit.FakeContext(layers, template, trainable, net=copy.deepcopy(net))
    algo = make()
    for name, param in net.named_parameters():
        if name in algo.frozen_keys(ctx):
            param.requires_grad_(False)
    state = algo.init_server(template, ctx)
    x = torch.randn(4, 7, dtype=torch.float64)
    for r in range(2):
        state, mean_out = _round(algo, state, ctx, net, x, seed=r)
        server = algo.server_module(state, ctx)
        torch.testing.assert_close(server(x).detach(), mean_out, rtol=1e-9, atol=1e-9)
