"""The validation vocabulary: one wording, values shown as they are typed on a command line."""

import pytest

from pkm_lm.errors import (
    ConfigError,
    DataError,
    NotFoundError,
    NotInstalledError,
    UserError,
    check_choice,
    check_positive,
    check_probability,
    invalid,
    show,
)


def test_user_errors_keep_their_builtin_types():
    for error, builtin in [
        (ConfigError, ValueError),
        (DataError, ValueError),
        (NotFoundError, FileNotFoundError),
        (NotInstalledError, ImportError),
    ]:
        assert issubclass(error, UserError) and issubclass(error, builtin)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "null"), (True, "true"), ("fp8", "fp8"), ([1, 2], "[1, 2]"), ((), "[]"), (0.5, "0.5")],
)
def test_values_shown_as_typed(value, shown):
    assert show(value) == shown


def test_one_wording():
    assert str(invalid("model.dim", 7, "must be even")) == "model.dim=7 is invalid: must be even"
    with pytest.raises(
        ConfigError, match=r"^train.precision=fp8 is invalid: must be one of fp32, bf16$"
    ):
        check_choice("train.precision", "fp8", ("fp32", "bf16"))
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="must be an integer >= 1"):
            check_positive("train.batch_size", bad)
    check_positive("train.batch_size", 1)
    for bad in (1.0, -0.1, False):
        with pytest.raises(ConfigError, match=r"must be a probability in \[0, 1\)"):
            check_probability("model.dropout", bad)
    check_probability("model.dropout", 0.0)
