"""The encoder's error for a video it cannot take: raised where the problem is found, answered as
INVALID_ARGUMENT (HTTP 400) with its message."""


class VideoError(ValueError):
    """The bytes are not a decodable video within the limits; the message says why."""
