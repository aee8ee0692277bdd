"""Prompt routers and continual growth: the keyword table (the reference's rules as data, bad
tables), the learned router (central and federated fits on separable embeddings, top-k, save/load,
the frozen base's masked mean-pooled embedding), unknown experts refused, novelty detection and
the registration of a new expert with its own workers."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from fedmoe.errors import CheckpointError, ConfigError, DataError
from fedmoe.experts import ExpertCoordinator
from fedmoe.experts.agent import SEED_TASKS
from fedmoe.experts.growth import NoveltyDetector, adapter_keys_for, grow_expert
from fedmoe.experts.routers import (
    REFERENCE_TABLE,
    KeywordRouter,
    LearnedRouter,
    PromptEmbedder,
    Route,
    Router,
    accuracy,
    build_router,
)
from fedmoe.experts.workers import WorkerSpec
from fedmoe.models.causal import ExpertModel, build_causal_lm, tiny_causal_config
from wordlevel import word_tokenizer as _word_tokenizer

PEFT = peft.__version__  # imported at collection: its import is not a test's time
ROUTES = REFERENCE_TABLE
EXPERTS = ("python", "sql", "docs")
TABLE = {"experts": {"python": ["python", "def "], "sql": ["sql", "select"]}, "default": "python"}


# ------------------------------------------------------------------------------------ keyword


def test_keyword_table_routes_the_reference_sample_tasks():
    router = KeywordRouter.from_file(ROUTES, experts=EXPERTS)
    assert isinstance(router, Router) and router.experts == EXPERTS
    routes = router.route([p for _, p in SEED_TASKS])
    assert [r.experts for r in routes] == [("python",), ("python", "sql"), ("python", "docs")]
    assert routes[1].weights == (0.5, 0.5) and "database" in routes[1].reason


def test_keyword_router_falls_back_to_default_when_nothing_matches():
    router = KeywordRouter.from_file(ROUTES)
    (route,) = router.route(["Sort these numbers for me"])
    assert route.pairs == (("python", 1.0),) and "default" in route.reason


def test_keyword_count_weighting_follows_matched_patterns():
    router = KeywordRouter.from_dict({**TABLE, "weighting": "count"})
    (route,) = router.route(["python code: def f(): run sql"])
    assert route.experts == ("python", "sql")
    assert route.weights == pytest.approx((2 / 3, 1 / 3))


def test_keyword_router_is_case_insensitive_unless_asked():
    assert KeywordRouter.from_dict(TABLE).route(["SELECT *"])[0].top == "sql"
    assert KeywordRouter.from_dict({**TABLE, "case_sensitive": True}).route(["SELECT *"])[0].top == "python"


def test_keyword_table_loads_from_json(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(TABLE))
    assert KeywordRouter.from_file(path).route(["select 1"])[0].top == "sql"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("experts: [python\n", "does not parse"),
        ("- python\n", "expected a mapping"),
        ("experts: {python: [python]}\ndefault: python\nrules: 1\n", "unknown key 'rules'"),
        ("default: python\n", "missing key 'experts'"),
        ("experts: {python: python}\ndefault: python\n", "expert 'python' must have a non-empty list"),
        ("experts: {python: []}\ndefault: python\n", "expert 'python' must have a non-empty list"),
        ("experts: {sql: ['(select']}\ndefault: sql\n", "expert 'sql' pattern '(select' does not compile"),
        ("experts: {sql: [sql]}\ndefault: rust\n", "expert 'rust' is unknown"),
        ("experts: {sql: [sql]}\ndefault: sql\nweighting: max\n", "weighting 'max' is unknown"),
    ],
)
def test_bad_keyword_table_is_one_line_error_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        KeywordRouter.from_file(path)
    assert fragment in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_keyword_table_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        KeywordRouter.from_file(tmp_path / "nope.yaml")


def test_keyword_table_naming_an_expert_the_model_lacks_is_refused():
    with pytest.raises(DataError, match=r"expert 'sql' is unknown; known experts: python, docs"):
        KeywordRouter.from_dict(TABLE, experts=["python", "docs"])


def test_route_weights_must_sum_to_one():
    with pytest.raises(DataError, match="sum to"):
        Route((("python", 0.5),))


# ------------------------------------------------------------------------------------ learned


def clusters(n_per: int = 40, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Three separable clusters with a large common offset and one huge dimension, as LM hidden states have."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=gen) * 2
    x = torch.cat([centres[i] + torch.randn(n_per, dim, generator=gen) * 0.5 for i in range(3)]) + 5.0
    x[:, 0] = x[:, 0] * 100
    labels = [EXPERTS[i] for i in range(3) for _ in range(n_per)]
    return x, labels


def test_learned_router_fits_centrally_to_high_accuracy():
    x, y = clusters()
    router = LearnedRouter(EXPERTS, dim=16, hidden=0)
    router.fit(x[::2], y[::2], epochs=40)
    assert accuracy(router, x[1::2], y[1::2]) >= 0.95


def test_learned_router_mlp_fits_federated_with_fedavg_to_high_accuracy():
    x, y = clusters()
    train = [i for i in range(len(y)) if i % 2 == 0]
    # non-IID workers: each holds mostly one expert's prompts
    parts = [[i for i in train if y[i] == e] for e in EXPERTS]
    parts = [p[:-4] + q[-2:] for p, q in zip(parts, parts[1:] + parts[:1])]
    data = [(x[p], [y[i] for i in p]) for p in parts]
    router = LearnedRouter(EXPERTS, dim=16, hidden=8, seed=1)
    history = router.fit_federated(data, rounds=15, local_epochs=2, lr=1e-2, batch_size=8)
    assert len(history) == 15 and history[-1] < history[0]
    assert accuracy(router, x[1::2], y[1::2]) >= 0.95
    pooled = torch.cat([d[0] for d in data])
    assert torch.allclose(router.net.shift, pooled.mean(0), rtol=1e-5)


def test_learned_router_top_k_routes_renormalise_softmax_weights():
    x, y = clusters()
    router = LearnedRouter(EXPERTS, dim=16, top_k=2)
    router.fit(x, y, epochs=5)
    routes = router.route_embeddings(x[:5])
    probs = router.probabilities(x[:5])
    for r, p in zip(routes, probs):
        assert len(r) == 2 and sum(r.weights) == pytest.approx(1.0)
        top = p.topk(2)
        assert r.weights[0] == pytest.approx(float(top.values[0] / top.values.sum()), rel=1e-5)
        assert r.top == EXPERTS[int(top.indices[0])]


def test_learned_router_save_load_and_refuses_other_experts(tmp_path):
    x, y = clusters()
    router = LearnedRouter(EXPERTS, dim=16, hidden=4)
    router.fit(x, y, epochs=3)
    router.save(tmp_path / "router.safetensors")
    again = LearnedRouter.load(tmp_path / "router.safetensors", experts=EXPERTS)
    assert torch.equal(again.probabilities(x), router.probabilities(x))
    with pytest.raises(CheckpointError, match="is for experts"):
        LearnedRouter.load(tmp_path / "router.safetensors", experts=("python", "sql"))
    with pytest.raises(CheckpointError, match="does not exist"):
        LearnedRouter.load(tmp_path / "other.safetensors")


def test_learned_router_refuses_unknown_labels():
    x, y = clusters(n_per=2)
    router = LearnedRouter(EXPERTS, dim=16)
    with pytest.raises(DataError, match="expert 'rust' is unknown; known experts: python, sql, docs"):
        router.fit(x, [*y[:-1], "rust"])
    with pytest.raises(DataError, match="expert 'rust' is unknown"):
        accuracy(router, x, [*y[:-1], "rust"])


def test_build_router_from_config(tmp_path):
    assert isinstance(build_router("keyword", table=str(ROUTES), experts=EXPERTS), KeywordRouter)
    assert isinstance(build_router("keyword", table=TABLE), KeywordRouter)
    router = build_router("learned", experts=EXPERTS, dim=16, hidden=4)
    router.save(tmp_path / "r.safetensors")
    assert build_router("learned", checkpoint=tmp_path / "r.safetensors").experts == EXPERTS
    with pytest.raises(ConfigError, match="router kind 'regex' is unknown"):
        build_router("regex")
    with pytest.raises(ConfigError, match="has no option 'tabel'"):
        build_router("keyword", tabel=TABLE)


# ------------------------------------------------------------------------------------ embeddings


def word_tokenizer(words: str):
    """A plain word-level tokenizer over ``words`` (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(words.split(), chat=False, chat_specials=False)


WORDS = "write a python function sort list select rows from table where add docstring explain comment"


def tiny_experts() -> ExpertModel:
    base = build_causal_lm(tiny_causal_config("qwen2", 64), seed=0)
    return ExpertModel(base, EXPERTS, {"r": 2, "alpha": 4, "init_seed": 0}, correction_rank=2)


def test_prompt_embedder_mean_pools_without_padding():
    model = tiny_experts()
    embed = PromptEmbedder(model, word_tokenizer(WORDS), batch_size=8)
    both = embed(["write a python function sort list", "select rows"])
    alone = embed(["select rows"])
    assert both.shape == (2, 32)
    assert torch.allclose(both[1], alone[0], atol=1e-5)


def test_learned_router_on_the_frozen_base_embeddings_learns_domains():
    model = tiny_experts()
    embed = PromptEmbedder(model, word_tokenizer(WORDS))
    prompts = {
        "python": ["write a python function", "python function sort list", "write python list function"],
        "sql": ["select rows from table", "select from table where", "rows from table where select"],
        "docs": ["add docstring explain", "explain comment docstring", "add comment explain"],
    }
    texts = [p for e in EXPERTS for p in prompts[e]]
    labels = [e for e in EXPERTS for _ in prompts[e]]
    router = LearnedRouter(EXPERTS, dim=embed.dim, embedder=embed)
    router.fit(texts, labels, epochs=60)
    assert accuracy(router, texts, labels) == 1.0
    assert router.route(["select rows from table"])[0].top == "sql"


# ------------------------------------------------------------------------------------ growth


def domain(i: int, n: int = 20, dim: int = 16) -> torch.Tensor:
    """Embeddings of domain i: a random centre (the same for every call) plus small noise."""
    centre = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))[i] * 2
    return centre + 0.3 * torch.randn(n, dim, generator=torch.Generator().manual_seed(100 + i))


