"""The command line's commands, one module per family (`cli.py` assembles them):

    run.py        generate, chat, demo, speculate
    measure.py    perplexity, bench, gpu-figures, build-kernels
    compress.py   prune, distill
    serving.py    serve, loadtest, bench-serve
    classroom.py  grade, progress, grade-class, make-exercises, book
    practice.py   practice (review, estimate, drill, mock, stats, tags, export, import)
    common.py     the model options, loading, the chat helpers
"""
