"""Chapter 8's engine: tensor, pipeline and data parallel inference on gloo ranks started
on this machine, held to the single-process engine; the launcher's failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference_engine.errors import DojoError
from reference_engine.generate import generate
from reference_engine.load import load_model
from reference_engine.parallel.launch import run_local
from reference_engine.parallel.pipeline import bubble_fraction, gpipe_schedule, measured_bubble, stage_layers
from reference_engine.parallel.run import greedy_on_rank, logits_on_rank
from reference_engine.parallel.tensor import kv_group_split, split_sizes
from tests.tiny_gguf import tiny_llama, write_gguf

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.", "What is 2+2?",
           "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    write_gguf(tiny_llama(), path, "Q8_0")
    return str(path)


def test_split_sizes_and_kv_groups():
    assert split_sizes(10, 3) == [4, 3, 3] and split_sizes(2, 3) == [1, 1, 0]
    assert kv_group_split(9, 3, 2) == [(range(0, 6), range(0, 2)), (range(6, 9), range(2, 3))]
    assert kv_group_split(9, 3, 3)[1] == (range(3, 6), range(1, 2))
    with pytest.raises(DojoError, match="use 1 to 3 ranks, not 4"):
        kv_group_split(9, 3, 4)


def test_gpipe_schedule_and_bubble():
    assert gpipe_schedule(2, 3) == [[0, None], [1, 0], [2, 1], [None, 2]]
    schedule = gpipe_schedule(4, 6)
    assert len(schedule) == 9
    for s in range(4):  # every stage runs every micro-batch once, in order, s steps after stage 0
        column = [row[s] for row in schedule]
        assert [j for j in column if j is not None] == list(range(6)) and column.index(0) == s
    idle = sum(j is None for row in schedule for j in row) / (4 * len(schedule))
    assert idle == pytest.approx(bubble_fraction(4, 6)) == pytest.approx(3 / 9)
    # two stages, equal busy times: the measured bubble is the formula's
    timeline = [(0, 0, 0, 0.0, 1.0), (0, 0, 1, 1.0, 2.0), (1, 0, 0, 1.0, 2.0), (1, 0, 1, 2.0, 3.0)]
    assert measured_bubble(timeline, 2) == pytest.approx(bubble_fraction(2, 2))
    assert [len(r) for r in stage_layers(30, 4)] == [8, 8, 7, 7]
    with pytest.raises(DojoError, match="1 to 30 ranks"):
        stage_layers(30, 31)


def test_schemes_match_the_single_process_engine_on_a_tiny_model(tiny_file):
    model, tok = load_model(tiny_file)
    prompts = [tok.encode(p) for p in ["the cat sat", "the dog", "then the cat and the dog sat together"]]
    expected = generate(model, prompts, max_new_tokens=6).tokens
    for scheme, world, micro in [("tp", 2, 1), ("pp", 2, 3), ("dp", 2, 1)]:
        out = run_local(greedy_on_rank, world, (scheme, prompts, 6, tiny_file, micro))
        assert [o["tokens"] for o in out] == [expected] * world, scheme
    tp = run_local(greedy_on_rank, 2, ("tp", prompts, 6, tiny_file))[0]
    per_token = tp["comm_per_token"]
    assert per_token["all_reduce"]["calls"] == 2 * model.config.n_layers  # after attention and after the MLP
    assert per_token["all_reduce"]["bytes"] == 2 * model.config.n_layers * len(prompts) * model.config.d_model * 4
    assert per_token["all_gather"]["calls"] == 1  # the LM head's logits


def smollm2_checks_on_rank(jobs: list[tuple]) -> list:
    """Several checks in one group of ranks: starting ranks (a fresh interpreter, torch
    imported, the group joined) costs more than a SmolLM2 run, so each world size starts
    once. A job is ("greedy", scheme, prompts, new tokens, micro-batches) or ("logits", ids)."""
    return [greedy_on_rank(*job[1:4], None, job[4]) if job[0] == "greedy" else logits_on_rank(job[1])
            for job in jobs]


def test_smollm2_across_ranks_matches_the_single_process_engine(smollm):
    """Greedy tokens identical on five chat prompts for TP = 2 (the 3 KV groups split
    unevenly: 6 and 3 query heads), TP = 3, PP (2 stages, 5 micro-batches) and DP = 2; TP
    logits within float32 rounding of one process's, and the same on every rank."""
    model, tok = smollm
    prompts = [tok.encode_chat(p) for p in PROMPTS]
    expected = generate(model, prompts, max_new_tokens=10).tokens
    ids = [tok.encode("The quick brown fox jumps over the lazy dog because")]
    with torch.inference_mode():
        expected_logits = model(torch.tensor(ids))
    jobs = {2: [("greedy", "tp", prompts, 10, 1), ("greedy", "pp", prompts, 10, 5), ("greedy", "dp", prompts, 10, 1),
                ("logits", ids)],
            3: [("greedy", "tp", prompts, 10, 1), ("logits", ids)]}
    for world, checks in jobs.items():
        by_rank = run_local(smollm2_checks_on_rank, world, (checks,))
        for i, job in enumerate(checks):
            out = [results[i] for results in by_rank]
            if job[0] == "greedy":
                assert all(o["tokens"] == expected for o in out), (world, job[1])
                continue
            assert all(torch.equal(out[0], other) for other in out[1:])  # gathered: the same on every rank
            assert (out[0] - expected_logits).abs().max() < 1e-3 * expected_logits.abs().max()
            assert torch.equal(out[0].argmax(-1), expected_logits.argmax(-1))


