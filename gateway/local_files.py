"""file:// URLs: videos (and frames) the gateway reads from its own filesystem, off unless the
operator names the directories they may come from (`local_video_roots`).

An evaluation host that shares a filesystem with the server sends a path instead of a 40 MB body.
A path is allowed only when the file it leads to, every symlink and `..` resolved, lies under one
of the roots (themselves resolved once at start). The file is opened without following a last
symlink and checked again through the descriptor (/proc/self/fd), so a path swapped for a symlink
between the check and the open is refused too. It must be a regular file within the size limit;
it is read into memory, like an inline or fetched video.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from gateway.errors import APIError, bad_request


def forbidden(message: str, param: str) -> APIError:
    return APIError(403, message, "invalid_request_error", param=param, code="file_url_not_allowed")


@dataclass(frozen=True)
class LocalFiles:
    roots: tuple[Path, ...]  # resolved; empty: file:// URLs are refused
    max_bytes: int

    @classmethod
    def parse(cls, roots: list[str], max_bytes: int) -> LocalFiles:
        """The roots resolved; a ValueError (at start) for one that is not an existing directory."""
        resolved = []
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_absolute() or not path.is_dir():
                raise ValueError(f"local_video_roots: {root!r} is not an absolute path of an existing directory")
            resolved.append(path.resolve())
        return cls(tuple(resolved), max_bytes)

    def read(self, url: str, param: str = "messages") -> bytes:
        """The bytes of the file a file:// URL names, once every check passes (blocking: call it in a
        thread). 403 outside the roots or with none, 404 missing, 413 over the size limit."""
        if not self.roots:
            raise forbidden("file:// URLs are off on this server: the operator allows them under chosen directories "
                            "with local_video_roots (VIDEOLLM_GATEWAY_LOCAL_VIDEO_ROOTS)", param)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise bad_request("a file URL is file:///absolute/path (no host, query or fragment)", param)
        path = unquote(parts.path)
        if not path.startswith("/") or "\x00" in path:
            raise bad_request("a file URL is file:///absolute/path", param)
        real = os.path.realpath(path)
        self._check_within(real, url, param)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise APIError(404, f"no file at {url}", param=param, code="file_not_found") from None
        except OSError as err:  # a symlink put there since the check (ELOOP), no permission...
            raise forbidden(f"{url} cannot be opened: {err.strerror}", param) from None
        try:
            opened = f"/proc/self/fd/{fd}"  # what was opened, in fact (Linux; elsewhere O_NOFOLLOW alone)
            if os.path.exists(opened):
                self._check_within(os.readlink(opened), url, param)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise bad_request(f"{url} is not a regular file", param)
            if info.st_size > self.max_bytes:
                raise APIError(413, f"{url} is {info.st_size} bytes; the limit for a local file is {self.max_bytes} "
                                    "bytes (max_inline_bytes)", param=param, code="video_too_large")
            with os.fdopen(fd, "rb") as file:
                fd = -1  # the file owns it now
                data = file.read(self.max_bytes + 1)
        finally:
            if fd >= 0:
                os.close(fd)
        if len(data) > self.max_bytes:  # it grew while read
            raise APIError(413, f"{url} is over the limit of {self.max_bytes} bytes", param=param,
                           code="video_too_large")
        if not data:
            raise bad_request(f"{url} is empty", param)
        return data

    def _check_within(self, real: str, url: str, param: str) -> None:
        if not any(Path(real).is_relative_to(root) for root in self.roots):
            raise forbidden(f"{url} is outside the directories this server reads videos from", param)
