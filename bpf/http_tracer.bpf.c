/* Weft HTTP tracer: TCP connections and HTTP/1.x requests on them, server and client side.
 *
 * Hooks (raw tracepoints only: this kernel has no kprobes and refuses fentry; and no syscall
 * tracepoint, whose mere presence sends every syscall of every process down the kernel's slow
 * path, measured +75 ns a syscall here):
 *   sock:sock_recv_length / sock:sock_send_length   every socket read / write: the sock, the byte
 *       count, and (from the task's saved registers) the syscall and its user buffer; the bytes
 *       are parsed here, in the calling thread, inside the call, with its TCP seq
 *   tcp:tcp_sendmsg_locked                          a TCP send's start (writes are timed there)
 *   sock:inet_sock_set_state                        handshakes (role), this end closing, CLOSE
 * Kernel needs: raw tracepoints, ring buffer (5.8+), task storage and bpf_task_pt_regs (5.15+),
 * the tcp_sendmsg_locked tracepoint (6.0+), bpf_probe_read_{user,kernel}, BTF for offsets;
 * x86-64 syscall ABI.
 *
 * Cost model: one program run per socket read or write (nothing for other fds or syscalls); a
 * hash lookup by sock, then the parser over the call's first bytes; one task-storage write per
 * TCP send. Records leave the kernel once per request (when its response is complete) and once
 * per connection open/close; never per syscall.
 *
 * Connections are known from their first send or receive by a traced task, with the role their
 * handshake showed; one that existed before the agent started is picked up the same way, mid-
 * stream (seen_mid_stream), its role read from the first call that starts a message (a request
 * line or a status line), so the rest of a body in flight is not taken for one.
 *
 * Request state machine (per connection, requests in a 4-deep FIFO for pipelining). "Request
 * direction" is what the server reads / the client writes; "response direction" the reverse.
 *   request start: a chunk (or the bytes after a finished request) begins with an upper-case
 *     method token (at a call's start: with a space and what starts a target after it, '/', '*',
 *     an absolute URL, an authority after CONNECT); a line whose version then does not start
 *     "HTTP/" is forgotten (text that starts like a request). start = time of that call, seq =
 *     tcp seq of the call's first byte + offset.
 *     Times: a read is timed once its bytes are in the user buffer, a write when TCP starts
 *     queueing it (its bytes can be read before the call returns), so client start <= server
 *     start <= server end <= client end on one clock.
 *   request line: method, path and version; the path is cut at '?' or '#' here, so a query
 *     string never leaves the kernel; "HTTP/1.0" and "HTTP/1.1" set a flag, any other version
 *     none. Headers: only Host, traceparent and tracestate are copied. A Content-Length body is
 *     stepped over by arithmetic (never copied), so its bytes are never taken for a request and
 *     a pipelined request right after it is read. A chunked request body is neither copied nor
 *     parsed: it ends at a call that ends in "0\r\n\r\n"; where that could not be seen, at the
 *     latest when its request is answered, or when an answer comes to no request seen (a
 *     request pipelined behind a chunked end in one call is lost). A
 *     PROXY protocol header (v1 text line or v2 binary, from a load balancer) before a
 *     connection's first request is stepped over.
 *   response: "HTTP/1.x NNN" gives the status; Content-Length or chunked framing is followed.
 *     Interim responses (1xx but 101) are skipped: the request waits for its final one. A call
 *     that holds more than one response (an interim and the final one, pipelined answers) is
 *     parsed on past each complete one, within the bytes it copied.
 *   another protocol: a connection that starts with the HTTP/2 preface, switches protocols
 *     (101: WebSocket, h2c upgrade) or becomes a tunnel (2xx to CONNECT) is not parsed any
 *     further (only its bytes are counted).
 *   end = the call that wrote (server) / read (client) the last response byte, known from
 *     Content-Length, the chunked terminator "0\r\n\r\n" (at the end of the call's bytes, in
 *     one buffer of a vector call too), a bodiless final status (204/304) or
 *     HEAD, or else the next request on the connection or its close (end = last write/read).
 *     A request with no status line when the connection closes ends at the close, flagged
 *     NO_RESPONSE (the stitcher exports it as a failed span).
 * Bounds: each call scans at most WEFT_SCAN_MAX bytes; bytes past that only count towards the
 *   body length. A request whose Host/traceparent come after the window loses them. A head that
 *   goes on past the window ends where the call's last bytes show it did (the message whole in
 *   the call), else at the latest at its answer (a request) or at the next request (a response).
 *
 * -D constants (probe_agent/probes/http.py): WEFT_TCP_COPIED_SEQ_OFF, WEFT_TCP_WRITE_SEQ_OFF,
 *   WEFT_SKC_*_OFF (sock_common fields), WEFT_SK_PROTOCOL_OFF, WEFT_PT_REGS_{DX,R14,SP}_OFF,
 *   WEFT_NR_<syscall> (x86-64 numbers), WEFT_SCAN_MAX, WEFT_WINDOW, WEFT_CONN_RING_PAGES.
 */
#include "common.h"
#include "inject.h" /* WEFT-INJECT: struct weft_tpctx (ids of header injection) */

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define MSG_PEEK 2
/* TCP states (include/net/tcp_states.h: a stable ABI, printed by the tracepoint) */
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_LAST_ACK 9

#define NQ 4 /* pipelined requests per connection */
#define METHOD_MAX 8
#define PATH_MAX_ 128
#define HOST_MAX 64
#define TP_MAX 56
#define TS_MAX 64

enum http_stat {
    HST_RING_FULL = 0,
    HST_CONNS_FULL = 1,
    HST_QUEUE_FULL = 2,
    HST_UNPARSED = 3, /* socket calls outside read/write/send/recv syscalls (io_uring, mmsg) */
    HST_ADOPTED = 4,
    HST_NOT_HTTP = 5,
    HST_CONN_RING_FULL = 6, /* connection records lost (their own ring was full) */
    HST_UNMARKED = 7,       /* HTTP records lost with no lost-request marker either (both rings full) */
    HST_OTHER_PROTOCOL = 8, /* connections that speak another protocol (h2c, upgrades, tunnels) */
};

enum role { ROLE_UNKNOWN = 0, ROLE_SERVER = 1, ROLE_CLIENT = 2 };
enum call_kind { CK_BUF = 0, CK_IOV = 1, CK_MSG = 2, CK_NODATA = 3, CK_NONE = 4 };

/* Request-direction parser states. */
enum rq_state {
    RQ_IDLE = 0, RQ_METHOD, RQ_PATH, RQ_VERSION, RQ_HNAME, RQ_HVAL, RQ_HSKIP, RQ_BODY, RQ_CHUNKED
};
/* Response-direction parser states. */
enum rs_state { RS_IDLE = 0, RS_VERSION, RS_STATUS, RS_LINE, RS_HNAME, RS_HVAL, RS_HSKIP, RS_BODY };
enum hdr_target { T_NONE = 0, T_HOST, T_TP, T_TS, T_CLEN, T_TE };

/* HTTP record flags (= pb.HttpFlag). */
#define F_PATH_TRUNCATED 1
#define F_NO_RESPONSE 2
#define F_PIPELINED 4
#define F_HTTP_1_0 16
#define F_HTTP_1_1 32
/* "HTTP/1.0" and "HTTP/1.1" as one little-endian word */
#define HTTP_1_0_WORD 0x302E312F50545448ULL
#define HTTP_1_1_WORD 0x312E312F50545448ULL
#define VERSION_NOT_HTTP 9 /* rq_vlen: the request line's version does not start "HTTP/" */
#define CONNECT_WORD 0x005443454E4E4F43ULL /* "CONNECT" and the zero after it */
#define PROXY_WORD 0x00000059584F5250ULL   /* "PROXY" and the zeros after it */
/* The PROXY protocol v2 signature, "\r\n\r\n\0\r\nQUIT\n": its first 8 bytes and last 4. */
#define PROXY_V2_SIG 0x510A0D000A0D0A0DULL
#define PROXY_V2_SIG_TAIL 0x0A544955U

/* One request as it travels to user space: the tail of struct http_rec. */
struct req {
    u64 start_ns;
    u64 end_ns;
    u32 pid;
    u32 tid;
    u32 seq;
    u16 status;
    u8 has_seq;
    u8 flags;
    u8 method_len;
    u8 path_len;
    u8 host_len;
    u8 tp_len;
    u8 ts_len;
    u8 done_headers; /* request headers fully parsed */
    u8 no_body;      /* HEAD: the response has no body */
    u8 pad;
    char method[METHOD_MAX];
    char path[PATH_MAX_];
    char host[HOST_MAX];
    char tp[TP_MAX];
    char ts[TS_MAX];
    u64 goid; /* Go: the goroutine serving (server) / sending for (client); 0 elsewhere */
}; /* 368 bytes */

struct tuple {
    u8 laddr[16];
    u8 raddr[16];
    u16 lport;
    u16 rport;
    u8 family;
    u8 role;
    u8 mid_stream;
    u8 pad;
}; /* 40 bytes */

struct http_rec {
    struct weft_hdr hdr;
    u64 cookie;
    struct tuple t;
    struct req r;
    struct weft_tpctx inj; /* WEFT-INJECT: assigned (server) / injected (client) ids, kind 0: none */
};
_Static_assert(sizeof(struct http_rec) == 512, "http_rec layout changed: update probe_agent/probes/http.py");

struct conn_rec {
    struct weft_hdr hdr;
    u64 cookie;
    u64 bytes_sent;
    u64 bytes_recv;
    struct tuple t;
};
_Static_assert(sizeof(struct conn_rec) == 96, "conn_rec layout changed: update probe_agent/probes/http.py");

/* What is left of a request whose record the HTTP ring had no room for, sent through the
 * connection ring: enough for the stitcher to know the request existed on its thread (or
 * goroutine) and connection at those times, so that it never links a call to the wrong one of
 * two concurrent requests because the right one went missing. */
struct lost_rec {
    struct weft_hdr hdr; /* ts_ns = the request's start, pid/tid = its thread */
    u64 cookie;
    u64 end_ns;
    u64 goid;
    u32 seq;
    u8 has_seq;
    u8 pad[3];
    struct tuple t;
};
_Static_assert(sizeof(struct lost_rec) == 104, "lost_rec layout changed: update schemas/records.py");

