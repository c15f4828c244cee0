"""Triton kernels, one fused op per file (kernels first, then the launcher).

    lora_shrink        xa = dropout(x)·Aᵀ                                 (forward, pass 1)
    lora_linear_fwd    y  = x·Wᵀ + b + s·xa·Bᵀ                             (forward, pass 2)
    lora_dy_b          dyB = dy·B  and  grad_B = s·dyᵀ·xa                  (backward, pass 1)
    lora_linear_bwd_dx grad_x = dy·W + s·(dyB·A)⊙mask/(1-p), grad_A = s·dyBᵀ·dropout(x)
                                                                           (backward, pass 2)
    dropout            the Philox keep-mask shared by all of them
"""
