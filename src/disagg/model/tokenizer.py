"""Text <-> token ids, and chat messages -> prompt text.

A thin layer over Hugging Face `tokenizers` (the Rust library): it loads a tokenizer.json from a
model directory, rebuilds one from a GGUF file's vocabulary, or makes a byte-level one for
random-weight presets. Chat templates are Jinja, rendered in a sandbox as transformers does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from disagg.errors import ConfigError, InvalidRequestError

# ChatML, the template of SmolLM2 and Qwen2 without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer regexes of the BPE families whose GGUF files we read (llama.cpp's names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre in ("smollm", "starcoder"):
        # SmolLM2 splits every digit on its own before the GPT-2 split; without this, numbers
        # tokenize differently from the original tokenizer.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


class Tokenizer:
    def __init__(self, tok: HFTokenizer, *, chat_template: str | None, eos_token_ids: Sequence[int],
                 bos_token_id: int | None = None, add_bos: bool = False) -> None:
        self._tok = tok
        self.chat_template = chat_template
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos

    # ---- construction ----

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        path = Path(path)
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ConfigError(f"cannot load {path / 'tokenizer.json'}: {e}") from e
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        eos = list(eos_token_ids)
        for key in ("eos_token",):
            token = cfg.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and (tid := tok.token_to_id(token)) is not None and tid not in eos:
                eos.append(tid)
        bos = cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return cls(
            tok,
            chat_template=cfg.get("chat_template"),
            eos_token_ids=eos,
            bos_token_id=tok.token_to_id(bos) if bos else None,
            add_bos=bool(cfg.get("add_bos_token", False)),
        )

    @classmethod
    def from_gguf_vocab(cls, *, tokens: list[str], token_types: list[int], merges: list[str], pre: str,
                        chat_template: str | None, eos_token_ids: Sequence[int], bos_token_id: int | None,
                        add_bos: bool) -> Tokenizer:
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        control, user_defined = 3, 4  # llama.cpp's token types
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, token_types, strict=True) if kind == user_defined])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, token_types, strict=True) if kind == control])
        return cls(tok, chat_template=chat_template, eos_token_ids=eos_token_ids,
                   bos_token_id=bos_token_id, add_bos=add_bos)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A merge-free byte-level BPE (259 ids) for random-weight presets: any text round-trips."""
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {t: i for i, t in enumerate(specials + alphabet)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(tok, chat_template=CHATML_TEMPLATE, eos_token_ids=(0, 2))

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"add_bos_token": self.add_bos, "chat_template": self.chat_template}
        if self.eos_token_ids:
            cfg["eos_token"] = self._tok.id_to_token(self.eos_token_ids[0])
        if self.bos_token_id is not None:
            cfg["bos_token"] = self._tok.id_to_token(self.bos_token_id)
        return cfg

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self._config(), indent=2))

    def to_dict(self) -> dict[str, Any]:
        """Everything a router needs to tokenize as this worker does, as JSON (no pickle on the wire)."""
        return {"tokenizer": self._tok.to_str(), "config": self._config(), "eos_token_ids": list(self.eos_token_ids)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        try:
            tok = HFTokenizer.from_str(d["tokenizer"])
            cfg = d["config"]
            bos = cfg.get("bos_token")
            return cls(tok, chat_template=cfg.get("chat_template"), eos_token_ids=[int(t) for t in d["eos_token_ids"]],
                       bos_token_id=tok.token_to_id(bos) if bos else None, add_bos=bool(cfg.get("add_bos_token")))
        except Exception as e:  # tokenizers raises its own exception types on a bad description
            raise ConfigError(f"not a tokenizer description: {e}") from e

    # ---- use ----

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @cached_property
    def _template(self) -> jinja2.Template:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise InvalidRequestError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template or CHATML_TEMPLATE)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}] must have a string 'role' and a string 'content'")
        special = {"bos_token": self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else "",
                   "eos_token": self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""}
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **special)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template failed: {e}") from e
