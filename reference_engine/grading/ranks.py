"""Chapter 8's tasks run the learner's code on several ranks at once: every rank calls the
function on every case, and each saves what it observed. This joins those observations
into one, call by call, so that a case's judge sees every rank's output (by rank) and the
first rank that raised is the error shown."""

from __future__ import annotations


def merge_ranks(by_rank: list[dict | None], n_calls: int, params: tuple[str, ...]) -> dict:
    """One `observe.run_job` result from each rank's (None where a rank saved nothing).
    calls[i]["output"] is the list of the ranks' outputs; its error names the rank."""
    observed = [(r or {}).get("observed") or {} for r in by_rank]
    first = next((o for o in observed if o.get("signature")), None)
    if first is None:  # no rank got as far as calling the function: say why, case by case
        why = next((r["error"] for r in by_rank if r and r.get("error")), None)
        error = (f"no rank could run it ({why})" if why else
                 "no rank reported: every one crashed, waited forever or exited before its first case")
        return {"signature": list(params), "calls": [{"output": None, "error": error, "inputs_after": None}] * n_calls,
                "same_object": None, "ops": None, "speed": None, "largest": None}
    calls = []
    for i in range(n_calls):
        outputs, error = [], None
        for rank, obs in enumerate(observed):
            got = obs.get("calls") or []
            if i >= len(got):
                done = len(got) == i  # it reports after every case: it ended during this one
                error = error or (f"rank {rank} ended during this case (a crash, such as gloo aborting on a "
                                  "message of the wrong size, or os._exit) or never reached it"
                                  if done else f"rank {rank} ended before this case")
                outputs.append(None)
                continue
            if got[i]["error"] and error is None:
                error = f"{got[i]['error']} (on rank {rank})"
            outputs.append(got[i]["output"])
        calls.append({"output": None if error else outputs, "error": error, "inputs_after": None})
    return {**first, "calls": calls, "same_object": None, "ops": first.get("ops"), "speed": None}
