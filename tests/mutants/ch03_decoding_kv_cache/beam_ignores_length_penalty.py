"""3.3 length_penalty: ranks hypotheses by their total log-probability whatever the length_penalty."""
import torch


def beam_search(step, prompt, beam_width, max_new_tokens, length_penalty=1.0, stop_id=None):
    beams, beam_logprob = [[]], torch.zeros(1, dtype=torch.float64)
    finished = []
    for _ in range(max_new_tokens):
        logprobs = step([prompt + b for b in beams])
        V = logprobs.shape[-1]
        candidates = (beam_logprob[:, None] + logprobs).flatten()
        top = candidates.topk(min(2 * beam_width, candidates.numel()))
        new_beams, new_logprob = [], []
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            parent, token = divmod(index, V)
            if token == stop_id:
                finished.append((value, beams[parent]))
            else:
                new_beams.append(beams[parent] + [token])
                new_logprob.append(value)
            if len(new_beams) == beam_width:
                break
        beams, beam_logprob = new_beams, torch.tensor(new_logprob, dtype=torch.float64)
        if len(finished) >= beam_width:
            break
    if len(finished) < beam_width:
        finished += [(lp, b) for b, lp in zip(beams, beam_logprob.tolist())]
    score, tokens = max(finished, key=lambda f: f[0])
    return tokens, score
