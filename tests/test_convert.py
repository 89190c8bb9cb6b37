"""zlocal convert: bitsandbytes output format, round trips, GPTQ, and the refusal cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zlocal.checkpoint.manifest import verify
from zlocal.conversion.convert import convert
from zlocal.errors import CheckpointError, ConversionError, InvalidArgumentError

BNB = ["nf4", "fp4", "int8"]


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


@pytest.fixture(scope="module")
def bnb_outputs(tiny_zephyr, tmp_path_factory):
    """Each bitsandbytes method converted once (no quality pass: that is tested separately)."""
    root = tmp_path_factory.mktemp("bnb")
    return {m: convert(tiny_zephyr, root / m, m, evaluate=False, quiet=True) for m in BNB}


def _copy_src(tiny_zephyr, dest):
    shutil.copytree(tiny_zephyr, dest, ignore=shutil.ignore_patterns(".complete"))
    return dest


@pytest.mark.parametrize("method", BNB)
def test_bnb_output_matches_what_transformers_writes(method, bnb_outputs, tiny_zephyr, tmp_path):
    """Same tensor names, dtypes, shapes and values as transformers' own quantize + save_pretrained."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    ref = AutoModelForCausalLM.from_pretrained(
        tiny_zephyr, quantization_config=qc, device_map="cpu", dtype=torch.float32
    )
    ref.save_pretrained(tmp_path / "ref")
    ours = _tensors(Path(bnb_outputs[method].out))
    theirs = _tensors(tmp_path / "ref")
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k], v), k
    cfg_ours = json.loads((Path(bnb_outputs[method].out) / "config.json").read_text())
    cfg_ref = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert cfg_ours["quantization_config"] == cfg_ref["quantization_config"]


