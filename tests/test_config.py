import pytest

from krakenlm.config import ModelConfig, size_kraken
from krakenlm.errors import ConfigError
from krakenlm.presets import PRESETS, get_preset

PAPER = {"kraken-125m-2way": 124.01, "kraken-125m-4way": 124.48, "kraken-125m-6way": 123.21,
         "kraken-350m-2way": 350.04, "kraken-350m-4way": 353.36, "kraken-760m-4way": 760.94}


@pytest.mark.parametrize("name,millions", PAPER.items())
def test_paper_parameter_counts(name, millions):
    assert round(get_preset(name).num_params() / 1e6, 2) == millions


def test_paper_formula_matches_config():
    cfg = get_preset("kraken-125m-2way")
    L, N, d = cfg.n_layer, cfg.n_sub, cfg.n_embd  # noqa: N806
    assert cfg.num_params() == L * N * (8 * d * d + 2 * d) + N * d * d + d + (50304 + 1024) * d


def test_gpt2_124m_matches_hugging_face_count():
    assert get_preset("gpt2-124m").num_params() == 124_439_808


@pytest.mark.parametrize("field,value", [("arch", "bert"), ("n_layer", 0), ("n_embd", -1), ("n_head", 5),
                                         ("n_sub", 2), ("mlp", "relu"), ("position", "alibi"), ("n_kv_head", 5),
                                         ("norm_eps", 0), ("bias", "yes"), ("norm", "batchnorm"),
                                         ("rope_theta", 0), ("tie_embeddings", 1), ("ladder_layers", 2)])
def test_bad_fields_name_themselves(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


def test_llama_3_8b_matches_its_published_count():
    """8,030,261,248: GQA, SwiGLU, RMSNorm gains only, untied LM head."""
    assert get_preset("llama-3-8b").num_params() == 8_030_261_248


def test_ladder_has_gpt_parameters_and_bounded_ladder_layers():
    assert get_preset("ladder-124m").num_params() == get_preset("gpt2-124m").num_params()
    assert get_preset("ladder-124m").ladder_start == 0
    assert ModelConfig(arch="ladder", n_layer=12, ladder_layers=4).ladder_start == 8
    with pytest.raises(ConfigError, match="ladder_layers"):
        ModelConfig(arch="ladder", n_layer=12, ladder_layers=13)


def test_unknown_field_rejected():
    with pytest.raises(ConfigError, match="config: unknown field"):
        ModelConfig.from_dict({"n_layers": 12})


def test_json_round_trip(tmp_path):
    cfg = get_preset("kraken-125m-4way")
    path = tmp_path / "c.json"
    path.write_text(__import__("json").dumps(cfg.to_dict()))
    assert ModelConfig.from_json(path) == cfg
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config"):
        ModelConfig.from_json(path)


@pytest.mark.parametrize("name,gpt_budget", [
    ("kraken-125m-2way", "gpt2-124m"), ("kraken-125m-4way", "gpt2-124m"), ("kraken-125m-6way", "gpt2-124m"),
    ("kraken-350m-2way", "gpt2-350m"), ("kraken-350m-4way", "gpt2-350m")])
def test_sizing_rule_reproduces_paper_within_one_head_multiple(name, gpt_budget):
    paper = get_preset(name)
    budget = get_preset(gpt_budget).replace(bias=False, vocab_size=50304).num_params()
    sized = size_kraken(budget, paper.n_layer, paper.total_heads, paper.n_sub)
    assert sized.n_head == paper.n_head
    assert abs(sized.n_embd - paper.n_embd) <= paper.n_head


def test_sizing_rule_760m_uses_gpt3_medium_budget():
    budget = ModelConfig(n_layer=24, n_embd=1536, n_head=16).num_params()
    assert size_kraken(budget, 24, 16, 4).n_embd == 960


def test_hardware_friendly_sizing():
    budget = get_preset("gpt2-124m").replace(bias=False, vocab_size=50304).num_params()
    for n_sub in (2, 4, 6):
        s = size_kraken(budget, 12, 12, n_sub, hardware_friendly=True)
        assert s.n_embd % 64 == 0 and (s.n_embd // s.n_head) % 64 == 0
        assert abs(s.params - budget) / budget < 0.15


def test_per_layer_sizing_keeps_layer_parameters():
    for size in ("1.3b", "13b", "175b"):
        gpt = get_preset(f"gpt-{size}")
        for n in (4, 8):
            k = get_preset(f"kraken{n}-{size}")
            assert k.total_heads == gpt.n_head
            assert abs(k.layer_params() / gpt.layer_params() - 1) < 0.02


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match="kraken-125m-2way"):
        get_preset("kraken-9000")


def test_all_presets_valid_and_named():
    assert all(cfg.name == name for name, cfg in PRESETS.items())
