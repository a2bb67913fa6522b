""".pt files that AUTOMATIC1111's web UI agrees to open, written as pure bytes.

A1111 checks every .pt before unpickling it (modules/safe.py): each zip member must be one of
`<dir>/data.pkl`, `<dir>/data/<N>`, `<dir>/version` (releases since 1.7 also allow `byteorder` and
`.data/serialization_id`), and the pickle may name only a short list of globals (OrderedDict, torch's
`_rebuild_tensor_v2`, the typed storages such as FloatStorage, ...). Today's torch.save also writes
`.format_version` and `.storage_alignment`, so A1111 refuses what torch.save makes as possibly malicious.

Here torch's own pickler writes data.pkl and the storages (protocol 2, torch's persistent-id scheme, so any
torch.load reads the result), and the zip is rebuilt with only the members every A1111 release allows:
stored, not compressed, each record's bytes 64-aligned as torch aligns them (torch.load(mmap=True) needs it),
with fixed timestamps so the same object always gives the same bytes. The byte-order record is left out on
little-endian machines (torch reads a file without it as little-endian) and kept on big-endian ones.
"""

from __future__ import annotations

import io
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

ARCHIVE = "archive"  # the folder name torch.save uses for buffers; A1111 accepts any single folder name
# Members kept from torch.save's zip (the part after the folder name); every A1111 release allows these.
KEPT_RECORD = re.compile(r"^(data\.pkl|data/\d+|version)$" if sys.byteorder == "little"
                         else r"^(data\.pkl|data/\d+|version|byteorder)$")
ALIGNMENT = 64  # torch's record alignment
PADDING_FIELD = b"FB"  # the zip extra-field id torch pads records with
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: no clock in the bytes


def write_pt(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` atomically at `path` as `pt_bytes` makes it."""
    from ..artifacts import atomic_write_via

    data = pt_bytes(obj)
    return atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def pt_bytes(obj: Any) -> bytes:
    """`obj` as a torch zip that torch.load and A1111's safety check both accept."""
    saved = io.BytesIO()
    torch.save(obj, saved)
    records = []
    with zipfile.ZipFile(saved) as source:
        for info in source.infolist():
            record = info.filename.split("/", 1)[1]
            if KEPT_RECORD.match(record):
                records.append((record, source.read(info)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for record, data in records:  # torch's order: data.pkl, the storages by number, version
            name = f"{ARCHIVE}/{record}"
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.extra = _padding(out.tell(), name)
            target.writestr(info, data)
    return out.getvalue()


def _padding(offset: int, name: str) -> bytes:
    """An extra field that puts the record's data, after its 30-byte local header, on an ALIGNMENT boundary."""
    header_end = offset + 30 + len(name.encode()) + 4  # +4: the extra field's own id and length
    pad = -header_end % ALIGNMENT
    return PADDING_FIELD + pad.to_bytes(2, "little") + b"Z" * pad
