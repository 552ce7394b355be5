"""Byte-level BPE: round trips, pre-tokenization, special tokens, streaming, chat template."""

import pytest

from reference_engine import DojoError, load_tokenizer
from reference_engine.tokenizer import Tokenizer, byte_alphabet

VARIED_TEXTS = [
    "Hello, world!",
    "In 2024, 12345 people ran 3.14 km.",
    "   leading spaces and trailing   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "café, naïve, Straße, ñandú",
    "日本語のテキスト and 中文",
    "emoji 🙂🚀 and a flag 🇫🇷",
    "code: def f(x):\n    return x ** 2  # square",
    "it's we're they'll I'd you've",
    "",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a <|endoftext|> b<|im_end|>",
]


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer()


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_round_trip(smol_tok, text):
    assert smol_tok.decode(smol_tok.encode(text)) == text


def test_special_tokens_in_text_are_single_ids(smol_tok):
    assert smol_tok.encode("<|im_start|>user<|im_end|>") == [1, smol_tok.token_to_id["user"], 2]
    assert smol_tok.encode("<|endoftext|>") == [0]


def test_digits_are_split_one_by_one(smol_tok):
    assert smol_tok.pre_tokenize("In 2024,") == ["In", " ", "2", "0", "2", "4", ","]
    ids = smol_tok.encode("12345")
    assert [smol_tok.decode([i]) for i in ids] == list("12345")


def test_known_ids(smol_tok):
    # ids read from the GGUF vocabulary: " capital" and " Paris" are single tokens
    assert smol_tok.decode(smol_tok.encode(" capital")) == " capital"
    assert len(smol_tok.encode(" Paris")) == 1


def test_stream_decoder_holds_back_partial_characters(smol_tok):
    text = "ok 🙂 日本"
    ids = smol_tok.encode(text)
    decoder = smol_tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_renders_the_models_own_template(smol_tok):
    text = smol_tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smol_tok.encode_chat("Hi") == smol_tok.encode(text)


def test_byte_alphabet_is_a_bijection_of_printable_characters():
    table = byte_alphabet()
    assert len(set(table.values())) == 256
    assert table[32] == "Ġ" and table[ord("A")] == "A"
    assert all(c.isprintable() for c in table.values())


def test_merges_apply_lowest_rank_first():
    tokens = [chr(c) for c in range(ord("a"), ord("d"))] + ["ab", "bc", "abc"]
    tok = Tokenizer(tokens, merges=["b c", "a b", "a bc"], special_ids=[], pre="gpt2")
    # "b c" has rank 0, so "abc" -> a, bc -> abc (never ab, c)
    assert tok._bpe("abc") == ["abc"]
    assert tok._bpe("abcab") == ["abc", "ab"]


def test_decode_rejects_ids_outside_the_vocabulary(smol_tok):
    with pytest.raises(DojoError, match="outside the vocabulary"):
        smol_tok.decode([49152])


def test_unsupported_pre_tokenizer_is_explained():
    with pytest.raises(DojoError, match="pre-tokenizer"):
        Tokenizer(["a"], [], [], pre="nonsense")


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_matches_hf_tokenizers_built_from_the_same_file(smol_tok, hf_tok, text):
    """An independent implementation: HF transformers converts the GGUF vocabulary and
    merges into a `tokenizers` BPE with its own pre-tokenizer."""
    assert smol_tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
