"""Serving under load: one OrtGenerator (one onnxruntime session) generating for 8 threads at once gives each
thread exactly the tokens it gets alone, and requests with different switchable adapters never mix."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.deploy.adapter_file import export_adapter
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.runner import OrtGenerator

THREADS = 8
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A switchable export of run ``a`` and the ``.onnx_adapter`` files of runs ``a`` and ``b``
    (same sites, different random adapters, B included)."""
    root = tmp_path_factory.mktemp("serving")
    for name, seed in (("a", 1), ("b", 2)):
        model, kwargs = tiny("tiny-llama")
        gm = mf.transform(model, small_config("malora", targets="q_proj,v_proj,down_proj"), kwargs)
        randomize_adapters(gm, std=0.3, seed=seed)
        mf.save_adapters(gm, root / name, base_model="tiny-llama")
        export_adapter(root / name, root / f"{name}.onnx_adapter")
    export_run(root / "a", root / "export", switchable=True)
    return root


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=int(rng.integers(2, 20))).tolist() for _ in range(THREADS)]


def concurrently(jobs):
    """Run every job on its own thread, all released at once; results in job order."""
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def test_eight_threads_on_one_session_get_their_own_tokens(served):
    gen = OrtGenerator(served / "export", "cpu")
    requests = [
        (prompt, {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.95, "seed": i})
        for i, prompt in enumerate(prompts())
    ]

    def job(prompt, kwargs):
        return lambda: list(gen.generate(prompt, max_new_tokens=NEW_TOKENS, **kwargs))

    alone = [job(p, kw)() for p, kw in requests]
    assert all(len(tokens) == NEW_TOKENS for tokens in alone)
    assert len({tuple(tokens) for tokens in alone}) == THREADS  # different prompts, different answers
    for _ in range(3):
        assert concurrently([job(p, kw) for p, kw in requests]) == alone


def test_concurrent_requests_with_different_adapters_never_mix(served):
    gen = OrtGenerator(served / "export", "cpu")
    adapters = [None, served / "a.onnx_adapter", served / "b.onnx_adapter"]
    requests = [(prompt, adapters[i % 3]) for i, prompt in enumerate(prompts())]
    requests += [(prompt, adapters[(i + 1) % 3]) for i, prompt in enumerate(prompts())]

    def job(prompt, adapter):
        return lambda: list(gen.generate(prompt, max_new_tokens=NEW_TOKENS, adapter=adapter))

    alone = {(tuple(p), str(a)): job(p, a)() for p in prompts() for a in adapters}
    for p in prompts():
        # the export's own weights are run a's: adapter a changes nothing, adapter b changes the answer
        assert alone[(tuple(p), str(adapters[0]))] == alone[(tuple(p), str(adapters[1]))]
    differing = sum(alone[(tuple(p), str(adapters[1]))] != alone[(tuple(p), str(adapters[2]))] for p in prompts())
    assert differing >= THREADS - 1, f"adapters a and b agree on {THREADS - differing} of {THREADS} prompts"
    for start in range(0, len(requests), THREADS):
        batch = requests[start : start + THREADS]
        got = concurrently([job(p, a) for p, a in batch])
        assert got == [alone[(tuple(p), str(a))] for p, a in batch]
    # a fresh generator: first loads of each adapter file race each other
    fresh = OrtGenerator(served / "export", "cpu")

    def fresh_job(prompt, adapter):
        return lambda: list(fresh.generate(prompt, max_new_tokens=NEW_TOKENS, adapter=adapter))

    batch = requests[:THREADS]
    assert concurrently([fresh_job(p, a) for p, a in batch]) == [alone[(tuple(p), str(a))] for p, a in batch]
    assert len(fresh._loaded_adapters) == 2  # one LoraAdapter per file, loaded once


def test_run_that_generates_nothing_says_why(served, monkeypatch, capsys):
    from malora_fx.cli import main
    from malora_fx.training import evaluate
    from malora_fx.training.data import format_prompt

    gen = OrtGenerator(served / "export", "cpu")
    first = next(gen.generate(format_prompt(gen.tokenizer, "abc"), max_new_tokens=1))
    assert main(["run", str(served / "export"), "--prompt", "abc", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out) > 1  # normally it shows text (then a newline)
    monkeypatch.setattr(evaluate, "stop_token_ids", lambda tok: {first})  # the first greedy token now ends it
    assert main(["run", str(served / "export"), "--prompt", "abc", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # no blank line
    name = gen.tokenizer.convert_ids_to_tokens(first)
    assert f"malora-fx: no tokens generated: the first token was a stop token {name!r} (id {first})" in captured.err
    monkeypatch.setattr(evaluate, "stop_token_ids", lambda tok: {first, tok.eos_token_id})
    monkeypatch.setattr(type(gen.tokenizer), "eos_token_id", property(lambda self: first), raising=False)
    assert main(["run", str(served / "export"), "--prompt", "abc", "--max-new-tokens", "3"]) == 0
    assert f"the first token was end-of-sequence {name!r} (id {first})" in capsys.readouterr().err
