"""GGUF input (alignloop/sources.py): a tiny Llama GGUF written here with llama.cpp's `gguf` package is
converted once into a Hugging Face folder, generates through the engine exactly as `transformers` does
on that folder, and is found by every command that names a model; bad model paths stop with one message
naming file and field (exit 2) and leave the run as it was."""
from __future__ import annotations

import json
import os

import pytest
import torch

from alignloop.engine import Engine
from alignloop.model import load_causal_lm
from alignloop.sources import gguf_dest, resolve_model, tokenizer_dir
from alignloop.tokenizer import ChatTokenizer
from tests.tiny_gguf import bpe_tokenizer, write_tiny_gguf

ASK = [{"role": "user", "content": "What is the capital of Valdoria?"}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chatml.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache root of the test's own, so no test converts into ~/.cache."""
    monkeypatch.setenv("ALIGNLOOP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_round_trip_into_the_run_then_reused(tiny_gguf, tmp_path, capfd):
    run = tmp_path / "run"
    folder = resolve_model(tiny_gguf, run)
    assert folder == run / "models" / "tiny-chatml"
    assert f"converted {tiny_gguf}" in capfd.readouterr().err
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "source.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(tiny_gguf, run) == folder                       # converted once, then reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp and "converted" not in capfd.readouterr().err

    assert tokenizer_dir(folder, run) == folder
    tok = ChatTokenizer.load(folder)
    text = "The capital of Valdoria is Mirenth. What is 7 plus 5?"
    assert tok.encode(text) == bpe_tokenizer().encode(text).ids          # the GGUF's vocabulary and merges, intact
    assert tok.decode(tok.render_prompt(ASK), skip_special=False) == \
        "<|im_start|>user\nWhat is the capital of Valdoria?<|im_end|>\n<|im_start|>assistant\n"  # its template
    assert tok.stop_ids == [tok.hf.convert_tokens_to_ids("<|im_end|>")]

    model = load_causal_lm(folder)
    prompts = [tok.render_prompt(ASK), tok.render_prompt([{"role": "user", "content": "Hello there"}])]
    outs = Engine(model, tok).generate(prompts, max_new_tokens=16, temperature=0)
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, eos_token_id=tok.stop_ids,
                             suppress_tokens=[tok.pad_id], pad_token_id=tok.pad_id)
        assert o.ids == ref[0, len(p):].tolist()


def test_without_a_run_it_converts_into_the_cache(tiny_gguf, cache, tmp_path):
    folder = resolve_model(tiny_gguf)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-chatml-")
    assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]   # no temporary left
    os.utime(tiny_gguf, ns=(0, 10**18))  # a changed file (another mtime) gets a folder of its own
    assert gguf_dest(tiny_gguf, None) != folder


# A quantised weight is one of a few levels per block of 32 along its row: Q8_0 rounds to the nearest of
# 255 steps of max|block|/127, Q4_0 to 16 steps of max|block|/8 (its top level, +7, clamps a value at the
# block's +8, so up to a whole step there). Each scale is stored as float16 (relative error ≤ 2^-11, times
# up to 127 or 8 steps).
QUANT_ERROR = {"Q8_0": (0.5 + 127 * 2**-11) / 127, "Q4_0": (1 + 8 * 2**-11) / 8}  # × max|block|


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantised_gguf_loads_within_quantisation_error(qtype, tiny_gguf, tmp_path):
    """The same seed written quantised (offline, by the `gguf` package's quantiser) converts through
    resolve_model into float32 weights that are the F32 file's to within the quantisation error — and
    exactly llama.cpp's own dequantisation of them, not merely close."""
    import gguf
    from safetensors.torch import load_file
    quantised = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(quantised)).tensors}
    assert kinds["token_embd.weight"] == kinds["blk.1.ffn_down.weight"] == qtype     # really quantised
    assert quantised.stat().st_size < 0.5 * tiny_gguf.stat().st_size

    run = tmp_path / "run"
    ref = load_file(resolve_model(tiny_gguf, run) / "model.safetensors")
    folder = resolve_model(quantised, run)
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None
    got = load_file(folder / "model.safetensors")
    assert set(got) == set(ref)
    qt = gguf.GGMLQuantizationType[qtype]
    matrices = 0
    for name, x in ref.items():
        y = got[name]
        assert y.dtype == torch.float32 and y.shape == x.shape, name
        if x.dim() == 1:                                               # norms stay F32: exact
            assert torch.equal(y, x), name
            continue
        matrices += 1
        blocks_x, blocks_y = x.reshape(-1, 32), y.reshape(-1, 32)      # blocks run along each row
        err = (blocks_y - blocks_x).abs() / blocks_x.abs().amax(dim=1, keepdim=True)
        assert err.max() <= QUANT_ERROR[qtype], (name, float(err.max()))
        assert err.max() > QUANT_ERROR[qtype] / 10, (name, "no quantisation error: not quantised?")
        expected = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), qt), qt)
        assert torch.equal(y, torch.from_numpy(expected)), name
    assert matrices == 1 + 2 * 7
    model = load_causal_lm(folder)                                     # and it runs
    tok = ChatTokenizer.load(folder)
    out = Engine(model, tok).generate([tok.render_prompt(ASK)], max_new_tokens=4, temperature=0)
    assert len(out[0].ids) >= 1


