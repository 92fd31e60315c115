"""`palm-rlhf convert`: a palm-rlhf-pytorch state dict -> a save_pretrained directory
whose model gives the reference package's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import palm_rlhf_pytorch as ref_pkg  # the [test] extra, which also brings pytest: never skipped
import torch
from safetensors.torch import save_file

from palm_rlhf.cli.main import main
from palm_rlhf.model import PaLM
from palm_rlhf.model.convert import v08_to_ours


ROOT = Path(__file__).resolve().parents[2]
CFG = dict(dim=32, num_tokens=50, depth=2, heads=2, dim_head=16)


def reference(scopes=(), **overrides):
    torch.manual_seed(0)
    ref = ref_pkg.PaLM(**{**CFG, **overrides})
    for scope in scopes:
        ref.add_finetune_params(scope, lora_r=4)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.2)
    return ref.eval()


def ref_logits(ref, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref(x, **kwargs)


X = torch.randint(1, 50, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["auto", "0.8"])
def test_convert_v08_pt(tmp_path, fmt, capsys):
    ref = reference(scopes=("actor",))
    src = tmp_path / "palm.pt"
    torch.save(ref.state_dict(), src)
    out = tmp_path / "converted"
    assert main(["convert", str(src), str(out), "--from", fmt]) == 0
    assert "scopes: ['actor']" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["dim"] == 32 and config["depth"] == 2 and config["heads"] == 2 and config["dim_head"] == 16
    assert config["finetune_scopes"] == {"actor": 4}
    model = PaLM.from_pretrained(out).eval()
    assert (model(X) - ref_logits(ref, X)).abs().max() <= 1e-5
    assert (model(X, finetune_scope="actor") - ref_logits(ref, X, finetune_scope="actor")).abs().max() <= 1e-5


def test_convert_seed_format_safetensors_auto(tmp_path):
    """A seed-format file (absolute gains, near 1) is recognised and left as it is."""
    ref = reference()
    seed_state = {k: v.contiguous() for k, v in v08_to_ours(ref.state_dict()).items() if k != "to_logits.weight"}
    src = tmp_path / "seed.safetensors"
    save_file(seed_state, str(src))
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out)]) == 0
    model = PaLM.from_pretrained(out).eval()
    assert (model(X) - ref_logits(ref, X)).abs().max() <= 1e-5


def test_convert_non_causal_and_qk_rmsnorm(tmp_path):
    ref = reference(causal=False, qk_rmsnorm=True)
    src = tmp_path / "enc.pt"
    torch.save(ref.state_dict(), src)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--non-causal"]) == 0
    model = PaLM.from_pretrained(out).eval()
    assert model.causal is False and model.config["qk_rmsnorm"] is True
    x = X.clone()
    x[1, -4:] = -1
    keep = x >= 0
    assert (model(x) - ref_logits(ref, x))[keep].abs().max() <= 1e-5


def test_convert_rejects_bad_files(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert main(["convert", str(corrupt), str(tmp_path / "o1")]) == 2
    assert "corrupt.pt" in capsys.readouterr().err

    not_palm = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, not_palm)
    assert main(["convert", str(not_palm), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "not a PaLM state dict" in err and "token_emb.weight" in err
    assert not (tmp_path / "o2").exists()


def test_a_run_directory_exports_its_final_model_and_tokenizer(tmp_path, capsys):
    from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer

    torch.manual_seed(0)
    model = PaLM(**CFG)
    model.save_pretrained(tmp_path / "run" / "final")
    ByteTokenizer().save(tmp_path / "run" / "final")
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert "from " + str(tmp_path / "run" / "final") in capsys.readouterr().out
    again = PaLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert load_tokenizer(tmp_path / "out") == ByteTokenizer()


@pytest.mark.parametrize("source", ["state dict", "run directory"])
def test_an_output_path_under_a_file_is_one_error_line(tmp_path, source):
    """`palm-rlhf convert MODEL OUT` with OUT under a file: exit 2 and one `error:` line naming the file
    (it was `internal error: NotADirectoryError`), and the file is left as it was."""
    torch.manual_seed(0)
    if source == "state dict":
        src = tmp_path / "palm.pt"
        torch.save(reference().state_dict(), src)
    else:
        src = tmp_path / "run"
        PaLM(**CFG).save_pretrained(src / "final")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    proc = subprocess.run([sys.executable, "-m", "palm_rlhf", "convert", str(src), str(blocker / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: output directory {blocker / 'out'} cannot be used "
                                        f"({str(blocker)!r} is a file); choose another OUT"]
    assert blocker.read_text() == "a file, not a directory"
