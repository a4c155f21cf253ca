"""Caffe's protobuf messages, built at import time from the schema in ``caffe.proto``.

No ``protoc`` is needed to install or use preimage: :data:`PROTO_SOURCE` is a verbatim copy of
``preimage/models/caffe.proto`` (``tests/test_caffe.py`` checks that the two agree), and
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

PROTO_SOURCE = r"""// The subset of Caffe's schema (BVLC/caffe src/caffe/proto/caffe.proto) that preimage needs to
// read deploy prototxts and .caffemodel / .binaryproto files.  Message names, field names, field
// numbers, types and defaults are Caffe's own, so that files written by Caffe parse unchanged;
// fields that only matter for training (solver, data sources, ...) are left out.
//
// preimage does not run protoc on this file: preimage/models/caffe_pb2.py embeds this text and
// builds the message classes at import time with a small parser for the proto2 subset used here
// (messages, nested enums, optional/repeated fields, [default = ...] and [packed = true]).
// tests/test_caffe.py checks that the embedded copy equals this file.

syntax = "proto2";

package caffe;

message BlobShape {
  repeated int64 dim = 1 [packed = true];
}

message BlobProto {
  optional BlobShape shape = 7;
  repeated float data = 5 [packed = true];
  repeated float diff = 6 [packed = true];
  repeated double double_data = 8 [packed = true];
  repeated double double_diff = 9 [packed = true];
  // 4D dimensions -- deprecated.  Use "shape" instead.
  optional int32 num = 1 [default = 0];
  optional int32 channels = 2 [default = 0];
  optional int32 height = 3 [default = 0];
  optional int32 width = 4 [default = 0];
}

message BlobProtoVector {
  repeated BlobProto blobs = 1;
}

message FillerParameter {
  optional string type = 1 [default = "constant"];
  optional float value = 2 [default = 0];
  optional float min = 3 [default = 0];
  optional float max = 4 [default = 1];
  optional float mean = 5 [default = 0];
  optional float std = 6 [default = 1];
  optional int32 sparse = 7 [default = -1];
  enum VarianceNorm {
    FAN_IN = 0;
    FAN_OUT = 1;
    AVERAGE = 2;
  }
  optional VarianceNorm variance_norm = 8 [default = FAN_IN];
}

message NetParameter {
  optional string name = 1;
  repeated string input = 3;
  repeated BlobShape input_shape = 8;
  repeated int32 input_dim = 4;
  optional bool force_backward = 5 [default = false];
  optional NetState state = 6;
  optional bool debug_info = 7 [default = false];
  repeated LayerParameter layer = 100;
  repeated V1LayerParameter layers = 2;
}

enum Phase {
  TRAIN = 0;
  TEST = 1;
}

message NetState {
  optional Phase phase = 1 [default = TEST];
  optional int32 level = 2 [default = 0];
  repeated string stage = 3;
}

message NetStateRule {
  optional Phase phase = 1;
  optional int32 min_level = 2;
  optional int32 max_level = 3;
  repeated string stage = 4;
  repeated string not_stage = 5;
}

message ParamSpec {
  optional string name = 1;
  optional DimCheckMode share_mode = 2;
  enum DimCheckMode {
    STRICT = 0;
    PERMISSIVE = 1;
  }
  optional float lr_mult = 3 [default = 1.0];
  optional float decay_mult = 4 [default = 1.0];
}

message LayerParameter {
  optional string name = 1;
  optional string type = 2;
  repeated string bottom = 3;
  repeated string top = 4;
  optional Phase phase = 10;
  repeated float loss_weight = 5;
  repeated ParamSpec param = 6;
  repeated BlobProto blobs = 7;
  repeated bool propagate_down = 11;
  repeated NetStateRule include = 8;
  repeated NetStateRule exclude = 9;
  optional TransformationParameter transform_param = 100;
  optional LossParameter loss_param = 101;
  optional AccuracyParameter accuracy_param = 102;
  optional ArgMaxParameter argmax_param = 103;
  optional BatchNormParameter batch_norm_param = 139;
  optional BiasParameter bias_param = 141;
  optional ConcatParameter concat_param = 104;
  optional ConvolutionParameter convolution_param = 106;
  optional DropoutParameter dropout_param = 108;
  optional EltwiseParameter eltwise_param = 110;
  optional FlattenParameter flatten_param = 135;
  optional InnerProductParameter inner_product_param = 117;
  optional InputParameter input_param = 143;
  optional LRNParameter lrn_param = 118;
  optional PoolingParameter pooling_param = 121;
  optional PowerParameter power_param = 122;
  optional ReLUParameter relu_param = 123;
  optional ScaleParameter scale_param = 142;
  optional SigmoidParameter sigmoid_param = 124;
  optional SoftmaxParameter softmax_param = 125;
  optional TanHParameter tanh_param = 127;
}