struct conn {
    u64 cookie;
    u64 bytes_sent;
    u64 bytes_recv;
    u64 last_write_ns;
    u64 last_read_ns;
    u64 body_left; /* response body bytes still to come (Content-Length) */
    u64 clen;
    u64 chunk_tail; /* a chunked body's last 5 bytes so far, oldest in the low byte */
    u64 rq_body_left; /* request: Content-Length while its headers are read, then body bytes to come */
    u64 rq_chunk_tail; /* a chunked request body's last 5 bytes so far (as chunk_tail) */
    u64 rq_name[2]; /* lower-cased header name prefix, request direction */
    u64 rs_name[2]; /* same, response direction */
    struct tuple t;
    u32 head; /* oldest request not yet emitted */
    u32 tail; /* one past the newest request started */
    u32 resp; /* the request the current response answers */
    u32 owner; /* tgid whose fd table last held it (fds has its fd there, for close) */
    u64 cgroup; /* cgroup of that process: records may be emitted from softirq (state change) */
    u8 rq_state;
    u8 rq_target;
    u8 rq_name_len;
    u8 rq_vlen;
    u8 rs_state;
    u8 rs_target;
    u8 rs_name_len;
    u8 rs_vlen;
    u8 chunked;
    u8 rq_chunked; /* the request being read said Transfer-Encoding: chunked */
    u8 rq_chunk_unsure; /* a call of its chunked body could not be checked for the end */
    u8 open_sent;
    u8 resp_started;
    u8 opaque; /* another protocol now (HTTP/2 preface, 101, CONNECT tunnel): bytes only counted */
    u32 rs_done_body; /* body bytes of the response that just ended in the current call */
    struct req q[NQ];
#if WEFT_INJECT
    struct weft_tpctx qctx[NQ]; /* WEFT-INJECT: per queued request, like q (256 bytes: only then) */
#endif
};

/* The syscall a socket send/recv happens in, read from the task's saved user registers (the
 * arguments are still there when sock_{send,recv}_length fires inside it). */
struct sysargs {
    u64 dx;      /* len / vlen */
    u64 si;      /* buffer, iovec array or msghdr */
    u64 di;      /* fd */
    u64 orig_ax; /* syscall number */
};

/* Start of this thread's current TCP send: the first tcp_sendmsg_locked of the call, before any
 * of its bytes is queued (task storage: no hash, no LRU). Taken (ts = 0) at sock_send_length. */
struct write_entry {
    u64 ts;
    u64 sk;
    u64 scope_cg; /* a scoped agent: the cgroup `scope` was decided for */
    u8 scope;     /* SCOPE_IN / SCOPE_OUT, or 0: not decided */
};
#define SCOPE_IN 1
#define SCOPE_OUT 2

/* One call's bytes being parsed, handed from the syscall-exit program to the parser programs
 * (tail calls, WEFT_WINDOW bytes each, so the verifier sees one small loop). Per CPU: a tail
 * call chain runs to its end on the CPU that started it. */
struct parse_ctx {
    u64 sk;
    u64 pid_tgid;
    u64 now;
    u64 total; /* bytes the call moved */
    u64 end;   /* where the call's bytes end in user memory (call_end; 0: not known) */
    u64 goid;  /* Go: goroutine of the call (weft_call_goid) */
    u32 n;     /* bytes of the call copied to scratch */
    u32 pos;   /* next byte to parse */
    u32 seq0;
    u8 has_seq;
    u8 request_dir;
    u8 inj_begin; /* WEFT-INJECT: a server request line ended in this run */
    u8 inj_hdrs;  /* WEFT-INJECT: a server request's headers ended in this run */
};

BPF_ARRAY(cgroup_scope, struct weft_cgroup_scope, WEFT_CGROUP_SCOPES);
BPF_TABLE("lru_hash", u64, u8, cgroup_verdict, WEFT_CGROUP_VERDICTS);
BPF_PERCPU_ARRAY(stats, u64, WEFT_MAX_STATS);
/* HTTP records only, all of one size: the agent reads a span of them by arithmetic, with no
 * per-record work in Python (probe_agent/ringbuf.py read_stride). Connection records, a few per
 * connection, go to their own ring. */
BPF_RINGBUF_OUTPUT(http_events, WEFT_RING_PAGES);
BPF_RINGBUF_OUTPUT(conn_events, WEFT_CONN_RING_PAGES);
/* LRU maps: entries of processes that died without close() age out instead of filling them. */
BPF_TABLE("lru_hash", u64, struct conn, conns, WEFT_MAX_CONNS);      /* sock -> state */
/* sock -> ROLE_SERVER / ROLE_CLIENT, from its TCP handshake (inet_sock_set_state), until its
 * first send or receive makes it a connection (or it closes). */
BPF_TABLE("lru_hash", u64, u8, roles, WEFT_MAX_CONNS);
BPF_TASK_STORAGE(write_entry, struct write_entry);       /* set at tcp_sendmsg_locked */
struct scan_buf {
    char b[2 * WEFT_SCAN_MAX]; /* twice: lets the verifier bound (offset + length) of gathers */
};
BPF_PERCPU_ARRAY(scratch, struct scan_buf, 1);
BPF_PERCPU_ARRAY(parse_state, struct parse_ctx, 1);
BPF_PROG_ARRAY(parsers, 1); /* [0] = weft_parse, filled by the loader */
BPF_ARRAY(zero_conn, struct conn, 1); /* never written: the initial value of a connection */
#if WEFT_INJECT
/* WEFT-INJECT: owned by inject.bpf.c (loaded first); see its header comment */
BPF_TABLE("extern", u32, struct weft_tpctx, weft_ctx, WEFT_MAX_TASKS);
BPF_TABLE("extern", u32, struct weft_inj_out, weft_inj_out, WEFT_MAX_TASKS);
#endif

/* ---------- Go goroutine ids (issue 6; filled by probe_agent/probes/goroutines.py) ----------
 * weft_go_procs: pid -> offsets, for the Go processes the agent traces (empty: goid stays 0).
 * weft_go_caller: (pid, writeLoop goid) -> goid of the goroutine whose request it writes, set
 * by bpf/go_runtime.bpf.c, which declares both maps "extern": they are public and owned here.
 * At a syscall tracepoint the task's user registers sit at the top of its kernel stack
 * (bpf_task_pt_regs, measured to work in tracepoints here); Go's ABIInternal keeps the current
 * g in R14 through syscall.Syscall/RawSyscall6 (Go 1.17+), so goid = *(g + goid_off). A
 * syscall made by C code (cgo) has anything in R14: the g is believed only when the user stack
 * pointer lies inside that g's stack [g.stack.lo, g.stack.hi). */
struct weft_go_proc {
    u64 goid_off;
    u64 stack_off; /* offsetof(runtime.g, stack): {lo, hi} */
    u64 m_off;     /* offsetof(runtime.g, m), used by go_runtime.bpf.c */
    u64 curg_off;  /* offsetof(runtime.m, curg), used by go_runtime.bpf.c */
    u64 gopc_off;  /* offsetof(runtime.g, gopc), used by go_runtime.bpf.c */
    u64 skip_lo;   /* [skip_lo, skip_hi): go statements go_runtime.bpf.c does not report */
    u64 skip_hi;
};
struct weft_go_key {
    u64 id;
    u32 pid;
    u32 pad;
};
BPF_TABLE_PUBLIC("hash", u32, struct weft_go_proc, weft_go_procs, WEFT_MAX_GO_PROCS);
BPF_TABLE_PUBLIC("lru_hash", struct weft_go_key, u64, weft_go_caller, WEFT_MAX_TASKS);

static __always_inline u64 weft_call_goid(u64 pid_tgid, u8 client_write)
{
    u32 pid = pid_tgid >> 32;
    struct weft_go_proc *proc = weft_go_procs.lookup(&pid);
    if (!proc)
        return 0;
    char *regs = (char *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 g = 0, sp = 0, goid = 0, stack[2] = {};
    if (!regs || bpf_probe_read_kernel(&g, 8, regs + WEFT_PT_REGS_R14_OFF) || !g ||
        bpf_probe_read_kernel(&sp, 8, regs + WEFT_PT_REGS_SP_OFF) ||
        bpf_probe_read_user(stack, sizeof(stack), (void *)(g + proc->stack_off)) ||
        sp < stack[0] || sp >= stack[1])
        return 0;
    bpf_probe_read_user(&goid, 8, (void *)(g + proc->goid_off));
    if (client_write && goid) {
        struct weft_go_key key = {.id = goid, .pid = pid};
        u64 *caller = weft_go_caller.lookup(&key);
        if (caller)
            return *caller;
    }
    return goid;
}
/* ---------- end Go goroutine ids ---------- */

static __always_inline int weft_skip_task(u64 pid_tgid)
{
    if ((u32)(pid_tgid >> 32) == WEFT_SELF_PID)
        return 1;
#if WEFT_FILTER_CGROUPS
    u64 cg = bpf_get_current_cgroup_id();
    u8 *known = cgroup_verdict.lookup(&cg);
    if (known)
        return *known == WEFT_CG_OUT;
    u32 first = 0;
    struct weft_cgroup_scope *ready = cgroup_scope.lookup(&first);
    if (!ready || !ready->id)
        return 1; /* the loader has not filled the roots yet: skip, and decide nothing for good */
    u8 verdict = WEFT_CG_OUT;
    for (u32 i = 0; i < WEFT_CGROUP_SCOPES; i++) {
        u32 k = i;
        struct weft_cgroup_scope *root = cgroup_scope.lookup(&k);
        if (root && root->id && bpf_get_current_ancestor_cgroup_id(root->level) == root->id) {
            verdict = WEFT_CG_IN;
            break;
        }
    }
    cgroup_verdict.update(&cg, &verdict);
    return verdict == WEFT_CG_OUT;
#endif
    return 0;
}

#if WEFT_FILTER_CGROUPS
/* A scoped agent (--cgroup): whether the current task is out of scope, remembered in its task
 * storage with the cgroup it was decided for. An untraced task's socket calls then cost a task
 * storage lookup each, instead of a connection lookup, two reads of the sock and a cgroup lookup
 * (its neighbours on the node pay for the agent as little as possible). `*wp`: that storage. */
static __always_inline int task_out_of_scope(u64 pid_tgid, struct write_entry **wp)
{
    struct write_entry *w = write_entry.task_storage_get(bpf_get_current_task_btf(), 0,
                                                         BPF_LOCAL_STORAGE_GET_F_CREATE);
    *wp = w;
    u64 cg = bpf_get_current_cgroup_id();
    if (w && w->scope && w->scope_cg == cg)
        return w->scope == SCOPE_OUT;
    int out = weft_skip_task(pid_tgid);
    if (w && cgroup_verdict.lookup(&cg)) { /* decided for good (not while the loader fills in) */
        w->scope_cg = cg;
        w->scope = out ? SCOPE_OUT : SCOPE_IN;
    }
    return out;
}
#endif

static __always_inline void weft_stat(u32 idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)++;
}

