"""Images of vision-language rows: where a row's images are, what they are, and how to read them.
Pure functions over one row (``load_image`` reads a file or decodes bytes).

A row gives its images in one of two ways (they can be combined):

- typed content parts in its messages, OpenAI / transformers style: ``{"type": "image", "image": X}``,
  ``{"type": "image_url", "image_url": {"url": X}}`` (or ``"image_url": X``), ``{"type": "image",
  "path": X}``, next to ``{"type": "text", "text": ...}`` parts;
- an ``images`` column (or ``image``: one image), filling the ``{"type": "image"}`` parts that carry
  no image, in order (TRL's layout). With plain string contents the images go before the text of the
  first user turn (as TRL places them), or where the text writes ``<image>`` when it does so exactly
  once per image (LLaMA-Factory's ShareGPT layout).

X is a local file path (relative paths are read from ``image_root``, default the current directory),
a ``file://`` or ``data:image/...;base64`` URI, the encoded bytes, a PIL image, or a ``{"bytes",
"path"}`` mapping (how ``datasets`` stores an ``Image`` column). Remote URLs are refused: training
runs offline, so the error says which row and field hold one and to download it first.

``split_images`` gives the row's text with ``SENTINEL`` where each image goes (so ``formats`` reads
roles, systems and tools as for any chat row) and the images as ``ImageRef``; ``with_parts`` turns the
normalised messages into typed parts, ``{"type": "image"}`` at each sentinel.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftrainer.constants import IMAGE_COLUMNS, IMAGE_PART_KEYS, IMAGE_PART_TYPES, REMOTE_IMAGE_SCHEMES
from sftrainer.data.formats import ChatExample
from sftrainer.errors import RowError

SENTINEL = "\ufdd2"  # a Unicode noncharacter: where an image goes in a message's text
TEXT_PLACEHOLDER = "<image>"  # LLaMA-Factory's marker of an image in ShareGPT text
ImageRef = dict[str, Any]  # {"bytes": bytes | None, "path": str | None}, as datasets stores an Image
MESSAGE_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen")


def image_column(columns: list[str]) -> str | None:
    """The column that holds the rows' images, if any ('images' before 'image')."""
    return next((c for c in IMAGE_COLUMNS if c in columns), None)


# ---- one image -------------------------------------------------------------------------------


def image_ref(value: Any, where: str, root: str | os.PathLike | None = None) -> ImageRef:
    """An image given in the data, as a reference to store (bytes, or an absolute local path).
    Raises ``RowError`` naming ``where`` for a remote URL, a missing file or an unusable value."""
    from PIL import Image

    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")  # lossless, whatever the image's own format was
        return {"bytes": buffer.getvalue(), "path": None}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return image_ref(value["bytes"], where, root)
        for key in ("path", "url", "image_url", "image"):
            if value.get(key) is not None:
                return image_ref(value[key], where, root)
        raise RowError(where, "holds no image: give a path, bytes or {'url': ...}")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise RowError(
            where, f"must be an image (a file path, bytes or a PIL image), got {type(value).__name__}"
        )
    text = value.strip()
    if text.startswith("data:"):
        return {"bytes": _data_uri(text, where), "path": None}
    if text.lower().startswith(REMOTE_IMAGE_SCHEMES):
        raise RowError(
            where,
            f"is a remote URL ({text[:80]}); sftrainer reads images offline, from local files or bytes. "
            "Download the image and give its local path (or put its bytes in the data)",
        )
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if not text:
        raise RowError(where, "is an empty image path")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path(root or os.getcwd()) / path
    if not path.is_file():
        base = f" (relative paths are read from {root or os.getcwd()}; set image_root to change that)"
        raise RowError(where, f"no such image file: {text}{'' if Path(text).is_absolute() else base}")
    return {"bytes": None, "path": str(path)}


