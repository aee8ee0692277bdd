import torch

from fedmoe.federation.store import ClientStore


def test_store_is_lossless_by_default_and_keeps_integer_buffers():
    s = ClientStore()
    w = {"w": torch.randn(3, 3, dtype=torch.float32) / 3, "n": torch.tensor(7)}
    s.put_weights(4, w)
    got = s.get_weights(4)
    assert torch.equal(got["w"], w["w"]) and got["n"].dtype == torch.int64 and int(got["n"]) == 7
    assert s.get_weights(5) is None


def test_store_lowers_precision_only_when_asked():
    s = ClientStore("bfloat16")
    s.put_weights(0, {"w": torch.tensor([1.0001]), "n": torch.tensor(3)})
    assert s.weights[0]["w"].dtype == torch.bfloat16
    assert s.get_weights(0)["w"].dtype == torch.float32
    assert s.weights[0]["n"].dtype == torch.int64


def test_store_state_round_trip():
    s = ClientStore()
    s.put_weights(1, {"w": torch.ones(2)})
    s.put_optimizer(1, {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []})
    t = ClientStore()
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.get_weights(1)["w"], torch.ones(2))
    assert t.get_optimizer(1)["state"][0]["exp_avg"].shape == (2,)


def test_store_loads_a_memory_state_saved_without_a_backend_key():
    s = ClientStore()
    s.load_state_dict({"dtype": None, "weights": {3: {"w": torch.ones(2)}}, "optimizers": {}})
    assert torch.equal(s.get_weights(3)["w"], torch.ones(2)) and s.get_optimizer(3) is None
    assert s.state_dict()["backend"] == "memory"
