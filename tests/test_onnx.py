"""ONNX export of the encoder and the whole student decode, run with onnxruntime (issue 16, item 4)."""

import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from msdd.cli import main  # noqa: E402
from msdd.data import embedded_eval_set  # noqa: E402
from msdd.integrations.onnx import OnnxTokenizer  # noqa: E402
from msdd.tokenizer import Tokenizer  # noqa: E402


def test_onnx_student_matches_pytorch_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "--model", "tiny-64-student", "--out", str(out), "--format", "onnx"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "onnx.json"]
    info = json.loads((out / "onnx.json").read_text())
    assert info["steps"] == [1, 1, 1, 1] and info["decoder_inputs"] == ["z", "x0", "bn1", "bn2", "bn3"]
    tok, ort_tok = Tokenizer.from_pretrained("tiny-64-student"), OnnxTokenizer(out)
    images = embedded_eval_set(64)[0][:3]  # batch 3: the graphs were traced at batch 2 (dynamic batch)
    z = tok.encode(images)
    assert (ort_tok.encode(images) - z).abs().max() < 1e-4
    for seed in (0, 5):  # the same seed draws the same noise: the same image (measured: 9e-7 max abs)
        want = tok.decode(z, generator=torch.Generator().manual_seed(seed))
        got = ort_tok.decode(z, generator=torch.Generator().manual_seed(seed))
        assert got.shape == want.shape and (got - want).abs().max() < 1e-4, seed
    other = ort_tok.decode(z, seed=1)  # seed: a generator seeded with it, as Tokenizer.decode's
    assert (other - tok.decode(z, seed=1)).abs().max() < 1e-4
    assert (other - want).abs().max() > 1e-2  # the noise inputs matter, so the checks above can fail


def test_onnx_refusals_and_the_bench_row(tmp_path, capsys, monkeypatch):
    from msdd.config import load_config

    ssdd = tmp_path / "ssdd"
    Tokenizer(load_config("ssdd-tiny-test").model).save_pretrained(ssdd)
    assert main(["export", "--model", str(ssdd), "--out", str(tmp_path / "o"), "--format", "onnx"]) == 2
    assert "multi-scale (msdd family)" in capsys.readouterr().err and list(tmp_path.iterdir()) == [ssdd]
    with pytest.raises(FileNotFoundError, match="msdd export --format onnx"):
        OnnxTokenizer(tmp_path)

    from msdd.eval.bench.contenders import build_contenders
    from msdd.eval.bench.models import FlowModel

    import onnxruntime

    sessions = []

    def session(*args, **kwargs):
        sessions.append(onnxruntime.InferenceSession.__wrapped__(*args, **kwargs))
        return sessions[-1]

    session.__wrapped__ = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # as `msdd bench --threads 1` sets it
    student = FlowModel.random(load_config("tiny-test").model, torch.device("cpu"))
    eager, onnx_row = build_contenders(["student", "onnx-student"], student, student, (1,), 1.0, 2, torch.device("cpu"))
    assert onnx_row.flop_per_image == eager.flop_per_image and onnx_row.info["runtime"] == "onnxruntime"
    assert sessions[0].get_session_options().intra_op_num_threads == 1  # the run's threads, not one per core
    assert (onnx_row.decode() - eager.decode()).abs().max() < 1e-4  # the same decode, the same noise


def test_onnx_without_its_extra_is_a_clear_error_before_any_work(tmp_path, capsys, monkeypatch):
    from msdd.eval.bench.settings import BenchSettings

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    out = tmp_path / "o"
    assert main(["export", "--model", "tiny-64", "--out", str(out), "--format", "onnx"]) == 2
    assert 'onnx not installed: ONNX export and inference need the onnx extra, pip install "msdd[onnx]"' in \
        capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"--contenders onnx-student: onnx not installed.*msdd\[onnx\]"):
        BenchSettings(contenders=("student", "onnx-student"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match="onnx and onnxruntime not installed"):
        BenchSettings(contenders=("onnx-student",))


def test_onnx_export_of_a_guided_teacher_at_a_given_schedule(tmp_path):
    """`export_onnx` of a Tokenizer object with steps and guidance of its own: the graph decodes that schedule (guided
    passes included) as PyTorch does with the same noise, `onnx.json` records it with the shapes and stage windows, the
    caller's model is left as it was (its dtype and training mode), and `OnnxTokenizer.reconstruct` with a thread
    count is encode then decode."""
    from msdd.integrations.onnx import export_onnx

    tok = Tokenizer.from_pretrained("tiny-64-teacher")
    mine = Tokenizer.from_pretrained("tiny-64-teacher").double().train()  # exported as float32: the same weights
    out = export_onnx(mine, tmp_path / "teacher", steps=[2, 1, 1, 2], guidance=2.0)
    assert next(mine.parameters()).dtype == torch.float64 and mine.training
    info = json.loads((out / "onnx.json").read_text())
    assert info == {"image_size": 64, "latent_shape": [32, 8], "steps": [2, 1, 1, 2], "guidance": 2.0,
                    "stage_resolutions": [8, 16, 32, 64], "stage_gamma": [w.gamma for w in tok.windows],
                    "decoder_inputs": ["z", "x0", "bn1", "bn2", "bn3"], "opset": 17}
    ort_tok = OnnxTokenizer(out, threads=1)
    images = embedded_eval_set(64)[0][:2]
    want = tok.decode(tok.encode(images), steps=[2, 1, 1, 2], guidance=2.0, generator=torch.Generator().manual_seed(4))
    got = ort_tok.reconstruct(images, generator=torch.Generator().manual_seed(4))
    assert (got - want).abs().max() < 1e-4
    unguided = tok.decode(tok.encode(images), steps=[2, 1, 1, 2], guidance=1.0, seed=4)
    assert (unguided - want).abs().max() > 1e-2  # guidance changes the image, so the check above can fail
    assert ort_tok.encoder.get_session_options().intra_op_num_threads == 1
