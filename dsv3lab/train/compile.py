"""``torch.compile`` for training: compiled artifacts cached on disk, and eager when compilation fails.

    step = compile_model(model)          # a callable with the model's forward signature
    logits, losses = step(tokens, targets, ...)

* **Cache.** Inductor's FX-graph cache and AOTAutograd cache are switched on and written under
  ``data/cache/inductor/`` (:data:`COMPILE_CACHE_DIR`, git-ignored), unless ``TORCHINDUCTOR_CACHE_DIR`` is set. A
  later process that compiles the same graphs (the dozens of runs of ``dsv3lab reproduce``) loads the generated code
  instead of generating and building it again; Dynamo's tracing still runs in every process.
* **Fallback.** Compilation happens lazily, at the first call (and again when shapes change). If it raises, the
  model runs eager from then on, and a ``RuntimeWarning`` says why (``fallback_reason``). Only errors of the
  compiler stack are caught after the first successful call; on the first call any error falls back, and a genuine
  error of the model is then raised again by the eager call.

Issue 14 measures whether compiling pays on a given machine (``benchmarks/train_step.py --compile`` reports the
compilation time separately from the step time).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch

from ..data.loader import DEFAULT_CACHE_DIR

COMPILE_CACHE_DIR = Path(DEFAULT_CACHE_DIR) / "inductor"


def configure_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Cache inductor's compiled artifacts on disk: ``path``, else ``$TORCHINDUCTOR_CACHE_DIR`` when set, else
    :data:`COMPILE_CACHE_DIR`. Returns the folder used."""
    # lazy: importing inductor pulls in Dynamo and triton (seconds); only a run that compiles needs it
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if path is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    elif current is None or current == default_cache_dir():  # unset (importing inductor writes its /tmp default)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE_DIR)
    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _compiler_error(err: BaseException) -> bool:
    """An error raised by Dynamo, AOTAutograd or Inductor (not by the model's own code)."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))


class CompiledModel:
    """``model`` under ``torch.compile`` with a fallback to eager (see the module docstring).

    ``compile_s``: wall seconds of the first call (compilation, or loading from the cache, plus one step);
    ``fallback_reason``: None while compiled, else the error that made it fall back."""

    def __init__(self, model: torch.nn.Module, backend: str | object = "inductor", **compile_kwargs):
        self.model = model
        self.compiled = torch.compile(model, backend=backend, **compile_kwargs)
        self.fallback_reason: str | None = None
        self.compile_s = 0.0
        self._calls = 0

    @property
    def is_compiled(self) -> bool:
        return self.fallback_reason is None

    def __call__(self, *args, **kwargs):
        if self.fallback_reason is None:
            first = self._calls == 0
            t0 = time.perf_counter()
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as err:
                if not (first or _compiler_error(err)):
                    raise
                lines = [line.strip() for line in str(err).splitlines() if line.strip()][:2]  # the gist
                self.fallback_reason = f"{type(err).__name__}: {' '.join(lines)}"[:300]
                warnings.warn(
                    f"torch.compile failed, training continues eager ({self.fallback_reason})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                if first:
                    self.compile_s += time.perf_counter() - t0
                self._calls += 1
                return out
        return self.model(*args, **kwargs)


def compile_model(model: torch.nn.Module, backend: str | object = "inductor", **compile_kwargs) -> CompiledModel:
    """:class:`CompiledModel` of ``model`` with the on-disk cache configured (:func:`configure_compile_cache`)."""
    configure_compile_cache()
    return CompiledModel(model, backend=backend, **compile_kwargs)
