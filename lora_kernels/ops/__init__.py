"""Triton kernels, one fused op per file (kernels first, then the launcher).

    lora_shrink        xa = dropout(x)·Aᵀ                                 (forward, pass 1)
    lora_linear_fwd    y  = x·Wᵀ + b + s·xa·Bᵀ                             (forward, pass 2)
    lora_dy_b          dyB = dy·B  and  grad_B = s·dyᵀ·xa                  (backward, pass 1)
    lora_linear_bwd_dx grad_x = dy·W + s·(dyB·A)⊙mask/(1-p), grad_A = s·dyBᵀ·dropout(x)
                                                                           (backward, pass 2)
    dora_linear_fwd    DoRA: v = xd·Wᵀ + s·xa·Bᵀ, y = x·Wᵀ + b − xd·Wᵀ + g·v (y = g·v + b without dropout)
                                                                           (forward, pass 2 of a DoRA layer)
    dora_linear_bwd_dx DoRA with dropout: grad_x = dy·W + ((g−1)·dy·W + s·dyB·A)⊙mask/(1−p)
                                                                           (backward, DoRA at p > 0)
    dropout            the Philox keep-mask shared by all of them
    dequant_4bit       bitsandbytes NF4/FP4 (double-quant) W tiles dequantized in registers, for the two GEMM
                       passes over a 4-bit base (QLoRA); and a one-pass W dequantization for the split path
"""
