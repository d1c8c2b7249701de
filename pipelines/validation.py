"""What makes a LLaVA sample acceptable, and why a rejected one was rejected.

Two checks, split by cost: :func:`check_record` looks only at the JSON record (run on the
driver while the input streams past, where duplicate ids can be seen), :func:`inspect_image`
looks at the image bytes (run in Ray Data tasks). Either raises :class:`Rejection` carrying a
:class:`Reason`; the shard job writes every rejection to ``quarantine.jsonl``.

Conversations are checked with the same rules the trainer uses
(:func:`mocha.text.conversation.validate_conversation`), so a sample that reaches a shard is one
training accepts; before that, the common failures are classified into their own reasons.
"""

from __future__ import annotations

import enum
import errno
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from mocha.io.storage import RootReader

from mocha.text.conversation import GPT, HUMAN, ConversationError, count_image_tokens, validate_conversation


class Reason(str, enum.Enum):
    """Why a sample was quarantined (the value is what ``quarantine.jsonl`` records)."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    MALFORMED_RECORD = "malformed_record"
    EMPTY_CONVERSATION = "empty_conversation"
    MALFORMED_CONVERSATION = "malformed_conversation"
    NON_ALTERNATING_ROLES = "non_alternating_roles"
    IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
    DUPLICATE_ID = "duplicate_id"
    MISSING_IMAGE = "missing_image"
    OUTSIDE_ROOT = "outside_root"
    INVALID_PATH = "invalid_path"
    NOT_A_FILE = "not_a_file"
    UNREADABLE_FILE = "unreadable_file"
    NOT_AN_IMAGE = "not_an_image"
    UNREADABLE_IMAGE = "unreadable_image"
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"
    IMAGE_TOO_LARGE = "image_too_large"


class Rejection(Exception):
    """A sample failed a check; ``reason`` classifies it, ``detail`` says what exactly."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


#: PIL format name -> the WebDataset member extension the original bytes are stored under. MPO
#: (multi-picture JPEG, what many cameras write) is a JPEG whose first picture every decoder shows.
#: GIF is accepted because real mixtures hold it (LLaVA-665K's OCR-VQA part mixes JPEG, PNG and
#: GIF); an animated GIF trains on its first frame.
IMAGE_EXTENSIONS: dict[str, str] = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}

#: Member suffixes a reader takes as a sample's image: what ``mocha data shard`` writes (each
#: once; JPEG and MPO share ``jpg``), plus ``jpeg``, which other WebDataset writers use for JPEG.
IMAGE_MEMBER_SUFFIXES: tuple[str, ...] = (*dict.fromkeys(IMAGE_EXTENSIONS.values()), "jpeg")

#: Limits on an image path, the usual Linux ones (PATH_MAX, NAME_MAX), checked the same on every
#: filesystem so the outcome does not depend on where the images live.
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255


def image_member(members: Mapping[str, Any], key: str = "?") -> bytes | None:
    """The image bytes of one sample's members (``{suffix: bytes}``), or None for a text-only
    sample. Non-bytes values (absent members that a columnar reader filled with NaN/None) are not
    members. Two image members in one sample are an error: which one trains would be arbitrary."""
    found = [s for s in IMAGE_MEMBER_SUFFIXES if isinstance(members.get(s), (bytes, bytearray))]
    if len(found) > 1:
        raise ValueError(f"sample {key!r} holds {len(found)} image members ({', '.join(found)}); "
                         "a sample carries at most one image")
    return bytes(members[found[0]]) if found else None


def open_rgb(blob: bytes, key: str = "?") -> Image.Image:
    """Image bytes of any accepted format (JPEG, MPO, PNG, GIF, WebP) -> the RGB picture a viewer
    shows, through :func:`mocha.images.decode_rgb` (16-bit scaled, EXIF orientation applied,
    transparency over white; an animated image gives its first frame). Training, the feature job
    and evaluation all decode this way. A file that cannot be decoded is a ``ValueError`` naming
    the sample ``key``."""
    from mocha.images import decode_rgb

    try:
        return decode_rgb(blob)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"sample {key!r}: cannot decode its image ({len(blob)} bytes): {e}") from None

