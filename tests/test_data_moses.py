"""Moses normalisation and tokenisation: identical to sacremoses, only faster."""

from pathlib import Path

from pkm_lm.data import moses

RAW = Path(__file__).parent / "fixtures" / "data" / "raw"


def test_moses_matches_sacremoses():
    """Our faster normaliser and tokenizer must not change a single character."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    tokenizer = MosesTokenizer(lang="en")
    normalizer = MosesPunctNormalizer(
        "en", pre_replace_unicode_punct=True, post_remove_control_chars=True
    )
    lines = (RAW / "train.txt").read_text(encoding="utf-8").split("\n")
    lines += [
        "Mr. Smith met Dr. Who at No. 5 and no. 6, e.g. here. Then U.S.A. Ltd. left.",
        "A. b. \u00c9COLE. \u00e9tude. No. 5, No. five, pp. 12 pp. x Art. 3. art. IV. Nos. 7 .. ... x. .",
        'He said. "Yes." (Really.) Mrs. S. Jones Jr. and Co. Inc. 3.14. \u00c0. \u00e0. \u0661. Mr.',
        "\u00abGuillemets\u00bb \u201equotes\u201f \u2039x\u203a 1,5 % \u200bzero\u00a0width \x07bell 10 000",
    ]
    for line in lines:
        text = normalizer.normalize(line)
        assert moses.normalize_line(line) == text
        assert (
            moses.tokenize_line(line)
            == tokenizer.tokenize(text, escape=False, return_str=True).strip()
        )
