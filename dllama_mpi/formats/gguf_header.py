"""The GGUF header reader: key/values and tensor table of a little-endian GGUF v2/v3 file.

The one GGUF metadata parser of the package: GGUFModel (gguf.py) opens model files with it, the
tokenizer reads GGUF vocabularies through it (the header a GGUFModel parsed, or its own parse of
a path). It imports nothing else from the package, so the tokenizer may use it without
depending on the model readers.
"""
from __future__ import annotations

import math

import numpy as np

# value type -> struct format of the scalar types (GGUF v2/v3, little-endian)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _LazyArray:
    """A metadata array not read yet: element type, count and where its elements start."""

    __slots__ = ("itype", "count", "pos")

    def __init__(self, itype: int, count: int, pos: int):
        self.itype, self.count, self.pos = itype, count, pos


class UnsupportedGGUF(ValueError):
    """A GGUF this reader does not parse (another version, big-endian, an unknown value type)
    but the `gguf` package may."""


class GGUFHeader:
    """The key/values and the tensor table of a little-endian GGUF v2/v3 file: the one GGUF
    metadata parser of the package (the tokenizer reads its vocabulary through it).

    `fields`: key -> int/float/bool/str, or a _LazyArray (arrays are skipped, and read by
    `value()` when asked for). `tensors`: (name, GGML type name, dims innermost first,
    absolute data offset, bytes) in file order; empty with `metadata_only`. String values
    with invalid UTF-8 are a damaged header with `errors="strict"`, decoded with U+FFFD with
    "replace" (string arrays -- vocabularies -- always are). Raises ValueError on a damaged
    header, UnsupportedGGUF on one of another kind."""

    def __init__(self, path: str, *, metadata_only: bool = False, errors: str = "strict"):
        import mmap
        import struct
        self.errors = errors
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ValueError(f"not a GGUF file (magic {magic!r})")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    self._parse(buf, struct, metadata_only)
                except (struct.error, IndexError, UnicodeDecodeError) as e:
                    raise ValueError(f"header runs past the end of the file or is corrupt ({e})") \
                        from None
                finally:
                    buf.release()
        self.path = path

    def _parse(self, buf, struct, metadata_only: bool) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        u32, u64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from
        size = len(buf)
        (self.version,) = u32(buf, 4)
        if self.version not in (2, 3):
            raise UnsupportedGGUF(f"GGUF version {self.version} (only 2 and 3, little-endian)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def string(pos):
            (n,) = u64(buf, pos)
            if pos + 8 + n > size:
                raise IndexError("a string runs past the end of the file")
            return str(buf[pos + 8:pos + 8 + n], "utf-8", self.errors), pos + 8 + n

        def skip(vtype, pos, count=1):
            if vtype == _STRING:
                for _ in range(count):
                    pos += 8 + u64(buf, pos)[0]
                return pos
            if vtype == _ARRAY:
                for _ in range(count):
                    itype, n = u32(buf, pos)[0], u64(buf, pos + 4)[0]
                    pos = skip(itype, pos + 12, n)
                return pos
            if vtype not in _SCALARS:
                raise UnsupportedGGUF(f"unknown metadata value type {vtype}")
            return pos + count * struct.calcsize(_SCALARS[vtype])

        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = u32(buf, pos)
            pos += 4
            if vtype == _STRING:
                self.fields[key], pos = string(pos)
            elif vtype == _ARRAY:
                itype, n = u32(buf, pos)[0], u64(buf, pos + 4)[0]
                self.fields[key] = _LazyArray(itype, n, pos + 12)
                pos = skip(itype, pos + 12, n)
            elif vtype in _SCALARS:
                (self.fields[key],) = struct.unpack_from(_SCALARS[vtype], buf, pos)
                pos = skip(vtype, pos)
            else:
                raise UnsupportedGGUF(f"unknown metadata value type {vtype} for {key}")
            if pos > size:
                raise IndexError(f"metadata {key} runs past the end of the file")
        self.tensors = []
        if metadata_only:
            return
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = u32(buf, pos)
            if n_dims > 4:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, ttype, dims, offset))
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"bad general.alignment {align!r}")
        self.data_offset = pos + (-pos) % align
        seen = set()
        for name, ttype, dims, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise ValueError(f"tensor {name} has unknown type {ttype}") from None
            values, nbytes = GGML_QUANT_SIZES[qtype]
            n = math.prod(dims)             # Python ints: corrupt dimensions cannot wrap
            if n % values or (dims and dims[0] % values):
                raise ValueError(f"tensor {name} has dimensions {list(dims)}, not whole "
                                 f"blocks of {values} for type {qtype.name}")
            if n // values * nbytes > size:
                raise ValueError(f"tensor {name} has dimensions {list(dims)}: "
                                 f"{n // values * nbytes} bytes, more than the whole file")
            self.tensors.append((name, qtype.name, tuple(int(d) for d in dims),
                                 self.data_offset + offset, n // values * nbytes))

    def value(self, key: str, default=None):
        """A metadata value as a Python object (arrays as lists), or `default`."""
        v = self.fields.get(key, default)
        if not isinstance(v, _LazyArray):
            return v
        import struct
        with open(self.path, "rb") as f:
            f.seek(v.pos)
            if v.itype in _SCALARS:
                dt = np.dtype(_SCALARS[v.itype])
                return np.frombuffer(f.read(v.count * dt.itemsize), dt).tolist()
            if v.itype != _STRING:
                raise ValueError(f"{key}: arrays of arrays are not read")
            out = []
            for _ in range(v.count):
                (n,) = struct.unpack("<Q", f.read(8))
                out.append(f.read(n).decode("utf-8", "replace"))
            return out
