"""A tiny word-level tokenizer for tests: a few words, the usual special tokens and, optionally, a
chat template, so that tests of causal LMs and instruction data need no tokenizer folder."""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_SPECIALS = ["<|user|>", "<|assistant|>", "<|end|>"]
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer(words: Iterable[str], chat: bool = True, chat_specials: bool = True, split: str = "whitespace"):
    """A ``PreTrainedTokenizerFast`` over ``words`` (ids after the specials, in first-seen order;
    unknown words are ``<unk>``). ``chat``: set the chat template; ``chat_specials``: add its
    tokens; ``split``: ``whitespace`` (words and punctuation apart) or ``spaces`` (on spaces only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + (CHAT_SPECIALS if chat_specials else [])
    vocab = {w: i for i, w in enumerate([*specials, *dict.fromkeys(words)])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace() if split == "whitespace" else pre_tokenizers.WhitespaceSplit()
    extra = {"additional_special_tokens": CHAT_SPECIALS} if chat_specials else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", **extra)
    if chat:
        tok.chat_template = CHAT
    return tok
