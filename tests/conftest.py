import os

import pytest
import torch

from qoq.host import keep_freed_memory

# Triton decides at decoration time whether a @triton.jit function is interpreted, and kernels'
# device helpers are decorated at import. Any test module may import qoq.kernels first, so the
# CPU interpreter is switched on here, before collection (the kernels still run through their
# torch twins unless a test forces Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the suite's conversions out of the user's cache only when asked; the default cache is fine
# and makes repeated runs fast.
torch.set_num_threads(max(1, os.cpu_count() or 1))
keep_freed_memory()  # as the CLI does: large temporaries are not page-faulted in again each time


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, fp32 on the CPU."""
    from qoq.model.loader import load_model

    return load_model()


@pytest.fixture(scope="session")
def hf_bundled():
    """The same GGUF loaded by transformers itself: the independent oracle."""
    from transformers import AutoModelForCausalLM

    from qoq.model.loader import bundled_model_path

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
