"""Shared fixtures: tiny random-weight models saved as Hugging Face folders, the embedded model,
and a block-accounting check after every test that made an engine."""
from __future__ import annotations

import os

# first: tandem puts the repository root last on sys.path (tandem/__init__.py says why), and pytest's import
# mode is `append` (pyproject.toml) so that it stays there; the tests' children import tandem first too
import tandem  # noqa: F401
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run under Triton's interpreter where there is no GPU; it is read when a kernel is
# decorated, so it must be set before anything imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.triton_interpreter import skip_repeated_patching

    skip_repeated_patching()  # the same kernels, a quarter faster to interpret (the module says why)
# under pytest-xdist each worker takes its share of the cores (two threads each on two cores only contend)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
# tests that start processes on ports picked (tandem.worker.process.free_port) before the process binds
# them: two at once may pick the same port, so under xdist they all run on one worker, one after another
# (pytest_xdist_make_scheduler below)
PROCESS_TESTS = ("tests/disagg/", "tests/deploy/test_metric_names.py", "tests/kvstore/test_process.py",
                 "tests/operator/test_operator.py::test_the_tandem_operator_command",
                 "tests/server/test_cli.py::test_tandem_serve_subprocess")

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    vocab = 49152  # the embedded model's tokenizer, reused by every tiny model
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                           **TINY_SHAPE)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, rope_theta=1000000.0, **TINY_SHAPE)
    if arch == "mistral":
        return MistralConfig(vocab_size=vocab, tie_word_embeddings=False, sliding_window=None,
                             num_key_value_heads=1, **{k: v for k, v in TINY_SHAPE.items()
                                                       if k != "num_key_value_heads"})
    raise ValueError(arch)


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once from its GGUF to a Hugging Face folder."""
    from tandem.engine.loader import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, smollm_dir) -> dict[str, str]:
    """Random-weight tiny Llama (llama3 rope scaling, untied), Qwen2 (q/k/v bias, tied) and
    Mistral (GQA 4:1) models, each saved with the embedded model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    out = {}
    for arch in ("llama", "qwen2", "mistral"):
        torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3}[arch])
        model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[arch] = str(path)
    return out


def skip_unless_ranks_fit(ranks: int) -> None:
    """A group on CUDA needs a GPU per rank, unless TANDEM_GROUP_BACKEND=gloo lets its ranks share them."""
    if (ranks > 1 and torch.cuda.is_available() and torch.cuda.device_count() < ranks
            and os.environ.get("TANDEM_GROUP_BACKEND") != "gloo"):
        pytest.skip(f"{ranks} ranks need {ranks} GPUs here (or TANDEM_GROUP_BACKEND=gloo)")


@pytest.fixture
def make_llm():
    """Builds LLMs and, after the test, checks every block came back to each one's pool."""
    from tandem import LLM

    made: list = []

    def build(model=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        llm = LLM(model=model, **kwargs)
        made.append(llm)
        return llm

    yield build
    for llm in made:
        pool = llm.engine.kv.pool
        assert not llm.engine.has_unfinished_requests()
        assert pool.num_free == pool.num_blocks, f"leaked {pool.num_blocks - pool.num_free} KV blocks"
        llm.engine.close()  # tensor-parallel ranks' processes stop now, not when the engine is collected


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s workers (pytest-xdist's -n, --dist load) take a module at a time, so its module fixtures
    are built once, and PROCESS_TESTS all on one worker, handed out first (the longest share)."""
    from xdist.scheduler import LoadScopeScheduling

    if config.getvalue("dist") != "load" or not hasattr(LoadScopeScheduling, "_split_scope"):
        return None  # a --dist asked for by name, or an xdist whose scheduler this does not know

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "processes" if nodeid.startswith(PROCESS_TESTS) else nodeid.split("::")[0]

        def _assign_work_unit(self, node) -> None:
            if "processes" in self.workqueue:
                self.workqueue.move_to_end("processes", last=False)
            super()._assign_work_unit(node)

    return ByModule(config, log)
