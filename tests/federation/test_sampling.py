from fedmoe.federation.sampling import ClientSampler


def test_uniform_sampling_is_a_function_of_seed_and_round():
    a, b = ClientSampler(50, 5, seed=3), ClientSampler(50, 5, seed=3)
    assert [a.sample(r) for r in range(1, 6)] == [b.sample(r) for r in range(1, 6)]
    assert a.sample(1) != ClientSampler(50, 5, seed=4).sample(1)


def test_uniform_sampling_draws_distinct_clients():
    s = ClientSampler(10, 10, seed=0)
    assert s.sample(7) == list(range(10))
    for r in range(1, 20):
        ids = ClientSampler(30, 6, seed=1).sample(r)
        assert len(set(ids)) == 6 and all(0 <= i < 30 for i in ids)


def test_per_group_sampling_takes_one_client_per_residue_class():
    s = ClientSampler(23, 5, mode="per_group", seed=0)
    for r in range(1, 10):
        ids = s.sample(r)
        assert sorted(i % 5 for i in ids) == [0, 1, 2, 3, 4]


def test_bad_sampling_settings_name_the_key():
    import pytest

    from fedmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"federation.clients_per_round=6 .*the data has 5 clients"):
        ClientSampler(5, 6)
    with pytest.raises(ConfigError, match=r"federation.sampling='random'"):
        ClientSampler(5, 2, mode="random")