/* ---------- connections ---------- */

/* Fill the tuple from the sock; returns 0 unless it is a TCP socket over IPv4/IPv6. */
static __always_inline int read_tuple(char *sk, struct tuple *t)
{
    u16 family = 0, proto = 0, dport = 0, lport = 0;
    bpf_probe_read_kernel(&family, 2, sk + WEFT_SKC_FAMILY_OFF);
    bpf_probe_read_kernel(&proto, 2, sk + WEFT_SK_PROTOCOL_OFF);
    if ((family != AF_INET && family != AF_INET6) || proto != IPPROTO_TCP)
        return 0;
    bpf_probe_read_kernel(&dport, 2, sk + WEFT_SKC_DPORT_OFF);
    bpf_probe_read_kernel(&lport, 2, sk + WEFT_SKC_NUM_OFF);
    t->family = family;
    t->lport = lport;
    t->rport = (dport >> 8) | (dport << 8);
    if (family == AF_INET) {
        bpf_probe_read_kernel(t->laddr, 4, sk + WEFT_SKC_RCV_SADDR_OFF);
        bpf_probe_read_kernel(t->raddr, 4, sk + WEFT_SKC_DADDR_OFF);
    } else {
        bpf_probe_read_kernel(t->laddr, 16, sk + WEFT_SKC_V6_RCV_SADDR_OFF);
        bpf_probe_read_kernel(t->raddr, 16, sk + WEFT_SKC_V6_DADDR_OFF);
    }
    return 1;
}

static __always_inline void emit_conn(struct conn *c, u16 kind, u64 pid_tgid, u64 now)
{
    struct conn_rec *r = conn_events.ringbuf_reserve(sizeof(struct conn_rec));
    if (!r) {
        weft_stat(HST_CONN_RING_FULL);
        return;
    }
    weft_fill_hdr(&r->hdr, kind, pid_tgid, now);
    r->hdr.cgroup_id = c->cgroup;
    r->cookie = c->cookie;
    r->bytes_sent = c->bytes_sent;
    r->bytes_recv = c->bytes_recv;
    __builtin_memcpy(&r->t, &c->t, sizeof(struct tuple));
    conn_events.ringbuf_submit(r, 0);
}

/* Register sock `sk`, used by this process; returns its state or 0. */
static __always_inline struct conn *add_conn(u64 pid_tgid, char *sk, u8 role, u8 mid_stream, u64 now)
{
    u32 zero = 0;
    struct conn *init = zero_conn.lookup(&zero);
    if (!init)
        return 0;
    u64 key = (u64)sk;
    if (conns.update(&key, init)) {
        weft_stat(HST_CONNS_FULL);
        return 0;
    }
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    if (!read_tuple(sk, &c->t) || !c->t.lport) {
        /* not TCP, or already closed (unhashed, port 0: a read of what a reset left queued): an
         * entry now would never see its CLOSE */
        conns.delete(&key);
        return 0;
    }
    u64 cookie = 0;
    bpf_probe_read_kernel(&cookie, 8, sk + WEFT_SKC_COOKIE_OFF);
    c->cookie = cookie ? cookie : ((u64)sk ^ (now << 16)); /* skc_cookie is assigned lazily */
    c->owner = pid_tgid >> 32;
    c->cgroup = bpf_get_current_cgroup_id();
    c->t.role = role;
    c->t.mid_stream = mid_stream;
    if (role != ROLE_UNKNOWN) {
        c->open_sent = 1;
        emit_conn(c, WEFT_KIND_CONN_OPEN, pid_tgid, now);
    }
    return c;
}

/* ---------- requests ---------- */

/* A request record's header: its time is the request's start, its thread the one that read
 * (server) or wrote (client) it — the record may be emitted later, from another task. */
static __always_inline void req_hdr(struct weft_hdr *h, struct conn *c, struct req *q, u16 kind)
{
    h->ts_ns = q->start_ns;
    h->cgroup_id = c->cgroup;
    h->pid = q->pid;
    h->tid = q->tid;
    h->kind = kind;
    h->version = WEFT_ABI_VERSION;
    h->reserved = 0;
}

static __always_inline void emit_lost(struct conn *c, struct req *q, u64 end_ns)
{
    struct lost_rec *l = conn_events.ringbuf_reserve(sizeof(struct lost_rec));
    if (!l) {
        weft_stat(HST_UNMARKED);
        return;
    }
    req_hdr(&l->hdr, c, q, WEFT_KIND_HTTP_LOST);
    l->cookie = c->cookie;
    l->end_ns = end_ns;
    l->goid = q->goid;
    l->seq = q->seq;
    l->has_seq = q->has_seq;
    __builtin_memset(l->pad, 0, sizeof(l->pad));
    __builtin_memcpy(&l->t, &c->t, sizeof(struct tuple));
    conn_events.ringbuf_submit(l, 0);
}

#if WEFT_INJECT
/* WEFT-INJECT: a finished server request's context leaves its thread (kind NONE, the slot kept
 * for the thread's next request: no LRU free + alloc per request) — whether or not its record
 * found room in the ring, or the thread's next calls would carry a stale context. */
static __always_inline void end_ctx(struct weft_tpctx *x, u32 owner)
{
    if (x->kind != WEFT_CTX_ASSIGNED)
        return;
    struct weft_tpctx *live = weft_ctx.lookup(&owner);
    if (live && live->kind == WEFT_CTX_AMBIGUOUS) {
        if (live->open <= 1) {
            live->kind = WEFT_CTX_NONE;
            live->open = 0;
        } else {
            live->open--;
        }
    } else if (live && live->kind == WEFT_CTX_ASSIGNED && live->serial == x->serial) {
        live->kind = WEFT_CTX_NONE;
        live->open = 0;
    }
}
#endif

static __always_inline void emit_req(struct conn *c, u32 idx, u8 extra_flags, u64 end_ns)
{
    struct req *q = &c->q[idx & (NQ - 1)];
#if WEFT_INJECT
    struct weft_tpctx *x = &c->qctx[idx & (NQ - 1)];
    end_ctx(x, q->tid);
#endif
    struct http_rec *r = http_events.ringbuf_reserve(sizeof(struct http_rec));
    if (!r) /* measured: a reservation now and then fails with the ring nearly empty, and a */
        r = http_events.ringbuf_reserve(sizeof(struct http_rec)); /* second try mostly succeeds */
    if (!r) {
        weft_stat(HST_RING_FULL);
        emit_lost(c, q, end_ns);
        return;
    }
    req_hdr(&r->hdr, c, q, WEFT_KIND_HTTP);
    r->cookie = c->cookie;
    __builtin_memcpy(&r->t, &c->t, sizeof(struct tuple));
    __builtin_memcpy(&r->r, q, sizeof(struct req));
#if WEFT_INJECT
    __builtin_memcpy(&r->inj, x, sizeof(struct weft_tpctx)); /* the request's ids */
#else
    __builtin_memset(&r->inj, 0, sizeof(struct weft_tpctx));
#endif
    r->r.end_ns = end_ns;
    r->r.flags = (r->r.flags | extra_flags) & 0x7f; /* 0x80: internal 'path cut' mark */
    http_events.ringbuf_submit(r, 0);
}

/* The response to the oldest unanswered request is complete: emit it. */
static __always_inline void response_done(struct conn *c, u64 now)
{
    if (c->head != c->tail) {
        emit_req(c, c->head, 0, now);
        c->head++;
    }
    c->resp_started = 0;
    c->rs_state = RS_IDLE;
}

/* The connection is over: emit every request still queued. One answered ends at `end_ns` (its
 * response's last byte); one that got no status line (the client gave up, the server closed
 * without answering, a reset) ends at the close, `closed_ns`, flagged: a failed request, whose
 * span shows how long the caller waited. */
static __always_inline void flush_all(struct conn *c, u64 end_ns, u64 closed_ns)
{
#pragma unroll
    for (int i = 0; i < NQ; i++) {
        if (c->head == c->tail)
            break;
        u8 answered = c->q[c->head & (NQ - 1)].status != 0;
        emit_req(c, c->head, answered ? 0 : F_NO_RESPONSE, answered ? end_ns : closed_ns);
        c->head++;
    }
    c->resp_started = 0;
    c->rs_state = RS_IDLE;
}

static __always_inline int is_upper(char ch)
{
    return ch >= 'A' && ch <= 'Z';
}

static __always_inline char lower(char ch)
{
    return (ch >= 'A' && ch <= 'Z') ? ch + 32 : ch;
}

/* The first byte of a request target (RFC 9112 3.2): a path, '*' (OPTIONS), an absolute URL (a
 * forward proxy's), or anything after CONNECT (an authority) or a PROXY protocol line's "PROXY"
 * (`any`). Text that merely starts like a method ("I loved it") fails here. */
static __always_inline int target_start(char t, int any)
{
    return t == '/' || t == '*' || lower(t) == 'h' || any;
}

/* Header names, lower-cased, as the first 16 bytes read as two little-endian u64 (name[2]).
 * Names longer than 16 bytes only keep their first 16, so the length is compared too. */
static __always_inline u8 target_of(u64 *name, u8 n)
{
    if (n == 4 && name[0] == 0x74736f68ULL && name[1] == 0) /* host */
        return T_HOST;
    if (n == 11 && name[0] == 0x7261706563617274ULL && name[1] == 0x746e65ULL) /* traceparent */
        return T_TP;
    if (n == 10 && name[0] == 0x6174736563617274ULL && name[1] == 0x6574ULL) /* tracestate */
        return T_TS;
    if (n == 14 && name[0] == 0x2d746e65746e6f63ULL && name[1] == 0x6874676e656cULL) /* content-length */
        return T_CLEN;
    if (n == 17 && name[0] == 0x726566736e617274ULL && name[1] == 0x6e69646f636e652dULL) /* transfer-encoding */
        return T_TE;
    return T_NONE;
}

/* ---------- 8 bytes at a time ----------
 * Most bytes of a header block are ones the parser only passes over (the rest of a line it does
 * not keep) or copies as they are (a header name it lower-cases, a value or path it keeps). Where
 * the next 8 bytes hold no byte that would change the parser's state, the whole word is taken in
 * one step; anywhere else the byte-wise step runs. A word step leaves exactly the state the eight
 * byte steps would have left, so calls split anywhere still parse the same. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* The high bit of each byte of w that equals b. Exact for the lowest flagged byte (a borrow may
 * also flag bytes above a match), which is the only one used. */
static __always_inline u64 bytes_eq(u64 w, u64 b)
{
    u64 x = w ^ (ONES * b);
    return (x - ONES) & ~x & HIGHS;
}

