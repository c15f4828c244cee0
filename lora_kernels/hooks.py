"""What runs after every inject_lora: a registry with no imports, so that whoever owns a family of models can
register what that family needs at `import lora_kernels` (integrations/__init__.py: a transformers model gets
adapter-only Trainer checkpoints) without importing torch there, and the injector never imports upwards."""
from typing import Callable, List

_AFTER_INJECT: List[Callable] = []


def after_inject(hook: Callable) -> Callable:
    """Register `hook(model)` to run at the end of every inject_lora (once per hook); returns it (a decorator)."""
    if hook not in _AFTER_INJECT:
        _AFTER_INJECT.append(hook)
    return hook


def run_after_inject(model) -> None:
    for hook in _AFTER_INJECT:
        hook(model)
