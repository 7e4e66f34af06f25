"""Option validation: every unusable value is refused at construction with a clear message."""

from __future__ import annotations

import math

import pytest

import asyncgone
from asyncgone import ConfigurationError, EngineOptions, TCPKeepalive


def test_defaults_are_the_named_constants() -> None:
    """An empty ``EngineOptions`` carries the documented ``DEFAULT_*`` values."""
    options = EngineOptions()
    assert options.recycle == asyncgone.DEFAULT_RECYCLE == "auto"
    assert options.max_lifetime == asyncgone.DEFAULT_MAX_LIFETIME
    assert options.ping_after == asyncgone.DEFAULT_PING_AFTER
    assert options.ping_timeout == asyncgone.DEFAULT_PING_TIMEOUT
    assert options.connect_timeout == asyncgone.DEFAULT_CONNECT_TIMEOUT
    assert options.tcp_keepalive == asyncgone.DEFAULT_TCP_KEEPALIVE
    assert options.max_connecting == asyncgone.DEFAULT_MAX_CONNECTING == 2
    assert options.connect_retry == asyncgone.DEFAULT_CONNECT_RETRY == 5.0
    assert options.connect_backoff_max == asyncgone.DEFAULT_CONNECT_BACKOFF_MAX


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ping_timeout": -1}, "ping_timeout must be a finite number of seconds more than zero"),
        ({"ping_timeout": 0}, "ping_timeout must be a finite number of seconds more than zero"),
        ({"ping_timeout": "3"}, "ping_timeout must be a number of seconds, got '3'"),
        ({"connect_timeout": math.inf}, "connect_timeout must be a finite number"),
        ({"connect_timeout": math.nan}, "connect_timeout must be a finite number"),
        ({"ping_after": -0.5}, "ping_after must be a finite number of seconds zero or more"),
        ({"ping_after": True}, "ping_after must be a number of seconds, got True"),
        ({"recycle": "sometimes"}, "recycle must be 'auto', a number of seconds or None"),
        ({"recycle": -10}, "recycle must be a finite number of seconds more than zero"),
        ({"max_lifetime": 0}, "max_lifetime must be a finite number of seconds more than zero"),
        ({"tcp_keepalive": True}, "tcp_keepalive must be an asyncgone.TCPKeepalive or None"),
        ({"max_connecting": 0}, "max_connecting must be a whole number of at least 1, got 0"),
        ({"max_connecting": 1.5}, "max_connecting must be a whole number of at least 1"),
        ({"max_connecting": True}, "max_connecting must be a whole number of at least 1"),
        ({"connect_retry": "forever"}, "connect_retry must be 'pool_timeout', a number of"),
        ({"connect_retry": -1}, "connect_retry must be a finite number of seconds zero or more"),
        ({"connect_retry": math.inf}, "connect_retry must be a finite number of seconds"),
        ({"connect_backoff_max": 0}, "connect_backoff_max must be a finite number of seconds"),
        ({"connect_backoff_max": "2"}, "connect_backoff_max must be a number of seconds"),
    ],
)
def test_bad_option_values_are_refused(kwargs: dict[str, object], message: str) -> None:
    """Each nonsensical option value raises ``ConfigurationError`` naming option and value."""
    with pytest.raises(ConfigurationError, match="^" + message.replace("(", r"\(")):
        EngineOptions(**kwargs)  # type: ignore[arg-type]


def test_bad_options_are_refused_by_create_engine_before_connecting() -> None:
    """``create_engine`` validates asyncgone's options eagerly, with no server involved."""
    with pytest.raises(ConfigurationError, match="ping_timeout"):
        asyncgone.create_engine("mysql+asyncmy://root@127.0.0.1:1/test", ping_timeout=-3)