/* Index 0..7 of the lowest flagged byte of m != 0 (isolate it, then one multiply spreads the
 * index into the top byte). */
static __always_inline u32 first_flagged(u64 m)
{
    return (u32)((((m & -m) >> 7) * 0x0001020304050607ULL) >> 56);
}

/* A-Z lower-cased in each of the 8 bytes, every other byte unchanged (lower(), word-wide). */
static __always_inline u64 lower8(u64 w)
{
    u64 h = w & ~HIGHS;
    u64 ge_a = h + ONES * (0x80 - 'A'); /* high bit set: byte >= 'A' */
    u64 gt_z = h + ONES * (0x7f - 'Z'); /* high bit set: byte > 'Z' */
    u64 upper = (ge_a ^ gt_z) & ~w & HIGHS;
    return w | (upper >> 2);
}

/* 8 bytes of the scratch buffer from i (it is 2 * WEFT_SCAN_MAX long: always in bounds). */
static __always_inline u64 word_at(char *s, u32 i)
{
    return *(u64 *)(s + (i & (WEFT_SCAN_MAX - 1)));
}

/* Bytes to pass over before the first one equal to b (8: none in the word). */
static __always_inline u32 skip_to(u64 w, u64 b)
{
    u64 m = bytes_eq(w, b);
    return m ? first_flagged(m) : 8;
}

/* A header name's next 8 bytes (none of them ':', CR or LF): keep their lower case within the
 * first 16 bytes, as the byte-wise step does. 0 when the word straddles the 16th byte. */
static __always_inline int name_word(u64 *name, u8 *name_len, u64 w)
{
    u8 len = *name_len;
    if (len <= 8)
        *(u64 *)((char *)name + (len & 15)) = lower8(w);
    else if (len < 16)
        return 0;
    *name_len = len < 248 ? len + 8 : 255;
    return 1;
}

/* Copy a word into a kept text field of `max` bytes at v (when it fits whole): 1 when taken. */
#define KEEP_WORD(field, len_field, max, v, w)                                                  \
    do {                                                                                        \
        if ((v) + 8 <= (max)) {                                                                 \
            *(u64 *)&(field)[(v) & 63] = (w);                                                   \
            len_field = (v) + 8;                                                                \
        } else if ((v) < (max)) {                                                               \
            return 0;                                                                           \
        }                                                                                       \
    } while (0)

/* Request direction: take the word at i when its 8 bytes change nothing but copies; 1 if taken. */
static __always_inline int request_word(struct conn *c, char *s, struct parse_ctx *p, u32 i, u8 st)
{
    u64 w = word_at(s, i);
    u64 nl = bytes_eq(w, '\n');
    if (st == RQ_VERSION || st == RQ_HSKIP) {
        u32 j = nl ? first_flagged(nl) : 8;
        if (!j)
            return 0;
        if (st == RQ_VERSION && c->rq_vlen < 8) {
            /* the version's first 8 bytes: whole in this word, or else byte by byte */
            if (c->rq_vlen || j < 8)
                return 0;
            struct req *r = &c->q[(c->tail - 1) & (NQ - 1)];
            r->flags |= w == HTTP_1_1_WORD ? F_HTTP_1_1 : w == HTTP_1_0_WORD ? F_HTTP_1_0 : 0;
            u64 x = (w ^ HTTP_1_1_WORD) & 0xFFFFFFFFFFULL; /* "HTTP/" or not, without a branch */
            c->rq_vlen = 8 + ((x | (0 - x)) >> 63);        /* 8, or VERSION_NOT_HTTP */
        }
        p->pos = i + j;
        return 1;
    }
    u64 stop = nl | bytes_eq(w, '\r');
    struct req *r = &c->q[(c->tail - 1) & (NQ - 1)];
    if (st == RQ_HNAME) {
        if (stop | bytes_eq(w, ':') || !name_word(c->rq_name, &c->rq_name_len, w))
            return 0;
    } else if (st == RQ_HVAL) {
        u8 v = c->rq_vlen;
        u8 t = c->rq_target;
        if (stop || !v || t >= T_CLEN) /* leading spaces, and framing values, byte by byte */
            return 0;
        if (t == T_HOST)
            KEEP_WORD(r->host, r->host_len, HOST_MAX, v, w);
        else if (t == T_TP)
            KEEP_WORD(r->tp, r->tp_len, TP_MAX, v, w);
        else if (t == T_TS)
            KEEP_WORD(r->ts, r->ts_len, TS_MAX, v, w);
        c->rq_vlen = v < 248 ? v + 8 : 255;
    } else if (st == RQ_PATH) {
        if (stop | bytes_eq(w, ' ') | bytes_eq(w, '?') | bytes_eq(w, '#'))
            return 0;
        if (!(r->flags & 0x80)) { /* not cut at '?' / '#' */
            u8 v = r->path_len;
            if (v + 8 <= PATH_MAX_) {
                *(u64 *)&r->path[v & (PATH_MAX_ - 1)] = w;
                r->path_len = v + 8;
            } else if (v < PATH_MAX_) {
                return 0;
            } else {
                r->flags |= F_PATH_TRUNCATED;
            }
        }
    } else {
        return 0;
    }
    p->pos = i + 8;
    return 1;
}

/* Response direction: the same for the status line's version, skipped lines and header names. */
static __always_inline int response_word(struct conn *c, char *s, struct parse_ctx *p, u32 i, u8 st)
{
    u64 w = word_at(s, i);
    u32 j = 0;
    if (st == RS_VERSION) {
        j = skip_to(w, ' ');
    } else if (st == RS_LINE || st == RS_HSKIP) {
        j = skip_to(w, '\n');
    } else if (st == RS_HNAME) {
        if (bytes_eq(w, '\n') | bytes_eq(w, '\r') | bytes_eq(w, ':') ||
            !name_word(c->rs_name, &c->rs_name_len, w))
            return 0;
        j = 8;
    }
    if (!j)
        return 0;
    p->pos = i + j;
    return 1;
}

/* Request-direction bytes (server read / client write): up to WEFT_WINDOW steps from p->pos,
 * each a byte or a word. Returns 1 when the rest of the call is not worth parsing. */
static __always_inline int scan_request(struct conn *c, char *s, struct parse_ctx *p)
{
    u64 pid_tgid = p->pid_tgid;
    u64 now = p->now;
    for (u32 k = 0; k < WEFT_WINDOW; k++) {
        u32 i = p->pos;
        if (i >= p->n)
            return 1;
        p->pos = i + 1;
        u8 st = c->rq_state;
        if (i + 8 <= p->n && request_word(c, s, p, i, st))
            continue;
        char ch = s[i & (WEFT_SCAN_MAX - 1)];
        if (st == RQ_IDLE) {
            if (!is_upper(ch)) {
                weft_stat(HST_NOT_HTTP);
                return 1; /* not a request start: ignore the rest of this call */
            }
            if (c->tail - c->head >= NQ) {
                weft_stat(HST_QUEUE_FULL);
                return 1;
            }
            if (c->resp_started && c->rs_state == RS_BODY && (c->chunked || c->clen == (u64)-1)) {
                /* a response whose end we could not see (unframed, or a chunked end we missed)
                 * ended with the last byte sent before this new request */
                response_done(c, c->t.role == ROLE_SERVER ? c->last_write_ns : c->last_read_ns);
            }
            struct req *r = &c->q[c->tail & (NQ - 1)];
            /* all of it: records leave the node as they are (schema v2), so no byte of an
             * earlier request on this connection may linger past the new one's lengths */
            __builtin_memset(r, 0, sizeof(struct req));
            r->start_ns = now;
            r->pid = pid_tgid >> 32;
            r->tid = (u32)pid_tgid;
            r->has_seq = p->has_seq;
            r->seq = p->seq0 + i;
            r->goid = p->goid; /* Go */
            if (c->tail != c->head)
                r->flags = F_PIPELINED;
            r->method[0] = ch;
            r->method_len = 1;
#if WEFT_INJECT
            c->qctx[c->tail & (NQ - 1)].kind = WEFT_CTX_NONE; /* WEFT-INJECT */
#endif
            c->tail++;
            c->rq_state = RQ_METHOD;
            c->rq_body_left = 0;
            c->rq_chunked = 0;
            continue;
        }
        struct req *r = &c->q[(c->tail - 1) & (NQ - 1)];
        if (st == RQ_METHOD) {
            if (ch == ' ') {
                if (r->method_len == 3 && r->method[0] == 'P' && r->method[1] == 'R' &&
                    r->method[2] == 'I') {
                    /* "PRI * HTTP/2.0": the HTTP/2 connection preface (h2c with prior knowledge,
                     * plain-text gRPC); RFC 9113 reserved the method so that no HTTP/1 request
                     * has it. Not a request: the connection is left alone from here on. */
                    weft_stat(HST_OTHER_PROTOCOL);
                    c->tail--;
                    c->rq_state = RQ_IDLE;
                    c->opaque = 1;
                    return 1;
                }
                c->rq_state = RQ_PATH;
                r->no_body = r->method_len == 4 && r->method[0] == 'H' && r->method[1] == 'E' &&
                             r->method[2] == 'A' && r->method[3] == 'D';
            } else if (is_upper(ch) && r->method_len < METHOD_MAX) {
                r->method[r->method_len & (METHOD_MAX - 1)] = ch;
                r->method_len++;
            } else {
                /* not HTTP after all: forget this request */
                weft_stat(HST_NOT_HTTP);
                c->tail--;
                c->rq_state = RQ_IDLE;
                return 1;
            }
        } else if (st == RQ_PATH) {
            if (ch == ' ') {
                c->rq_state = RQ_VERSION;
                c->rq_vlen = 0;
            } else if (ch == '\r' || ch == '\n') {
                c->rq_state = RQ_HSKIP;
            } else if (ch == '?' || ch == '#') {
                r->flags |= 0x80; /* cut: the rest of the target is never copied */
            } else if (!(r->flags & 0x80)) {
                if (r->path_len < PATH_MAX_) {
                    r->path[r->path_len & (PATH_MAX_ - 1)] = ch;
                    r->path_len++;
                } else {
                    r->flags |= F_PATH_TRUNCATED;
                }
            }
        } else if (st == RQ_VERSION) {
            u8 v = c->rq_vlen; /* bytes of "HTTP/1." matched so far; 8: past the version */
            if (v < 7)
                /* a mismatch: past the version (8), or not "HTTP/" at all (below 5: 9) */
                c->rq_vlen = ch == (u8)(HTTP_1_1_WORD >> (v * 8)) ? v + 1 : 8 + ((0x1F >> v) & 1);
            else if (v == 7) {
                r->flags |= ch == '1' ? F_HTTP_1_1 : ch == '0' ? F_HTTP_1_0 : 0;
                c->rq_vlen = 8;
            }
            if (ch == '\n') {
                if (c->tail == 1 && *(u64 *)r->method == PROXY_WORD) {
                    /* a PROXY protocol v1 line ("PROXY TCP4 <client> <balancer> <ports>", a load
                     * balancer's) before a connection's first request: not a request */
                    c->tail--;
                    c->rq_state = RQ_IDLE;
                    continue;
                }
                if (c->rq_vlen == VERSION_NOT_HTTP) {
                    /* a line that does not end in "HTTP/...": not a request (text, a body) */
                    weft_stat(HST_NOT_HTTP);
                    c->tail--;
                    c->rq_state = RQ_IDLE;
                    return 1;
                }
                p->inj_begin = 1; /* WEFT-INJECT */
                c->rq_state = RQ_HNAME;
                c->rq_name_len = 0;
                c->rq_name[0] = 0;
                c->rq_name[1] = 0;
            }
        } else if (st == RQ_HNAME) {
            if (ch == '\n') {
                /* blank line: headers done; after the body the next byte may start a
                 * pipelined request (chunked framing wins over a Content-Length: RFC 9112 6.3) */
                r->done_headers = 1;
                p->inj_hdrs = 1; /* WEFT-INJECT */
                r->flags &= 0x7f;
                c->rq_state = RQ_IDLE;
                if (c->rq_chunked) {
                    c->rq_state = RQ_CHUNKED;
                    c->rq_chunk_tail = 0;
                    c->rq_chunk_unsure = 0;
                    return 0; /* the caller looks for its end (chunked_request_head_call) */
                }
                if (c->rq_body_left) {
                    c->rq_state = RQ_BODY;
                    return 0; /* the caller steps over the body (skip_request_body) */
                }
            } else if (ch == ':') {
                u8 t = target_of(c->rq_name, c->rq_name_len);
                c->rq_target = t;
                c->rq_vlen = 0;
                c->rq_state = t == T_NONE ? RQ_HSKIP : RQ_HVAL;
            } else if (ch != '\r') {
                if (c->rq_name_len < 16)
                    ((char *)c->rq_name)[c->rq_name_len & 15] = lower(ch);
                if (c->rq_name_len < 255)
                    c->rq_name_len++;
            }
        } else if (st == RQ_HVAL) {
            if (ch == '\n') {
                c->rq_state = RQ_HNAME;
                c->rq_name_len = 0;
                c->rq_name[0] = 0;
                c->rq_name[1] = 0;
            } else if (ch == '\r' || (ch == ' ' && c->rq_vlen == 0)) {
                /* skip */
            } else {
                u8 t = c->rq_target;
                u8 v = c->rq_vlen;
                if (t == T_HOST && v < HOST_MAX) {
                    r->host[v & (HOST_MAX - 1)] = ch;
                    r->host_len = v + 1;
                } else if (t == T_TP && v < TP_MAX) {
                    r->tp[v & 63] = ch; /* v < TP_MAX (56) */
                    r->tp_len = v + 1;
                } else if (t == T_TS && v < TS_MAX) {
                    r->ts[v & (TS_MAX - 1)] = ch;
                    r->ts_len = v + 1;
                } else if (t == T_CLEN && (u8)(ch - '0') < 10) {
                    c->rq_body_left = c->rq_body_left * 10 + (u8)(ch - '0');
                } else if (t == T_TE && ch == 'k') {
                    c->rq_chunked = 1; /* "chunked" is the only transfer coding with a 'k' */
                }
                if (v < 255)
                    c->rq_vlen = v + 1;
            }
        } else { /* RQ_HSKIP */
            if (ch == '\n') {
                c->rq_state = RQ_HNAME;
                c->rq_name_len = 0;
                c->rq_name[0] = 0;
                c->rq_name[1] = 0;
            }
        }
    }
    return 0;
}

