"""3.3 values: takes each beam's best tokens and keeps the first beam_width candidates in beam order, not the best beam_width over all beams."""


def beam_search(step, prompt, beam_width, max_new_tokens, length_penalty=1.0, stop_id=None):
    beams, beam_logprob = [[]], [0.0]
    finished = []
    for _ in range(max_new_tokens):
        logprobs = step([prompt + b for b in beams])
        candidates = []
        for parent, row in enumerate(logprobs):
            top = row.topk(beam_width)
            candidates += [(beam_logprob[parent] + v, parent, t) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        new_beams, new_logprob = [], []
        for value, parent, token in candidates:
            if token == stop_id:
                finished.append((value / (len(beams[parent]) + 1) ** length_penalty, beams[parent]))
            else:
                new_beams.append(beams[parent] + [token])
                new_logprob.append(value)
            if len(new_beams) == beam_width:
                break
        beams, beam_logprob = new_beams, new_logprob
        if len(finished) >= beam_width:
            break
    if len(finished) < beam_width:
        finished += [(lp / len(b) ** length_penalty, b) for b, lp in zip(beams, beam_logprob)]
    score, tokens = max(finished, key=lambda f: f[0])
    return tokens, score