#: Default pixel limit (width * height) above which an image is quarantined as too large.
DEFAULT_MAX_PIXELS = 40_000_000

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_ID_CHARS = 48


def sample_key(index: int, sample_id: str) -> str:
    """A WebDataset key: zero-padded input position + a sanitized prefix of the id.

    Unique (the position is), safe (only ``[A-Za-z0-9_-]``: no dots, which WebDataset splits
    extensions on, and no slashes) and deterministic; the original id stays in the json member.
    """
    slug = _UNSAFE_KEY_CHARS.sub("_", sample_id)[:_KEY_ID_CHARS].strip("_")
    return f"{index:010d}-{slug}" if slug else f"{index:010d}"


@dataclass(frozen=True)
class CheckedRecord:
    """A record that passed the JSON-level checks."""

    sample_id: str
    image: str | None  # path relative to the image root, or None for a text-only sample


def _sample_id(record: dict[str, Any]) -> str:
    raw = record.get("id")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or str(raw).strip() == "":
        raise Rejection(Reason.MALFORMED_RECORD, "'id' must be a non-empty string or integer")
    return str(raw)


def _image_path(record: dict[str, Any]) -> str | None:
    image = record.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image.strip():
        raise Rejection(Reason.MALFORMED_RECORD, "'image' must be a non-empty string path when present")
    parts = image.replace("\\", "/").split("/")
    if image.startswith("/") or "://" in image or ".." in parts:
        raise Rejection(Reason.MALFORMED_RECORD, f"'image' must be a path inside the image root, got {image!r}")
    if "\x00" in image:
        raise Rejection(Reason.INVALID_PATH, f"'image' contains a NUL byte: {image!r}")
    encoded = image.encode("utf-8", "surrogatepass")
    longest = max(len(p.encode("utf-8", "surrogatepass")) for p in parts)
    if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise Rejection(Reason.INVALID_PATH, f"'image' path is too long ({len(encoded)} bytes, longest name "
                                             f"{longest}; limits {MAX_PATH_BYTES} and {MAX_NAME_BYTES})")
    return image


def _classify_conversation(conversations: Any) -> None:
    """Raise the most specific :class:`Rejection` for the usual conversation faults."""
    if conversations is None or (isinstance(conversations, list) and not conversations):
        raise Rejection(Reason.EMPTY_CONVERSATION, "'conversations' is missing or empty")
    if not isinstance(conversations, list):
        raise Rejection(Reason.MALFORMED_CONVERSATION, f"'conversations' must be a list, got {type(conversations).__name__}")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or "value" not in turn:
            raise Rejection(Reason.MALFORMED_CONVERSATION, f"turn {i} must be an object with string 'from' and 'value'")
        if turn["from"] not in (HUMAN, GPT):
            raise Rejection(Reason.MALFORMED_CONVERSATION, f"turn {i} has unknown role {turn['from']!r}")
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            raise Rejection(Reason.MALFORMED_CONVERSATION, f"turn {i} has an empty or non-string 'value'")
    for i, turn in enumerate(conversations):
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            raise Rejection(Reason.NON_ALTERNATING_ROLES,
                            f"turn {i} is from {turn['from']!r}, expected {expected!r} (human first, then alternating)")


def check_record(record: Any, seen_ids: set[str] | None = None) -> CheckedRecord:
    """Validate one parsed JSON record; on success its id is added to ``seen_ids`` (when given).

    Raises :class:`Rejection`. With ``seen_ids``, a later record repeating an accepted id is a
    duplicate (the first occurrence wins). The shard job passes none: it decides duplicates
    itself once the images are checked too, so that the first *good* copy of an id wins.
    """
    if not isinstance(record, dict):
        raise Rejection(Reason.MALFORMED_RECORD, f"record must be a JSON object, got {type(record).__name__}")
    sample_id = _sample_id(record)
    image = _image_path(record)
    conversations = record.get("conversations")
    _classify_conversation(conversations)
    tokens = sum(count_image_tokens(turn["value"]) for turn in conversations)
    expected = 0 if image is None else 1
    if tokens != expected:
        field = f"image {image!r}" if image is not None else "no image field"
        raise Rejection(Reason.IMAGE_TOKEN_MISMATCH, f"{tokens} '<image>' tokens with {field} (expected {expected})")
    try:
        validate_conversation(conversations, sample_id)
    except ConversationError as e:
        raise Rejection(Reason.MALFORMED_CONVERSATION, str(e)) from None
    if seen_ids is not None:
        if sample_id in seen_ids:
            raise Rejection(Reason.DUPLICATE_ID, f"id {sample_id!r} already used by an earlier record")
        seen_ids.add(sample_id)
    return CheckedRecord(sample_id=sample_id, image=image)