/* A response has no body when its status or the request method says so (RFC 9112 §6.3). */
static __always_inline int bodiless(struct conn *c, u16 status)
{
    if (status == 204 || status == 304)
        return 1;
    return c->head != c->tail && c->q[c->head & (NQ - 1)].no_body;
}

/* The request being answered is a CONNECT (a proxy's tunnel). */
static __always_inline int answering_connect(struct conn *c)
{
    return c->head != c->tail && *(u64 *)c->q[c->head & (NQ - 1)].method == CONNECT_WORD;
}

/* Headers of a response ended with `rest` bytes of this call after them: follow its framing. */
static __always_inline void response_headers_done(struct conn *c, u16 status, u64 rest, u64 now)
{
    if (status == 101 || (status >= 200 && status < 300 && answering_connect(c))) {
        /* Switching Protocols (WebSocket, h2c upgrade) or a tunnel open (RFC 9110 9.3.6): the
         * request ends here, and what follows is another protocol */
        response_done(c, now);
        weft_stat(HST_OTHER_PROTOCOL);
        c->opaque = 1;
        return;
    }
    c->rs_done_body = 0;
    if (status >= 100 && status < 200) { /* interim (100 Continue): the final response follows */
        c->rs_state = RS_IDLE;
        c->resp_started = 0;
        if (c->head != c->tail)
            c->q[c->head & (NQ - 1)].status = 0; /* not answered until the final response */
        return;
    }
    c->rs_state = RS_BODY;
    if (bodiless(c, status)) {
        response_done(c, now);
    } else if (c->chunked) {
        c->body_left = 0; /* the terminator is checked on the call's tail */
    } else if (c->clen != (u64)-1) {
        if (rest >= c->clen) {
            c->rs_done_body = (u32)c->clen; /* <= rest, the rest of one call */
            response_done(c, now);
        } else {
            c->body_left = c->clen - rest;
        }
    }
    /* else: no framing (ends at close, or at the next request) */
}

/* Response-direction bytes (server write / client read): up to WEFT_WINDOW steps from p->pos.
 * Returns 1 when the rest of the call is not worth parsing (body, or not a response). */
static __always_inline int scan_response(struct conn *c, char *s, struct parse_ctx *p)
{
    u64 now = p->now;
    u64 total = p->total;
    u16 status = 0;
    if (c->rs_state == RS_BODY) {
        if (!c->chunked && c->clen != (u64)-1) {
            if (total >= c->body_left)
                response_done(c, now);
            else
                c->body_left -= total;
        }
        return 1;
    }
    if (c->head != c->tail)
        status = c->q[c->head & (NQ - 1)].status;
    for (u32 k = 0; k < WEFT_WINDOW; k++) {
        u32 i = p->pos;
        if (i >= p->n)
            return 1;
        p->pos = i + 1;
        u8 st = c->rs_state;
        if (i + 8 <= p->n && response_word(c, s, p, i, st))
            continue;
        char ch = s[i & (WEFT_SCAN_MAX - 1)];
        if (st == RS_IDLE) {
            if (ch != 'H')
                return 1;
            c->rs_state = RS_VERSION;
            c->resp_started = 1;
            if (p->goid && c->t.role == ROLE_SERVER && c->head != c->tail)
                c->q[c->head & (NQ - 1)].goid = p->goid; /* Go: the writer serves it, not a background reader */
            c->clen = (u64)-1;
            c->chunked = 0;
            c->chunk_tail = 0;
            c->body_left = 0;
            status = 0;
        } else if (st == RS_VERSION) {
            if (ch == ' ') {
                c->rs_state = RS_STATUS;
                c->rs_vlen = 0;
            }
        } else if (st == RS_STATUS) {
            if (ch >= '0' && ch <= '9' && c->rs_vlen < 3) {
                status = status * 10 + (ch - '0');
                c->rs_vlen++;
            } else {
                c->rs_state = ch == '\n' ? RS_HNAME : RS_LINE;
                c->rs_name_len = 0;
                c->rs_name[0] = 0;
                c->rs_name[1] = 0;
            }
            if (c->head != c->tail)
                c->q[c->head & (NQ - 1)].status = status;
        } else if (st == RS_LINE || st == RS_HSKIP) {
            if (ch == '\n') {
                c->rs_state = RS_HNAME;
                c->rs_name_len = 0;
                c->rs_name[0] = 0;
                c->rs_name[1] = 0;
            }
        } else if (st == RS_HNAME) {
            if (ch == '\n') {
                response_headers_done(c, status, total - (u64)i - 1, now);
                return 2; /* bodies are never scanned; the caller sees what may follow */
            } else if (ch == ':') {
                u8 t = target_of(c->rs_name, c->rs_name_len);
                c->rs_target = t;
                if (t == T_CLEN)
                    c->clen = 0;
                c->rs_state = (t == T_CLEN || t == T_TE) ? RS_HVAL : RS_HSKIP;
            } else if (ch != '\r') {
                if (c->rs_name_len < 16)
                    ((char *)c->rs_name)[c->rs_name_len & 15] = lower(ch);
                if (c->rs_name_len < 255)
                    c->rs_name_len++;
            }
        } else if (st == RS_HVAL) {
            if (ch == '\n') {
                c->rs_state = RS_HNAME;
                c->rs_name_len = 0;
                c->rs_name[0] = 0;
                c->rs_name[1] = 0;
            } else if (c->rs_target == T_CLEN && ch >= '0' && ch <= '9') {
                c->clen = c->clen * 10 + (ch - '0');
            } else if (c->rs_target == T_TE && ch == 'k') {
                c->chunked = 1; /* "chunked" is the only transfer coding with a 'k' */
            }
        } else {
            return 1;
        }
    }
    return 0;
}

#if WEFT_INJECT
/* ---------- WEFT-INJECT: header injection context ---------- */

/* Bytes the injector pushed into this thread's current send on `sk` (0 if none). Taken once. */
static __always_inline u32 injected_in_call(u32 tid, char *sk)
{
    struct weft_inj_out *o = weft_inj_out.lookup(&tid);
    if (!o || o->seq_taken)
        return 0;
    u16 dport = 0, lport = 0;
    bpf_probe_read_kernel(&dport, 2, sk + WEFT_SKC_DPORT_OFF);
    bpf_probe_read_kernel(&lport, 2, sk + WEFT_SKC_NUM_OFF);
    u32 ports = ((u32)lport << 16) | (u16)((dport >> 8) | (dport << 8));
    if (o->ports != ports)
        return 0;
    o->seq_taken = 1;
    return o->pushed;
}

/* After a request-direction run: a server request gets its context (random ids, the trace id of
 * a valid incoming traceparent once its headers are read), kept in weft_ctx[tid] until its
 * response is complete (emit_req); a client request takes the ids the injector put on the wire. */
