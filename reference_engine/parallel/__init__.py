"""Chapter 8: inference on several processes with torch.distributed.

  - `launch.py`: ranks from torchrun's environment, or started here (notebooks, tests),
    every wait bounded by a timeout;
  - `comm.py`: the collectives, counted in calls and bytes, and a ring all-reduce built
    from sends and receives;
  - `data.py`: data parallel (each rank a whole model and a share of the prompts);
  - `tensor.py`: tensor parallel (Megatron: column-split then row-split matmuls, one
    all-reduce after attention and one after the MLP, the LM head split by vocabulary);
  - `pipeline.py`: pipeline parallel (blocks in stages, micro-batches, the GPipe schedule).

Nothing here is imported by the rest of the engine: a single process never needs it.
"""

SCHEMES = {"dp": "data parallel: each rank a whole model and a share of the prompts",
           "tp": "tensor parallel: every block split over the ranks (Megatron), two all-reduces per block",
           "pp": "pipeline parallel: the blocks in stages, micro-batches between them"}
