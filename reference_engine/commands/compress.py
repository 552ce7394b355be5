"""Making the model smaller: prune (chapter 5) and distill (chapter 6)."""

from __future__ import annotations

import json
import sys

from ..errors import DojoError
from .common import cpu_float32_only, set_threads, with_model


def add_commands(sub) -> None:
    pn = with_model(sub.add_parser("prune", help="structured pruning: write a smaller model (fewer blocks, KV "
                                                 "groups or FFN channels) as a GGUF file that --model reads"))
    pn.add_argument("out", help="the GGUF file to write, for example smollm2-pruned.gguf")
    pn.add_argument("--remove-blocks", type=int, default=0, metavar="N",
                    help="drop the N blocks that change their input least")
    pn.add_argument("--remove-kv-groups", type=int, default=0, metavar="G",
                    help="drop G KV groups (with their query heads) from every block")
    pn.add_argument("--ffn-keep", type=int, default=None, metavar="C",
                    help="keep C FFN channels in every block (a multiple of 32 keeps every --quantize format and "
                         "the integer kernels available)")
    pn.add_argument("--calibration-windows", type=int, default=8, metavar="N",
                    help="256-token windows of calibration text to score with (default 8)")
    di = with_model(sub.add_parser("distill", help="train a student made of some of the teacher's blocks on the "
                                                   "teacher's outputs; write it as a GGUF file"))
    di.add_argument("out", help="the GGUF file to write, for example smollm2-student.gguf")
    di.add_argument("--blocks", default="least-important", help="least-important (default; chapter 5's block "
                                                                 "score), every-other, or a list like 0,2,4")
    di.add_argument("--n-blocks", type=int, metavar="N", help="blocks the student keeps (default: half)")
    di.add_argument("--student", metavar="PATH", help="distil into this GGUF model instead (for example the output "
                                                       "of prune); it must have the teacher's vocabulary")
    di.add_argument("--data", default="text", help="text (the pydoc topics, default) or generated (by the teacher)")
    di.add_argument("--steps", type=int, default=100)
    di.add_argument("--minutes", type=float, help="train for about this long (sets --steps from two timed steps)")
    di.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    di.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    di.add_argument("--lr", type=float, default=1e-3)
    di.add_argument("--alpha", type=float, default=0.5, help="weight of the soft loss (1: distillation only, 0: "
                                                              "cross-entropy only)")
    di.add_argument("--temperature", type=float, default=2.0)
    di.add_argument("--kl", choices=["forward", "reverse"], default="forward")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--checkpoint", metavar="PATH", help="default: OUT.ckpt.safetensors; an existing checkpoint of "
                                                         "the same run is resumed")
    di.add_argument("--no-bench", action="store_true", help="skip timing the student's decoding against the teacher's")
    di.add_argument("--json", action="store_true", help="also print one JSON object on the last line")


def cmd_prune(args) -> int:
    """Blocks first (scored on the full model), then KV groups, then FFN channels, each
    scored on calibration text through the model as pruned so far."""
    from pathlib import Path

    from ..compression import prune, structured
    from ..compression.calibration import calibration_windows
    from ..gguf_writer import gguf_tensors, save_gguf
    from ..load import load_model

    cpu_float32_only(args)
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise DojoError(f"the pruned model is written as GGUF: give a file name ending in .gguf, not {out.name!r}")
    if not (args.remove_blocks or args.remove_kv_groups or args.ffn_keep is not None):
        raise DojoError("nothing to prune: give --remove-blocks, --remove-kv-groups and/or --ffn-keep")
    model, tokenizer = load_model(args.model, pack=False)
    c = model.config
    if not 0 <= args.remove_blocks < c.n_layers:
        raise DojoError(f"--remove-blocks must be 0 to {c.n_layers - 1} (the model has {c.n_layers} blocks)")
    if not 0 <= args.remove_kv_groups < c.n_kv_heads:
        raise DojoError(f"--remove-kv-groups must be 0 to {c.n_kv_heads - 1}: each block has {c.n_kv_heads} KV "
                        f"groups of {c.n_heads // c.n_kv_heads} query heads, and one must stay")
    if args.ffn_keep is not None and not 1 <= args.ffn_keep <= c.ffn_dim:
        raise DojoError(f"--ffn-keep must be 1 to {c.ffn_dim}")
    gguf_tensors(model)  # a model that cannot be written fails now, not after the scoring
    windows = calibration_windows(tokenizer, args.calibration_windows, min(256, c.max_seq_len))
    before = sum(p.numel() for p in model.parameters())
    if args.remove_blocks:
        model = structured.prune_blocks(model, args.remove_blocks, structured.block_scores(model, windows))
    if args.remove_kv_groups:
        scores = structured.kv_group_scores(model, prune.input_norms(model, windows))
        model = structured.prune_kv_groups(model, args.remove_kv_groups, scores)
    if args.ffn_keep is not None:
        scores = structured.ffn_channel_scores(model, prune.input_norms(model, windows))
        model = structured.prune_ffn_channels(model, args.ffn_keep, scores)
    save_gguf(model, tokenizer, out)
    c = model.config
    after = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {c.n_layers} blocks, {c.n_heads} query / {c.n_kv_heads} KV heads, {c.ffn_dim} FFN channels; "
          f"{after / 1e6:.1f} M parameters (was {before / 1e6:.1f} M). Measure it with: "
          f"python -m reference_engine perplexity --model {out}  (or bench --model {out})")
    return 0


def cmd_distill(args) -> int:
    from ..distill.pipeline import format_report, run_distill
    from ..distill.train import DistillConfig

    cpu_float32_only(args)
    set_threads(args)
    cfg = DistillConfig(steps=args.steps, batch=args.batch, lr=args.lr, alpha=args.alpha,
                        temperature=args.temperature, direction=args.kl, seed=args.seed)
    try:
        report = run_distill(args.out, cfg, args.model, args.blocks, args.n_blocks, args.data, args.window,
                             args.minutes, args.checkpoint, bench=not args.no_bench, progress=sys.stderr.isatty(),
                             student_path=args.student)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    return 0


COMMANDS = {"prune": cmd_prune, "distill": cmd_distill}
