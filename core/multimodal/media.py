"""Reading the images of chat messages (`image_url` parts) for the server, under the operator's policy.

* `data:` URLs (`data:image/png;base64,...`) are always accepted;
* `file://` URLs only under `--allowed-local-media-path` (resolved, so `..` and symbolic links
  cannot leave the directory);
* `http(s)://` URLs only from the hosts listed in `--allowed-media-domains`: unlike vLLM, which
  fetches any URL unless told otherwise, loraplex fetches none until the operator names hosts.
  Redirects are not followed (they could leave the allowed hosts).

Every image is at most `LORAPLEX_MAX_IMAGE_BYTES` (checked before it is decoded, and while it
downloads), a fetch takes at most `VLLM_IMAGE_FETCH_TIMEOUT` seconds, and the image is decoded
in full here, so a broken one is the request's 400, never an error in the middle of a batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .. import envs
from ..errors import InvalidRequestError


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: Path | None
    allowed_media_domains: frozenset[str]
    max_bytes: int
    timeout: float

    @classmethod
    def from_args(cls, allowed_local_media_path: str, allowed_media_domains: list[str] | None) -> "MediaPolicy":
        local = Path(allowed_local_media_path).expanduser().resolve() if allowed_local_media_path else None
        return cls(local, frozenset(allowed_media_domains or ()), envs.max_image_bytes(), envs.image_fetch_timeout())


async def load_image(url: str, policy: MediaPolicy) -> Any:
    """The PIL image `url` names, fully decoded; InvalidRequestError (a 400) saying why not."""
    shown = url if len(url) <= 80 else f"{url[:60]}... ({len(url)} characters)"
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url, shown, policy.max_bytes)
    elif scheme == "file":
        data = await asyncio.to_thread(_local_file_bytes, url, shown, policy)
    elif scheme in ("http", "https"):
        data = await _fetch(url, shown, policy)
    else:
        raise InvalidRequestError(f"image_url {shown!r} is not a data:, file:// or http(s):// URL; send the image "
                                  "inline as data:image/png;base64,<base64 of the file>")
    return await asyncio.to_thread(_decode, data, shown)


def _data_url_bytes(url: str, shown: str, max_bytes: int) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    media_type, *options = header.split(";")
    if not comma or "base64" not in options or not media_type.lower().startswith("image/"):
        raise InvalidRequestError(f"image_url {shown!r} is not a base64 image data URL; write it as "
                                  "data:image/<png|jpeg|...>;base64,<base64 of the image file>")
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidRequestError(f"the image in image_url {shown!r} is larger than the {max_bytes} bytes allowed "
                                  "(LORAPLEX_MAX_IMAGE_BYTES); send a smaller image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"image_url {shown!r} does not hold valid base64 ({exc}); encode the image file "
                                  "with standard base64") from exc


def _local_file_bytes(url: str, shown: str, policy: MediaPolicy) -> bytes:
    root = policy.allowed_local_media_path
    if root is None:
        raise InvalidRequestError(f"image_url {shown!r}: this server does not read local files; send the image as a "
                                  "data: URL (the operator may allow a directory with --allowed-local-media-path)")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise InvalidRequestError(f"image_url {shown!r}: a file:// URL must name a local path (file:///dir/image.png)")
    path = Path(unquote(parts.path)).resolve()
    if not path.is_relative_to(root):
        raise InvalidRequestError(f"image_url {shown!r} is outside the directory this server may read images from; "
                                  "send the image as a data: URL")
    try:
        if path.stat().st_size > policy.max_bytes:
            raise InvalidRequestError(f"the image at {shown!r} is larger than the {policy.max_bytes} bytes allowed "
                                      "(LORAPLEX_MAX_IMAGE_BYTES); send a smaller image")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"image_url {shown!r} cannot be read ({exc.strerror}); check the path") from exc


async def _fetch(url: str, shown: str, policy: MediaPolicy) -> bytes:
    import httpx

    host = (urlsplit(url).hostname or "").lower()
    if host not in policy.allowed_media_domains:
        raise InvalidRequestError(
            f"image_url {shown!r}: this server fetches images only from the hosts its operator allows "
            f"({', '.join(sorted(policy.allowed_media_domains)) or 'none'}); send the image as a data: URL"
        )
    try:
        async with httpx.AsyncClient(timeout=policy.timeout, follow_redirects=False) as client:
            return await asyncio.wait_for(_download(client, url, shown, policy.max_bytes), policy.timeout)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise InvalidRequestError(f"fetching image_url {shown!r} took longer than {policy.timeout:g} s "
                                  "(VLLM_IMAGE_FETCH_TIMEOUT); send the image as a data: URL") from exc
    except httpx.HTTPError as exc:
        raise InvalidRequestError(f"image_url {shown!r} cannot be fetched ({type(exc).__name__}: {exc}); "
                                  "check the URL or send the image as a data: URL") from exc


async def _download(client: Any, url: str, shown: str, max_bytes: int) -> bytes:
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise InvalidRequestError(f"fetching image_url {shown!r} answered HTTP {response.status_code}; "
                                      "check the URL or send the image as a data: URL")
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data.extend(chunk)
            if len(data) > max_bytes:
                raise InvalidRequestError(f"the image at {shown!r} is larger than the {max_bytes} bytes allowed "
                                          "(LORAPLEX_MAX_IMAGE_BYTES); send a smaller image")
        return bytes(data)


def _decode(data: bytes, shown: str) -> Any:
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge canvas in a small file
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception as exc:  # Pillow raises many types for data that is not a complete image
        raise InvalidRequestError(f"image_url {shown!r} does not hold a decodable image ({type(exc).__name__}: {exc}); "
                                  "send a PNG, JPEG, GIF, BMP or WebP file") from exc
    return image