def exit_on_rank_one(code: int) -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(code)
    dist.barrier()  # rank 0 would wait here forever without the launcher's watch
    return 0


def raise_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("bad shard")
    dist.barrier()


def test_a_rank_that_exits_or_raises_stops_the_job_with_its_name():
    with pytest.raises(DojoError, match=r"rank 1 of 2 exited \(code 7\) before returning; the other ranks were"):
        run_local(exit_on_rank_one, 2, (7,), timeout_s=60)
    with pytest.raises(DojoError, match="rank 1 of 2 failed: ValueError: bad shard"):
        run_local(raise_on_rank_one, 2, timeout_s=60)


def run_module(*args, env=None, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_torchrun_launches_tensor_parallel(tiny_file):
    model, tok = load_model(tiny_file)
    expected = tok.decode(generate(model, [tok.encode("the cat sat")], max_new_tokens=5).tokens[0])
    result = run_module("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "reference_engine", "generate", "the cat sat", "--model", tiny_file, "--parallel", "tp",
                        "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr[:2500] + "\n...\n" + result.stderr[-1500:]  # the ranks' own lines come first
    assert result.stdout.strip() == expected.strip()
    assert "all_reduce" in result.stderr and "tp on 2 ranks" in result.stderr


def test_two_torchrun_nodes_on_loopback_match(tiny_file):
    model, tok = load_model(tiny_file)
    prompts = ["the cat sat", "the dog ate", "in 2024 they"]
    expected = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=5).tokens
    port = str(29500 + os.getpid() % 400)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t8",
                               "-m", "reference_engine", "generate", *prompts, "--model", tiny_file, "--parallel",
                               "pp", "--micro-batches", "3", "--max-new-tokens", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-1500:] + outputs[1][1][-1500:]
    printed = next(out for out, _ in outputs if out.strip())  # the node whose rank is 0 prints
    assert printed == "".join(f"[{i}] {tok.decode(t)}\n" for i, t in enumerate(expected))


def test_missing_launcher_and_absent_ranks_are_clear_errors(tiny_file, monkeypatch, capsys):
    from reference_engine.cli import main
    from reference_engine.parallel.launch import LAUNCHER_ENV

    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    for args, words in [(["--parallel", "tp"], ["needs a launcher", "torchrun"]),
                        (["--micro-batches", "2"], ["--micro-batches is for --parallel pp"]),
                        (["--parallel", "tp", "--kv-dtype", "float16"], ["drop", "--kv-dtype"])]:
        assert main(["generate", "hi", "--model", tiny_file, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err and all(w in err for w in words), err
    alone = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29900 + os.getpid() % 90)}
    result = run_module("-m", "reference_engine", "generate", "hi", "--model", tiny_file, "--parallel", "tp",
                        "--dist-timeout", "3", env=alone, timeout=60)
    assert result.returncode == 2 and "did not join" in result.stderr and "Traceback" not in result.stderr
    result = run_module("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m",
                        "reference_engine", "generate", "hi", "--model", tiny_file, "--parallel", "tp")
    assert result.returncode != 0 and "use 1 to 2 ranks, not 3" in result.stderr


def test_a_rank_killed_under_torchrun_ends_the_job_with_a_message(smollm):
    """SIGKILL one worker in the middle of generating: torchrun ends the job, and the
    surviving rank, cut off in a collective, says what happened instead of hanging."""
    import signal
    import time

    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", "-m", "reference_engine", "generate", *["Count from 1 to 300, separated by commas."] * 4,
                                 "--chat", "--parallel", "pp", "--micro-batches", "4", "--max-new-tokens", "400",
                                 "--dist-timeout", "20"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    victim, deadline = None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and launcher.poll() is None:
        for proc in Path("/proc").iterdir():  # torchrun's worker whose RANK is 1
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if parent == launcher.pid and b"RANK=1" in environ:
                victim = int(proc.name)
        time.sleep(0.2)
    assert victim is not None, "rank 1 never started"
    time.sleep(8)  # loaded, and generating (the 400 tokens take about a minute)
    os.kill(victim, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)  # no hang: the job ends
    assert launcher.returncode != 0
    # the survivor says so in one line if it reaches a collective before torchrun stops it;
    # either way torchrun's summary names the rank that died and how
    survivor = "error: rank 0 of 2 failed" in stderr and "another rank exited" in stderr
    assert survivor or ("rank      : 1" in stderr and "SIGKILL" in stderr), stderr[-3000:]