static __always_inline void inject_after_scan(struct conn *c, struct parse_ctx *p)
{
    if (c->tail == c->head)
        return;
    u32 idx = (c->tail - 1) & (NQ - 1);
    struct weft_tpctx *x = &c->qctx[idx];
    struct req *r = &c->q[idx];
    u32 tid = r->tid;
    if (c->t.role == ROLE_CLIENT) {
        u32 me = (u32)p->pid_tgid;
        struct weft_inj_out *o = weft_inj_out.lookup(&me);
        if (!o || !o->seq_taken || !o->pushed || x->kind != WEFT_CTX_NONE)
            return;
        __builtin_memcpy(x->trace, o->trace, 32);
        __builtin_memcpy(x->span, o->span, 16);
        x->serial = 0;
        x->kind = WEFT_CTX_INJECTED;
        x->unsampled = o->unsampled;
        o->pushed = 0; /* taken; the injector rewrites the slot in place next time */
        return;
    }
    if (c->t.role != ROLE_SERVER)
        return;
    if (p->inj_begin && x->kind == WEFT_CTX_NONE) {
        x->serial = p->now;
        weft_random_hex(x->trace, 32);
        weft_random_hex(x->span, 16);
        x->kind = WEFT_CTX_ASSIGNED;
        x->parent = WEFT_PARENT_NONE;
        struct weft_tpctx *busy = weft_ctx.lookup(&tid);
        if (busy && busy->kind != WEFT_CTX_NONE) {
            /* a second request open on one thread: its sends can't be told apart */
            busy->kind = WEFT_CTX_AMBIGUOUS;
            if (busy->open < 255)
                busy->open++;
        } else if (busy) {
            __builtin_memcpy(busy, x, sizeof(*busy)); /* the thread's slot, free again: reuse it */
            busy->open = 1;
        } else {
            x->open = 1;
            weft_ctx.update(&tid, x);
            x->open = 0;
        }
    }
    if (p->inj_hdrs && x->kind == WEFT_CTX_ASSIGNED && r->tp_len == 55) {
        if (weft_trace_of(r->tp, 55, x->trace)) {
            x->parent = weft_parent_of(r->tp);
            struct weft_tpctx *live = weft_ctx.lookup(&tid);
            if (live && live->kind == WEFT_CTX_ASSIGNED && live->serial == x->serial) {
                __builtin_memcpy(live->trace, x->trace, 32);
                live->parent = x->parent;
            }
        }
    }
}
#endif

/* ---------- socket sends and receives ----------
 * A call is handled in ONE program run, at sock_{send,recv}_length: that tracepoint fires inside
 * the syscall, in the calling thread, once the bytes have moved (a read's are in the user buffer,
 * a write's are still in it), and names the sock and the byte count. The user buffer and the
 * syscall number come from the task's saved user registers. Hooking each data syscall's enter
 * and exit instead costs three programs and three tracepoint dispatches per call, and a tax on
 * every other syscall. Calls that are not plain syscalls (io_uring, sendmmsg, kernel sockets)
 * are counted and left alone. */

