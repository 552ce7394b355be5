"""Chapter 3's judges: properties of what the learner's code did, where no single right
value exists. The accept/reject step is judged by the distributions of the tokens it lets
out (statistically, at 5.5 standard deviations per comparison: a correct step fails a
grading about once in a million); the block allocator by the invariants of its block tables after every
operation (whatever blocks it chose). Each returns None, or what is wrong.
"""

from __future__ import annotations

import torch

SIGMAS = 5.5  # a correct implementation lands further out about 4 times in 10^8 comparisons


def emitted(out: torch.Tensor, k: int, position: int) -> torch.Tensor:
    """The token emitted at `position` of each trial, for the trials that reach it: draft
    token `position` if it was accepted, else the replacement (or bonus) token."""
    draft, n_ok, nxt = out[:, :k], out[:, k], out[:, k + 1]
    reached = n_ok >= position
    if position == k:
        return nxt[reached]
    return torch.where(n_ok[reached] > position, draft[reached, position], nxt[reached])


def histogram_problem(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> str | None:
    """None if the tokens could have been drawn from probs, else which token is off."""
    n, V = tokens.numel(), probs.numel()
    if n == 0:
        return f"{what}: no trial reached it"
    if tokens.min() < 0 or tokens.max() >= V:
        return f"{what}: token ids must lie in [0, {V}), got {int(tokens.min())}..{int(tokens.max())}"
    counts = torch.bincount(tokens, minlength=V).double()
    impossible = (probs == 0) & (counts > 0)
    if impossible.any():
        t = int(impossible.nonzero()[0])
        return f"{what}: token {t} has target probability 0 but came out {int(counts[t])} times in {n}"
    spread = (n * probs * (1 - probs)).sqrt().clamp(min=1e-9)
    z = ((counts - n * probs).abs() / spread).masked_fill(probs == 0, 0.0)
    t = int(z.argmax())
    if z[t] > SIGMAS:
        return (f"{what}: token {t} came out {counts[t] / n:.3f} of the time, target probability {probs[t]:.3f} "
                f"({n} samples, {z[t]:.0f} standard deviations off)")
    return None


def follows_target(out, p, q, n_trials):
    """Every draft position's emitted token must be distributed as p at that position."""
    k = q.shape[0]
    if out.shape != (n_trials, k + 2):
        return f"expected {n_trials} trials of {k + 2} numbers, got shape {tuple(out.shape)}"
    if not (out[:, k] > 0).any():
        return ("no draft token was ever accepted: sampling from p alone keeps the distribution but gains nothing; "
                "accept draft token x with probability min(1, p(x) / q(x))")
    for position in range(k):
        problem = histogram_problem(emitted(out, k, position), p[position], f"emitted token {position + 1}")
        if problem:
            return problem
    return None


def bonus_follows_target(out, p, q, n_trials):
    k = q.shape[0]
    return histogram_problem(emitted(out, k, k), p[k], f"the bonus token after all {k} drafts were accepted")


def acceptance_matches(out, p, q, n_trials):
    """Draft token i is accepted (given the ones before were) with probability sum_x min(p_i, q_i)."""
    k = q.shape[0]
    n_ok = out[:, k]
    if n_ok.min() < 0 or n_ok.max() > k:
        return f"the number accepted must lie in 0..{k}, got {int(n_ok.min())}..{int(n_ok.max())}"
    for i in range(k):
        reached = int((n_ok >= i).sum())
        rate = float((n_ok > i).sum()) / max(reached, 1)
        alpha = min(1.0, float(torch.minimum(p[i], q[i]).sum()))
        spread = (alpha * (1 - alpha) / max(reached, 1)) ** 0.5
        if abs(rate - alpha) > SIGMAS * spread + 1e-9:
            return (f"draft token {i + 1} was accepted in {rate:.3f} of {reached} trials; the rule accepts with "
                    f"probability sum_x min(p(x), q(x)) = {alpha:.3f}")
    return None


# -- the block allocator's tables ------------------------------------------------------------


def allocator_judge(out, kind, ops, n_blocks, block_size, n_sequences):
    """Check the recorded block tables after every op of the script (see `replay_allocator`)."""
    def blocks_for(n_slots: int) -> int:
        return -(-n_slots // block_size)  # ceil

    held, where = [0] * n_sequences, {}  # slots each sequence holds; (seq, slot) -> (block, offset)
    for i, (op, seq, n) in enumerate(ops.tolist()):
        raised = bool(((out[:, 0] == i) & (out[:, 5] == 1)).any())
        if op == 1:
            held[seq] = 0
            where = {key: val for key, val in where.items() if key[0] != seq}
        else:
            free = n_blocks - sum(blocks_for(h) for h in held)
            more = max(0, blocks_for(n) - blocks_for(held[seq]))
            fits = more <= free
            if raised and fits:
                return (f"op {i + 1}: ensure({seq}, {n}) raised, but the tables leave {free} block(s) free "
                        f"and it needs {more}: blocks went missing from the free list (not given back by release, "
                        "or kept by an earlier ensure that raised)")
            if not raised and not fits:
                return (f"op {i + 1}: ensure({seq}, {n}) needs {more} more block(s) with {free} free: it "
                        "must raise an error instead of handing out a block twice or one that does not exist")
            if not raised:
                held[seq] = max(held[seq], n)
        problem = tables_problem(out[(out[:, 0] == i) & (out[:, 5] == 0)], held, where, i, n_blocks, block_size)
        if problem:
            return problem
    return None


def tables_problem(rows, held, where, i, n_blocks, block_size) -> str | None:
    """Every held slot placed once; blocks in range, whole, not shared; nothing moved.
    `where` maps (seq, slot) -> (block, offset) as of the previous op and is updated."""
    seen = {(s, slot) for s, slot in rows[:, 1:3].tolist()}
    for s, h in enumerate(held):
        if {(s, slot) for slot in range(h)} != {key for key in seen if key[0] == s}:
            return f"after op {i + 1}, sequence {s} should hold slots 0..{h - 1}"
    owner = {}
    for s, slot, block, offset in rows[:, 1:5].tolist():
        if not (0 <= block < n_blocks) or offset != slot % block_size:
            return (f"after op {i + 1}: slot {slot} of sequence {s} is at (block {block}, offset {offset}); blocks "
                    f"are 0..{n_blocks - 1} and the offset is slot % block_size = {slot % block_size}")
        key = (s, slot // block_size)
        if owner.setdefault(block, key) != key:
            other = owner[block]
            return (f"after op {i + 1}: block {block} holds slots {slot // block_size * block_size}.. of sequence {s} "
                    f"and slots {other[1] * block_size}.. of sequence {other[0]}: a block belongs to one place only")
        if where.get((s, slot), (block, offset)) != (block, offset):
            return (f"after op {i + 1}: slot {slot} of sequence {s} moved from block {where[(s, slot)][0]} to {block}: "
                    "growing a sequence must keep its blocks (their keys and values are already written)")
        where[(s, slot)] = (block, offset)
    return None
