"""Errors a user can cause, each mapped to one HTTP status and one CLI line.

Code deep inside the engine raises these with a message that says what was wrong and what to
do; the CLI prints the message alone, the server wraps it in an OpenAI error object.
"""


class DisaggError(Exception):
    """Base of every error caused by the user's input or set-up, not by a bug."""

    http_status = 400
    error_type = "invalid_request_error"


class InvalidRequestError(DisaggError):
    """A request field is missing, malformed or out of range."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class ModelNotFoundError(DisaggError):
    """The named model is neither a preset, a Hugging Face directory nor a GGUF file."""

    http_status = 404
    error_type = "not_found_error"


class ConfigError(DisaggError):
    """A configuration value (flag, environment variable or file) is invalid."""


class OverloadedError(DisaggError):
    """The server is at a configured limit (queue, KV held for others): try again shortly."""

    http_status = 503
    error_type = "service_unavailable"
    retry_after = 1  # seconds, sent as Retry-After
