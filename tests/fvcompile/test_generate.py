"""fvcompile.generate on tiny decoders: greedy output equal to the uncompiled model's, a decode step
that compiles once, prompts of different lengths in one batch, prompt lookup, passes, bad input.

Most tests compile with codegen=False (Dynamo's and AOTAutograd's graphs and the passes, run as
FX code: seconds); one compiles with Inductor's code generation, on a one-layer model.
"""
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import fvcompile
from fvcompile.models import get
from fvcompile.models.chameleon import Chameleon
from fvcompile.models.llama import Llama, generate_greedy


@pytest.fixture(autouse=True)
def _fresh_generate():
    fvcompile.reset()  # generate keeps its compiled steps; each test starts without them
    yield
    fvcompile.reset()


def tiny(name="llama-tiny", **changes):
    """A registry model, fresh weights; `changes` edit its config (a one-layer model compiles faster)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get(name).extra["config"], **changes)
    return (Chameleon if name.startswith("chameleon") else Llama)(cfg).eval()


def prompt_of(length, seed=0, vocab=256):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def rows_of(*lengths, vocab=256):
    return [prompt_of(n, seed=n, vocab=vocab)[0].tolist() for n in lengths]


def greedy_new_tokens(model, prompt, n):
    return generate_greedy(model, torch.as_tensor(prompt).reshape(1, -1), n)[:, -n:]


def assert_rows_greedy(model, rows, out, n):
    for row, new in zip(rows, out.rows()):
        assert new == greedy_new_tokens(model, row, n)[0].tolist()


def test_compiled_greedy_equals_eager_and_decode_compiles_once():
    """Prompts of different lengths in one batch (left-padded), each row's tokens equal to eager
    greedy decoding of that prompt alone; the decode step compiled once, run for every token."""
    model = tiny(n_layers=1)
    rows = rows_of(3, 7, 5)
    out = fvcompile.generate(model, rows, max_new_tokens=10, codegen=False)
    assert_rows_greedy(model, rows, out, 10)
    assert out.sequences()[0][:3] == rows[0]
    decode = out.reports["decode"]
    assert len(decode.graphs) == 1 and not decode.recompilations and not decode.graph_breaks
    assert decode.graph_calls == 9 and decode.eager_calls == 0  # every token after the first

    # Other prompt lengths and more tokens: the same graphs (prefill's length is dynamic).
    graphs_before = counters["stats"]["unique_graphs"]
    rows = rows_of(4, 9, 2)
    out = fvcompile.generate(model, rows, max_new_tokens=16, codegen=False)
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert_rows_greedy(model, rows, out, 16)
    assert len(out.reports["prefill"].graphs) == 1 and len(out.reports["decode"].graphs) == 1


def test_chameleon_decodes_like_eager_with_the_cache():
    model = tiny("chameleon-tiny")
    rows = rows_of(4, 6, vocab=512)
    assert_rows_greedy(model, rows, fvcompile.generate(model, rows, max_new_tokens=5, compile=False), 5)


def test_prompt_lookup_keeps_greedy_output_in_fewer_forwards():
    model = tiny()
    # A small random model soon repeats itself: its own output then supplies the drafts.
    prompt = prompt_of(6, seed=3)
    out = fvcompile.generate(model, prompt, max_new_tokens=24, prompt_lookup=4, compile=False)
    assert torch.equal(out.new_tokens, greedy_new_tokens(model, prompt, 24))
    assert out.drafts_accepted > 0 and out.forwards < 24


def test_sparse24_on_a_squared_relu_model_reports_the_cpu():
    model = tiny("llama-tiny-relu2", n_layers=1)
    out = fvcompile.generate(model, prompt_of(5), max_new_tokens=3, passes=["sparse24"], codegen=False)
    for step in ("prefill", "decode"):
        report = out.reports[step]
        assert report.passes == ["sparse24"] and report.rewritten("sparse24") == 1  # the layer's FFN
        notes = [note for run in report.pass_runs("sparse24") for note in run.result.notes]
        assert any("no 2:4 sparse tensor cores" in note for note in notes), notes


def test_sampling_is_reproducible_with_a_generator():
    model = tiny()
    runs = [fvcompile.generate(model, prompt_of(4), max_new_tokens=6, temperature=0.8, top_k=20, compile=False,
                               generator=torch.Generator().manual_seed(7)).new_tokens for _ in range(2)]
    assert torch.equal(*runs)


def test_eos_ends_a_row():
    model = tiny()
    prompt = prompt_of(7)
    expected = greedy_new_tokens(model, prompt, 12)[0].tolist()
    eos = expected[3]
    out = fvcompile.generate(model, prompt, max_new_tokens=12, compile=False, eos_id=eos)
    assert out.rows() == [expected[:expected.index(eos) + 1]]


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=prompt_of(40), cache_len=32), "more than the KV cache's 32 slots.*raise cache_len"),
    (dict(prompt=prompt_of(20), cache_len=32, max_new_tokens=20), "need 40 cache slots.*lower max_new_tokens to 12"),
    (dict(prompt=prompt_of(250), max_new_tokens=10), "past the model's context.*at most 6 new tokens"),
    (dict(prompt=prompt_of(300)), "more than the model's context of 256"),
    (dict(prompt="hello"), "no tokenizer.*pass tokenizer="),
    (dict(top_k=5), "temperature=0 is greedy.*drop top_k.*or set temperature > 0"),
    (dict(temperature=0.7, prompt_lookup=3), "serves greedy decoding only.*set temperature=0"),
    (dict(prompt=[[1, 2], [3]], prompt_lookup=3), "one prompt at a time"),
    (dict(prompt=[[1, 999]]), r"outside the model's vocabulary \[0, 256\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be a whole number >= 1"),
    (dict(mode="reduce-overhead"), "CUDA graphs, which need a CUDA device.*leave mode unset"),
])
def test_bad_input_names_the_problem_and_the_way_out(kwargs, message):
    model = tiny()
    kwargs = {"prompt": prompt_of(4), "max_new_tokens": 4, **kwargs}
    graphs_before = counters["stats"]["unique_graphs"]
    with pytest.raises(ValueError, match=message):
        fvcompile.generate(model, kwargs.pop("prompt"), **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs_before  # refused before anything compiled


def test_text_prompts_go_through_the_tokenizer():
    model = tiny()  # a byte-level stand-in tokenizer fits its 256 ids
    out = fvcompile.generate(model, ["hi", "hello"], tokenizer=ByteTokenizer(), max_new_tokens=3, compile=False)
    assert out.prompts == [list(b"hi"), list(b"hello")]
    assert out.text == [ByteTokenizer().decode(row) for row in out.rows()]


def test_a_model_without_a_cache_path_is_refused():
    with pytest.raises(TypeError, match="static KV-cache path.*models/llama.py's Llama"):
        fvcompile.generate(torch.nn.Linear(4, 4), prompt_of(3), max_new_tokens=2)


@pytest.mark.inductor
def test_inductor_compiled_greedy_equals_eager():
    """Inductor's generated code (C++ on CPU): greedy tokens equal eager's, and the decode step
    compiled once for every token. A one-token prompt makes prefill's graph the decode step's, so
    that Inductor's cache serves the second compile (its dynamic prompt length is checked above,
    through AOTAutograd's graphs, and in bench/generate.py through Inductor)."""
    model = tiny(vocab_size=64, dim=32, n_layers=1, ffn_hidden=64, max_seq_len=64)
    prompt = prompt_of(1, vocab=64)
    out = fvcompile.generate(model, prompt, max_new_tokens=10)
    assert torch.equal(out.new_tokens, greedy_new_tokens(model, prompt, 10))
    assert len(out.reports["decode"].graphs) == 1 and out.reports["decode"].graph_calls == 9
