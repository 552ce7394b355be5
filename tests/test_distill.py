"""Distillation: the losses are the documented formulas, the chunked backward is the plain
one, training on a teacher lowers the student's KL to it, and an interrupted run resumes
to exactly where an uninterrupted one gets."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_clean_error, run_cli, tiny_file  # noqa: F401 (fixture)
from tiny_gguf import tiny_llama

from reference_engine.cli import main
from reference_engine.compression.structured import keep_blocks
from reference_engine.distill import losses, train
from reference_engine.errors import DojoError


def logits_pair(n=6, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3, torch.randn(n, vocab, generator=g) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_soft_kl_is_t_squared_times_kl_of_the_tempered_distributions(temperature):
    s, t = logits_pair()
    want = F.kl_div((s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1), log_target=True,
                    reduction="none").sum(-1) * temperature**2
    assert torch.allclose(losses.soft_kl(s, t, temperature), want, atol=1e-5)
    reverse = F.kl_div((t / temperature).log_softmax(-1), (s / temperature).log_softmax(-1), log_target=True,
                       reduction="none").sum(-1) * temperature**2
    assert torch.allclose(losses.soft_kl(s, t, temperature, "reverse"), reverse, atol=1e-5)
    assert not torch.allclose(want, reverse)
    assert torch.allclose(losses.soft_kl(t, t, temperature), torch.zeros(len(t)), atol=1e-5)


def test_t_squared_keeps_the_soft_gradient_the_same_size_across_temperatures():
    """The reason for T^2: without it the gradient falls like 1 / T^2."""
    s, t = logits_pair(n=64, vocab=200, seed=3)
    norms = {}
    for temperature in (2.0, 8.0):
        leaf = s.clone().requires_grad_(True)
        losses.soft_kl(leaf, t, temperature).sum().backward()
        norms[temperature] = leaf.grad.norm().item()
    assert 0.5 < norms[8.0] / norms[2.0] < 2.0  # with T^2: the same order of size
    assert norms[8.0] / 64 / (norms[2.0] / 4) < 0.2  # without it: 16x smaller


def test_distill_loss_masks_padding_and_mixes_with_alpha():
    s, t = logits_pair()
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    valid = torch.tensor([True, True, False, True, False, True])
    out = losses.distill_loss(s, t, targets, valid, alpha=0.3, temperature=2.0)
    kl = losses.soft_kl(s[valid], t[valid], 2.0).sum()
    ce = F.cross_entropy(s[valid], targets[valid], reduction="sum")
    assert torch.allclose(out["loss"], 0.3 * kl + 0.7 * ce, atol=1e-4)
    changed = s.clone()
    changed[~valid] += 100  # padding positions may hold anything
    assert torch.allclose(losses.distill_loss(changed, t, targets, valid, alpha=0.3)["loss"], out["loss"], atol=1e-4)
    with pytest.raises(DojoError, match="must be > 0"):
        losses.soft_kl(s, t, 0.0)
    with pytest.raises(DojoError, match="needs the teacher"):
        losses.distill_loss(s, None, targets, valid, alpha=0.5)


def test_chunked_backward_gives_the_gradient_of_the_whole_loss():
    teacher = tiny_llama(seed=0)
    student = keep_blocks(teacher, [1])
    student.requires_grad_(True)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    targets, valid = ids[:, 1:].reshape(-1), torch.ones(16, dtype=torch.bool)
    valid[3] = False
    with torch.no_grad():
        t_hidden = train.final_hidden(teacher, ids)[:, :-1].reshape(-1, 64)
    grads = []
    for chunk in (5, 1000):
        student.zero_grad()
        s_hidden = train.final_hidden(student, ids)[:, :-1].reshape(-1, 64)
        totals = losses.chunked_distill_backward(s_hidden, t_hidden, student.head, teacher.head, targets, valid,
                                                 chunk=chunk, alpha=0.5, temperature=2.0)
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    whole = losses.distill_loss(student(ids)[:, :-1].reshape(-1, teacher.config.vocab_size),
                                teacher(ids)[:, :-1].reshape(-1, teacher.config.vocab_size), targets, valid)
    assert math.isclose(totals["loss"], whole["loss"].item() / 15, rel_tol=1e-4)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = train.DistillConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert train.lr_at(100, cfg) == pytest.approx(1e-4)


def test_batches_depend_on_the_step_alone_and_cover_every_window():
    rows = torch.cat([train.batch_rows(step, 10, 5, seed=3) for step in range(2)])
    assert sorted(rows.tolist()) == list(range(10))  # one epoch: each window once
    assert torch.equal(train.batch_rows(7, 10, 5, seed=3), train.batch_rows(7, 10, 5, seed=3))
    assert not torch.equal(train.batch_rows(0, 10, 5, seed=3), train.batch_rows(0, 10, 5, seed=4))


def tiny_setup():
    teacher = tiny_llama(seed=0)
    windows = torch.randint(0, teacher.config.vocab_size, (12, 16), generator=torch.Generator().manual_seed(2))
    return teacher, windows


def held_out_kl(student, teacher, windows):
    with torch.no_grad():
        return losses.soft_kl(student(windows), teacher(windows), 1.0).mean().item()


def test_distillation_lowers_the_students_kl_to_the_teacher():
    teacher = tiny_llama(seed=0)
    windows = torch.randint(0, teacher.config.vocab_size, (136, 16), generator=torch.Generator().manual_seed(2))
    student = keep_blocks(teacher, [0])
    before = held_out_kl(student, teacher, windows[128:])
    cfg = train.DistillConfig(steps=30, batch=8, warmup=3, lr=3e-3, alpha=1.0, temperature=1.0)
    history = train.distill(student, teacher, windows[:128], cfg, progress=False)
    assert held_out_kl(student, teacher, windows[128:]) < 0.85 * before  # measured: 1.84 -> 1.46
    assert history.kl[-1] < history.kl[0]
    assert not any(p.requires_grad for p in student.parameters())  # handed back frozen, in eval mode
    assert torch.equal(student.tok_embeddings.weight, teacher.tok_embeddings.weight)  # frozen by default


def test_a_teacher_cache_trains_the_same_student_and_runs_the_teacher_once_per_window(monkeypatch):
    teacher, windows = tiny_setup()
    teacher_rows, real_final_hidden = [], train.final_hidden

    def counting(model, ids):
        if model is teacher:
            teacher_rows.append(len(ids))
        return real_final_hidden(model, ids)

    cache = train.TeacherCache(teacher)
    # 6 of the 12 windows first; then all 12 in another order and grouping, so batches mix
    # cached and new windows; then a batch that repeats one window
    for cfg in (train.DistillConfig(steps=2, batch=3, warmup=1, lr=3e-3, alpha=0.5, seed=0),
                train.DistillConfig(steps=3, batch=4, warmup=1, lr=3e-3, alpha=0.5, seed=1)):
        plain = keep_blocks(teacher, [0])
        train.distill(plain, teacher, windows, cfg, progress=False)
        monkeypatch.setattr(train, "final_hidden", counting)
        cached = keep_blocks(teacher, [0])
        train.distill(cached, teacher, windows, cfg, progress=False, cache=cache)
        monkeypatch.setattr(train, "final_hidden", real_final_hidden)
        for a, b in zip(plain.parameters(), cached.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert sum(teacher_rows) == cache.misses == 12 and cache.hits == 6  # every window through the teacher once
    twice = windows[[0, 0]]
    assert torch.equal(cache(twice), torch.stack([cache.rows[tuple(windows[0].tolist())]] * 2))
    fresh = train.TeacherCache(teacher)
    fresh(twice)
    assert fresh.misses == 1 and fresh.hits == 1  # a window repeated in one batch runs once
    with pytest.raises(DojoError, match="another teacher"):
        train.distill(keep_blocks(teacher, [0]), tiny_llama(seed=1), windows, cfg, progress=False, cache=cache)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    teacher, windows = tiny_setup()
    cfg = train.DistillConfig(steps=6, batch=2, warmup=2, lr=3e-3)
    identity = train.run_identity(cfg, [0], "text", "tiny")
    straight = keep_blocks(teacher, [0])
    train.distill(straight, teacher, windows, cfg, progress=False)

    ckpt = tmp_path / "run.ckpt.safetensors"
    real_step, calls = train.train_step, []

    def crash_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", crash_on_the_fifth)
    resumed = keep_blocks(teacher, [0])
    with pytest.raises(KeyboardInterrupt):
        train.distill(resumed, teacher, windows, cfg, checkpoint=ckpt, identity=identity, save_every=2,
                      progress=False)
    monkeypatch.setattr(train, "train_step", real_step)
    assert not list(tmp_path.glob("*.partial"))
    resumed = keep_blocks(teacher, [0])
    history = train.distill(resumed, teacher, windows, cfg, checkpoint=ckpt, identity=identity, save_every=2,
                            progress=False)
    assert history.resumed_from == 4 and history.steps == [4, 5]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)

    other = train.run_identity(train.DistillConfig(steps=6, batch=2, warmup=2, lr=1e-3), [0], "text", "tiny")
    with pytest.raises(DojoError, match="another run .*lr"):
        train.distill(keep_blocks(teacher, [0]), teacher, windows, cfg, checkpoint=ckpt, identity=other,
                      progress=False)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(DojoError, match="not a readable distillation checkpoint"):
        train.distill(keep_blocks(teacher, [0]), teacher, windows, cfg, checkpoint=ckpt, identity=identity,
                      progress=False)


def distill_cli(capsys, *args):
    """The distill command in this process (its flags, its error handling), returning
    (exit code, stdout, stderr): a subprocess per call would cost a torch import each."""
    code = main(["distill", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(result, *words):
    code, _, err = result
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err


TINY_RUN = ("--steps", "3", "--batch", "2", "--window", "32", "--no-bench")


def test_distill_command_writes_a_student_that_loads_back(tiny_file, tmp_path, capsys):  # noqa: F811
    from reference_engine import load_model

    out = tmp_path / "student.gguf"
    code, stdout, err = distill_cli(capsys, out, "--model", tiny_file, "--blocks", "every-other", *TINY_RUN, "--json")
    assert code == 0, err
    report = json.loads(stdout.splitlines()[-1])
    assert report["blocks"] == [0] and report["steps"] == 3
    assert {"perplexity", "kl", "top1"} <= set(report["after"])
    student, _ = load_model(out)
    assert student.config.n_layers == 1
    assert (tmp_path / "student.gguf.ckpt.safetensors").exists()
    code, stdout, _ = distill_cli(capsys, out, "--model", tiny_file, "--blocks", "every-other", *TINY_RUN)
    assert code == 0 and "resumed at step 3" in stdout
    assert_refused(distill_cli(capsys, out, "--model", tiny_file, "--blocks", "every-other", *TINY_RUN, "--lr", "0.01"),
                   "another run", "lr")
    shorter = [a if a != "32" else "16" for a in TINY_RUN]
    assert_refused(distill_cli(capsys, out, "--model", tiny_file, "--blocks", "every-other", *shorter),
                   "another run", "data")


@pytest.mark.parametrize("args,words", [
    (["--temperature", "0"], ["temperature", "> 0"]),
    (["--alpha", "1.5"], ["alpha", "[0, 1]"]),
    (["--blocks", "0,7"], ["blocks to keep"]),
    (["--data", "books"], ["--data"]),
])
def test_distill_rejects_bad_requests_and_writes_nothing(tiny_file, tmp_path, capsys, args, words):  # noqa: F811
    out = tmp_path / "student.gguf"
    assert_refused(distill_cli(capsys, out, "--model", tiny_file, "--steps", "2", "--no-bench", *args), *words)
    assert not list(tmp_path.iterdir())


def test_distill_refuses_a_student_of_another_vocabulary(tiny_file, tmp_path, capsys):  # noqa: F811
    assert_refused(distill_cli(capsys, tmp_path / "s.gguf", "--student", tiny_file, "--steps", "1", "--no-bench"),
                   "vocabulary", "teacher")


def test_distill_heals_a_pruned_model_of_its_own(tiny_file, tmp_path, capsys):  # noqa: F811
    from reference_engine import load_model

    pruned = tmp_path / "pruned.gguf"
    assert main(["prune", str(pruned), "--model", str(tiny_file), "--ffn-keep", "64", "--calibration-windows", "1"]) == 0
    out = tmp_path / "healed.gguf"
    code, stdout, err = distill_cli(capsys, out, "--model", tiny_file, "--student", pruned, *TINY_RUN)
    assert code == 0, err
    assert "student: pruned.gguf: 2 blocks" in stdout
    healed, _ = load_model(out)
    assert healed.config.ffn_dim == 64


def test_the_distill_command_runs_as_a_program(tiny_file, tmp_path):  # noqa: F811
    """Once through a real process: the entry point, exit code and output."""
    out = tmp_path / "student.gguf"
    result = run_cli("distill", out, "--model", tiny_file, "--blocks", "0", "--steps", "1", "--batch", "1",
                     "--window", "16", "--no-bench")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert_clean_error(run_cli("distill", tmp_path / "x.gguf", "--model", tiny_file, "--temperature", "-1"),
                       "temperature")
