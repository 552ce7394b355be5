"""`python -m reference_engine distill OUT.gguf`: make a student from the teacher, train it,
measure it before and after on held-out text, time its decoding against the teacher's in
the same run, and write it as a GGUF file that every other command reads.

Re-running the same command after an interruption resumes from its checkpoint
(OUT.gguf.ckpt.safetensors by default); nothing already saved is lost.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import DojoError
from . import data, student as students
from .train import DistillConfig, distill, evaluate, make_optimizer, run_identity, train_step, trainable


def checkpoint_steps(path: Path) -> int | None:
    """The schedule length a checkpoint was written with (to resume a --minutes run)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int(json.loads((f.metadata() or {})["run"])["config"]["steps"])
    except Exception:  # noqa: BLE001 (unreadable: load_checkpoint says so, with what to do)
        return None


def steps_for_minutes(student, teacher, windows, valid, cfg: DistillConfig, minutes: float) -> tuple[int, float]:
    """How many steps fit in `minutes`, from two steps timed on a throwaway copy."""
    trial = copy.deepcopy(student)
    named = trainable(trial, cfg)
    optimizer = make_optimizer(named, cfg)
    params = [p for _, p in named]
    rows = torch.arange(min(cfg.batch, len(windows)))
    train_step(trial, teacher, windows[rows], valid[rows], cfg, optimizer, params)  # warm-up, not timed
    t0 = time.perf_counter()
    train_step(trial, teacher, windows[rows], valid[rows], cfg, optimizer, params)
    per_step = time.perf_counter() - t0
    return max(1, int(minutes * 60 / per_step)), per_step


def decode_speeds(teacher, student, tokenizer, rounds: int = 3, new_tokens: int = 64) -> dict:
    """Batch-1 decode tokens/s of both, measured in alternating rounds (medians)."""
    from ..bench import bench_decode

    prompt = tokenizer.encode_chat("Explain what a hash table is.")
    for m in (teacher, student):
        m.pack_for_cpu()
    rates = {"teacher": [], "student": []}
    for _ in range(rounds):
        rates["teacher"].append(bench_decode(teacher, [prompt], new_tokens, repeats=1))
        rates["student"].append(bench_decode(student, [prompt], new_tokens, repeats=1))
    out = {k: statistics.median(v) for k, v in rates.items()}
    out["speedup"] = out["student"] / out["teacher"]
    return out


