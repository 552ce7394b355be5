"""What the student learns from: real text, or text the teacher wrote.

  text       the pydoc topics from character 40,000 on, in windows: the first 40,000
             characters are the held-out text that `perplexity` and every "before/after"
             figure score, and no training token comes from them;
  generated  sequence-level distillation (Kim and Rush, 2016): the teacher continues
             prompts taken from the training text, sampling at temperature 1, and the
             student learns the teacher's own sequences, the distribution it will be asked
             to imitate at generation time. Rows that stop early (end of text) are padded on
             the right and masked out of the loss.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..compression.calibration import windows_of
from ..errors import DojoError
from ..perplexity import pydoc_topics

TRAIN_START = 40_000  # characters: the held-out evaluation text ends here


def text_windows(tokenizer, window: int = 256, n_windows: int | None = None) -> torch.Tensor:
    """(N, window) token windows of the training text; every window it holds by default."""
    ids = tokenizer.encode(pydoc_topics()[TRAIN_START:])
    n = len(ids) // window if n_windows is None else n_windows
    return windows_of(ids, n, window, "distillation data")


@torch.inference_mode()
def generated_windows(teacher, tokenizer, n_windows: int, window: int = 256, prompt_tokens: int = 16,
                      batch: int = 8, seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n_windows, window), valid (n_windows, window) bool): prompts of `prompt_tokens`
    training tokens continued by the teacher, sampled at temperature 1 until `window`
    tokens or the end-of-text token; what follows a stop is padding (valid False)."""
    if not 0 < prompt_tokens < window:
        raise DojoError(f"the prompt must be shorter than the window: {prompt_tokens} tokens of {window}")
    prompts = text_windows(tokenizer, prompt_tokens, n_windows)
    ids = torch.zeros(n_windows, window, dtype=torch.long)
    valid = torch.zeros(n_windows, window, dtype=torch.bool)
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    from ..generate import generate

    for start in tqdm(range(0, n_windows, batch), desc="teacher writes", unit="batch", disable=not progress):
        rows = prompts[start : start + batch].tolist()
        out = generate(teacher, rows, max_new_tokens=window - prompt_tokens, temperature=1.0, stop_ids=stops,
                       seed=seed + start)
        for i, (prompt, new) in enumerate(zip(rows, out.tokens)):
            seq = prompt + new
            ids[start + i, : len(seq)] = torch.tensor(seq)
            valid[start + i, : len(seq)] = True
    return ids, valid
