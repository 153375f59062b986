"""The engine's state layout: key names (with Redis Cluster hash tags) and record encodings.

Numbers that are compared as strings are zero-padded to 20 digits (`_n`), so string order is
numeric order in every backend.

    w:{g}:wm                 hash  node → newest watermark (HMax)
    w:{g}:expect             hash  node → "1": nodes to wait for even before their first watermark
    w:{g}:meta               hash  "swept" → low watermark already decided up to (HMax)
    w:{g}:dueidx             set   due buckets that hold work
    w:{g}:due:<bucket>       set   "<threshold>|<sid>[|e]": a parent question to settle then
                                   (|e: the early in-process question)
    w:{g}:waiting            set   decided spans waiting for their parent's trace
    w:{g}:blind              set   "<node>|<from>|<until>": spans of time a node lost records
                                   without a marker (pb.BlindSpan)
    w:{s:<sid>}              hash  span record: ev (the request), dec (decision), tr (trace), out
    w:{s:<sid>}:kids         set   decided children waiting for this span's trace
    w:{p:<node>|<pid>}:proc  hash  "<ts>" → `proc_record` (ProcessInfo): "service\\x1fexe[\\x1fruntime]",
                                   with attributes "service\\x1fexe\\x1fk=v\\x1ek=v...\\x1fruntime"
    w:{p:<node>|<pid>}:lin:<tid>  zset  score µs, "<ts>|s<parent tid>" (spawn) / "<ts>|x" (exit)
    w:{p:<node>|<pid>}:go:<goid>  hash  "p" → "<parent goid>|<ts>" (`go` statement)
    w:{p:<node>|<pid>}:t<tid> / :g<goid>
                             zset  score start µs, "<start>|<end>|<sid>": server requests per lane
    w:{q:<seq>}              set   client requests with that TCP seq
    w:{c:<canon tuple>}      zset  score start µs, "<start>|<end>|<sid>|<has seq>": client requests
    w:{i:<span id hex>}      set   client requests that injected that traceparent span id

A request the agent could not capture (pb.LostRequest) is indexed like the others under the
span id LOST + <sid>, with fingerprint ANY_FINGERPRINT in `q:` sets; it has no span record.

(The Redis store adds `w:{g}:nodever`, node → a stamp of the last batch that wrote its `{p:...}` keys,
for its worker-local mirror; the engine never reads it.)
"""

from __future__ import annotations

from typing import NamedTuple

from schemas import weft_events_pb2 as pb
from schemas.resource import bounded

SEP = "\x1f"
ATTR_SEP = "\x1e"       # between the key=value pairs of a process record's attributes
WM = "w:{g}:wm"
META = "w:{g}:meta"
EXPECT = "w:{g}:expect"
DUE_INDEX = "w:{g}:dueidx"
WAITING = "w:{g}:waiting"
BLIND = "w:{g}:blind"
OUTBOX = "w:{g}:outbox"      # emitted span ids whose export is not yet acknowledged
ROLE_SERVER = pb.ROLE_SERVER
ROLE_CLIENT = pb.ROLE_CLIENT
LOST = "~"               # span id prefix of a request the agent could not capture (LostRequest)
ANY_FINGERPRINT = "*"    # the fingerprint a lost client request matches with: its own is lost


def n20(value: int) -> str:
    return f"{value:020d}"


def due_key(bucket: int) -> str:
    return f"w:{{g}}:due:{bucket}"


def span_key(sid: str) -> str:
    return f"w:{{s:{sid}}}"


def kids_key(sid: str) -> str:
    return f"w:{{s:{sid}}}:kids"


def proc_prefix(node: str, pid: int) -> str:
    return f"w:{{p:{node}|{pid}}}"


def seq_key(seq: int) -> str:
    return f"w:{{q:{seq}}}"


def tuple_key(canon: str) -> str:
    return f"w:{{c:{canon}}}"


def inj_key(span_hex: str) -> str:
    return f"w:{{i:{span_hex}}}"


def _safe(text: str, also: str = "") -> str:
    """`text` with the record's separators (and the characters in `also`) replaced by "?"."""
    for bad in (SEP, ATTR_SEP, *also):
        if bad in text:
            text = text.replace(bad, "?")
    return text


def proc_record(p: pb.ProcessInfo) -> str:
    """A ProcessInfo as its `:proc` hash value: "service SEP exe [SEP attrs] [SEP runtime]". The
    runtime stays the last field, where stitchers from before resource attributes look for "go",
    so that during a rolling upgrade they still read every record right; a record without
    attributes is written exactly as they wrote it."""
    fields = [_safe(p.service_name or p.exe), _safe(p.exe)]
    attrs = bounded(p.resource_attributes.items()) if p.resource_attributes else []
    if attrs:
        fields.append(ATTR_SEP.join(f"{_safe(k, '=')}={_safe(v)}" for k, v in attrs))
    if p.runtime or attrs:
        fields.append(_safe(p.runtime))
    return SEP.join(fields)


