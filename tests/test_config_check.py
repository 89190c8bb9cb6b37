"""config.json checks: every malformed value is a one-line CheckpointError naming the field and the
value, in the library and in every CLI command that reads a checkpoint; real configs still pass."""

from __future__ import annotations

import json
import shutil

import pytest

from zlocal.checkpoint.config_check import MAX_CONFIG_BYTES, check_config
from zlocal.checkpoint.resolve import resolve_model
from zlocal.errors import CheckpointError

BASE = {
    "model_type": "mistral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
}

# (what to change, words the message must hold: the field and the bad value)
BAD = {
    "heads_zero": ({"num_attention_heads": 0}, ["num_attention_heads", "got 0"]),
    "hidden_string": ({"hidden_size": "64"}, ["hidden_size", "'64' (str)"]),
    "hidden_fraction": ({"hidden_size": 64.5}, ["hidden_size", "64.5 (float)"]),
    "layers_word": ({"num_hidden_layers": "two"}, ["num_hidden_layers", "'two'"]),
    "layers_bool": ({"num_hidden_layers": True}, ["num_hidden_layers", "True (bool)"]),
    "layers_billion": ({"num_hidden_layers": 10**9}, ["num_hidden_layers", "1000000000"]),
    "vocab_negative": ({"vocab_size": -5}, ["vocab_size", "-5"]),
    "kv_not_dividing": ({"num_key_value_heads": 3}, ["num_key_value_heads 3", "not divisible"]),
    "heads_not_dividing_hidden": (
        {"num_attention_heads": 5, "num_key_value_heads": 5},
        ["hidden_size 64", "num_attention_heads 5"],
    ),
    "head_dim_zero": ({"head_dim": 0}, ["head_dim", "got 0"]),
    "window_string": ({"sliding_window": "4k"}, ["sliding_window", "'4k'"]),
    "max_pos_float": ({"max_position_embeddings": 512.0}, ["max_position_embeddings", "512.0"]),
    "eps_zero": ({"rms_norm_eps": 0}, ["rms_norm_eps", "got 0"]),
    "theta_string": ({"rope_theta": "1e4"}, ["rope_theta", "'1e4'"]),
    "rope_unknown": (
        {"rope_parameters": {"rope_type": "wibble"}},
        ["rope_parameters.rope_type", "'wibble'", "yarn"],
    ),
    "rope_legacy_unknown": (
        {"rope_scaling": {"type": "wobble", "factor": 2.0}},
        ["rope_scaling", "'wobble'"],
    ),
    "rope_not_object": ({"rope_scaling": 5}, ["rope_scaling", "got 5"]),
    "rope_factor": ({"rope_scaling": {"rope_type": "linear", "factor": -2}}, ["rope_scaling.factor", "-2"]),
    "rope_per_layer": (
        {"rope_parameters": {"full_attention": {"rope_type": "nope"}}},
        ["rope_parameters.full_attention.rope_type", "'nope'"],
    ),
    "tie_string": ({"tie_word_embeddings": "no"}, ["tie_word_embeddings", "'no'"]),
    "dtype_unknown": ({"torch_dtype": "int3"}, ["torch_dtype", "'int3'"]),
    "eos_word": ({"eos_token_id": "two"}, ["eos_token_id", "'two'"]),
    "model_type_number": ({"model_type": 7}, ["model_type", "7 (int)"]),
    "missing_hidden": ({"hidden_size": ...}, ["hidden_size is missing"]),
    "quant_not_object": ({"quantization_config": "gptq"}, ["quantization_config", "'gptq'"]),
    "quant_bits": (
        {"quantization_config": {"quant_method": "gptq", "bits": 0}},
        ["quantization_config.bits"],
    ),
    "text_config_value": (
        {"text_config": {**BASE, "hidden_size": "64"}},
        ["text_config.hidden_size", "'64'"],
    ),
    "text_config_not_object": ({"text_config": []}, ["text_config", "[] (list)"]),
}


