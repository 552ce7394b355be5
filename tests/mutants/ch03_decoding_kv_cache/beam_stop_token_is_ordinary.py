"""3.3 stop: treats the stop token like any other token, so hypotheses run on past it."""
import torch


def beam_search(step, prompt, beam_width, max_new_tokens, length_penalty=1.0, stop_id=None):
    beams, beam_logprob = [[]], torch.zeros(1, dtype=torch.float64)
    for _ in range(max_new_tokens):
        logprobs = step([prompt + b for b in beams])
        V = logprobs.shape[-1]
        candidates = (beam_logprob[:, None] + logprobs).flatten()
        top = candidates.topk(min(beam_width, candidates.numel()))
        beams = [beams[i // V] + [i % V] for i in top.indices.tolist()]
        beam_logprob = top.values
    scores = [lp / len(b) ** length_penalty for b, lp in zip(beams, beam_logprob.tolist())]
    best = max(range(len(beams)), key=lambda i: scores[i])
    return beams[best], scores[best]