def _data_uri(text: str, where: str) -> bytes:
    header, _, payload = text.partition(",")
    if not header.endswith(";base64") or not payload:
        raise RowError(
            where, "is a data: URI that is not base64-encoded image data (data:image/png;base64,...)"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RowError(where, f"is a data: URI whose base64 payload is invalid ({err})") from None


def load_image(ref: ImageRef, where: str = "image") -> Any:
    """The PIL image of a reference, fully decoded. ``RowError`` when it cannot be read or decoded."""
    from PIL import Image, UnidentifiedImageError

    source = ref.get("path") or "the image bytes"
    try:
        image = Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") is not None else ref["path"])
        image.load()  # decode now: a truncated file fails here, not inside the image processor
    except FileNotFoundError:
        raise RowError(where, f"no such image file: {ref.get('path')}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RowError(
            where, f"{source} cannot be decoded as an image ({type(err).__name__}: {err})"
        ) from None
    return image


# ---- one row ---------------------------------------------------------------------------------


def split_images(
    row: Mapping[str, Any], column: str | None, root: str | None = None
) -> tuple[dict[str, Any], list[ImageRef]]:
    """The row with each image's place marked by ``SENTINEL`` in the text, and its images in order.

    Typed content parts become one string per message; ``{"type": "image"}`` parts without an image
    take the ``column``'s images in order. Raises ``RowError`` for a count mismatch, an unknown part
    type, a remote URL or a missing file.
    """
    row = dict(row)
    given = _column_images(row.pop(column, None) if column else None, column)
    slots: list[tuple[str, Any]] = []  # (where, the part's own image or None)
    typed = False
    for field in MESSAGE_FIELDS:
        value = row.get(field)
        if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
            row[field], found = _messages_text(value, field, slots)
            typed = typed or found
    bare = [k for k, (_, payload) in enumerate(slots) if payload is None]
    if not typed and given:
        row, slots = _place_untyped(row, len(given), column)
        bare = list(range(len(slots)))
    if len(bare) != len(given):
        raise RowError(
            column or "images",
            f"the row has {len(given)} image(s) in '{column or 'images'}' but its messages hold "
            f"{len(bare)} image part(s) without an image ({{'type': 'image'}}); give one image per part",
        )
    filled = iter(given)
    refs = []
    for k, (where, payload) in enumerate(slots):
        if k in bare:
            index = bare.index(k)
            refs.append(image_ref(next(filled), f"{column}[{index}]", root))
        else:
            refs.append(image_ref(payload, where, root))
    return row, refs


def _column_images(value: Any, column: str | None) -> list[Any]:
    if value is None:
        return []
    if column == "image" or not isinstance(value, list | tuple):
        return [value]
    return [v for v in value if v is not None]


def _messages_text(messages: list[Any], field: str, slots: list[tuple[str, Any]]) -> tuple[list[Any], bool]:
    """Messages with typed contents turned into strings (``SENTINEL`` per image); whether any was typed."""
    out, typed = [], False
    for i, message in enumerate(messages):
        key = _content_key(message)
        content = message.get(key)
        if isinstance(content, list):
            typed = True
            message = {**message, key: _parts_text(content, f"{field}[{i}].{key}", slots)}
        out.append(message)
    return out, typed


def _parts_text(parts: list[Any], where: str, slots: list[tuple[str, Any]]) -> str:
    pieces = []
    for k, part in enumerate(parts):
        at = f"{where}[{k}]"
        if not isinstance(part, Mapping):
            raise RowError(
                at, "must be a content part: {'type': 'text', 'text': ...} or {'type': 'image', ...}"
            )
        kind = part.get("type")
        payload = _payload(part)
        if kind in ("text", "input_text") or (kind is None and part.get("text") is not None):
            text = part.get("text")
            if not isinstance(text, str):
                raise RowError(f"{at}.text", f"must be a string, got {type(text).__name__}")
            pieces.append(text)
        elif kind in IMAGE_PART_TYPES or (kind is None and payload is not None):
            pieces.append(SENTINEL)
            slots.append((at, payload))
        else:
            raise RowError(
                f"{at}.type",
                f"unknown content part type {kind!r}: text and image parts are read ('text', "
                f"{', '.join(repr(t) for t in IMAGE_PART_TYPES)}); video and audio are not supported",
            )
    return "".join(pieces)


def _place_untyped(row: dict[str, Any], n: int, column: str | None) -> tuple[dict[str, Any], list]:
    """Plain string contents with ``n`` images from the column: where the text writes ``<image>``
    exactly ``n`` times, there; otherwise before the text of the first user turn (TRL's layout)."""
    slots = [(f"{column}[{k}]", None) for k in range(n)]
    texts = _string_contents(row)
    if sum(text.count(TEXT_PLACEHOLDER) for _, _, text in texts) == n:
        for address, _, text in texts:
            _set(row, address, text.replace(TEXT_PLACEHOLDER, SENTINEL))
        return row, slots
    first = next(((address, text) for address, role, text in texts if role == "user"), None)
    if first is None:
        raise RowError(column or "images", "the row has images but no user turn to put them in")
    _set(row, first[0], SENTINEL * n + first[1])
    return row, slots


TEXT_FIELDS = (*MESSAGE_FIELDS, "instruction", "text")
USER_TEXT_FIELDS = ("prompt", "instruction", "text")  # a pair's prompt opens its one user turn


def _string_contents(row: dict[str, Any]) -> list[tuple[tuple[str, int | None, str | None], str, str]]:
    """((field, message index, content key), role, text) of each string text of the row, in order."""
    out: list[tuple[tuple[str, int | None, str | None], str, str]] = []
    for field in TEXT_FIELDS:
        value = row.get(field)
        if isinstance(value, str):
            out.append(((field, None, None), "user" if field in USER_TEXT_FIELDS else "assistant", value))
        elif isinstance(value, list):
            for i, message in enumerate(value):
                key = _content_key(message) if isinstance(message, Mapping) else None
                if key is not None and isinstance(message.get(key), str):
                    role = str(message.get("role", message.get("from", ""))).lower()
                    out.append(((field, i, key), "user" if role in ("user", "human") else role, message[key]))
    return out


def _set(row: dict[str, Any], address: tuple[str, int | None, str | None], text: str) -> None:
    """Set one text of the row; a message is replaced by a copy (the caller's data stays as it was)."""
    field, i, key = address
    if i is None:
        row[field] = text
        return
    messages = list(row[field])
    messages[i] = {**messages[i], key: text}
    row[field] = messages


def _content_key(message: Mapping[str, Any]) -> str:
    return "value" if "value" in message and "content" not in message else "content"


def with_parts(example: ChatExample) -> ChatExample:
    """The conversation with typed contents: text parts, and ``{"type": "image"}`` at each sentinel.

    Vision-language templates read typed parts (LLaVA's renders a plain string as nothing), so every
    message gets them; a message without text gets one empty text part (templates index ``[0]``).
    """
    messages = []
    for message in example.messages:
        content = message.get("content")
        if isinstance(content, str):
            parts: list[dict[str, Any]] = []
            for k, piece in enumerate(content.split(SENTINEL)):
                if k:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            message = {**message, "content": parts or [{"type": "text", "text": ""}]}
        messages.append(message)
    return ChatExample(messages, example.first_trainable, example.tools, example.template_kwargs)


def count_images(example: Any) -> int:
    """Image places (sentinels) an example holds."""
    if isinstance(example, ChatExample):
        return sum(
            m["content"].count(SENTINEL) for m in example.messages if isinstance(m.get("content"), str)
        )
    texts = [getattr(example, name, "") for name in ("text", "prompt", "completion")]
    return sum(t.count(SENTINEL) for t in texts if isinstance(t, str))


def lift_images(row: Mapping[str, Any]) -> dict[str, Any]:
    """A Python row made storable in Arrow: images given as bytes or PIL images inside message parts
    move to the ``images`` column (their parts become ``{"type": "image"}``, which the column fills in
    order), and the column's images become ``{"bytes", "path"}`` mappings, so every row's column has
    one type. Arrow cannot store bytes or PIL images inside the free-form message contents.

    Paths and URLs stay where they are (checked when the row is prepared, with its row number).
    """
    from PIL import Image

    def binary(value: Any) -> bool:
        return isinstance(value, bytes | bytearray | memoryview | Image.Image)

    column = image_column(list(row))
    given = iter(_column_images(row.get(column), column) if column else [])
    merged: list[Any] = []
    out = {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}
    for field in MESSAGE_FIELDS:
        value = out.get(field)
        if not isinstance(value, list):
            continue
        messages = []
        for message in value:
            content = message.get(_content_key(message)) if isinstance(message, Mapping) else None
            if isinstance(content, list):
                parts = []
                for part in content:
                    payload = _payload(part) if isinstance(part, Mapping) else None
                    if payload is None and isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES:
                        merged.append(next(given, None))  # a bare part: the column's next image
                    elif binary(payload):
                        merged.append(payload)
                        part = {"type": "image"}
                    parts.append(part)
                message = {**message, _content_key(message): parts}
            messages.append(message)
        out[field] = messages
    merged += list(given)  # images the parts do not take (split_images reports the count)
    if merged:
        out["images"] = [_storable(v) for v in merged if v is not None]
    return out


def _payload(part: Mapping[str, Any]) -> Any:
    payload = next((part[key] for key in IMAGE_PART_KEYS if part.get(key) is not None), None)
    if isinstance(payload, Mapping) and "url" in payload and "bytes" not in payload:
        payload = payload["url"]
    return payload


def _storable(value: Any) -> dict[str, Any]:
    from PIL import Image

    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    if isinstance(value, bytes | bytearray | memoryview | Image.Image):
        return image_ref(value, "images")
    return {"bytes": None, "path": os.fspath(value) if isinstance(value, os.PathLike) else value}