def test_configuration_error_is_a_value_error() -> None:
    """Code that catches ``ValueError`` for bad arguments also catches asyncgone's."""
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ConfigurationError, asyncgone.AsyncGoneError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"idle": 0}, "idle"),
        ({"interval": 2.5}, "interval"),
        ({"count": -1}, "count"),
        ({"user_timeout": -1}, "user_timeout"),
    ],
)
def test_bad_tcp_keepalive_values_are_refused(kwargs: dict[str, object], field: str) -> None:
    """Kernel keepalive settings must be whole positive seconds/counts (timeout may be 0)."""
    with pytest.raises(ConfigurationError, match=f"TCPKeepalive.{field}"):
        TCPKeepalive(**kwargs)  # type: ignore[arg-type]


def test_options_are_frozen_and_keyword_only() -> None:
    """Options cannot be changed after validation, nor passed positionally."""
    options = EngineOptions()
    with pytest.raises(AttributeError):
        options.ping_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        EngineOptions(1.0)  # type: ignore[misc]


def test_connect_timeout_in_the_url_is_checked() -> None:
    """A non-numeric ``connect_timeout`` in the URL is refused before any connection."""
    with pytest.raises(ConfigurationError, match="connect_timeout in the URL"):
        asyncgone.create_engine("mysql+asyncmy://root@127.0.0.1/test?connect_timeout=soon")


def test_a_misspelt_keyword_names_the_close_match() -> None:
    """A keyword within a typo of one of asyncgone's is refused with that name, before any
    connection; SQLAlchemy's own keywords and their misspellings stay SQLAlchemy's."""
    url = "mysql+asyncmy://root@127.0.0.1:1/test"
    with pytest.raises(
        ConfigurationError, match="unknown keyword 'recyle': did you mean 'recycle'"
    ):
        asyncgone.create_engine(url, recyle=10)
    with pytest.raises(ConfigurationError, match="did you mean 'ping_timeout'"):
        asyncgone.Database(url, ping_timout=1)
    with pytest.raises(ConfigurationError, match="did you mean 'attempts'"):
        asyncgone.Database(url, attemps=5)
    with pytest.raises(TypeError, match="Invalid argument"):
        asyncgone.create_engine(url, pool_recyle=10)  # close to SQLAlchemy's pool_recycle
    engine = asyncgone.create_engine(url, pool_recycle=10, echo_pool=False)
    assert engine.sync_engine.pool._recycle == 10  # type: ignore[attr-defined]


def test_pool_pre_ping_means_a_bounded_ping_at_every_checkout() -> None:
    """pool_pre_ping=True becomes ping_after=0 (asyncgone's bounded ping, after the socket
    check); SQLAlchemy's own pre-ping, unbounded and run first, is never switched on."""
    url = "mysql+asyncmy://root@127.0.0.1:1/test"
    engine = asyncgone.create_engine(url, pool_pre_ping=True)
    assert engine.sync_engine.pool._pre_ping is False  # type: ignore[attr-defined]
    assert asyncgone.stats(engine).pings == 0
    from asyncgone._state import state_of

    state = state_of(engine)
    assert state is not None
    assert state.options.ping_after == 0
    with pytest.raises(ConfigurationError, match="pool_pre_ping=True or ping_after"):
        asyncgone.create_engine(url, pool_pre_ping=True, ping_after=5)
    with pytest.raises(ConfigurationError, match="pool_pre_ping must be True or False"):
        asyncgone.create_engine(url, pool_pre_ping="yes")


def test_connect_admission_accepts_its_documented_values() -> None:
    """No cap, no retry, a fixed retry window and a zero retry are all valid."""
    assert EngineOptions(max_connecting=None).max_connecting is None
    assert EngineOptions(connect_retry=None).connect_retry is None
    assert EngineOptions(connect_retry=0).connect_retry == 0
    assert EngineOptions(connect_retry=12.5, connect_backoff_max=0.5).connect_retry == 12.5


@pytest.mark.parametrize("name", ["kill_on_cancel", "overflow_give_back", "galera_spread"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_flags_must_be_true_or_false(name: str, value: object) -> None:
    """A flag given as anything but True or False is refused before anything connects,
    naming the option and the value."""
    url = "mysql+asyncmy://root@127.0.0.1:1/test"
    with pytest.raises(ConfigurationError, match=f"{name} must be True or False, got {value!r}"):
        asyncgone.create_engine(url, **{name: value})
