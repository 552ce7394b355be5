"""Byte-level BPE tokenizer built from a GGUF file's vocabulary and merges.

Encoding runs in three steps:
  1. split out special tokens written in the text ("<|im_start|>" -> id 1);
  2. pre-tokenize: cut the text into pieces that merges never cross (words, numbers,
     punctuation runs, whitespace). SmolLM2's "smollm" pre-tokenizer first isolates every
     digit ("2024" -> "2", "0", "2", "4"), then applies the GPT-2 pattern to the rest;
  3. map each piece's UTF-8 bytes to printable characters (GPT-2's byte alphabet, so a
     space is "Ġ") and apply merges, lowest rank first, until none applies.

Decoding concatenates the token strings and maps characters back to bytes.
"""

from __future__ import annotations

import codecs

import regex

from .errors import DojoError

# GPT-2's pattern: contractions, letters (with one leading space), numbers, other symbols,
# whitespace not followed by a word, remaining whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# pre-tokenizer name in GGUF metadata -> (isolate single digits first?, pattern)
PRE_TOKENIZERS = {
    "smollm": (True, GPT2_PATTERN),
    "gpt2": (False, GPT2_PATTERN),
    "default": (False, GPT2_PATTERN),
    "llama-bpe": (False, LLAMA3_PATTERN),
}
CONTROL, USER_DEFINED = 3, 4  # GGUF token types that count as special tokens
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                   "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (control codes, space, ...)
    map to chr(256), chr(257), ... in byte order. Example: 32 (space) -> "Ġ" (chr(288)).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    def __init__(self, tokens: list[str], merges: list[str], special_ids: list[int],
                 pre: str = "smollm", eos_id: int | None = None, chat_template: str | None = None):
        if pre not in PRE_TOKENIZERS:
            raise DojoError(f"unsupported pre-tokenizer {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
        self.tokens, self.merges, self.pre = tokens, list(merges), pre
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        self.merge_rank = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.special = {tokens[i]: i for i in special_ids}
        self.special_ids = frozenset(special_ids)
        self.eos_id = eos_id
        self.chat_template = chat_template or CHATML_TEMPLATE
        split_digits, pattern = PRE_TOKENIZERS[pre]
        self._split_digits = split_digits
        self._pattern = regex.compile(pattern)
        # Longest first, so that "<|im_start|>" wins over any special that is its prefix.
        specials = sorted(self.special, key=len, reverse=True)
        self._special_pattern = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
        self._to_unicode = byte_alphabet()
        self._to_byte = {c: b for b, c in self._to_unicode.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        from .gguf_loader import field_value

        model = field_value(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise DojoError(f"unsupported tokenizer model {model!r}: this engine reads byte-level BPE "
                            "tokenizers (tokenizer.ggml.model = 'gpt2'), as in SmolLM2 and Llama 3.")
        tokens = field_value(reader, "tokenizer.ggml.tokens")
        types = field_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        return cls(
            tokens=list(tokens),
            merges=list(field_value(reader, "tokenizer.ggml.merges") or []),
            special_ids=[i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)],
            pre=field_value(reader, "tokenizer.ggml.pre", "default"),
            eos_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
            chat_template=field_value(reader, "tokenizer.chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # -- encoding -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. Special tokens written in the text become their single id."""
        if not isinstance(text, str):
            raise DojoError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        pos = 0
        for m in self._special_pattern.finditer(text) if self._special_pattern else ():
            ids += self._encode_ordinary(text[pos:m.start()])
            ids.append(self.special[m.group()])
            pos = m.end()
        ids += self._encode_ordinary(text[pos:])
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """Pieces that no merge crosses. Example (smollm): "In 2024," -> ["In", " ", "2", "0", "2", "4", ","]."""
        if not self._split_digits:
            return self._pattern.findall(text)
        pieces = []
        for run in regex.split(r"(\p{N})", text):  # digits isolated, kept as their own runs
            if run:
                pieces += self._pattern.findall(run)
        return pieces

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for piece in self.pre_tokenize(text):
            if piece not in self._cache:
                symbols = "".join(self._to_unicode[b] for b in piece.encode("utf-8"))
                self._cache[piece] = [self.token_to_id[s] for s in self._bpe(symbols)]
            ids += self._cache[piece]
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Apply merges to one piece, lowest rank first.
        Example: merges ["a b", "ab c"], word "abc" -> ["a","b","c"] -> ["ab","c"] -> ["abc"]."""
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.merge_rank.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            a, b = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the pair, left to right
                if j + 1 < len(parts) and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return parts

    # -- decoding -------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        text = self.tokens[token_id]
        if token_id in self.special_ids:
            return text.encode("utf-8")
        return bytes(self._to_byte[c] for c in text)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. Bytes that do not form valid UTF-8 become U+FFFD."""
        for i in ids:
            if not 0 <= int(i) < len(self.tokens):
                raise DojoError(f"token id {int(i)} is outside the vocabulary (0..{len(self.tokens) - 1})")
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # -- chat ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the model's own chat template (a Jinja template stored in the GGUF file).

        Example (SmolLM2, one user message "Hi"):
        "<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging
        Face<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
        """
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, user_message: str) -> list[int]:
        """Token ids of a one-turn chat: the template around user_message, ending where the
        assistant's reply begins (what generation continues)."""
        return self.encode(self.apply_chat_template([{"role": "user", "content": user_message}]))


class StreamDecoder:
    """Turns a stream of token ids into text, holding back bytes of an unfinished
    UTF-8 character (an emoji is often split over two byte-level tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
