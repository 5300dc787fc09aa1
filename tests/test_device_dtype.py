"""`--device` and `--dtype` (serve, chat, label, eval, sample): auto is bfloat16 on CUDA and float32 on the
CPU, and the chosen type reaches the engines that generate."""
from __future__ import annotations

import pytest
import torch

from alignloop.errors import InputError
from alignloop.model import pick_device, pick_dtype

HI = [{"role": "user", "content": "What is the capital of the first country?"}]


def test_auto_and_bad_names():
    assert pick_dtype("auto", "cpu") == torch.float32 and pick_dtype("auto", "cuda") == torch.bfloat16
    assert pick_dtype("float16", "cpu") == torch.float16
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    with pytest.raises(InputError, match="field 'dtype'") as e:
        pick_dtype("half")
    assert e.value.field == "dtype"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            pick_device("cuda")


def test_bfloat16_reaches_the_server_and_the_labeling_sampler(micro_run):
    from alignloop.feedback.sampling import Sampler
    from alignloop.serve import load_models
    engine = load_models({"base": micro_run / "pretrain"}, micro_run, device="cpu", dtype="bfloat16")["base"].engine
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    out = engine.generate([engine.tok.render_prompt(HI)], max_new_tokens=6, temperature=0)[0]
    assert out.ids and out.finish_reason in ("stop", "length")
    sampler = Sampler(micro_run, None, device="cpu", dtype="bfloat16")
    assert next(sampler._engine(micro_run / "pretrain").model.parameters()).dtype == torch.bfloat16
