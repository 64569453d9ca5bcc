"""What every config test asks of an error: one ConfigError line naming the key and the file."""

from __future__ import annotations

import pytest

from fedpriv.kernel.errors import ConfigError


def config_error(fn, *args, names: tuple[str, ...] | str = ()) -> str:
    """Call ``fn(*args)``; it must raise ConfigError with a one-line message naming every string in ``names``."""
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert message.strip(), "empty error message"
    assert len(message.splitlines()) == 1, f"error message spans several lines: {message!r}"
    assert "Traceback" not in message
    for name in (names,) if isinstance(names, str) else names:
        assert name in message, f"{name!r} not named in {message!r}"
    return message
