"""Real text for the methods that look at activations (GPTQ, SmoothQuant), kept apart from
the text they are judged on.

Both come from the pydoc topics every CPython ships (about 465 kB, joined in sorted
order): evaluation uses its first 40,000 characters, as `perplexity` does; calibration
starts at character 200,000. No calibration token is ever scored.
"""

from __future__ import annotations

import torch

from ..errors import DojoError
from ..perplexity import pydoc_topics, reference_text

CALIBRATION_START = 200_000  # characters: far past the evaluation text's 40,000


def windows_of(ids: list[int], n_windows: int, window: int, what: str) -> torch.Tensor:
    """(n_windows, window) LongTensor of consecutive, non-overlapping windows of `ids`."""
    if n_windows < 1 or window < 2:
        raise DojoError(f"{what} needs at least one window of at least 2 tokens, got {n_windows} x {window}")
    if len(ids) < n_windows * window:
        raise DojoError(f"{what} needs {n_windows} windows of {window} tokens ({n_windows * window} tokens); "
                        f"the text has {len(ids)}. Pass a longer text or ask for fewer or shorter windows.")
    return torch.tensor(ids[: n_windows * window]).view(n_windows, window)


def calibration_windows(tokenizer, n_windows: int = 16, window: int = 256, text: str | None = None) -> torch.Tensor:
    """Token windows to calibrate on (default: the pydoc topics from CALIBRATION_START on)."""
    text = pydoc_topics()[CALIBRATION_START:] if text is None else text
    return windows_of(tokenizer.encode(text), n_windows, window, "calibration")


def evaluation_windows(tokenizer, n_windows: int = 4, window: int = 256) -> torch.Tensor:
    """Token windows to judge on: the start of the text `perplexity` scores."""
    return windows_of(tokenizer.encode(reference_text()), n_windows, window, "evaluation")


@torch.inference_mode()
def block_inputs(model, windows: torch.Tensor):
    """The first block's inputs for these windows, and what every block is called with:
    (x, rope, mask). Run the blocks one by one as x = layer(x, rope, 0, mask)."""
    B, T = windows.shape
    if T > model.config.max_seq_len:
        raise DojoError(f"calibration windows of {T} tokens exceed the model's context of "
                        f"{model.config.max_seq_len}; use shorter windows")
    positions = torch.arange(T).expand(B, T)
    return model.embed(windows, 0, positions, None)


@torch.inference_mode()
def linear_input_sums(model, windows: torch.Tensor, stat) -> dict[str, torch.Tensor]:
    """sum of stat(x) over the calibration windows for every Linear inside the blocks, where
    x (tokens, in) is what the layer multiplies: {"layers.3.mlp.w2": ..., ...}.
    Wanda's channel norms and whitened SVD's Gram matrices are both such sums."""
    from ..model import Linear

    sums: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            sums[name] = sums.get(name, 0) + stat(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in model.layers.named_modules(prefix="layers")
               if isinstance(m, Linear)]
    try:
        model(windows)
    finally:
        for h in handles:
            h.remove()
    return sums
