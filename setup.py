"""Setup for lora_kernels.

The CUDA extension in csrc/ is optional: it is built only when the installed torch has CUDA and
nvcc is on the machine (or LORA_KERNELS_BUILD_CUDA=1 forces it). A CPU-only install never tries.
"""
import os
import shutil

from setuptools import find_packages, setup


def _cuda_extension():
    forced = os.environ.get("LORA_KERNELS_BUILD_CUDA") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    has_cuda_torch = torch.version.cuda is not None
    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    if not forced and not (has_cuda_torch and has_nvcc):
        return [], {}
    ext = CUDAExtension(
        name="lora_kernels._cuda",
        sources=["csrc/bindings.cpp", "csrc/dropout_shrink.cu", "csrc/dropout_grad_a.cu", "csrc/lora_dx_epilogue.cu",
                 "csrc/dropout_mask.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused Triton kernels for LoRA training: a drop-in nn.Linear that speaks PEFT's format",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    package_data={"lora_kernels.data": ["*.jsonl", "*.txt"]},
    install_requires=[
        "torch>=2.4,<3",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "transformers>=4.45", "peft>=0.13", "safetensors>=0.4", "trl>=1.16",
                 "matplotlib>=3.5", "bitsandbytes>=0.45"],
        "train": ["transformers>=4.45", "matplotlib>=3.5", "peft>=0.13"],  # finetune ends printing PEFT's loader
    },
    entry_points={"console_scripts": ["lora-kernels=lora_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
