"""Constrained decoding (llama_ref.constrain): a shaped answer keeps its JSON object and writes every marker
exactly once, whatever the model would have picked, and closes within its token budget."""

import json
import random
import re

import pytest

torch = pytest.importorskip("torch")

from tiny_checkpoints import make_tiny_model, write_gguf  # noqa: E402

from llama_ref import Llama  # noqa: E402
from llama_ref.constrain import JsonFields, JsonFieldsConstraint  # noqa: E402
from llama_ref.engine import Engine, Job  # noqa: E402

SHAPE = JsonFields(
    keys=("1", "2", "3"),
    markers=(("1", "2"), (), ("1", "2", "3", "10")),
    pairs=((("1", "2"),), (), (("2", "10"), ("3", "10"))),
)  # links: ⟦2⟧ before ⟦10⟧
SMALL = JsonFields(keys=("1", "2"), markers=(("1", "2"), ("1",)))  # closes within the tiny model's context
MARKER = re.compile(r"⟦([^⟦⟧]*)⟧")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    path = write_gguf(make_tiny_model(directory), directory / "tiny.gguf")
    return Llama.build(path, max_seq_len=128, max_batch_size=4, device="cpu", dtype="fp32")


def shape_problems(text: str, shape: JsonFields) -> list[str]:
    """What keeps `text` from being the answer `shape` asks for; empty when nothing does."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    if not isinstance(data, dict) or list(data) != list(shape.keys):
        return [f"keys {list(data) if isinstance(data, dict) else type(data)} instead of {list(shape.keys)}"]
    problems = []
    for key, labels in zip(shape.keys, shape.markers):
        value = data[key]
        if "\n" in value:
            problems.append(f"{key}: spans lines")
        if (
            sorted(MARKER.findall(value)) != sorted(labels)
            or value.count("⟦") != len(labels)
            or value.count("⟧") != len(labels)
        ):
            problems.append(f"{key}: markers {MARKER.findall(value)} instead of {list(labels)}")
        elif shape.pairs:
            found = MARKER.findall(value)
            problems += [
                f"{key}: ⟦{a}⟧ after ⟦{b}⟧"
                for a, b in shape.pairs[shape.keys.index(key)]
                if found.index(a) > found.index(b)
            ]
    return problems


def prompt(llama) -> list[int]:
    return llama.tokenizer.encode('{"1": "Run ⟦1⟧ then ⟦2⟧.", "2": "See ⟦1⟧."}', bos=True, eos=False)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)])
def test_a_random_model_writes_the_shape_only_when_constrained(tiny, temperature, seed):
    engine = Engine(tiny.model, tiny.tokenizer)
    vocab = tiny.model.params.vocab_size
    budget = tiny.model.max_seq_len - len(prompt(tiny))
    free = Job(prompt(tiny), budget, temperature=temperature, seed=seed)
    shaped = Job(
        prompt(tiny),
        budget,
        temperature=temperature,
        seed=seed,
        constraint=JsonFieldsConstraint(SMALL, tiny.tokenizer, vocab, max_tokens=budget),
    )
    engine.run([free, shaped])
    assert shape_problems(tiny.tokenizer.decode(free.tokens), SMALL)  # the random model alone: no
    assert shape_problems(tiny.tokenizer.decode(shaped.tokens), SMALL) == []


def test_random_walks_over_the_allowed_tokens_always_end_on_the_shape(tiny):
    """Whatever a model picks among the allowed tokens, including half characters and tokens that span a
    key and a value, the answer parses, holds each marker once, and ends within max_tokens."""
    vocab = tiny.model.params.vocab_size
    for seed in range(40):
        rng = random.Random(seed)
        shortest = JsonFieldsConstraint(SHAPE, tiny.tokenizer, vocab).closing_bytes
        budget = shortest + rng.choice([0, 1, 5, 40, 400])
        constraint = JsonFieldsConstraint(SHAPE, tiny.tokenizer, vocab, max_tokens=budget)
        tokens = []
        while not constraint.finished:
            allowed = constraint.allowed_ids()
            assert allowed, f"seed {seed}: a dead end after {tiny.tokenizer.decode(tokens)!r}"
            token = rng.choice(allowed)
            constraint.advance(token)
            tokens.append(token)
        assert len(tokens) <= budget
        assert shape_problems(tiny.tokenizer.decode(tokens), SHAPE) == [], seed
        assert set(constraint.allowed_ids()) == tiny.tokenizer.stop_ids


def test_look_alikes_foreign_markers_and_early_ends_are_refused(tiny):
    shape = JsonFields(keys=("1",), markers=(("1", "2"),), pairs=((("1", "2"),),))
    byte_token = {data[0]: token for token, data in enumerate(tiny.tokenizer.token_bytes) if len(data) == 1}

    def spells(text):
        """Whether `text`, fed one byte token at a time, stays on the shape."""
        constraint = JsonFieldsConstraint(shape, tiny.tokenizer, tiny.model.params.vocab_size)
        constraint._strip_space = False
        for byte in text.encode():
            if not constraint.allows(byte_token[byte]):
                return False
            constraint.advance(byte_token[byte])
        return True

    assert spells('{\n"1": "Voir ⟦1⟧ ici⟦2⟧, \\"cité\\" \\u00e9"\n}')
    assert not spells('{\n"1": "Voir ⟦2⟧')  # a link's closing marker before its opening one
    assert not spells('{"1": "')  # another layout than the one asked for
    assert not spells("```json\n{")  # a fence around the object
    assert not spells('{\n"1": "Voir 【1】 ici"')  # a look-alike instead of the marker
    assert not spells('{\n"1": "Voir ⟦3⟧')  # a marker the value does not owe
    assert not spells('{\n"1": "Voir ⟦1⟧ ⟦1⟧')  # a marker twice
    assert not spells('{\n"1": "Voir ⟧')  # a stray closer
    assert not spells('{\n"1": "Voir\n')  # a second line
    assert not spells('{\n"1": "Voir \\n')  # an escaped one
    assert not spells('{\n"1": "Voir \\u000a')  # nor one spelled as \u000a
    assert not spells('{\n"1": "Voir \\u000')  # a prefix that can only become a control character
    assert spells('{\n"1": "Voir \\u00')  # one that can still become a letter
    for start in ("\\u", "\\u00", "\\u27e", "\\u007", "\\ud83d\\ude0"):
        # the way out that a pick owing markers is steered onto is itself on the shape, to the end
        assert spells('{\n"1": "Voir ' + start), start
        constraint = JsonFieldsConstraint(shape, tiny.tokenizer, tiny.model.params.vocab_size)
        constraint._strip_space = False
        for byte in ('{\n"1": "Voir ' + start).encode():
            constraint.advance(byte_token[byte])
        way_out = constraint._shortest_end(constraint._state)
        for byte in way_out:
            assert constraint.allows(byte_token[byte]), (start, way_out)
            constraint.advance(byte_token[byte])
        assert constraint.finished
    assert not spells('{\n"1": "Voir \\u27e6')  # the marker's opener, spelled as an escape
    assert spells('{\n"1": "Voir \\ud83d\\ude00 ⟦1⟧⟦2⟧"\n}')  # a surrogate pair (an emoji) is text
    assert not spells('{\n"1": "Voir ⟦1⟧⟦2⟧"\n}x')  # anything after the object


def test_forbidden_brackets_are_refused_in_values_and_left_out_of_the_allowed_set(tiny):
    """A model that writes [[1]] or 【1】 in the marker's place (Qwen2.5-Coder-1.5B did in Chinese, then put
    the real markers at the end) cannot when the source has no such brackets: it must write ⟦1⟧ there."""
    tokens = tiny.tokenizer.token_bytes
    byte_token = {data[0]: token for token, data in enumerate(tokens) if len(data) == 1}

    def constraint_after(text, forbidden):
        shape = JsonFields(keys=("1",), markers=(("1",),), forbidden=forbidden)
        constraint = JsonFieldsConstraint(shape, tiny.tokenizer, tiny.model.params.vocab_size)
        constraint._strip_space = False
        for byte in text.encode():
            constraint.advance(byte_token[byte])
        return constraint

    free, strict = constraint_after('{\n"1": "Voir ', None), constraint_after('{\n"1": "Voir ', "[]【】")
    assert free.allows(byte_token[ord("[")]) and not strict.allows(byte_token[ord("[")])
    assert not strict.allows(byte_token[ord("]")])
    for byte in "【".encode()[:2]:  # the lead bytes are shared with allowed characters such as 。
        strict.advance(byte_token[byte])
    assert not strict.allows(byte_token["【".encode()[2]]) and strict.allows(byte_token["。".encode()[2]])
    strict = constraint_after('{\n"1": "Voir ', "[]【】")
    assert strict.allows(byte_token["⟦".encode()[0]]) and strict.allows(byte_token[ord("a")])
    allowed = strict.allowed_ids()
    assert allowed and not any(b"[" in tokens[t] or b"]" in tokens[t] or "【".encode() in tokens[t] for t in allowed)
    assert any(b"[" in tokens[t] for t in free.allowed_ids())


def test_a_model_that_ends_a_value_owing_a_marker_writes_the_marker(tiny):
    """The pick `"` with ⟦1⟧ still owed is replaced by the way to the marker, not by whatever else ranks next."""
    shape = JsonFields(keys=("1",), markers=(("1",),))
    constraint = JsonFieldsConstraint(shape, tiny.tokenizer, tiny.model.params.vocab_size, max_tokens=100)
    constraint._strip_space = False
    for byte in b'{\n"1": "Voir':
        constraint.advance(tiny.tokenizer.token_bytes.index(bytes([byte])))
    quote = tiny.tokenizer.token_bytes.index(b'"')
    assert not constraint.allows(quote)
    assert len(constraint.allowed_ids()) > 100  # any other rejected pick: the whole shape-keeping vocabulary
    steered = constraint.allowed_ids(rejected=quote)
    assert steered and all("⟦1⟧".encode().startswith(tiny.tokenizer.token_bytes[t]) for t in steered)
    # Once steered, the model cannot leave the way half-way: ⟦ and ⩾ share their first byte, and
    # Qwen2.5-Coder-1.5B took it, then ⩾, over and over, until the budget cut its answer off.
    token = {bytes([b]): tiny.tokenizer.token_bytes.index(bytes([b])) for b in "⟦1⟧a⩾".encode()}
    constraint.advance(token[b"\xe2"])
    assert not constraint.allows(token["⩾".encode()[1:2]]) and constraint.allows(token["⟦".encode()[1:2]])
    for byte in "⟦1⟧".encode()[1:]:
        constraint.advance(token[bytes([byte])])
    assert constraint.allows(token[b"a"]) and constraint.allows(quote)  # the marker is whole: free again