message TransformationParameter {
  optional float scale = 1 [default = 1];
  optional bool mirror = 2 [default = false];
  optional uint32 crop_size = 3 [default = 0];
  optional string mean_file = 4;
  repeated float mean_value = 5;
  optional bool force_color = 6 [default = false];
  optional bool force_gray = 7 [default = false];
}

message LossParameter {
  optional int32 ignore_label = 1;
  enum NormalizationMode {
    FULL = 0;
    VALID = 1;
    BATCH_SIZE = 2;
    NONE = 3;
  }
  optional NormalizationMode normalization = 3 [default = VALID];
  optional bool normalize = 2;
}

message AccuracyParameter {
  optional uint32 top_k = 1 [default = 1];
  optional int32 axis = 2 [default = 1];
  optional int32 ignore_label = 3;
}

message ArgMaxParameter {
  optional bool out_max_val = 1 [default = false];
  optional uint32 top_k = 2 [default = 1];
  optional int32 axis = 3;
}

message ConcatParameter {
  optional int32 axis = 2 [default = 1];
  optional uint32 concat_dim = 1 [default = 1];
}

message BatchNormParameter {
  optional bool use_global_stats = 1;
  optional float moving_average_fraction = 2 [default = 0.999];
  optional float eps = 3 [default = 1e-5];
}

message BiasParameter {
  optional int32 axis = 1 [default = 1];
  optional int32 num_axes = 2 [default = 1];
  optional FillerParameter filler = 3;
}

message ConvolutionParameter {
  optional uint32 num_output = 1;
  optional bool bias_term = 2 [default = true];
  repeated uint32 pad = 3;
  repeated uint32 kernel_size = 4;
  repeated uint32 stride = 6;
  repeated uint32 dilation = 18;
  optional uint32 pad_h = 9 [default = 0];
  optional uint32 pad_w = 10 [default = 0];
  optional uint32 kernel_h = 11;
  optional uint32 kernel_w = 12;
  optional uint32 stride_h = 13;
  optional uint32 stride_w = 14;
  optional uint32 group = 5 [default = 1];
  optional FillerParameter weight_filler = 7;
  optional FillerParameter bias_filler = 8;
  enum Engine {
    DEFAULT = 0;
    CAFFE = 1;
    CUDNN = 2;
  }
  optional Engine engine = 15 [default = DEFAULT];
  optional int32 axis = 16 [default = 1];
  optional bool force_nd_im2col = 17 [default = false];
}

message DropoutParameter {
  optional float dropout_ratio = 1 [default = 0.5];
}

message EltwiseParameter {
  enum EltwiseOp {
    PROD = 0;
    SUM = 1;
    MAX = 2;
  }
  optional EltwiseOp operation = 1 [default = SUM];
  repeated float coeff = 2;
  optional bool stable_prod_grad = 3 [default = true];
}

message FlattenParameter {
  optional int32 axis = 1 [default = 1];
  optional int32 end_axis = 2 [default = -1];
}

message InnerProductParameter {
  optional uint32 num_output = 1;
  optional bool bias_term = 2 [default = true];
  optional FillerParameter weight_filler = 3;
  optional FillerParameter bias_filler = 4;
  optional int32 axis = 5 [default = 1];
  optional bool transpose = 6 [default = false];
}

message InputParameter {
  repeated BlobShape shape = 1;
}

message LRNParameter {
  optional uint32 local_size = 1 [default = 5];
  optional float alpha = 2 [default = 1.0];
  optional float beta = 3 [default = 0.75];
  enum NormRegion {
    ACROSS_CHANNELS = 0;
    WITHIN_CHANNEL = 1;
  }
  optional NormRegion norm_region = 4 [default = ACROSS_CHANNELS];
  optional float k = 5 [default = 1.0];
  enum Engine {
    DEFAULT = 0;
    CAFFE = 1;
    CUDNN = 2;
  }
  optional Engine engine = 6 [default = DEFAULT];
}

message PoolingParameter {
  enum PoolMethod {
    MAX = 0;
    AVE = 1;
    STOCHASTIC = 2;
  }
  optional PoolMethod pool = 1 [default = MAX];
  optional uint32 pad = 4 [default = 0];
  optional uint32 pad_h = 9 [default = 0];
  optional uint32 pad_w = 10 [default = 0];
  optional uint32 kernel_size = 2;
  optional uint32 kernel_h = 5;
  optional uint32 kernel_w = 6;
  optional uint32 stride = 3 [default = 1];
  optional uint32 stride_h = 7;
  optional uint32 stride_w = 8;
  enum Engine {
    DEFAULT = 0;
    CAFFE = 1;
    CUDNN = 2;
  }
  optional Engine engine = 11 [default = DEFAULT];
  optional bool global_pooling = 12 [default = false];
  enum RoundMode {
    CEIL = 0;
    FLOOR = 1;
  }
  optional RoundMode round_mode = 13 [default = CEIL];
}

