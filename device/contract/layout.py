"""One framework for every fixed little-endian record of the card: descriptors and command structures.

A ``Layout`` is declared once as a list of ``(name, struct format, description[, const[, count]])``
tuples. From it come the packing code (one precompiled ``struct.Struct``), in-place access to single
fields (descriptors in a DMA-mapped ring), the wire dataclass (``wire_class``) and the datasheet rows,
so none of them can drift from the others.

* ``const`` fields (NDIS object headers, reserved fields) are written on pack and checked on unpack;
  they are not dataclass fields. ``SIZE`` stands for the size of the structure being declared.
* a field's format may be another ``Layout`` (nested structure), repeated ``count`` times.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from device.contract.status import NdisStatus

SIZE = "SIZE"  # const placeholder: the size of the fixed part of the structure being defined
_TYPE_NAMES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "h": "s16", "i": "s32"}


class ParseError(ValueError):
    """A payload does not match its layout. ``status`` is the NDIS status to complete the command with."""

    def __init__(self, message: str, status: NdisStatus = NdisStatus.INVALID_DATA) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    fmt: Any  # struct format ("I", "16s", ...) or a nested Layout
    desc: str
    const: Any = None  # value written on pack and required on unpack (not a dataclass field)
    count: int = 1  # nested Layout repeated count times (value is a tuple when count > 1)
    offset: int = 0
    field_struct: struct.Struct | None = None  # scalar fields: reads/writes just this field in place

    @property
    def size(self) -> int:
        if isinstance(self.fmt, Layout):
            return self.fmt.size * self.count
        return struct.calcsize("<" + self.fmt)

    @property
    def type_name(self) -> str:
        if isinstance(self.fmt, Layout):
            return self.fmt.name + (f"[{self.count}]" if self.count > 1 else "")
        return f"u8[{self.fmt[:-1]}]" if self.fmt.endswith("s") else _TYPE_NAMES[self.fmt]


class Layout:
    """A fixed-size little-endian structure: fields -> struct.Struct, pack/unpack, in-place access, doc rows."""

    def __init__(self, name: str, ndis: str, fields_: Sequence[tuple], doc: str = "", size: int | None = None) -> None:
        self.name = name
        self.ndis = ndis  # the NDIS structure it mirrors ("" = beyond NDIS)
        self.doc = doc
        self.cls: type | None = None  # the wire dataclass, set by wire_class()
        built: list[Field] = []
        offset = 0
        for spec in fields_:
            f = Field(*spec)
            scalar = None if isinstance(f.fmt, Layout) else struct.Struct("<" + f.fmt)
            f = dataclasses.replace(f, offset=offset, field_struct=scalar)
            built.append(f)
            offset += f.size
        self.fields = tuple(built)
        self.by_name = {f.name: f for f in built}
        self.struct = struct.Struct("<" + "".join(
            f.fmt.struct.format.lstrip("<") * f.count if isinstance(f.fmt, Layout) else f.fmt for f in built))
        self.size = self.struct.size
        if size is not None and size != self.size:
            raise AssertionError(f"{name}: fields cover {self.size} bytes, declared size {size}")
        self.value_names = tuple(f.name for f in built if f.const is None)
        # Descriptors are flat (no consts, no nesting): they pack and unpack straight through the struct.
        self._flat = all(f.const is None and not isinstance(f.fmt, Layout) for f in built)

    # -- whole records
    def pack(self, obj: Any = None, /, **values: Any) -> bytes:
        """Encode a wire object, or (descriptors) the named field values, missing ones 0."""
        if obj is None:
            unknown = set(values) - set(self.value_names)
            if unknown:
                raise TypeError(f"{self.name} has no field(s) {sorted(unknown)}")
            if self._flat:
                return self.struct.pack(*(values.get(n, 0) for n in self.value_names))
            assert self.cls is not None
            obj = self.cls(**values)
        flat: list[Any] = []
        self._encode(obj, flat)
        try:
            return self.struct.pack(*flat)
        except struct.error as exc:
            raise ValueError(f"{self.name}: {exc}") from None

    def unpack_from(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> Any:
        if offset < 0 or len(buf) - offset < self.size:
            raise ParseError(f"{self.name}: need {self.size} bytes at offset {offset}, buffer has {len(buf)}",
                             NdisStatus.INVALID_LENGTH)
        assert self.cls is not None
        if self._flat:
            return self.cls(*self.struct.unpack_from(buf, offset))
        return self.cls(*self._decode(iter(self.struct.unpack_from(buf, offset)), self.name))

    unpack = unpack_from

    def unpack_exact(self, buf: bytes | bytearray | memoryview) -> Any:
        if len(buf) != self.size:
            raise ParseError(f"{self.name}: expected {self.size} bytes, got {len(buf)}", NdisStatus.INVALID_LENGTH)
        return self.unpack_from(buf)

    def _decode(self, flat: Iterator[Any], where: str) -> list[Any]:
        out: list[Any] = []
        for f in self.fields:
            if isinstance(f.fmt, Layout):
                sub = f.fmt
                assert sub.cls is not None
                items = tuple(sub.cls(*sub._decode(flat, f"{where}.{f.name}")) for _ in range(f.count))
                out.append(items if f.count > 1 else items[0])
                continue
            value = next(flat)
            if f.const is not None:
                expected = self.size if f.const == SIZE else f.const
                if value != expected:
                    raise ParseError(f"{where}.{f.name} must be {expected:#x}, got {value:#x}")
                continue
            out.append(value)
        return out

    def _encode(self, obj: Any, flat: list[Any]) -> None:
        for f in self.fields:
            if isinstance(f.fmt, Layout):
                value = getattr(obj, f.name)
                items = value if f.count > 1 else (value,)
                if len(items) != f.count:
                    raise ValueError(f"{self.name}.{f.name} needs {f.count} entries, got {len(items)}")
                for item in items:
                    f.fmt._encode(item, flat)
            elif f.const is not None:
                flat.append(self.size if f.const == SIZE else f.const)
            else:
                value = getattr(obj, f.name)
                if f.fmt.endswith("s") and len(value) > int(f.fmt[:-1]):
                    raise ValueError(f"{self.name}.{f.name} holds at most {f.fmt[:-1]} bytes")
                flat.append(value)

    # -- single fields in place (descriptor rings)
    def offset_of(self, name: str) -> int:
        return self.by_name[name].offset

    def get(self, buf: bytes | bytearray | memoryview, base: int, name: str) -> int:
        f = self.by_name[name]
        assert f.field_struct is not None
        return f.field_struct.unpack_from(buf, base + f.offset)[0]

    def set(self, buf: bytearray | memoryview, base: int, name: str, value: int) -> None:
        f = self.by_name[name]
        assert f.field_struct is not None
        f.field_struct.pack_into(buf, base + f.offset, value)

    # -- documentation
    def rows(self) -> list[tuple[int, int, str, str, str]]:
        """(offset, size, name, type, description) for each field, for the datasheet."""
        rows = []
        for f in self.fields:
            desc = f.desc
            if f.const is not None:
                desc = f"{desc} (must be {(self.size if f.const == SIZE else f.const):#x})"
            rows.append((f.offset, f.size, f.name, f.type_name, desc))
        return rows

    def markdown(self) -> str:
        head = f"**{self.name}**" + (f" (mirrors `{self.ndis}`)" if self.ndis else "") + f", {self.size} bytes"
        lines = [head, "", "| offset | size | field | type | description |", "|---|---|---|---|---|"]
        lines += [f"| {o:#06x} | {s} | {n} | {t} | {d} |" for o, s, n, t, d in self.rows()]
        return "\n".join(lines)


class Wire:
    """Base of the generated wire dataclasses: ``obj.pack()`` and ``Cls.unpack(buf)`` through the layout."""

    LAYOUT: ClassVar[Layout]

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Any:
        return cls.LAYOUT.unpack_exact(buf)


def _default(f: Field) -> Any:
    if isinstance(f.fmt, Layout):
        assert f.fmt.cls is not None, f"{f.fmt.name} needs its wire class before {f.name}"
        one = f.fmt.cls()
        return tuple(one for _ in range(f.count)) if f.count > 1 else one
    return b"" if f.fmt.endswith("s") else 0


def wire_class(layout: Layout, name: str, *, frozen: bool = True, extra: Sequence[tuple] = (),
               methods: dict[str, Any] | None = None, module: str = "device.contract.ndis") -> type:
    """The dataclass of ``layout``: its value fields in order (all defaulted), then ``extra`` fields
    (``(name, type, dataclasses.field(...))``, e.g. key material that follows the fixed part)."""
    spec: list[tuple] = [(n, Any, dataclasses.field(default=_default(layout.by_name[n])))
                         for n in layout.value_names]
    spec += list(extra)
    namespace = {"LAYOUT": layout, **(methods or {})}
    cls = dataclasses.make_dataclass(name, spec, bases=(Wire,), frozen=frozen, namespace=namespace)
    cls.__module__ = module
    layout.cls = cls
    return cls