@dataclass(frozen=True)
class ImageInfo:
    extension: str  # "jpg" | "png" | "webp"
    width: int
    height: int


_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def _has_image_signature(data: bytes) -> bool:
    """Starts like an image file (so a failure to read it means damage, not foreign bytes)."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check that ``data`` is a complete, decodable image of an accepted format and size.

    The size is read from the header before any pixel is decoded, so an oversized image is
    rejected without allocating it. Then every byte of pixel data is decoded, which catches
    truncated or damaged files: PNGs are ``verify()``-ed first (chunk CRCs) and loaded; JPEGs
    are loaded in PIL's draft mode, which still entropy-decodes every coefficient (so damage
    and truncation fail the same way) but skips most of the inverse DCT and colour conversion
    at full size. Raises :class:`Rejection`.
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejection(Reason.IMAGE_TOO_LARGE, str(e)) from None
    except UnidentifiedImageError:
        if _has_image_signature(data):
            raise Rejection(Reason.UNREADABLE_IMAGE, f"image signature but unreadable header ({len(data)} bytes)") from None
        raise Rejection(Reason.NOT_AN_IMAGE, f"{len(data)} bytes that no image decoder recognises") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejection(Reason.UNREADABLE_IMAGE, f"cannot read the image header: {e}") from None
    with im:
        fmt, (width, height) = im.format, im.size
        if fmt not in IMAGE_EXTENSIONS:
            raise Rejection(Reason.UNSUPPORTED_IMAGE_FORMAT, f"format {fmt} (accepted: {', '.join(IMAGE_EXTENSIONS)})")
        if width * height > max_pixels:
            raise Rejection(Reason.IMAGE_TOO_LARGE, f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
        try:
            if fmt == "PNG":
                im.verify()
                with Image.open(io.BytesIO(data)) as again:
                    again.load()
            else:
                if fmt in ("JPEG", "MPO"):
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise Rejection(Reason.UNREADABLE_IMAGE, f"{fmt} image fails to decode: {e}") from None
    return ImageInfo(extension=IMAGE_EXTENSIONS[fmt], width=width, height=height)


def read_image(images: "str | RootReader", relative: str) -> bytes:
    """The bytes of a record's image under the image root; every way the path can fail becomes
    a :class:`Rejection` (never an exception that would abort the job): missing, a link out of
    the root, a folder or other non-file, a name the filesystem refuses, no permission."""
    from mocha.io import storage

    reader = storage.RootReader(images) if isinstance(images, str) else images
    try:
        return reader.read(relative)
    except storage.OutsideRootError as e:
        raise Rejection(Reason.OUTSIDE_ROOT, str(e)) from None
    except FileNotFoundError:
        raise Rejection(Reason.MISSING_IMAGE, f"no file {relative!r} under the image root") from None
    except (IsADirectoryError, NotADirectoryError) as e:
        raise Rejection(Reason.NOT_A_FILE, f"{relative!r} is not a regular file ({e.strerror or e})") from None
    except PermissionError as e:
        raise Rejection(Reason.UNREADABLE_FILE, f"{relative!r}: permission denied ({e.strerror or e})") from None
    except ValueError as e:  # "embedded null byte" and other names the OS cannot take
        raise Rejection(Reason.INVALID_PATH, f"{relative!r}: {e}") from None
    except OSError as e:
        if e.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.ELOOP):
            raise Rejection(Reason.INVALID_PATH, f"{relative!r}: {e.strerror or e}") from None
        raise Rejection(Reason.UNREADABLE_FILE, f"{relative!r}: {e}") from None