@pytest.mark.parametrize("method", BNB)
def test_bnb_round_trip_transformers_and_zlocal(method, bnb_outputs, tiny_zephyr):
    """Loads without zlocal, and through zlocal.load, and both generate the same greedy tokens."""
    from transformers import AutoModelForCausalLM

    import zlocal

    out = bnb_outputs[method].out
    assert verify(out).ok
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    ids = torch.tensor([[1, 22557, 736]])
    hf = model.generate(ids, max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    assert len(hf) == 4
    rt = zlocal.load(out, dtype="float32", max_context=64)
    c = rt.stream_tokens([1, 22557, 736], max_new_tokens=4, temperature=0)
    toks = [r.token for r in c if r.token is not None]
    assert toks == hf
    # 4-bit layers stay bitsandbytes modules; int8 ones run on zlocal's fused CPU kernel (same weights)
    layer = rt.model.model.layers[0].mlp.down_proj
    expected = "Int8WeightOnlyLinear" if method == "int8" else "Linear4bit"
    assert type(layer).__name__ == expected


def test_output_has_manifest_and_aux_files(bnb_outputs, tiny_zephyr):
    out = Path(bnb_outputs["nf4"].out)
    m = json.loads((out / "zlocal.json").read_text())
    assert m["method"] == "nf4" and m["bits"] == 4
    src_hash = m["source"]["shards"]["model.safetensors"]
    from zlocal.checkpoint.manifest import sha256_file

    assert src_hash == sha256_file(tiny_zephyr / "model.safetensors")
    assert set(m["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"}
    assert "bitsandbytes" in m["versions"] and "transformers" in m["versions"]
    assert not list(out.parent.glob(".*zlocal-tmp-*"))


def test_small_shards_are_indexed(tiny_zephyr, tmp_path):
    """Output is split shard by shard with a standard index when it exceeds the shard size."""
    from transformers import AutoModelForCausalLM

    r = convert(tiny_zephyr, tmp_path / "o", "int8", evaluate=False, quiet=True, max_shard_bytes=2_000_000)
    shards = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "o" / "model.safetensors.index.json").is_file()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    AutoModelForCausalLM.from_pretrained(r.out, device_map="cpu")


# -- refusals ------------------------------------------------------------------------------------
def test_existing_out_refused_and_untouched(tiny_zephyr, tmp_path):
    """Without --overwrite nothing existing is touched; with it, only an earlier zlocal output is
    replaced (tests/test_convert_output.py covers every refusal)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"already exists.*--overwrite"):
        convert(tiny_zephyr, out, "int8", evaluate=False, quiet=True)
    with pytest.raises(ConversionError, match=r"no zlocal\.json"):
        convert(tiny_zephyr, out, "int8", evaluate=False, quiet=True, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    convert(tiny_zephyr, out, "int8", evaluate=False, quiet=True, overwrite=True)
    convert(tiny_zephyr, out, "nf4", evaluate=False, quiet=True, overwrite=True)
    assert verify(out).ok and json.loads((out / "zlocal.json").read_text())["method"] == "nf4"


def test_pickle_refused_without_opt_in(tiny_zephyr, tmp_path):
    src = tmp_path / "pk"
    src.mkdir()
    for f in tiny_zephyr.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, src / f.name)
    with safe_open(str(tiny_zephyr / "model.safetensors"), "pt") as st:
        sd = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert(src, tmp_path / "o", "int8", evaluate=False, quiet=True)
    # default flags: the quality report reads the pickle reference too (whole, as it cannot stream)
    r = convert(src, tmp_path / "o", "int8", quiet=True, allow_pickle=True)
    assert verify(r.out).ok and not (src / ".stage").exists()
    q = json.loads((Path(r.out) / "zlocal.json").read_text())["quality"]
    assert q["path"] == "whole models, one after the other" and q["kl_mean"] < 0.05


def test_truncated_shard_named(tiny_zephyr, tmp_path):
    src = _copy_src(tiny_zephyr, tmp_path / "src")
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        convert(src, tmp_path / "o", "nf4", evaluate=False, quiet=True)
    assert not (tmp_path / "o").exists()


def test_corrupt_header_named(tiny_zephyr, tmp_path):
    src = _copy_src(tiny_zephyr, tmp_path / "src")
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        convert(src, tmp_path / "o", "nf4", evaluate=False, quiet=True)


def test_shape_disagreeing_with_config_names_tensor(tiny_zephyr, tmp_path):
    src = _copy_src(tiny_zephyr, tmp_path / "src")
    with safe_open(str(src / "model.safetensors"), "pt") as st:
        sd = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    msg = r"model\.layers\.1\.mlp\.up_proj\.weight.*\[96, 64\].*\[128, 64\]"
    with pytest.raises(CheckpointError, match=msg):
        convert(src, tmp_path / "o", "int8", evaluate=False, quiet=True)


def test_dtype_disagreeing_names_tensor(tiny_zephyr, tmp_path):
    src = _copy_src(tiny_zephyr, tmp_path / "src")
    with safe_open(str(src / "model.safetensors"), "pt") as st:
        sd = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype I32"):
        convert(src, tmp_path / "o", "int8", evaluate=False, quiet=True)


def test_unsupported_architecture(tiny_zephyr, tmp_path):
    src = _copy_src(tiny_zephyr, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="architecture 'gpt2'"):
        convert(src, tmp_path / "o", "nf4", evaluate=False, quiet=True)


@pytest.mark.parametrize("gs", [48, 256, 0])
def test_bad_group_size_refused_before_work(gs, tiny_zephyr, tmp_path):
    with pytest.raises(InvalidArgumentError, match="--group-size"):
        convert(tiny_zephyr, tmp_path / "o", "gptq4", group_size=gs, evaluate=False, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_group_size_must_divide_every_layer():
    from zlocal.conversion.quantize_gptq import check_group_size, default_group_size

    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30}
    assert default_group_size(smol) == 64
    with pytest.raises(InvalidArgumentError, match="q_proj/k_proj/v_proj input features 576"):
        check_group_size(smol, 128)
    zephyr = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32}
    assert default_group_size(zephyr) == 128


def test_not_enough_disk(tiny_zephyr, tmp_path, monkeypatch):
    import zlocal.conversion.convert_output as zo

    monkeypatch.setattr(zo, "free_bytes", lambda p: 10_000_000)
    with pytest.raises(ConversionError, match="not enough disk space"):
        convert(tiny_zephyr, tmp_path / "o", "nf4", evaluate=False, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_out_inside_src_refused(tiny_zephyr, tmp_path):
    src = _copy_src(tiny_zephyr, tmp_path / "src")
    with pytest.raises(ConversionError, match="inside SRC"):
        convert(src, src / "q", "nf4", evaluate=False, quiet=True)


def test_bnb_rejects_group_size(tiny_zephyr, tmp_path):
    with pytest.raises(InvalidArgumentError, match="gptq4/gptq8 only"):
        convert(tiny_zephyr, tmp_path / "o", "nf4", group_size=64)


def test_cli_error_is_one_line(tiny_zephyr, tmp_path, capsys):
    from zlocal.cli import main

    (tmp_path / "o").mkdir()
    rc = main(["convert", str(tiny_zephyr), str(tmp_path / "o"), "--method", "int8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == ConversionError.exit_code and err.startswith("zlocal: error:") and err.count("\n") == 1
