"""Moses preprocessing as XLM does it, through sacremoses.

replace-unicode-punctuation -> normalize-punctuation -> remove-non-printing-char ->
tokenizer without escaping (so "&" stays "&", not "&amp;"). Detokenisation inverts the
tokenizer for display.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4)
def _tools(lang: str):
    """Normaliser, tokenizer, detokenizer; sacremoses (the ``[data]`` extra) is imported here,
    so the trainer and the layer run without it."""
    from .moses_fast import FastMosesPunctNormalizer, FastMosesTokenizer, sacremoses

    return (
        FastMosesPunctNormalizer(lang),
        FastMosesTokenizer(lang),
        sacremoses.MosesDetokenizer(lang=lang),
    )


def normalize_line(line: str, lang: str = "en") -> str:
    """Punctuation-normalised `line` without non-printing characters, stripped."""
    return _tools(lang)[0].normalize(line).strip()


def tokenize_line(line: str, lang: str = "en") -> str:
    """Normalised, Moses-tokenised `line`: tokens separated by single spaces."""
    text = normalize_line(line, lang)
    if not text:
        return ""
    return _tools(lang)[1].tokenize(text, escape=False, return_str=True).strip()


def process_lines(lines: list[str], lang: str = "en", tokenize: bool = True) -> list[str]:
    """Tokenise (or only normalise) each line, dropping lines left empty: they carry no
    text and would only add `</s>` tokens to the stream."""
    fn = tokenize_line if tokenize else normalize_line
    out = (fn(line, lang) for line in lines)
    return [line for line in out if line]


def detokenize(tokens: list[str], lang: str = "en") -> str:
    """Moses detokenisation of a token list back into running text."""
    return _tools(lang)[2].detokenize(tokens, unescape=False)
