"""The rule written out in docs/lora.md ("Writing a rule") runs and does what it says."""

from pathlib import Path

import pytest
import torch

from fedmoe.algorithms.lora import rules
from fedmoe.algorithms.lora.fedit import fedit_aggregate

DOC = Path(__file__).resolve().parents[3] / "docs" / "lora.md"


@pytest.fixture
def doc_rule():
    """The docs' code block, executed; its registration is undone afterwards."""
    text = DOC.read_text()
    section = text[text.index("## Writing a rule"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    try:
        yield namespace["FedITServerStep"]
    finally:
        rules.RULES.pop("fedit_server_step", None)


def test_the_documented_rule_is_registered_and_steps_part_of_the_way_to_fedits_mean(kit, doc_rule):
    assert rules.get_rule("fedit_server_step") is doc_rule
    layers = kit.make_layers()
    g = kit.make_global(layers)
    clients = kit.make_clients(g, layers)
    results = kit.results(clients, [3, 7, 2])
    ctx = kit.FakeContext(layers, g, set(clients[0]))
    p = [3 / 12, 7 / 12, 2 / 12]
    mean, _ = fedit_aggregate({k: v for k, v in g.items() if k in clients[0]}, clients, p, layers)
    for eta in (1.0, 0.25):
        algo = doc_rule(eta=eta)
        state = algo.init_server(g, ctx)
        new = algo.aggregate(state, results, ctx)
        assert new["round"] == 1
        for k, v in new["global"].items():
            torch.testing.assert_close(v, state["global"][k] + eta * (mean[k] - state["global"][k]))