class ProcRecord(NamedTuple):
    service: str
    exe: str
    runtime: str
    attrs: tuple[tuple[str, str], ...]


def parse_proc_record(value: str) -> ProcRecord:
    parts = value.split(SEP)
    if len(parts) < 4:   # no attributes: service, exe[, runtime]
        parts += [""] * (3 - len(parts))
        return ProcRecord(parts[0], parts[1], parts[2], ())
    pairs = (a.partition("=") for a in parts[2].split(ATTR_SEP)) if parts[2] else ()
    return ProcRecord(parts[0], parts[1], parts[3], tuple((k, v) for k, _, v in pairs))


_new_tuple = tuple.__new__   # builds a NamedTuple from its values without the keyword-handling __new__
# Http.encode's format: str fields %s, int fields (and has_seq, a bool) %d, in field order
_ENCODING = SEP.join(("%s", *["%d"] * 7, "%s", "%d", "%s", *["%d"] * 3, *["%s"] * 5, "%d", "%s"))
# the request line's version, from the agent's HttpFlag bits (neither: not known)
_VERSION_FLAGS = pb.HTTP_FLAG_HTTP_1_0 | pb.HTTP_FLAG_HTTP_1_1
HTTP_VERSIONS: dict[int, str] = {pb.HTTP_FLAG_HTTP_1_0: "1.0", pb.HTTP_FLAG_HTTP_1_1: "1.1"}


class Http(NamedTuple):
    """One HTTP request event, as the engine stores and reads it back."""

    node: str
    role: int
    pid: int
    tid: int
    goid: int
    start: int
    end: int
    cookie: int
    laddr: str      # hex of raw address bytes
    lport: int
    raddr: str
    rport: int
    has_seq: bool
    seq: int
    method: str
    path: str
    host: str
    traceparent: str
    injected: str
    status: int
    version: str = ""   # "1.0" / "1.1"; empty in state written before the agent sent it

    @classmethod
    def from_pb(cls, node: str, h: pb.HttpRequest) -> Http:
        # every protobuf field is read once; text fields lose the separator (rarely present)
        t = h.tuple
        method, path, host, tp, inj = h.method, h.path, h.host, h.traceparent, h.injected_traceparent
        if SEP in method:
            method = method.replace(SEP, "?")
        if SEP in path:
            path = path.replace(SEP, "?")
        if SEP in host:
            host = host.replace(SEP, "?")
        if SEP in tp:
            tp = tp.replace(SEP, "?")
        if SEP in inj:
            inj = inj.replace(SEP, "?")
        return _new_tuple(cls, (node, h.role, h.pid, h.tid, h.goid, h.start_ns, h.end_ns, h.sock_cookie,
                                t.local_addr.hex(), t.local_port, t.remote_addr.hex(), t.remote_port,
                                h.has_seq, h.tcp_seq, method, path, host, tp, inj, h.status,
                                HTTP_VERSIONS.get(h.flags & _VERSION_FLAGS, "")))

    def encode(self) -> str:
        # the fields in order, SEP-separated (has_seq as 1/0): %-formatting the tuple as it is
        # costs half an f-string over its 20 unpacked fields, and runs once per request
        return _ENCODING % self

    @classmethod
    def decode(cls, text: str) -> Http:
        f = text.split(SEP)
        return cls(f[0], int(f[1]), int(f[2]), int(f[3]), int(f[4]), int(f[5]), int(f[6]),
                   int(f[7]), f[8], int(f[9]), f[10], int(f[11]), f[12] == "1", int(f[13]),
                   f[14], f[15], f[16], f[17], f[18], int(f[19]),
                   f[20] if len(f) > 20 else "")   # 20 fields: written by an older stitcher

    @property
    def fingerprint(self) -> str:
        return f"{self.method} {self.path}"

    def canon_tuple(self) -> str:
        return canonical_tuple(self.role, self.laddr, self.lport, self.raddr, self.rport)


def canonical_tuple(role: int, laddr: str, lport: int, raddr: str, rport: int) -> str:
    """The connection named from the client's side: client end > server end (addresses hex)."""
    if role == ROLE_CLIENT:
        return f"{laddr}:{lport}>{raddr}:{rport}"
    return f"{raddr}:{rport}>{laddr}:{lport}"