/* The saved user registers of this task: 1 and *a filled, else 0. */
static __always_inline int syscall_args(struct sysargs *a)
{
    char *regs = (char *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (!regs || bpf_probe_read_kernel(a, sizeof(*a), regs + WEFT_PT_REGS_DX_OFF))
        return 0;
    return 1;
}

/* How the syscall passed its bytes: CK_NONE for syscalls this tracer does not parse. */
static __always_inline u8 call_kind(u64 nr, u8 is_write)
{
    if (is_write) {
        if (nr == WEFT_NR_WRITE || nr == WEFT_NR_SENDTO)
            return CK_BUF;
        if (nr == WEFT_NR_WRITEV)
            return CK_IOV;
        if (nr == WEFT_NR_SENDMSG)
            return CK_MSG;
        if (nr == WEFT_NR_SENDFILE)
            return CK_NODATA;
    } else {
        if (nr == WEFT_NR_READ || nr == WEFT_NR_RECVFROM)
            return CK_BUF;
        if (nr == WEFT_NR_READV)
            return CK_IOV;
        if (nr == WEFT_NR_RECVMSG)
            return CK_MSG;
    }
    return CK_NONE;
}

/* The iovec array and its length of a readv/writev/recvmsg/sendmsg call (0 for the others). */
static __always_inline u64 iov_array(struct sysargs *a, u8 kind, u64 *cnt)
{
    u64 iovp = 0;
    *cnt = 0;
    if (kind == CK_IOV) {
        *cnt = a->dx;
        return a->si;
    }
    if (kind == CK_MSG) {
        bpf_probe_read_user(&iovp, 8, (char *)a->si + 16); /* user_msghdr.msg_iov */
        bpf_probe_read_user(cnt, 8, (char *)a->si + 24);   /* user_msghdr.msg_iovlen */
    }
    return iovp;
}

/* First user buffer of the call and its length. */
static __always_inline u64 first_buffer(struct sysargs *a, u8 kind, u64 *len)
{
    u64 iov[2] = {};
    u64 cnt = 0;
    *len = 0;
    if (kind == CK_BUF) {
        *len = a->dx;
        return a->si;
    }
    u64 iovp = iov_array(a, kind, &cnt);
    if (!iovp || !cnt || bpf_probe_read_user(iov, sizeof(iov), (void *)iovp))
        return 0;
    *len = iov[1];
    return iov[0];
}

#define MAX_IOV 4

/* readv/writev/recvmsg/sendmsg: append iovecs 1..MAX_IOV-1 after the first one's n bytes. */
static __always_inline u32 gather_rest(struct sysargs *a, u8 kind, char *s, u32 n, u64 ret)
{
    u64 cnt = 0;
    u64 iovp = iov_array(a, kind, &cnt);
    u64 want = ret < WEFT_SCAN_MAX ? ret : WEFT_SCAN_MAX;
    for (int k = 1; k < MAX_IOV; k++) {
        if (k >= cnt || n >= want || !iovp)
            break;
        u64 iov[2] = {};
        if (bpf_probe_read_user(iov, sizeof(iov), (void *)(iovp + 16 * k)))
            break;
        u64 len = iov[1];
        if (len > want - n)
            len = want - n;
        u32 off = n & (WEFT_SCAN_MAX - 1);
        u32 l = len & (WEFT_SCAN_MAX - 1);
        if (l && bpf_probe_read_user(s + off, l, (void *)iov[0]))
            break;
        n += l;
    }
    return n;
}

#define MAX_TAIL_IOV 16

/* Where a call's `total` bytes end in user memory: in its first buffer when that holds them all,
 * else in the buffer of its iovec array (writev, sendmsg, readv, recvmsg) that the byte count
 * ends in, found by adding up lengths. Only when at least `want` bytes end there; else 0. */
static __always_inline u64 call_end(struct sysargs *a, u8 kind, u64 buf, u64 buflen, u64 total, u64 want)
{
    if (buflen >= total)
        return total >= want ? buf + total : 0;
    u64 cnt = 0;
    u64 iovp = iov_array(a, kind, &cnt);
    u64 left = total;
    for (int k = 0; k < MAX_TAIL_IOV; k++) {
        u64 iov[2] = {};
        if (!iovp || k >= cnt || bpf_probe_read_user(iov, sizeof(iov), (void *)(iovp + 16 * k)))
            return 0;
        if (left <= iov[1])
            return left >= want ? iov[0] + left : 0;
        left -= iov[1];
    }
    return 0;
}

#define CHUNKED_END 0x0A0D0A0D30ULL /* "0\r\n\r\n", oldest byte low */

/* Chunked framing ends with "0\r\n\r\n": `tail` keeps a body's last five bytes so far; this
 * call's `count` (> 0) body bytes end at `end` in user memory (call_end: in one buffer, as a
 * server that writes the last chunk as a buffer of its own, like nginx, has them). A call of
 * fewer than five (a reader's small or unlucky read) adds to the ones kept from the calls before
 * it. Returns 1 when the body's last five bytes are the terminator. */
static __always_inline int chunked_end_read(u64 *tail, u64 end, u64 count)
{
    u64 t = 0;
    if (count >= 5) {
        bpf_probe_read_user(&t, 5, (char *)end - 5);
    } else {
        u32 k = count & 3 ? count & 3 : 4; /* 1..4 */
        u64 fresh = 0;
        bpf_probe_read_user(&fresh, k, (char *)end - k);
        t = ((*tail >> (8 * k)) | (fresh << (8 * (5 - k)))) & 0xFFFFFFFFFFULL;
    }
    *tail = t;
    return t == CHUNKED_END;
}

/* A chunked response's body went on with this call of `total` bytes, which end at `end`. */
static __always_inline void check_chunked_end(struct conn *c, u64 end, u64 total, u64 now)
{
    if (c->rs_state == RS_BODY && c->chunked && end && chunked_end_read(&c->chunk_tail, end, total))
        response_done(c, now);
}

/* The sock still has the ports recorded for it: a freed sock's address comes back for new
 * connections, and an entry whose CLOSE was never seen must not lend them its state. One read:
 * skc_dport and skc_num are adjacent (skc_portpair; the loader checks). */
static __always_inline int same_ports(struct conn *c, char *sk)
{
    u32 pair = 0;
    bpf_probe_read_kernel(&pair, 4, sk + WEFT_SKC_DPORT_OFF);
    u16 dport = (u16)pair, lport = (u16)(pair >> 16);
    return c->t.lport == lport && c->t.rport == (u16)((dport >> 8) | (dport << 8));
}

/* A TCP sock this tracer does not know yet, at its first send or receive by a traced task: a
 * connection whose handshake was seen (its role is in `roles`), or one that existed before the
 * agent started, picked up mid-stream with its role still unknown. */
static __always_inline struct conn *adopt(u64 pid_tgid, char *sk, struct sysargs *a, u8 is_write,
                                          u64 now)
{
    u16 family = 0, proto = 0;
    bpf_probe_read_kernel(&family, 2, sk + WEFT_SKC_FAMILY_OFF);
    bpf_probe_read_kernel(&proto, 2, sk + WEFT_SK_PROTOCOL_OFF);
    if ((family != AF_INET && family != AF_INET6) || proto != IPPROTO_TCP)
        return 0;
    if (weft_skip_task(pid_tgid) || !syscall_args(a) || call_kind(a->orig_ax, is_write) == CK_NONE)
        return 0;
    u64 key = (u64)sk;
    u8 *hint = roles.lookup(&key);
    u8 role = hint ? *hint : ROLE_UNKNOWN;
    if (hint)
        roles.delete(&key);
    struct conn *c = add_conn(pid_tgid, sk, role, role == ROLE_UNKNOWN, now);
    if (c && role == ROLE_UNKNOWN)
        weft_stat(HST_ADOPTED);
    return c;
}

/* What the bytes at s[at..n) begin: MSG_REQUEST a request line (an upper-case method, a space,
 * a target), MSG_STATUS a status line ("HTTP/1."), MSG_NONE neither, MSG_SHORT too few bytes to
 * tell (a request written a few bytes at a time). A PROXY protocol v1 line counts as a request
 * (the parser steps over it). Outside the parser's loop: the verifier sees it once. */
enum msg_start { MSG_NONE = 0, MSG_REQUEST, MSG_STATUS, MSG_SHORT };
static __always_inline int message_start(char *s, u32 at, u32 n)
{
    if (at >= n)
        return MSG_SHORT;
    char c0 = s[at & (WEFT_SCAN_MAX - 1)];
    if (!is_upper(c0))
        return MSG_NONE;
    u64 first7 = 0x00FFFFFFFFFFFFFFULL; /* "HTTP/1." */
    if (at + 8 <= n && (word_at(s, at) & first7) == (HTTP_1_1_WORD & first7))
        return MSG_STATUS;
    for (u32 i = 1; i <= METHOD_MAX; i++) {
        if (at + i + 1 >= n)
            return MSG_SHORT;
        char ch = s[(at + i) & (WEFT_SCAN_MAX - 1)];
        if (ch == ' ')
            return target_start(s[(at + i + 1) & (WEFT_SCAN_MAX - 1)],
                                (i == 7 && c0 == 'C') || /* CONNECT, or PROXY (v1) */
                                    (i == 5 && c0 == 'P' && s[(at + 1) & (WEFT_SCAN_MAX - 1)] == 'R'))
                       ? MSG_REQUEST
                       : MSG_NONE;
        if (!is_upper(ch))
            return MSG_NONE;
    }
    return MSG_NONE;
}

static __always_inline int on_sock_call(void *ctx, char *sk, int ret, int flags, u8 is_write)
{
    if (ret <= 0 && is_write) {
        /* a failed send (EAGAIN...): its start must not pass for the next one's */
        struct write_entry *w = write_entry.task_storage_get(bpf_get_current_task_btf(), 0, 0);
        if (w)
            w->ts = 0;
    }
    if (ret <= 0 || (!is_write && (flags & MSG_PEEK))) /* peeked bytes are parsed when read */
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
#if WEFT_FILTER_CGROUPS
    struct write_entry *scope_w;
    if (task_out_of_scope(pid_tgid, &scope_w))
        return 0;
#endif
    u64 key = (u64)sk;
    struct sysargs a = {};
    struct conn *c = conns.lookup(&key);
    if (c && !same_ports(c, sk)) {
        conns.delete(&key); /* another connection's state (see same_ports) */
        c = 0;
    }
    if (!c) {
        c = adopt(pid_tgid, sk, &a, is_write, bpf_ktime_get_ns());
        if (!c)
            return 0;
    } else if (!syscall_args(&a)) {
        return 0;
    }
    u8 kind = call_kind(a.orig_ax, is_write);
    if (kind == CK_NONE) {
        weft_stat(HST_UNPARSED);
        return 0;
    }
    u32 tgid = pid_tgid >> 32;
    if (c->owner != tgid) {
        /* another process uses this connection (a passed or inherited fd), unless it must not
         * be traced */
        if (weft_skip_task(pid_tgid))
            return 0;
        c->owner = tgid;
        c->cgroup = bpf_get_current_cgroup_id();
    }
    /* times: a read once its bytes are there, a write when TCP started queueing it (its bytes
     * may be read before it returns), so client start <= server start <= server end <= client end */
    u64 now;
    u32 seq = 0, seq0;
    if (is_write) {
        struct write_entry *w = write_entry.task_storage_get(bpf_get_current_task_btf(), 0, 0);
        now = (w && w->sk == key && w->ts) ? w->ts : bpf_ktime_get_ns();
        if (w)
            w->ts = 0; /* taken: the next send on this thread starts afresh */
        c->bytes_sent += ret;
        c->last_write_ns = now;
        bpf_probe_read_kernel(&seq, 4, sk + WEFT_TCP_WRITE_SEQ_OFF);
        seq0 = seq - (u32)ret;
#if WEFT_INJECT
        seq0 -= injected_in_call((u32)pid_tgid, sk); /* WEFT-INJECT: pushed bytes are on the wire too */
#endif
    } else {
        now = bpf_ktime_get_ns();
        c->bytes_recv += ret;
        c->last_read_ns = now;
        bpf_probe_read_kernel(&seq, 4, sk + WEFT_TCP_COPIED_SEQ_OFF);
        seq0 = seq - (u32)ret;
    }
    if (c->opaque)
        return 0;
    u64 buflen = 0;
    u64 buf = kind == CK_NODATA ? 0 : first_buffer(&a, kind, &buflen);
    if (c->rs_state == RS_BODY && c->t.role != ROLE_UNKNOWN &&
        is_write == (c->t.role == ROLE_SERVER)) {
        /* response body bytes: their framing is arithmetic, nothing to copy or parse */
        if (c->chunked)
            check_chunked_end(c, call_end(&a, kind, buf, buflen, (u64)ret, ret < 5 ? ret : 5),
                              (u64)ret, now);
        else if (c->clen != (u64)-1 && (u64)ret >= c->body_left)
            response_done(c, now);
        else if (c->clen != (u64)-1)
            c->body_left -= (u64)ret;
        return 0;
    }
    if (c->rq_state == RQ_CHUNKED) {
        if (is_write == (c->t.role == ROLE_CLIENT) && (c->head != c->tail || !c->rq_chunk_unsure)) {
            /* chunked request body bytes, also after an early answer (a 401 to an upload):
             * never copied or parsed; the call that ends in the terminator ends the body */
            u64 end = call_end(&a, kind, buf, buflen, (u64)ret, ret < 5 ? ret : 5);
            if (!end)
                c->rq_chunk_unsure = 1;
            else if (chunked_end_read(&c->rq_chunk_tail, end, (u64)ret))
                c->rq_state = RQ_IDLE;
            return 0;
        }
        /* the body's end went unseen: its request is answered and a call of it could not be
         * checked, or an answer comes with no request seen (a request behind the terminator in
         * one call). Requests are looked for again. */
        if (is_write == (c->t.role == ROLE_CLIENT) || c->head == c->tail)
            c->rq_state = RQ_IDLE;
    }
    if (is_write == (c->t.role == ROLE_CLIENT)) {
        /* the request direction with no request head in progress: a response whose head went
         * past the window, unended, was over before this (no pipelining) */
        if (c->rq_state == RQ_IDLE && c->resp_started && c->rs_state != RS_BODY)
            response_done(c, c->t.role == ROLE_SERVER ? c->last_write_ns : c->last_read_ns);
    } else if (c->rq_state != RQ_IDLE && c->rq_state < RQ_BODY && c->tail - c->head == 1) {
        /* an answer to the request whose head is still being read: that head went past the
         * window, unended; it was over before its answer */
        c->rq_state = RQ_IDLE;
    }
    u32 start = 0; /* first byte of this call to parse */
    if (c->rq_state == RQ_BODY && is_write == (c->t.role == ROLE_CLIENT)) {
        /* also when its request was answered first (a 404 or 417 before the body): a connection
         * that goes on carries the body next, and the server reads it as one (RFC 9110 10.1.1) */
        if ((u64)ret <= c->rq_body_left) {
            /* request body bytes: counted, never copied or parsed */
            c->rq_body_left -= (u64)ret;
            if (!c->rq_body_left)
                c->rq_state = RQ_IDLE;
            return 0;
        }
        start = (u32)c->rq_body_left; /* the body ends inside this call: a pipelined request */
        c->rq_body_left = 0;
        c->rq_state = RQ_IDLE;
    }
    u32 zero = 0;
    struct scan_buf *sb = scratch.lookup(&zero);
    if (!sb)
        return 0;
    char *s = sb->b;
    u32 n = 0;
    u64 total = (u64)ret;
    if (start && buf && buflen >= total) {
        /* a request right behind a body that ends inside this call of one buffer: the bytes
         * from there are the ones parsed, however far into the call they are */
        buf += start;
        buflen -= start;
        total -= start;
        seq0 += start;
        start = 0;
    }
    if (buf) {
        u64 avail = total < buflen ? total : buflen;
        n = avail < WEFT_SCAN_MAX ? (u32)avail : WEFT_SCAN_MAX;
        if (n > WEFT_SCAN_MAX)
            n = WEFT_SCAN_MAX;
        if (bpf_probe_read_user(s, n, (void *)buf))
            n = 0;
        else if (avail < total)
            n = gather_rest(&a, kind, s, n, total);
    }
    if (n >= 16 && c->tail == 0 && start == 0 && c->rq_state == RQ_IDLE &&
        is_write == (c->t.role == ROLE_CLIENT) && *(u64 *)s == PROXY_V2_SIG &&
        *(u32 *)(s + 8) == PROXY_V2_SIG_TAIL) {
        /* a PROXY protocol v2 header (a load balancer's, binary) before a connection's first
         * request: 16 bytes and the length they give (v1, a text line, the parser skips) */
        start = 16 + (((u32)(u8)s[14] << 8) | (u8)s[15]);
    }
    if (c->t.role == ROLE_UNKNOWN) {
        /* a connection picked up mid-stream: the direction that carries a request decides, seen
         * at the first call that starts a message (not the rest of a body in flight) */
        int kind_of = message_start(s, 0, n);
        if (kind_of != MSG_REQUEST && kind_of != MSG_STATUS)
            return 0;
        c->t.role = (is_write ^ (kind_of == MSG_STATUS)) ? ROLE_CLIENT : ROLE_SERVER;
        if (!c->open_sent) {
            c->open_sent = 1;
            emit_conn(c, WEFT_KIND_CONN_OPEN, pid_tgid, now);
        }
    }
    u8 request_dir = (c->t.role == ROLE_SERVER) ? !is_write : is_write;
    if (request_dir && c->rq_state == RQ_IDLE && message_start(s, start, n) == MSG_NONE) {
        /* where a request must start, a method token and a space with no target after them
         * (text, a body the parser lost step with): not a request */
        weft_stat(HST_NOT_HTTP);
        return 0;
    }
    struct parse_ctx *p = parse_state.lookup(&zero);
    if (!p)
        return 0;
    p->sk = key;
    p->pid_tgid = pid_tgid;
    p->now = now;
    p->total = total;
    p->n = n;
    p->pos = start;
    p->seq0 = seq0;
    p->has_seq = 1;
    p->request_dir = request_dir;
    /* for the chunked-end checks: through the iovecs in the response direction only (a vector
     * call costs a few reads); in the request direction only a call of one buffer (arithmetic) */
    if (!buf)
        p->end = 0;
    else if (p->request_dir)
        p->end = buflen >= total ? buf + total : 0;
    else
        p->end = call_end(&a, kind, buf, buflen, (u64)ret, ret < 5 ? ret : 5);
    p->goid = weft_call_goid(pid_tgid, is_write && c->t.role == ROLE_CLIENT); /* Go */
    p->inj_begin = 0; /* WEFT-INJECT */
    p->inj_hdrs = 0;
    parsers.call(ctx, 0);
    return 0;
}

/* A response's headers just ended at p->pos. Bodies are never scanned, but another response may
 * follow in this call: the final one after an interim one (100 Continue, 103 Early Hints), the
 * next pipelined one after a complete one. Returns 1 when nothing of the call is left to parse. */
static __always_inline int after_response_head(struct conn *c, struct parse_ctx *p)
{
    if (c->rs_state != RS_IDLE || c->opaque || c->head == c->tail)
        return 1;
    u64 next = (u64)p->pos + c->rs_done_body;
    if (next >= p->n)
        return 1; /* not copied */
    p->pos = (u32)next;
    return 0;
}

/* A request's body starts at p->pos (its head just ended there): step over the part of it in
 * this call. Returns 1 when nothing of the call is left to parse. */
static __always_inline int skip_request_body(struct conn *c, struct parse_ctx *p, char *s)
{
    u64 rest = p->total - p->pos; /* bytes of this call from the body's start */
    if (c->rq_body_left > rest) {
        c->rq_body_left -= rest;
        return 1;
    }
    u64 next = p->pos + c->rq_body_left;
    c->rq_body_left = 0;
    c->rq_state = RQ_IDLE;
    if (next < p->n) {
        p->pos = (u32)next; /* a pipelined request */
        return 0;
    }
    if (next >= p->total || !p->end)
        return 1; /* nothing follows, or not in a call of one buffer */
    /* what follows the body was not copied: copy it, and parse the call from there on */
    u64 left = p->total - next;
    u32 m = left < WEFT_SCAN_MAX ? (u32)left : WEFT_SCAN_MAX;
    if (m > WEFT_SCAN_MAX)
        m = WEFT_SCAN_MAX;
    if (bpf_probe_read_user(s, m, (char *)p->end - left))
        return 1;
    p->seq0 += (u32)next;
    p->total = left;
    p->n = m;
    p->pos = 0;
    return 0;
}

/* A chunked request's head just ended at p->pos: its body's start is in this call, and so its end
 * may be. Seen when the call is one buffer; else the body ends when its request is answered. */
static __always_inline int chunked_request_head_call(struct conn *c, struct parse_ctx *p)
{
    u64 body = p->total - p->pos;
    if (body && !p->end)
        c->rq_chunk_unsure = 1;
    else if (body && chunked_end_read(&c->rq_chunk_tail, p->end, body))
        c->rq_state = RQ_IDLE;
    return 1; /* the body is not parsed; a request pipelined behind it in this call is lost */
}

#define CRLFCRLF 0x0A0D0A0DU /* "\r\n\r\n" as a little-endian word: a head's end */

/* The head ends `back` bytes before the call's end (p->end: a call of one buffer). */
static __always_inline int head_ends_at(struct parse_ctx *p, u64 back)
{
    u32 w = 0;
    if (back + 4 > p->total - p->n) /* only in the bytes the parser was not given */
        return 0;
    bpf_probe_read_user(&w, 4, (char *)p->end - back - 4);
    return w == CRLFCRLF;
}

/* The call's first WEFT_SCAN_MAX bytes, all the parser saw, ended inside a head (a long cookie,
 * security policy or token), and the call went on. Where the head's end is found where the
 * call's last bytes put it (the message whole in the call: before its Content-Length body, or at
 * the call's end), it is taken as ended there; else the next message puts the parser back in step
 * (see on_sock_call). The headers past the window are not read. */
static __always_inline void head_past_window(struct conn *c, struct parse_ctx *p)
{
    if (!p->end)
        return;
    if (p->request_dir) {
        u8 st = c->rq_state;
        if (st == RQ_IDLE || st >= RQ_BODY)
            return;
        u64 body = c->rq_chunked ? 0 : c->rq_body_left;
        if (body && head_ends_at(p, body)) {
            c->rq_body_left = 0; /* the body too is whole in this call */
        } else if (!head_ends_at(p, 0)) {
            return;
        }
        c->q[(c->tail - 1) & (NQ - 1)].done_headers = 1;
        if (c->rq_chunked) {
            c->rq_state = RQ_CHUNKED;
            c->rq_chunk_tail = 0; /* nothing of an earlier chunked body may count here */
            c->rq_chunk_unsure = 1; /* its start (and maybe its end) past the window: its answer ends it */
        } else {
            c->rq_state = c->rq_body_left ? RQ_BODY : RQ_IDLE;
        }
        return;
    }
    u8 st = c->rs_state;
    if (!c->resp_started || st == RS_IDLE || st == RS_BODY || c->head == c->tail)
        return;
    u16 status = c->q[c->head & (NQ - 1)].status;
    u64 body = (c->clen == (u64)-1 || c->chunked || bodiless(c, status)) ? 0 : c->clen;
    if (body && head_ends_at(p, body))
        response_headers_done(c, status, body, p->now); /* the whole response in this call */
    else if (head_ends_at(p, 0))
        response_headers_done(c, status, 0, p->now); /* its body, if any, follows */
}

/* The parser: WEFT_WINDOW bytes per run, then a tail call to itself while bytes remain
 * (WEFT_SCAN_MAX / WEFT_WINDOW runs at most, under the kernel's 33 tail-call limit). */
int weft_parse(void *ctx)
{
    u32 zero = 0;
    struct parse_ctx *p = parse_state.lookup(&zero);
    struct scan_buf *sb = scratch.lookup(&zero);
    if (!p || !sb)
        return 0;
    u64 key = p->sk;
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    int stop = p->request_dir ? scan_request(c, sb->b, p) : scan_response(c, sb->b, p);
    if (p->request_dir && c->rq_state == RQ_BODY)
        stop = skip_request_body(c, p, sb->b);
    else if (p->request_dir && c->rq_state == RQ_CHUNKED)
        stop = chunked_request_head_call(c, p);
    else if (stop == 2)
        stop = after_response_head(c, p);
#if WEFT_INJECT
    if (p->request_dir)
        inject_after_scan(c, p);
#endif
    if (!stop && p->pos < p->n) {
        parsers.call(ctx, 0);
        return 0; /* tail call failed (limit): the rest of the call is not parsed */
    }
    if (p->pos >= p->n && p->n < p->total)
        head_past_window(c, p);
    if (!p->request_dir)
        check_chunked_end(c, p->end, p->total, p->now);
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_recv_length) /* (struct sock *sk, int ret, int flags) */
{
    return on_sock_call(ctx, (char *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], 0);
}

RAW_TRACEPOINT_PROBE(sock_send_length) /* (struct sock *sk, int ret, int flags) */
{
    return on_sock_call(ctx, (char *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], 1);
}

/* A TCP send starts: tcp_sendmsg_locked fires before each chunk of a send is queued, in the
 * sending thread. Its first firing in a call is the send's start (before the peer can have read
 * any of it): writes are timed there. Only TCP sends run this; no syscall hook is needed. */
RAW_TRACEPOINT_PROBE(tcp_sendmsg_locked) /* (const struct sock *sk, msghdr *msg, skb, int size_goal) */
{
    u64 sk = ctx->args[0];
    struct write_entry *w;
#if WEFT_FILTER_CGROUPS
    if (task_out_of_scope(bpf_get_current_pid_tgid(), &w))
        return 0; /* its sends are not traced: no time to take */
#else
    w = write_entry.task_storage_get(bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
#endif
    if (w && (!w->ts || w->sk != sk)) {
        w->ts = bpf_ktime_get_ns();
        w->sk = sk;
    }
    return 0;
}

/* The connection is over: emit what it still holds and forget it. */
static __always_inline void conn_done(u64 key)
{
    struct conn *c = conns.lookup(&key);
    if (!c)
        return;
    u64 now = bpf_ktime_get_ns();
    flush_all(c, c->t.role == ROLE_SERVER ? c->last_write_ns : c->last_read_ns, now);
    if (c->open_sent)
        emit_conn(c, WEFT_KIND_CONN_CLOSE, (u64)c->owner << 32 | c->owner, now);
    conns.delete(&key);
}

/* TCP state changes (every TCP sock on the host, a few per connection):
 *   handshake done: SYN_RECV -> ESTABLISHED is an accepted (server) connection, -> SYN_SENT a
 *     connected (client) one: the role waits in `roles` for the connection's first send/receive;
 *   this end closes: -> FIN_WAIT1 / LAST_ACK in close() (not in shutdown(), after which the
 *     response may still be read) or at exit: requests still open end, the connection is over;
 *   -> CLOSE: the same, whoever closed it (a reset, the peer's FIN after ours), so that a later
 *     sock at the same address starts clean.
 * Fires in softirq too (handshakes, CLOSE): nothing here reads the current task then. */
RAW_TRACEPOINT_PROBE(inet_sock_set_state) /* (const struct sock *sk, int oldstate, int newstate) */
{
    u64 key = ctx->args[0];
    int old = (int)ctx->args[1], new = (int)ctx->args[2];
    if (new == TCP_SYN_SENT || (old == TCP_SYN_RECV && new == TCP_ESTABLISHED)) {
        u8 role = new == TCP_SYN_SENT ? ROLE_CLIENT : ROLE_SERVER;
        roles.update(&key, &role);
    } else if (new == TCP_CLOSE) {
        roles.delete(&key);
        conn_done(key);
    } else if (new == TCP_FIN_WAIT1 || new == TCP_LAST_ACK) {
        /* task context: only close(), shutdown() and exit get here */
        struct sysargs a = {};
        if (syscall_args(&a) && a.orig_ax == WEFT_NR_SHUTDOWN)
            return 0;
        u8 *hint = roles.lookup(&key);
        if (hint) {
            /* a connection that closes before carrying a byte (a health check, a port probe):
             * still an open and a close of the traced process that held it */
            u64 pid_tgid = bpf_get_current_pid_tgid();
            u8 role = *hint;
            roles.delete(&key);
            if (!conns.lookup(&key) && !weft_skip_task(pid_tgid))
                add_conn(pid_tgid, (char *)key, role, 0, bpf_ktime_get_ns());
        }
        conn_done(key);
    }
    return 0;
}