def _with(changes: dict) -> dict:
    cfg = dict(BASE)
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_value_names_field_and_value(name):
    changes, words = BAD[name]
    with pytest.raises(CheckpointError) as e:
        check_config(_with(changes), "m/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("m/config.json: ")
    for word in words:
        assert word in msg, msg


REAL = {
    "llama3_rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
    "qwen_yarn_legacy_type": {"rope_scaling": {"type": "yarn", "factor": 4.0}, "sliding_window": None},
    "phi3_su": {"rope_scaling": {"type": "su", "long_factor": [1.0], "short_factor": [1.0]}},
    "per_layer_rope": {
        "rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": None}
    },
    "old_top_level_theta": {"rope_theta": 1000000.0, "rope_scaling": None},
    "head_dim_given": {
        "hidden_size": 3072,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
    },
    "dtype_prefixed": {"torch_dtype": "torch.bfloat16", "eos_token_id": [2, 32000]},
    "gptq": {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}},
    "unsupported_arch_without_sizes": {"model_type": "gpt2", "hidden_size": ..., "n_embd": 768},
    "nested_text_config": {"model_type": "llava", "text_config": dict(BASE), "hidden_size": ...},
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_shapes_pass(name):
    check_config(_with(REAL[name]))


@pytest.fixture
def ckpt(tmp_path, tiny_zephyr):
    def make(text: str | None = None, **changes):
        d = tmp_path / "ckpt"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(tiny_zephyr, d)
        if text is None:
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(changes)
            text = json.dumps(cfg)
        (d / "config.json").write_text(text)
        return d

    return make


def test_deeply_nested_config(ckpt):
    for depth in (100_000, 200):  # past json's recursion limit, and parseable but absurd
        d = ckpt('{"model_type": "mistral", "x": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(CheckpointError, match="nests deeper than 32 levels"):
            resolve_model(str(d))


def test_oversized_and_non_object_configs(ckpt):
    d = ckpt(" " * (MAX_CONFIG_BYTES + 1) + "{}")
    with pytest.raises(CheckpointError, match="bytes; a config is at most"):
        resolve_model(str(d))
    d = ckpt("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        resolve_model(str(d))
    d = ckpt('{"hidden_size": ' + "9" * 5000 + "}")  # past Python's int-from-text digit limit
    with pytest.raises(CheckpointError, match="not valid JSON"):
        resolve_model(str(d))


def test_fields_zlocal_never_reads_are_checked_by_transformers(ckpt):
    d = ckpt(hidden_act=5)
    with pytest.raises(CheckpointError, match=r"transformers cannot use it.*hidden_act") as e:
        resolve_model(str(d))
    assert "\n" not in str(e.value)
    d = ckpt(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0})  # yarn needs a factor
    with pytest.raises(CheckpointError, match="factor"):
        resolve_model(str(d))


def test_library_load_gives_checkpoint_error(ckpt):
    import zlocal

    d = ckpt(rope_parameters={"rope_type": "wibble", "rope_theta": 10000.0})
    with pytest.raises(CheckpointError, match="wibble"):
        zlocal.load(str(d), dtype="float32", max_context=64)


CLI_CASES = {
    "heads_zero": {"num_attention_heads": 0},
    "hidden_string": {"hidden_size": "64"},
    "hidden_fraction": {"hidden_size": 64.5},
    "layers_word": {"num_hidden_layers": "two"},
    "rope_unknown": {"rope_parameters": {"rope_type": "wibble", "rope_theta": 10000.0}},
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
@pytest.mark.parametrize("command", ["prompt", "plan", "convert", "generate"])
def test_every_command_reports_one_line(case, command, ckpt, tmp_path, capsys):
    from zlocal.cli import main

    d = ckpt(**CLI_CASES[case])
    messages = tmp_path / "m.json"
    messages.write_text('[{"role": "user", "content": "hi"}]')
    argv = {
        "prompt": ["prompt", str(d), "--messages", str(messages)],
        "plan": ["plan", str(d)],
        "convert": ["convert", str(d), str(tmp_path / "out"), "--method", "int8"],
        "generate": ["generate", str(d), "--prompt", "hi", "--max-new-tokens", "2"],
    }[command]
    assert main(argv) == CheckpointError.exit_code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    field = next(iter(CLI_CASES[case]))
    assert len(err) == 1 and err[0].startswith("zlocal: error: ckpt/config.json: ") and field in err[0], err
    assert not (tmp_path / "out").exists()


def test_embedded_alias_is_checked_too(ckpt, monkeypatch):
    from zlocal.checkpoint import embedded

    d = ckpt(num_attention_heads=0)
    monkeypatch.setattr(embedded, "ensure_embedded_model", lambda: d)
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        resolve_model("smollm2-135m")