def test_serve_chat_and_label_find_the_model(tiny_gguf, micro_copy, cache):
    from alignloop.chat import pick_model
    from alignloop.feedback.sampling import models_of
    from alignloop.rundir import stage_models
    from alignloop.serve import resolve_models
    models, run = resolve_models(micro_copy, {"tiny": tiny_gguf})          # serve RUN --model tiny=FILE.gguf
    assert run == micro_copy and models["tiny"] == micro_copy / "models" / "tiny-chatml"
    assert stage_models(micro_copy)["models/tiny-chatml"] == models["tiny"]   # the run now lists it
    assert models_of(micro_copy)["models/tiny-chatml"] == models["tiny"]  # … and so does the labeling sampler
    assert resolve_models(tiny_gguf, {})[0] == {"tiny-chatml": resolve_model(tiny_gguf)}   # serve FILE.gguf
    assert pick_model(tiny_gguf, None) == (resolve_model(tiny_gguf), None)                   # chat FILE.gguf
    assert tokenizer_dir(micro_copy / "pretrain") == micro_copy / "pretrain"


def test_tokenizer_rule_falls_back_to_the_run(micro_copy):
    stage = micro_copy / "pretrain"
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (stage / f).unlink(missing_ok=True)
    assert tokenizer_dir(stage, micro_copy) == micro_copy / "tokenizer"
    assert tokenizer_dir(stage) == micro_copy / "tokenizer"            # the run the folder sits in


# ---------------------------------------------------------------- bad input


def _bad(kind, tmp_path, tiny_gguf):
    if kind == "architecture":
        return write_tiny_gguf(tmp_path / "odd.gguf", arch="rwkv6")
    if kind == "truncated":
        path = tmp_path / "cut.gguf"
        path.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
        return path
    if kind == "no weights":
        path = tmp_path / "empty-model"
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "llama"}')
        return path
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    return path


def _cli(capsys, *args) -> tuple[int, str]:
    from alignloop.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("kind,says", [
    ("architecture", "field 'general.architecture': transformers cannot load the GGUF architecture 'rwkv6'"),
    ("truncated", "field 'tensor data': truncated or damaged GGUF file"),
    ("no weights", "field 'model': the model folder has a config.json but no weights"),
    ("neither", "field 'model': neither a Hugging Face model folder nor a .gguf file"),
])
def test_bad_model_exits_2_and_writes_nothing(kind, says, tiny_gguf, micro_copy, tmp_path, cache, capsys):
    bad = _bad(kind, tmp_path, tiny_gguf)
    before = sorted(str(p.relative_to(micro_copy)) for p in micro_copy.rglob("*"))
    code, err = _cli(capsys, "eval", "--preset", "micro", "--out", micro_copy, "--stage", "mine", "--model", bad)
    assert code == 2 and f"{bad} {says}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(str(p.relative_to(micro_copy)) for p in micro_copy.rglob("*")) == before, "nothing written"
    assert not cache.exists()


@pytest.mark.parametrize("command", ["serve", "chat", "sample"])
def test_other_commands_refuse_a_bad_gguf(command, tiny_gguf, micro_copy, tmp_path, cache, capsys):
    bad = _bad("truncated", tmp_path, tiny_gguf)
    args = {"serve": ["serve", micro_copy, "--model", f"x={bad}"], "chat": ["chat", bad],
            "sample": ["sample", "--preset", "micro", "--out", micro_copy, "--policy", bad]}[command]
    before = sorted(str(p.relative_to(micro_copy)) for p in micro_copy.rglob("*"))
    code, err = _cli(capsys, *args)
    assert code == 2 and "cut.gguf field 'tensor data': truncated" in err, err
    assert sorted(str(p.relative_to(micro_copy)) for p in micro_copy.rglob("*")) == before