def test_novelty_detector_flags_a_domain_far_from_every_centroid():
    det = NoveltyDetector(threshold=0.9)
    det.add("python", domain(0))
    det.add("sql", domain(1))
    assert not det.is_novel(domain(0, n=5))
    assert det.nearest(domain(1, n=5))[0] == "sql"
    assert det.is_novel(domain(2))
    sims = det.similarities(domain(2))
    assert set(sims) == {"python", "sql"} and max(sims.values()) < 0.9
    assert torch.allclose(det.centroid("python"), domain(0).double().mean(0))
    with pytest.raises(DataError, match="dimension 3"):
        det.is_novel(torch.ones(2, 3))


def registered(model: ExpertModel, names=("python", "sql")) -> ExpertCoordinator:
    coord = ExpertCoordinator(mode="fedasync")
    for e in names:
        coord.register(e, model.expert_state(e), model.adapted_layers(e))
    return coord


def test_growth_registers_a_fresh_expert_with_its_own_workers():
    model = tiny_experts()
    coord = registered(model)
    det = NoveltyDetector(threshold=0.9)
    det.add("python", domain(0))
    det.add("sql", domain(1))
    before = {e: coord.snapshot(e) for e in ("python", "sql")}
    grown = grow_expert(coord, det, "rust", domain(2), template="python", workers=2)
    assert grown is not None and grown.expert == "rust" and grown.version == 0
    assert [w.id for w in grown.workers] == ["rust-w1", "rust-w2"] and all(w.specialty == "rust" for w in grown.workers)
    assert coord.experts() == ["python", "rust", "sql"] and "rust" in det.experts
    snap = coord.snapshot("rust")
    assert snap.layers == adapter_keys_for(model.adapted_layers("python"), "python", "rust")
    assert all(".lora_A.rust." in x.a_key for x in snap.layers)
    for x in snap.layers:  # PEFT's start: B = 0 (the base), A random
        assert not snap.adapter[x.b_key].any() and snap.adapter[x.a_key].any()
    for e, old in before.items():  # the existing experts are untouched
        new = coord.snapshot(e)
        assert new.version == old.version and all(torch.equal(new.adapter[k], old.adapter[k]) for k in old.adapter)


def test_growth_skips_a_known_domain_and_refuses_a_taken_name():
    model = tiny_experts()
    coord = registered(model)
    det = NoveltyDetector(threshold=0.9)
    det.add("python", domain(0))
    assert grow_expert(coord, det, "py2", domain(0, n=5), template="python") is None
    assert "py2" not in coord.experts()
    with pytest.raises(DataError, match="already exists"):
        grow_expert(coord, det, "sql", domain(2), template="python")
    with pytest.raises(ConfigError, match="another specialty"):
        grow_expert(coord, det, "rust", domain(2), template="python", workers=[WorkerSpec("w", "python")])
