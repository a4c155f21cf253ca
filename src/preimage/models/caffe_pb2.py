"""Caffe's protobuf messages, built at import time from the schema in ``caffe.proto``.

No ``protoc`` is needed to install or use preimage: :data:`PROTO_SOURCE` is the text of
``preimage/models/caffe.proto`` (shipped as package data), and
:func:`build_file_descriptor` turns it into a ``FileDescriptorProto`` with a small parser for the
proto2 subset the file uses -- top-level and nested ``message``/``enum`` blocks, ``optional`` and
``repeated`` fields of scalar, enum and message types, and the ``default`` and ``packed`` field
options.  The descriptor goes into a private :class:`~google.protobuf.descriptor_pool.DescriptorPool`
(so it can never clash with another ``caffe.proto`` loaded in the same process) and the message
classes are made with ``message_factory.GetMessageClass``.  They behave like the classes ``protoc``
would generate: ``NetParameter()``, ``ParseFromString``, ``text_format.Parse(text, NetParameter())``,
``SerializeToString`` ...

Exported classes: ``BlobShape``, ``BlobProto``, ``BlobProtoVector``, ``NetParameter``,
``LayerParameter``, ``V1LayerParameter`` and every other top-level message of the schema
(see :data:`MESSAGES`).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

__all__ = [
    "MESSAGES",
    "PROTO_SOURCE",
    "BlobProto",
    "BlobProtoVector",
    "BlobShape",
    "LayerParameter",
    "NetParameter",
    "V1LayerParameter",
    "build_file_descriptor",
]

PROTO_SOURCE = (resources.files(__package__) / "caffe.proto").read_text(encoding="utf-8")
"""The schema, read from ``caffe.proto`` shipped beside this module (package data)."""

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS: dict[str, int] = {
    "double": _FDP.TYPE_DOUBLE,
    "float": _FDP.TYPE_FLOAT,
    "int64": _FDP.TYPE_INT64,
    "uint64": _FDP.TYPE_UINT64,
    "int32": _FDP.TYPE_INT32,
    "uint32": _FDP.TYPE_UINT32,
    "bool": _FDP.TYPE_BOOL,
    "string": _FDP.TYPE_STRING,
    "bytes": _FDP.TYPE_BYTES,
}
_LABELS = {"optional": _FDP.LABEL_OPTIONAL, "repeated": _FDP.LABEL_REPEATED, "required": _FDP.LABEL_REQUIRED}
_TOKEN = re.compile(r'\s*(?:(//[^\n]*)|("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|([A-Za-z_][A-Za-z0-9_.]*)'
                    r"|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|([{}\[\]=;,]))")


class ProtoSyntaxError(ValueError):
    """The embedded schema is outside the supported proto2 subset (a bug in preimage)."""


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos, text = 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ProtoSyntaxError(f"caffe.proto: cannot tokenize at {text[pos:pos + 30]!r}")
        pos = m.end()
        if m.group(1) is None:  # skip comments
            out.append(m.group(0).strip())
    return out


class _Parser:
    """Recursive-descent parser producing a FileDescriptorProto (type names resolved afterwards)."""

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0
        # (field proto, scope of the message that declares it, type name as written)
        self.pending: list[tuple[Any, str, str]] = []
        self.kinds: dict[str, int] = {}  # fully qualified name -> TYPE_MESSAGE / TYPE_ENUM

    def peek(self) -> str:
        return self.toks[self.i] if self.i < len(self.toks) else ""

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok == "" or (expected is not None and tok != expected):
            raise ProtoSyntaxError(f"caffe.proto: expected {expected or 'a token'!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> Any:
        fdp = descriptor_pb2.FileDescriptorProto(name="preimage/models/caffe.proto", syntax="proto2")
        package = ""
        while self.peek():
            tok = self.take()
            if tok == "syntax":
                self.take("=")
                if self.take().strip("\"'") != "proto2":
                    raise ProtoSyntaxError("caffe.proto: only proto2 is supported")
                self.take(";")
            elif tok == "package":
                package = self.take()
                fdp.package = package
                self.take(";")
            elif tok == "message":
                self.message(fdp.message_type.add(), package)
            elif tok == "enum":
                self.enum(fdp.enum_type.add(), package)
            else:
                raise ProtoSyntaxError(f"caffe.proto: unexpected {tok!r} at top level")
        self.resolve()
        return fdp

    def enum(self, proto: Any, scope: str) -> None:
        proto.name = self.take()
        self.kinds[f"{scope}.{proto.name}"] = _FDP.TYPE_ENUM
        self.take("{")
        while self.peek() != "}":
            value = proto.value.add(name=self.take())
            self.take("=")
            value.number = int(self.take())
            self.take(";")
        self.take("}")

    def message(self, proto: Any, scope: str) -> None:
        proto.name = self.take()
        full = f"{scope}.{proto.name}"
        self.kinds[full] = _FDP.TYPE_MESSAGE
        self.take("{")
        while self.peek() != "}":
            tok = self.take()
            if tok == "message":
                self.message(proto.nested_type.add(), full)
            elif tok == "enum":
                self.enum(proto.enum_type.add(), full)
            elif tok in _LABELS:
                self.field(proto.field.add(label=_LABELS[tok]), full)
            else:
                raise ProtoSyntaxError(f"caffe.proto: unexpected {tok!r} in message {full}")
        self.take("}")

    def field(self, proto: Any, scope: str) -> None:
        type_name = self.take()
        proto.name = self.take()
        proto.json_name = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), proto.name)
        self.take("=")
        proto.number = int(self.take())
        if self.peek() == "[":
            self.take("[")
            while True:
                key = self.take()
                self.take("=")
                value = self.take()
                if key == "default":
                    proto.default_value = value[1:-1] if value[:1] in "\"'" else value
                elif key == "packed":
                    proto.options.packed = value == "true"
                else:
                    raise ProtoSyntaxError(f"caffe.proto: unsupported field option {key!r}")
                if self.peek() == ",":
                    self.take(",")
                    continue
                self.take("]")
                break
        self.take(";")
        if type_name in _SCALARS:
            proto.type = _SCALARS[type_name]
        else:
            self.pending.append((proto, scope, type_name))

    def resolve(self) -> None:
        """Resolve message/enum type names with protobuf's scoping rule (innermost scope first)."""
        for proto, scope, name in self.pending:
            parts = scope.split(".")
            for depth in range(len(parts), -1, -1):
                candidate = ".".join(parts[:depth] + [name])
                if candidate in self.kinds:
                    proto.type = self.kinds[candidate]
                    proto.type_name = "." + candidate
                    break
            else:
                raise ProtoSyntaxError(f"caffe.proto: unknown type {name!r} in {scope}")


def build_file_descriptor(source: str = PROTO_SOURCE) -> Any:
    """Parse proto2 ``source`` (the supported subset) into a ``FileDescriptorProto``."""
    return _Parser(source).parse()


def _message_classes() -> dict[str, type[Message]]:
    fdp = build_file_descriptor()
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    file_desc = pool.FindFileByName(fdp.name)
    get = getattr(message_factory, "GetMessageClass", None)
    if get is None:  # protobuf < 4.22
        factory = message_factory.MessageFactory(pool)
        get = factory.GetPrototype
    return {name: get(desc) for name, desc in file_desc.message_types_by_name.items()}


MESSAGES: dict[str, type[Message]] = _message_classes()
"""Every top-level message class of the schema, by name."""

BlobShape: Any = MESSAGES["BlobShape"]
BlobProto: Any = MESSAGES["BlobProto"]
BlobProtoVector: Any = MESSAGES["BlobProtoVector"]
NetParameter: Any = MESSAGES["NetParameter"]
LayerParameter: Any = MESSAGES["LayerParameter"]
V1LayerParameter: Any = MESSAGES["V1LayerParameter"]


def __getattr__(name: str) -> type[Message]:
    try:
        return MESSAGES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
