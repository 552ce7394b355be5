"""Knowledge distillation (chapter 6): a smaller student learns the teacher's soft outputs.

  - `losses.py`: soft-target KL at temperature T (forward and reverse), cross-entropy,
    their mix, computed a chunk of positions at a time;
  - `student.py`: students made of a subset of the teacher's blocks;
  - `data.py`: training windows of real text, and text the teacher generates;
  - `train.py`: the training loop (AdamW, warm-up and cosine decay, clipping), resumable
    safetensors checkpoints, and the held-out evaluation.
"""
