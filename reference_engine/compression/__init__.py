"""Model compression: fewer bytes per weight (quantization, this chapter), and later fewer
weights (pruning, low-rank factorisation) and smaller models (distillation).

  - `formats.py`: integer formats (int8/int4/int3, symmetric or with a zero point, per
    tensor, per output channel or per group) and int4 packing;
  - `gguf_blocks.py`: the block formats of GGUF files (Q8_0, Q4_0, Q4_1, Q8_1), from and to
    raw bytes;
  - `qlinear.py`: `QuantizedLinear`, how a quantized weight is stored and multiplied;
  - `quantize.py`: the format names and `quantize_model`, which swaps quantized layers into
    a model (all computed first, so a failure leaves the model as it was);
  - `calibration.py`, `gptq.py`, `smoothquant.py`: the methods that look at real text;
  - `mixed_precision.py`: bf16 / fp16 models that keep what must stay in fp32;
  - `quality.py`: perplexity, KL divergence and top-1 agreement against a reference model.
"""
