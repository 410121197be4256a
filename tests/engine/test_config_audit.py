"""Issue 18: every value that would make training wrong is refused in one line naming the key
and what is allowed, before any work; YAML errors and wrong sections too; diffusers' key names get
ours."""

import pytest

from diffusion.train import DiffusionConfig
from engine.config import ConfigError, from_mapping, load_config, parse_yaml
from tests.launch import ROOT
from tokenizer.train import TokenizerConfig

TOKENIZER = parse_yaml((ROOT / "configs/tokenizer/digits_cvq.yaml").read_text())
DIFFUSION = parse_yaml((ROOT / "configs/diffusion/digits_uncond.yaml").read_text())
INF, NAN = float("inf"), float("nan")

CASES = [  # (config, change, what the message says)
    (TOKENIZER, {"train": {"max_grad_norm": -1.0}}, r"train.max_grad_norm.*> 0.*null"),
    (TOKENIZER, {"train": {"max_grad_norm": 0.0}}, r"train.max_grad_norm.*> 0"),
    (TOKENIZER, {"train": {"learning_rate": INF}}, r"train.learning_rate.*finite"),
    (TOKENIZER, {"train": {"learning_rate": NAN}}, r"train.learning_rate.*finite"),
    (TOKENIZER, {"train": {"learning_rate": 0.0}}, r"train.learning_rate.*> 0"),
    (TOKENIZER, {"train": {"seed": -1}}, r"train.seed.*>= 0"),
    (TOKENIZER, {"train": {"adam_betas": [0.5, INF]}}, r"train.adam_betas.*finite"),
    (TOKENIZER, {"model": {"ch_mult": []}}, r"model.ch_mult.*at least one"),
    (TOKENIZER, {"model": {"ch_mult": [1, 0]}}, r"model.ch_mult"),
    (TOKENIZER, {"model": {"attn_resolutions": [0]}}, r"model.attn_resolutions"),
    (TOKENIZER, {"model": {"dropout": 1.0}}, r"model.dropout.*\[0, 1\)"),
    (TOKENIZER, {"model": {"scaling_factor": 0.0}}, r"model.scaling_factor.*> 0"),
    (TOKENIZER, {"model": {"scaling_factor": INF}}, r"model.scaling_factor.*finite"),
    (TOKENIZER, {"model": {"quantizer_options": {"beta": INF}}}, r"beta.*finite"),
    (TOKENIZER, {"loss": {"disc_weight": INF}}, r"loss.disc_weight.*finite"),
    (TOKENIZER, {"loss": {"perceptual_weight": -1.0}}, r"loss.perceptual_weight.*>= 0"),
    (TOKENIZER, {"data": {"seed": -1}}, r"data.seed.*>= 0"),
    (TOKENIZER, {"data": {"dataset_name": "x"}}, r"diffusers' 'dataset_name' is data.source"),
    (TOKENIZER, {"train": {"train_batch_size": 4}}, r"'train_batch_size' is train.batch_size"),
    (TOKENIZER, {"train": {"max_stpes": 3}}, r"did you mean train.max_steps\?"),
    (DIFFUSION, {"unet": {"norm_num_groups": 0}}, r"unet.norm_num_groups.*>= 1"),
    (DIFFUSION, {"unet": {"attention_head_dim": 0}}, r"unet.attention_head_dim.*>= 1"),
    (DIFFUSION, {"unet": {"dropout": 1.0}}, r"unet.dropout.*\[0, 1\)"),
    (DIFFUSION, {"unet": {"block_out_channels": []}}, r"unet.block_out_channels"),
    (DIFFUSION, {"unet": {"attention_resolutions": [-8]}}, r"unet.attention_resolutions"),
    (DIFFUSION, {"train": {"ema_power": 0.0}}, r"train.ema_power.*> 0"),
    (DIFFUSION, {"train": {"weight_decay": -0.1}}, r"train.weight_decay.*>= 0"),
    (DIFFUSION, {"train": {"max_grad_norm": -1.0}}, r"train.max_grad_norm.*> 0"),
    (DIFFUSION, {"train": {"sample_guidance": INF}}, r"train.sample_guidance.*finite"),
    (DIFFUSION, {"train": {"adam_weight_decay": 0.1}}, r"is train.weight_decay here"),
    (DIFFUSION, {"eval": {"eta": 2.0}}, r"eval.eta.*\[0, 1\]"),
    (DIFFUSION, {"cache": {"shard_size": 0}}, r"cache.shard_size.*>= 1"),
]


@pytest.mark.parametrize(
    "base, change, message", CASES, ids=[f"{list(c)}-{list(c.values())}" for _, c, _ in CASES]
)
def test_every_value_that_trains_wrongly_is_refused(base, change, message, assert_config_refused):
    cls = TokenizerConfig if base is TOKENIZER else DiffusionConfig
    assert_config_refused(cls, base, change, message)


@pytest.mark.parametrize("section, value", [("model", 5), ("model", [1, 2]), ("train", "fast")])
def test_a_section_that_is_no_mapping_is_refused(section, value):
    with pytest.raises(ConfigError, match=rf"section '{section}' must be a mapping") as error:
        from_mapping(TokenizerConfig, {**TOKENIZER, section: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("train:\n  max_steps: 3\n  batch_size: [1, 2\n", 4, "expected ',' or ']'"),
        ("model: !!python/object/apply:os.system ['true']\n", 1, "could not determine"),
        ("train:\n\tmax_steps: 3\n", 2, "found character '\\\\t'"),
    ],
)
def test_yaml_errors_name_the_file_and_line(tmp_path, text, line, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad.yaml:{line}: not valid YAML \({problem}") as e:
        load_config(path, [], TokenizerConfig)
    assert "\n" not in str(e.value)


def test_the_keys_a_file_sets_are_known():
    config = from_mapping(TokenizerConfig, {**TOKENIZER, "data": {"resolution": 32}})
    assert config.data.given == {"resolution"}  # source: the default, not the file's