def run_distill(out: str, cfg: DistillConfig, model_path: str | None = None, blocks: str = "least-important",
                n_blocks: int | None = None, data_kind: str = "text", window: int = 256, minutes: float | None = None,
                checkpoint: str | None = None, eval_windows: int = 4, bench: bool = True,
                progress: bool = True, student_path: str | None = None) -> dict:
    from ..compression.calibration import calibration_windows, evaluation_windows
    from ..compression.quality import reference_logprobs
    from ..gguf_writer import gguf_tensors, save_gguf
    from ..load import load_model

    out_path = Path(out)
    if out_path.suffix != ".gguf":
        raise DojoError(f"the student is written as GGUF: give a file name ending in .gguf, not {out_path.name!r}")
    if not out_path.parent.is_dir():
        raise DojoError(f"cannot write {out_path}: the folder {out_path.parent} does not exist")
    if data_kind not in ("text", "generated"):
        raise DojoError(f"--data is 'text' (the pydoc topics) or 'generated' (by the teacher); got {data_kind!r}")
    if minutes is not None and minutes <= 0:
        raise DojoError(f"--minutes must be > 0, got {minutes}")
    cfg.check()
    teacher, tokenizer = load_model(model_path, pack=False)
    window = min(window, teacher.config.max_seq_len)
    if student_path is not None:  # a model of its own, for example chapter 5's `prune` output
        student, student_tokenizer = load_model(student_path, pack=False)
        if student_tokenizer.tokens != tokenizer.tokens:
            raise DojoError(f"{student_path} has a vocabulary of {student_tokenizer.vocab_size} tokens that is not the "
                            f"teacher's ({tokenizer.vocab_size}): a student must read and write the teacher's tokens")
        chosen = [f"{Path(student_path).name}: {student.config.n_layers} blocks"]
    else:
        calibration = calibration_windows(tokenizer, 4, window) if blocks == "least-important" else None
        chosen = students.student_blocks(teacher, blocks, n_blocks, calibration)
        student = students.make_student(teacher, chosen)
    gguf_tensors(student)  # a student that cannot be written fails now, not after training

    if data_kind == "text":
        windows = data.text_windows(tokenizer, window)
        valid = torch.ones_like(windows, dtype=torch.bool)
    else:
        windows, valid = data.generated_windows(teacher, tokenizer, min(cfg.steps * cfg.batch, 128), window,
                                                seed=cfg.seed, progress=progress)
    ckpt = Path(checkpoint) if checkpoint else out_path.with_name(out_path.name + ".ckpt.safetensors")
    estimate = None
    if minutes is not None:
        saved = checkpoint_steps(ckpt) if ckpt.exists() else None
        if saved is not None:
            cfg = replace(cfg, steps=saved)  # resuming a --minutes run: its schedule as it was
        else:
            steps, per_step = steps_for_minutes(student, teacher, windows, valid, cfg, minutes)
            cfg, estimate = replace(cfg, steps=steps), per_step
    teacher_file = Path(model_path) if model_path else None
    identity = run_identity(cfg, chosen, f"{data_kind}, windows of {window}",
                            teacher_file.name if teacher_file else "SmolLM2-135M-Instruct")

    held_out = evaluation_windows(tokenizer, eval_windows, window)
    ref = reference_logprobs(teacher, held_out)
    before = evaluate(student, ref, held_out)
    t0 = time.perf_counter()
    history = distill(student, teacher, windows, cfg, valid=valid, checkpoint=ckpt, identity=identity,
                      progress=progress)
    train_s = time.perf_counter() - t0
    after = evaluate(student, ref, held_out)
    save_gguf(student, tokenizer, out_path, name="distilled")
    report = {"out": str(out_path), "checkpoint": str(ckpt), "blocks": chosen, "steps": cfg.steps,
              "resumed_from": history.resumed_from, "seconds_per_step_estimate": estimate,
              "train_seconds": train_s, "train_tokens_per_s": history.tokens_per_s, "config": vars(cfg),
              "teacher": {"perplexity": before.reference_perplexity, "blocks": teacher.config.n_layers},
              "before": before.to_dict(), "after": after.to_dict()}
    if bench:
        report["decode"] = decode_speeds(teacher, student, tokenizer)
    return report


def format_report(r: dict) -> str:
    b, a = r["before"], r["after"]
    lines = [f"student: {len(r['blocks'])} of the teacher's {r['teacher']['blocks']} blocks {r['blocks']}"
             if isinstance(r["blocks"][0], int) else f"student: {r['blocks'][0]}",
             f"trained {r['steps']} steps" + (f" (resumed at step {r['resumed_from']})" if r["resumed_from"] else "")
             + f" in {r['train_seconds'] / 60:.1f} min, {r['train_tokens_per_s']:.0f} tokens/s",
             f"  {'held-out':22s} {'before':>10s} {'after':>10s}",
             f"  {'perplexity':22s} {b['perplexity']:10.2f} {a['perplexity']:10.2f}   (teacher "
             f"{r['teacher']['perplexity']:.2f})",
             f"  {'KL(teacher || student)':22s} {b['kl']:10.4f} {a['kl']:10.4f}   nats per token",
             f"  {'top-1 agreement':22s} {b['top1']:10.1%} {a['top1']:10.1%}"]
    if "decode" in r:
        d = r["decode"]
        lines.append(f"decode, batch 1: teacher {d['teacher']:.1f} tokens/s, student {d['student']:.1f} tokens/s "
                     f"({d['speedup']:.2f}x, alternating rounds in this run)")
    lines.append(f"wrote {r['out']} (checkpoint {r['checkpoint']}); measure it with: python -m reference_engine "
                 f"perplexity --model {r['out']} --reference <the teacher's file>")
    return "\n".join(lines)
