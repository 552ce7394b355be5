"""3.3 values: extends each beam with its single best token only, then keeps the best beams: a greedy search per beam."""
import torch


def beam_search(step, prompt, beam_width, max_new_tokens, length_penalty=1.0, stop_id=None):
    beams, beam_logprob = [[]], torch.zeros(1, dtype=torch.float64)
    finished = []
    for _ in range(max_new_tokens):
        logprobs = step([prompt + b for b in beams])
        if not finished and len(beams) == 1:  # first step: fan out into beam_width beams
            top = logprobs[0].topk(beam_width)
            beams = [[t] for t in top.indices.tolist()]
            beam_logprob = top.values
            continue
        best = logprobs.max(dim=-1)
        candidates = sorted(zip((beam_logprob + best.values).tolist(), range(len(beams)), best.indices.tolist()),
                            reverse=True)
        new_beams, new_logprob = [], []
        for value, parent, token in candidates[:beam_width]:
            if token == stop_id:
                finished.append((value / (len(beams[parent]) + 1) ** length_penalty, beams[parent]))
            else:
                new_beams.append(beams[parent] + [token])
                new_logprob.append(value)
        if not new_beams or len(finished) >= beam_width:
            break
        beams, beam_logprob = new_beams, torch.tensor(new_logprob, dtype=torch.float64)
    finished += [(lp / len(b) ** length_penalty, b) for b, lp in zip(beams, beam_logprob.tolist())]
    score, tokens = max(finished, key=lambda f: f[0])
    return tokens, score