message PowerParameter {
  optional float power = 1 [default = 1.0];
  optional float scale = 2 [default = 1.0];
  optional float shift = 3 [default = 0.0];
}

message ReLUParameter {
  optional float negative_slope = 1 [default = 0];
  enum Engine {
    DEFAULT = 0;
    CAFFE = 1;
    CUDNN = 2;
  }
  optional Engine engine = 2 [default = DEFAULT];
}

message ScaleParameter {
  optional int32 axis = 1 [default = 1];
  optional int32 num_axes = 2 [default = 1];
  optional FillerParameter filler = 3;
  optional bool bias_term = 4 [default = false];
  optional FillerParameter bias_filler = 5;
}

message SigmoidParameter {
  enum Engine {
    DEFAULT = 0;
    CAFFE = 1;
    CUDNN = 2;
  }
  optional Engine engine = 1 [default = DEFAULT];
}

message SoftmaxParameter {
  enum Engine {
    DEFAULT = 0;
    CAFFE = 1;
    CUDNN = 2;
  }
  optional Engine engine = 1 [default = DEFAULT];
  optional int32 axis = 2 [default = 1];
}

message TanHParameter {
  enum Engine {
    DEFAULT = 0;
    CAFFE = 1;
    CUDNN = 2;
  }
  optional Engine engine = 1 [default = DEFAULT];
}

// DEPRECATED in Caffe (the old "layers { ... }" syntax), still found in old .caffemodel files.
message V1LayerParameter {
  repeated string bottom = 2;
  repeated string top = 3;
  optional string name = 4;
  repeated NetStateRule include = 32;
  repeated NetStateRule exclude = 33;
  enum LayerType {
    NONE = 0;
    ABSVAL = 35;
    ACCURACY = 1;
    ARGMAX = 30;
    BNLL = 2;
    CONCAT = 3;
    CONTRASTIVE_LOSS = 37;
    CONVOLUTION = 4;
    DATA = 5;
    DECONVOLUTION = 39;
    DROPOUT = 6;
    DUMMY_DATA = 32;
    EUCLIDEAN_LOSS = 7;
    ELTWISE = 25;
    EXP = 38;
    FLATTEN = 8;
    HDF5_DATA = 9;
    HDF5_OUTPUT = 10;
    HINGE_LOSS = 28;
    IM2COL = 11;
    IMAGE_DATA = 12;
    INFOGAIN_LOSS = 13;
    INNER_PRODUCT = 14;
    LRN = 15;
    MEMORY_DATA = 29;
    MULTINOMIAL_LOGISTIC_LOSS = 16;
    MVN = 34;
    POOLING = 17;
    POWER = 26;
    RELU = 18;
    SIGMOID = 19;
    SIGMOID_CROSS_ENTROPY_LOSS = 27;
    SILENCE = 36;
    SOFTMAX = 20;
    SOFTMAX_LOSS = 21;
    SPLIT = 22;
    SLICE = 33;
    TANH = 23;
    WINDOW_DATA = 24;
    THRESHOLD = 31;
  }
  optional LayerType type = 5;
  repeated BlobProto blobs = 6;
  repeated string param = 1001;
  repeated DimCheckMode blob_share_mode = 1002;
  enum DimCheckMode {
    STRICT = 0;
    PERMISSIVE = 1;
  }
  repeated float blobs_lr = 7;
  repeated float weight_decay = 8;
  repeated float loss_weight = 35;
  optional AccuracyParameter accuracy_param = 27;
  optional ArgMaxParameter argmax_param = 23;
  optional ConcatParameter concat_param = 9;
  optional ConvolutionParameter convolution_param = 10;
  optional DropoutParameter dropout_param = 12;
  optional EltwiseParameter eltwise_param = 24;
  optional InnerProductParameter inner_product_param = 17;
  optional LRNParameter lrn_param = 18;
  optional PoolingParameter pooling_param = 19;
  optional PowerParameter power_param = 21;
  optional ReLUParameter relu_param = 30;
  optional SigmoidParameter sigmoid_param = 38;
  optional SoftmaxParameter softmax_param = 39;
  optional TanHParameter tanh_param = 37;
  optional TransformationParameter transform_param = 36;
  optional LossParameter loss_param = 42;
}
"""

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
