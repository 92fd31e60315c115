"""Tiny pretraining configs shared by the pretrain/finetune trainer tests."""

from palm_rlhf.runtime.config import load_config
from palm_rlhf.trainers.pretrain import PretrainConfig

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(400))


def write_corpus(tmp_path, text=TEXT):
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def tiny_config(tmp_path, corpus, *overrides, out="run"):
    return load_config(PretrainConfig, None, [
        f"out_dir={tmp_path / out}", f"data.sources=[{corpus}]", "eval.fraction=0.1",
        "model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16",
        "seq_len=16", "batch_size=4", "max_steps=6", "log_every=1", "eval.every=3", "eval.samples=4",
        "save_every=3", "progress=false", "optim.lr=1e-2", "optim.warmup=2", "device=cpu",
        *overrides])
