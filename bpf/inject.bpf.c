/* Weft header injection, form (b): W3C traceparent for any language, allowed under lockdown.
 *
 * Hooks:
 *   sock_ops (cgroup v2, attached with BPF_F_ALLOW_MULTI)  BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: a
 *       socket this host connected (client side) goes into the SOCKHASH `socks`.
 *   sk_msg verdict on `socks`  every send on those sockets, in the sending thread: a per-socket
 *       state machine follows HTTP/1.x requests (request line, headers, Content-Length body) and
 *       inserts "traceparent: 00-<trace>-<span>-<flags>\r\n" with bpf_msg_push_data.
 * Where the line goes: when the request line and the whole header block are in one send, right
 *   after the request line; when the header block ends in a later send, just before the blank line
 *   that ends it (only then is it known that the request carries no traceparent of its own). A
 *   request that has a traceparent gets nothing; every other byte passes unchanged.
 * Context: trace = that of the server request the sending thread serves (weft_ctx[tid], set by
 *   http_tracer.bpf.c), or that its creator served when the thread was cloned (weft_ctx_ref[tid],
 *   set by lineage.bpf.c, valid while the creator still serves the same request); else a fresh
 *   random trace (a root). The client span id is always fresh. What was pushed is left in
 *   weft_inj_out[tid] for the http tracer, which runs later in the same syscall: at
 *   sock_send_length it takes the pushed length off the call's first sequence number (write_seq
 *   counts the pushed bytes, the syscall's return value does not), so the client request keeps
 *   the sequence number of its first byte on the wire and the (tuple, seq) join still holds; its
 *   parser then copies the ids into the client record (HttpRequest.injected_traceparent).
 * Structure: weft_sk_msg finds the connection's state (keyed by addresses: sk_msg cannot call
 *   bpf_get_socket_cookie) and pulls up to WEFT_INJ_SCAN bytes linear. A send that starts a
 *   request and holds its whole head (the usual case) is read 8 bytes at a time right there
 *   (fast_head); anything else goes to weft_msg_scan, a byte-wise state machine tail-called
 *   WEFT_INJ_WINDOW bytes per run (one small loop for the verifier), which also carries a head
 *   split across sends. The last run settles the bytes past the window (body). Either path
 *   pushes the line, then pulls a message of up to LINEAR_MAX bytes back into one buffer:
 *   tcp_bpf sends each buffer of a message on its own, so a split message left three TCP
 *   segments where the program wrote one (measured: inject.ratio 0.77 -> 0.9+, most of the cost
 *   of injection was those extra segments, not the program).
 * Gives up on a connection (passes everything, counted) when it loses the framing: chunked request
 *   bodies, a header block longer than WEFT_INJ_SCAN bytes in one send, pipelined requests in one
 *   send, bytes that are not HTTP/1.x. Never injects for processes in go_pids (goroutines move
 *   between threads, so a thread's context is not theirs).
 * Kernel needs: sock_ops, sk_msg, SOCKHASH, bpf_msg_push_data/pull_data (4.17+), cgroup v2.
 * Sampled flag: 01, or with -DWEFT_SAMPLE_BOUND=B (the agent's OTEL_TRACES_SAMPLER keeps a share
 *   of traces) 01 when the trace id's low 64 bits are below B, else 00 — the stitcher's own test
 *   (weft/sampling.py), so a downstream service records exactly the traces Weft exports. With
 *   -DWEFT_SAMPLE_PARENT (a parentbased_* sampler, the default) a trace that came in with a
 *   traceparent keeps that traceparent's flag, as the stitcher's parent-based test does.
 * -D constants: WEFT_SELF_PID, WEFT_MAX_CONNS, WEFT_MAX_TASKS, WEFT_INJ_SCAN (bytes of a message
 *   followed, power of two), WEFT_INJ_WINDOW (bytes per tail call; SCAN / WINDOW calls at most),
 *   WEFT_SAMPLE_BOUND and WEFT_SAMPLE_PARENT (optional, above).
 */
#include "common.h"
#include "inject.h"

#define AF_INET 2
#define AF_INET6 10
#define INJ_LEN 70 /* "traceparent: 00-" 32 "-" 16 "-01\r\n" (or -00) */
#define LINEAR_MAX 4096 /* a message up to one page is made one buffer again after the push */

enum inj_stat {
    IST_INJECTED = 0,
    IST_HAD_TRACEPARENT = 1,
    IST_ROOT = 2,
    IST_GO = 3,
    IST_GAVE_UP = 4,
    IST_PUSH_FAILED = 5,
    IST_SOCKS_FULL = 6,
    IST_AMBIGUOUS = 7,
    IST_FAST = 8, /* sends the fast path settled (the rest went through the byte-wise scanner) */
};

enum msg_st { MS_IDLE = 0, MS_METHOD, MS_TARGET, MS_HNAME, MS_HEND, MS_HVAL, MS_HSKIP, MS_BODY, MS_OFF };
enum hdr { H_NONE = 0, H_CLEN, H_TE };

/* Per connection (socket cookie): where the byte stream stands. */
struct msg_state {
    u64 body_left; /* request body bytes still to pass */
    u64 last8;     /* last 8 bytes of the request line (big-endian): "HTTP/1.x" */
    u64 name[2];   /* lower-cased header name prefix */
    u8 st;         /* enum msg_st */
    u8 name_len;
    u8 method_len;
    u8 has_tp;     /* this request already carries a traceparent */
    u8 target;     /* enum hdr: the header whose value is being read */
    u8 chunked;
    u8 requests;   /* requests started in the current message */
    u8 pad;
    /* scratch of the current message, kept here rather than in registers: values the verifier
     * does not track let it prune the scan loop's states */
    s32 at;        /* where to insert the header line in this message, or -1 */
    s32 rline;     /* offset just after a request line that ended in this message, or -1 */
    u32 seen;      /* bytes of this message scanned */
    u32 pad2;
};

/* sk_msg cannot call bpf_get_socket_cookie: connections are named by their addresses. */
struct conn_key {
    u32 laddr[4];
    u32 raddr[4];
    u32 ports; /* local << 16 | remote, host byte order (= weft_inj_out.ports) */
    u32 family;
};

BPF_TABLE_PUBLIC("lru_hash", u32, struct weft_tpctx, weft_ctx, WEFT_MAX_TASKS);
BPF_TABLE_PUBLIC("lru_hash", u32, struct weft_ctx_ref, weft_ctx_ref, WEFT_MAX_TASKS);
BPF_TABLE_PUBLIC("lru_hash", u32, struct weft_inj_out, weft_inj_out, WEFT_MAX_TASKS);
BPF_HASH(go_pids, u32, u8, 16384);                  /* filled by the agent */
BPF_SOCKHASH(socks, u64, WEFT_MAX_CONNS);           /* socket cookie -> socket */
BPF_TABLE("lru_hash", struct conn_key, struct msg_state, msg_states, WEFT_MAX_CONNS);
BPF_PERCPU_ARRAY(stats, u64, WEFT_MAX_STATS);

/* The fast path's state between its steps (fast_head), kept here rather than in registers for
 * the same reason as msg_state's scratch: every step starts from values the verifier does not
 * know, so it checks one step's paths once instead of once per combination of earlier ones. */
struct fast_ctx {
    u64 cl;       /* Content-Length */
    u32 q;        /* next byte to read */
    u32 carry;    /* 0x80: the byte before q is a CR, whose LF must come next */
    u32 rline;    /* offset just after the request line; 0 while it is being read */
    u32 hdr_end;  /* offset just after the blank line */
    u32 has_tp;   /* a traceparent header was seen */
    u32 cl_seen;  /* a Content-Length header was seen */
    u32 n;        /* bytes in the window */
    u32 k;        /* the method's length */
};

/* The message being scanned, handed from weft_sk_msg to the weft_msg_scan tail calls (per CPU:
 * a tail-call chain runs to its end on the CPU that started it). */
struct scan_ctx {
    struct conn_key key;
    u64 pid_tgid;
    u32 n;    /* bytes pulled into the linear window */
    u32 pos;  /* next byte to scan */
    u32 stop; /* the scan is over (end of window, or the framing was lost) */
    u32 pad;
    struct fast_ctx fast;
};
BPF_PERCPU_ARRAY(scan_state, struct scan_ctx, 1);
BPF_PROG_ARRAY(scanners, 1); /* [0] = weft_msg_scan, filled by the loader */

/* remote_port as sock_ops and sk_msg give it (the network-order 16 bits, shifted into the upper
 * half of the u32 on this kernel, in the lower half on old ones) in host order. */
/* The connection key from a sock_ops or an sk_msg context: both name the fields alike (a macro,
 * because the verifier rewrites context loads per program type and a helper cannot take both). */
#define CONN_KEY_FROM(k, fam, ctx)                                                              \
    do {                                                                                        \
        (k).family = (fam);                                                                     \
        (k).ports = ((ctx)->local_port << 16) | swap16((ctx)->remote_port);                     \
        if ((fam) == AF_INET) {                                                                 \
            (k).laddr[0] = (ctx)->local_ip4;                                                    \
            (k).raddr[0] = (ctx)->remote_ip4;                                                   \
        } else {                                                                                \
            (k).laddr[0] = (ctx)->local_ip6[0];                                                 \
            (k).laddr[1] = (ctx)->local_ip6[1];                                                 \
            (k).laddr[2] = (ctx)->local_ip6[2];                                                 \
            (k).laddr[3] = (ctx)->local_ip6[3];                                                 \
            (k).raddr[0] = (ctx)->remote_ip6[0];                                                \
            (k).raddr[1] = (ctx)->remote_ip6[1];                                                \
            (k).raddr[2] = (ctx)->remote_ip6[2];                                                \
            (k).raddr[3] = (ctx)->remote_ip6[3];                                                \
        }                                                                                       \
    } while (0)

static __always_inline u32 swap16(u32 v)
{
    if (v > 0xffff)
        v >>= 16;
    return ((v & 0xff) << 8) | ((v >> 8) & 0xff);
}

static __always_inline void weft_stat(u32 idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)++;
}

int weft_sock_ops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    u32 family = skops->family;
    if (family != AF_INET && family != AF_INET6)
        return 1;
    /* a new connection may reuse the addresses of an old one: start its stream state afresh */
    struct conn_key k = {};
    CONN_KEY_FROM(k, family, skops);
    msg_states.delete(&k);
    u64 cookie = bpf_get_socket_cookie(skops);
    int err = socks.sock_hash_update(skops, &cookie, BPF_ANY);
    if (err)
        weft_stat(IST_SOCKS_FULL);
    return 1;
}

static __always_inline char lower(char ch)
{
    return (ch >= 'A' && ch <= 'Z') ? ch + 32 : ch;
}

#define HTTP11 0x485454502f312e31ULL /* "HTTP/1.1" */
#define HTTP10 0x485454502f312e30ULL /* "HTTP/1.0" */

static __always_inline void new_line(volatile struct msg_state *s)
{
    s->st = MS_HNAME;
    s->name_len = 0;
    s->name[0] = 0;
    s->name[1] = 0;
}

/* ---------- fast path: a whole request head in one send, read 8 bytes at a time ----------
 * The usual send (request line, headers, blank line, then at most that request's own body) is
 * read a word at a time: line ends are found with a zero-byte test on all 8 bytes at once, and
 * header names are compared only at line starts, as case-folded 8-byte words. A send it does not
 * recognise as exactly that goes, untouched, to the byte-wise scanner (weft_msg_scan), which
 * stays the reference: the fast path reaches the scanner's decision or declines, never another
 * one. Declines: methods over 7 letters, a CR or LF not in a CRLF pair, Content-Length other
 * than 1..6 digits after at most one space, a repeated Content-Length, Transfer-Encoding, bytes
 * past the body, a head longer than the window or than FAST_STEPS words and lines. */

#define ONES 0x0101010101010101ULL
#define HIGH 0x8080808080808080ULL
#define LOW7 0x7f7f7f7f7f7f7f7fULL
#define CRLF 0x0a0d
#define FAST_STEPS 256 /* words or lines read before the fast path declines */
/* 8 characters as a little-endian load of them gives them */
#define W8(a, b, c, d, e, f, g, h)                                                              \
    ((u64)(a) | (u64)(b) << 8 | (u64)(c) << 16 | (u64)(d) << 24 | (u64)(e) << 32 |              \
     (u64)(f) << 40 | (u64)(g) << 48 | (u64)(h) << 56)
/* OR-ing 0x20 into the letter bytes folds them to lower case; other bytes must match exactly */
#define FOLD_ALL 0x2020202020202020ULL
#define FOLD_0_6 0x0020202020202020ULL /* letters in bytes 0..6 */
#define FOLD_1_6 0x0020202020202000ULL
#define FOLD_1_7 0x2020202020202000ULL

/* 0x80 in each byte of x that is zero, exactly (the add cannot carry from one byte to the next,
 * so a zero byte does not flag its neighbour as the shorter subtract form can) */
static __always_inline u64 zero_bytes(u64 x)
{
    return ~(((x & LOW7) + LOW7) | x | LOW7);
}

/* 0x80 in each byte of x that is within [lo, hi] (lo >= 1, hi <= 0x7e) */
static __always_inline u64 bytes_in(u64 x, u32 lo, u32 hi)
{
    u64 y = x & LOW7;
    u64 ge = (y + ONES * (0x80 - lo)) & HIGH;
    u64 above = (y + ONES * (0x7f - hi)) & HIGH;
    return ge & ~above & ~x & HIGH;
}

/* Index (0..7) of the lowest byte flagged 0x80 in m, m != 0: the isolated flag, moved to bit 0 of
 * its byte, multiplies a constant whose top byte then holds that byte's index. */
static __always_inline u32 low_byte(u64 m)
{
    return (((m & -m) >> 7) * 0x0001020304050607ULL >> 56) & 7;
}

/* The 8 bytes at `off` of the n-byte linear window (16 <= n <= WEFT_INJ_SCAN) into `dst`, those
 * at or past n read as zero, so a pattern of 8 non-zero bytes never matches past the end. The
 * load is moved back to end at n and shifted; all without branches, whose paths the verifier
 * would follow separately at every call. A check the verifier needs, never failing, declines. */
#define LOAD8(dst, off)                                                                         \
    do {                                                                                        \
        s64 room_ = (s64)n - 8 - (s64)(off); /* < 0: the load would pass the end */             \
        s64 neg_ = room_ >> 63;                                                                 \
        asm volatile("" : "+r"(neg_)); /* keep it arithmetic, not a compare and a branch */     \
        u32 at_ = (off) + (room_ & neg_);                                                       \
        u64 shift_ = (u64)(-(room_ & neg_)) * 8;                                                \
        u64 keep_ = (s64)(shift_ - 64) >> 63; /* 0 when the whole load is past the end */      \
        asm volatile("" : "+r"(at_), "+r"(keep_));                                              \
        u8 *p_ = data + (at_ & (WEFT_INJ_SCAN - 1));                                            \
        if ((void *)(p_ + 8) > end)                                                             \
            return 0;                                                                           \
        (dst) = (*(u64 *)p_ >> (shift_ & 63)) & keep_;                                          \
    } while (0)

/* Content-Length's value at v: at most one space, 1..6 digits, CRLF. 0: decline. */
static __always_inline int fast_content_length(void *data, void *end, u32 n, u32 v,
                                               volatile struct fast_ctx *f)
{
    u64 w;
    LOAD8(w, v);
    if ((w & 0xff) == ' ')
        LOAD8(w, v + 1);
    u64 other = ~bytes_in(w, '0', '9') & HIGH;
    if (!other || f->cl_seen)
        return 0;
    u32 d = low_byte(other); /* digits */
    if (!d || d > 6 || ((w >> (8 * d)) & 0xffff) != CRLF)
        return 0;
    /* the digits' values moved to the top bytes (leading zeros below), then summed in pairs,
     * fours and eights: the first character is the most significant digit */
    u64 x = (w & 0x0f0f0f0f0f0f0f0fULL) << (64 - 8 * d);
    x = (x * (10 * 256 + 1)) >> 8;
    x = ((x & 0x00ff00ff00ff00ffULL) * (100 * 65536 + 1)) >> 16;
    x = ((x & 0x0000ffff0000ffffULL) * (10000 * 4294967296ULL + 1)) >> 32;
    f->cl = x;
    f->cl_seen = 1;
    return 1;
}

/* 1 when the first `window` bytes (linear) start with a whole request head (f: where its request
 * line and head end, whether it has a traceparent, its Content-Length); 0: decline. */
static __always_inline int fast_head(struct sk_msg_md *msg, u32 window, volatile struct fast_ctx *f)
{
    void *data = (void *)(long)msg->data;
    void *end = (void *)(long)msg->data_end;
    if (window < 16 || data + 16 > end)
        return 0;
    f->n = window;
    /* the method: 1..7 upper-case letters and a space, within the first word */
    u64 w = *(u64 *)data;
    u64 sp = zero_bytes(w ^ (ONES * ' '));
    if (!sp)
        return 0;
    u32 k = low_byte(sp);
    if (!k)
        return 0;
    u64 before = ~0ULL >> (64 - 8 * k); /* the bytes before the space */
    if ((bytes_in(w, 'A', 'Z') & before) != (HIGH & before))
        return 0;
    f->k = k;
    f->q = k + 1;
    f->carry = 0;
    f->rline = 0;
    f->has_tp = 0;
    f->cl_seen = 0;
    f->cl = 0;
    for (u32 step = 0; step < FAST_STEPS; step++) {
        /* each step reads what it needs from f: no value a comparison narrowed in one step is
         * carried, as a different state, into the next */
        u32 n = f->n;
        if (n > WEFT_INJ_SCAN)
            return 0;
        u32 q = f->q;
        if (q >= n)
            return 0; /* no blank line in the window */
        LOAD8(w, q);
        u64 lf = zero_bytes(w ^ (ONES * '\n'));
        u64 cr = zero_bytes(w ^ (ONES * '\r'));
        u64 pairs = (cr << 8) | f->carry; /* where each CR's LF must be */
        if (!lf) {
            if (pairs)
                return 0;
            f->carry = cr >> 56;
            f->q = q + 8;
            continue;
        }
        u32 b = low_byte(lf);
        if ((pairs ^ lf) & (~0ULL >> (56 - 8 * b)))
            return 0; /* up to this LF: a bare CR or LF */
        f->carry = 0;
        u32 e = q + b;
        if (!f->rline) {
            /* the request line ends in "HTTP/1.x\r\n", after the method's space */
            if (e < f->k + 10)
                return 0;
            u64 ver;
            LOAD8(ver, e - 9);
            if (ver != W8('H', 'T', 'T', 'P', '/', '1', '.', '1') &&
                ver != W8('H', 'T', 'T', 'P', '/', '1', '.', '0'))
                return 0;
            f->rline = e + 1;
        }
        u32 s = e + 1; /* a line starts */
        if (s + 2 > n)
            return 0;
        LOAD8(w, s);
        if ((w & 0xffff) == CRLF) {
            f->hdr_end = s + 2;
            return 1;
        }
        u64 w2, w3;
        if ((w | FOLD_ALL) == W8('t', 'r', 'a', 'c', 'e', 'p', 'a', 'r')) {
            LOAD8(w2, s + 4);
            if ((w2 | FOLD_0_6) == W8('e', 'p', 'a', 'r', 'e', 'n', 't', ':'))
                f->has_tp = 1;
        } else if ((w | FOLD_0_6) == W8('c', 'o', 'n', 't', 'e', 'n', 't', '-')) {
            LOAD8(w2, s + 7);
            if ((w2 | FOLD_1_6) == W8('-', 'l', 'e', 'n', 'g', 't', 'h', ':') &&
                !fast_content_length(data, end, n, s + 15, f))
                return 0;
        } else if ((w | FOLD_ALL) == W8('t', 'r', 'a', 'n', 's', 'f', 'e', 'r')) {
            LOAD8(w2, s + 8);
            LOAD8(w3, s + 10);
            if ((w2 | FOLD_1_7) == W8('-', 'e', 'n', 'c', 'o', 'd', 'i', 'n') &&
                (w3 | FOLD_0_6) == W8('n', 'c', 'o', 'd', 'i', 'n', 'g', ':'))
                return 0; /* a transfer coding: the scanner gives up on the connection */
        }
        f->q = s;
    }
    return 0;
}

/* The trace id of the server request thread `tid` (or its creator) serves, and in *parent how it
 * came (WEFT_PARENT_*): 1; none: 0; -1 when that thread serves several requests at once and the
 * send's own one is unknown. */
static __always_inline int find_trace(u32 tid, u64 *trace, u8 *parent)
{
    struct weft_tpctx *x = weft_ctx.lookup(&tid);
    if (x && x->kind != WEFT_CTX_NONE) { /* NONE: the slot of a finished request, kept for reuse */
        if (x->kind == WEFT_CTX_AMBIGUOUS)
            return -1;
        __builtin_memcpy(trace, x->trace, 32);
        *parent = x->parent;
        return 1;
    }
    struct weft_ctx_ref *ref = weft_ctx_ref.lookup(&tid);
    if (!ref)
        return 0;
    u32 owner = ref->tid;
    u64 serial = ref->serial;
    x = weft_ctx.lookup(&owner);
    if (x && x->kind == WEFT_CTX_AMBIGUOUS)
        return -1;
    if (!x || x->kind == WEFT_CTX_NONE || x->serial != serial)
        return 0; /* the creator moved on to another request, or finished */
    __builtin_memcpy(trace, x->trace, 32);
    *parent = x->parent;
    return 1;
}

#ifdef WEFT_SAMPLE_BOUND
/* The value of eight lower-case hex characters, the first one in the lowest byte of w. */
static __always_inline u64 hex8_value(u64 w)
{
    /* each byte to its nibble: '0'-'9' is 0x30-0x39, 'a'-'f' 0x61-0x66 (bit 6 set: add 9) */
    u64 n = (w & 0x0f0f0f0f0f0f0f0fULL) + 9 * ((w >> 6) & 0x0101010101010101ULL);
    /* fold neighbours, the earlier character the more significant: 8 nibbles -> 4 bytes -> ... */
    n = ((n & 0x00ff00ff00ff00ffULL) << 4) | ((n >> 8) & 0x00ff00ff00ff00ffULL);
    n = ((n & 0x0000ffff0000ffffULL) << 8) | ((n >> 16) & 0x0000ffff0000ffffULL);
    return ((n & 0xffffffffULL) << 16) | (n >> 32);
}

/* 1 when the sampler leaves this trace out: its id's low 64 bits (hex characters 16-31) are not
 * below the bound. */
static __always_inline u8 unsampled(const u64 *trace)
{
    return (hex8_value(trace[2]) << 32 | hex8_value(trace[3])) >= (u64)WEFT_SAMPLE_BOUND;
}
#else
#define unsampled(trace) 0
#endif

/* Flags 00 for this trace? With -DWEFT_SAMPLE_PARENT (a parentbased_* sampler) a trace that came
 * with a traceparent keeps its caller's flag, as the SDK's ParentBased sampler does; any other
 * trace is decided by its id. */
static __always_inline u8 left_out(const u64 *trace, u8 parent)
{
#ifdef WEFT_SAMPLE_PARENT
    if (parent != WEFT_PARENT_NONE)
        return parent == WEFT_PARENT_UNSAMPLED;
#endif
    return unsampled(trace);
}

static __always_inline int inject(struct sk_msg_md *msg, u32 at, u64 pid_tgid, u32 ports)
{
    u32 tid = (u32)pid_tgid;
    u64 trace[4], span[2];
    u8 parent = WEFT_PARENT_NONE;
    int found = find_trace(tid, trace, &parent);
    if (found < 0) {
        weft_stat(IST_AMBIGUOUS); /* a wrong trace would be worse than none: seq still links it */
        return 0;
    }
    if (!found) {
#pragma unroll
        for (int i = 0; i < 4; i++)
            trace[i] = weft_hex8(bpf_get_prandom_u32());
        weft_stat(IST_ROOT);
    }
    span[0] = weft_hex8(bpf_get_prandom_u32());
    span[1] = weft_hex8(bpf_get_prandom_u32());
    if (bpf_msg_push_data(msg, at, INJ_LEN, 0)) {
        weft_stat(IST_PUSH_FAILED);
        return 0;
    }
    /* The push split the message's buffer in three (before, the line, after), and tcp_bpf sends
     * each buffer with its own tcp_sendmsg: with TCP_NODELAY, three segments where the request
     * was one, and a server that reads a partial request. Pulling the whole message back into
     * one buffer (one small copy) keeps it one segment; past LINEAR_MAX it is left split. */
    u32 total = msg->size;
    u32 off = at;
    if (total > LINEAR_MAX || bpf_msg_pull_data(msg, 0, total, 0)) {
        off = 0;
        if (bpf_msg_pull_data(msg, at, at + INJ_LEN, 0)) {
            weft_stat(IST_PUSH_FAILED); /* cannot happen short of memory: the pushed bytes are unset */
            return 0;
        }
    }
    char *p = (char *)(long)msg->data + (off & (WEFT_INJ_SCAN - 1));
    void *end = (void *)(long)msg->data_end;
    if ((void *)(p + INJ_LEN) > end) {
        weft_stat(IST_PUSH_FAILED);
        return 0;
    }
    /* "traceparent: 00-<trace>-<span>-<flags>\r\n", written a word at a time */
    *(u64 *)p = W8('t', 'r', 'a', 'c', 'e', 'p', 'a', 'r');
    *(u64 *)(p + 8) = W8('e', 'n', 't', ':', ' ', '0', '0', '-');
    *(u64 *)(p + 16) = trace[0];
    *(u64 *)(p + 24) = trace[1];
    *(u64 *)(p + 32) = trace[2];
    *(u64 *)(p + 40) = trace[3];
    p[48] = '-';
    *(u64 *)(p + 49) = span[0];
    *(u64 *)(p + 57) = span[1];
    u8 flag_00 = left_out(trace, parent);
    *(u32 *)(p + 65) = '-' | '0' << 8 | ('1' - flag_00) << 16 | '\r' << 24;
    p[69] = '\n';
    /* at most one push per send: a second request in one message stops injection on the
     * connection, and the later chunks of a large send are body. The thread's slot from its
     * previous injection is rewritten in place: an LRU update would allocate an element (and the
     * tracer's delete free one) on every request. */
    struct weft_inj_out *slot = weft_inj_out.lookup(&tid);
    if (slot) {
        __builtin_memcpy(slot->trace, trace, 32);
        __builtin_memcpy(slot->span, span, 16);
        slot->ports = ports;
        slot->pushed = INJ_LEN;
        slot->seq_taken = 0;
        slot->unsampled = flag_00;
    } else {
        struct weft_inj_out o = {};
        __builtin_memcpy(o.trace, trace, 32);
        __builtin_memcpy(o.span, span, 16);
        o.ports = ports;
        o.pushed = INJ_LEN;
        o.unsampled = flag_00;
        weft_inj_out.update(&tid, &o);
    }
    weft_stat(IST_INJECTED);
    return 1;
}

#define APPLY_ALL 0xffffffffU

/* The request's body has `after` more bytes past this send: the kernel passes them without
 * running this program, and the connection is at a request boundary again (a body too long for
 * one apply_bytes is counted down send by send instead). */
static __always_inline void skip_body(struct sk_msg_md *msg, volatile struct msg_state *s,
                                      u64 after)
{
    u32 size = msg->size;
    s->body_left = after;
    s->st = after ? MS_BODY : MS_IDLE;
    if (!after || after >= APPLY_ALL - size)
        return;
    bpf_msg_apply_bytes(msg, size + (u32)after);
    s->body_left = 0;
    s->st = MS_IDLE;
}

int weft_sk_msg(struct sk_msg_md *msg)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    if (pid == WEFT_SELF_PID)
        return SK_PASS;
    struct conn_key k = {};
    u32 family = msg->family;
    CONN_KEY_FROM(k, family, msg);
    /* volatile: the scan loop must load and store the state, not keep it in registers, where the
     * verifier would track every value and explode the number of states */
    volatile struct msg_state *s = msg_states.lookup(&k);
    if (!s) {
        struct msg_state fresh = {};
        msg_states.update(&k, &fresh);
        s = msg_states.lookup(&k);
        if (!s)
            return SK_PASS;
    }
    /* Sends this program has nothing to do with are passed by the kernel without running it
     * (bpf_msg_apply_bytes: the verdict holds for that many more bytes of the socket):
     * everything on a connection it no longer follows, and the rest of a known-length body. */
    if (s->st == MS_OFF) {
        bpf_msg_apply_bytes(msg, APPLY_ALL);
        return SK_PASS;
    }
    if (go_pids.lookup(&pid)) {
        s->st = MS_OFF;
        weft_stat(IST_GO);
        bpf_msg_apply_bytes(msg, APPLY_ALL);
        return SK_PASS;
    }
    u32 size = msg->size;
    if (s->st == MS_BODY && s->body_left >= size) {
        skip_body(msg, s, s->body_left - size);
        return SK_PASS;
    }
    u32 n = size < WEFT_INJ_SCAN ? size : WEFT_INJ_SCAN;
    /* a send of one buffer (the usual case) is linear already: no helper call for it */
    if ((void *)(long)msg->data + n > (void *)(long)msg->data_end &&
        bpf_msg_pull_data(msg, 0, n, 0)) {
        s->st = MS_OFF;
        weft_stat(IST_GAVE_UP);
        return SK_PASS;
    }
    u32 zero = 0;
    struct scan_ctx *c = scan_state.lookup(&zero);
    if (!c)
        return SK_PASS;
    if (s->st == MS_IDLE && fast_head(msg, n, &c->fast)) {
        u32 rest = size - c->fast.hdr_end; /* body bytes in this send */
        u64 cl = c->fast.cl;
        if (rest <= cl) { /* else a second request follows: the scanner settles that */
            weft_stat(IST_FAST);
            /* a body that goes on in later sends is left to the BODY case above (skip_body
             * here, after the injection, tripled the verifier's work) */
            s->body_left = cl - rest;
            s->st = s->body_left ? MS_BODY : MS_IDLE;
            if (c->fast.has_tp)
                weft_stat(IST_HAD_TRACEPARENT);
            else
                inject(msg, c->fast.rline, pid_tgid, k.ports);
            return SK_PASS;
        }
    }
    s->at = -1;
    s->rline = -1;
    s->requests = 0;
    s->seen = 0;
    __builtin_memcpy(&c->key, &k, sizeof(k));
    c->pid_tgid = pid_tgid;
    c->n = n;
    c->pos = 0;
    c->stop = 0;
    scanners.call(msg, 0);
    s->st = MS_OFF; /* the scanner could not run: stop before the framing is lost */
    weft_stat(IST_GAVE_UP);
    return SK_PASS;
}

/* WEFT_INJ_WINDOW bytes of the message per run, then a tail call to itself while bytes remain;
 * the last run settles the rest of the message and injects. */
int weft_msg_scan(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_ctx *c = scan_state.lookup(&zero);
    if (!c)
        return SK_PASS;
    volatile struct msg_state *s = msg_states.lookup(&c->key);
    if (!s)
        return SK_PASS;
    u32 n = c->n;
    u32 size = msg->size;
    void *data = (void *)(long)msg->data;
    void *end = (void *)(long)msg->data_end;
    u32 base = c->pos;
    for (u32 j = 0; j < WEFT_INJ_WINDOW; j++) {
        u32 i = base + j;
        if (i >= n || i >= WEFT_INJ_SCAN) {
            c->stop = 1;
            break;
        }
        u32 off = i;
        asm volatile("" : "+r"(off)); /* keep the mask: the verifier needs the bound on the offset */
        char *p = data + (off & (WEFT_INJ_SCAN - 1));
        if ((void *)(p + 1) > end) {
            c->stop = 1;
            break;
        }
        s->seen = i + 1;
        char ch = *p;
        u8 st = s->st;
        if (st == MS_IDLE) {
            if (ch < 'A' || ch > 'Z' || s->requests) {
                s->st = MS_OFF; /* not a request, or a second one in one send */
                { c->stop = 1; break; }
            }
            s->requests = 1;
            s->st = MS_METHOD;
            s->method_len = 1;
            s->has_tp = 0;
            s->chunked = 0;
            s->body_left = 0;
            s->last8 = 0;
        } else if (st == MS_METHOD) {
            if (ch == ' ' && s->method_len > 0) {
                s->st = MS_TARGET;
            } else if (ch >= 'A' && ch <= 'Z' && s->method_len < 16) {
                s->method_len++;
            } else {
                s->st = MS_OFF;
                { c->stop = 1; break; }
            }
        } else if (st == MS_TARGET) {
            if (ch == '\n') {
                if (s->last8 != HTTP11 && s->last8 != HTTP10) {
                    s->st = MS_OFF;
                    { c->stop = 1; break; }
                }
                s->rline = i + 1;
                new_line(s);
            } else if (ch != '\r') {
                s->last8 = (s->last8 << 8) | (u8)ch;
            }
        } else if (st == MS_HNAME) {
            if ((ch == '\r' || ch == '\n') && s->name_len == 0) {
                /* the blank line: the header block ends here */
                if (s->has_tp)
                    weft_stat(IST_HAD_TRACEPARENT);
                else if (s->rline >= 0)
                    s->at = s->rline;
                else
                    s->at = i;
                s->st = MS_HEND;
                if (ch == '\r')
                    continue;
                st = MS_HEND; /* bare LF: the MS_HEND step below takes it */
            } else if (ch == '\r') {
                continue; /* a header line without a colon: its LF starts the next line */
            } else if (ch == '\n') {
                new_line(s);
                continue;
            } else if (ch == ':') {
                u64 a = s->name[0], b = s->name[1];
                u8 len = s->name_len;
                s->target = H_NONE;
                if (len == 11 && a == 0x7261706563617274ULL && b == 0x746e65ULL) /* traceparent */
                    s->has_tp = 1;
                else if (len == 14 && a == 0x2d746e65746e6f63ULL && b == 0x6874676e656cULL) /* content-length */
                    s->target = H_CLEN;
                else if (len == 17 && a == 0x726566736e617274ULL && b == 0x6e69646f636e652dULL) /* transfer-encoding */
                    s->target = H_TE;
                s->st = s->target == H_NONE ? MS_HSKIP : MS_HVAL;
                continue;
            } else {
                if (s->name_len < 16)
                    ((volatile char *)s->name)[s->name_len & 15] = lower(ch);
                if (s->name_len < 255)
                    s->name_len++;
                continue;
            }
        }
        if (st == MS_HEND) {
            if (ch != '\n') {
                s->st = MS_OFF;
                { c->stop = 1; break; }
            }
            if (s->chunked) {
                s->st = MS_OFF; /* chunked request bodies are not followed: stop here */
                weft_stat(IST_GAVE_UP);
            } else {
                s->st = s->body_left ? MS_BODY : MS_IDLE;
            }
        } else if (st == MS_HVAL) {
            if (ch == '\n') {
                new_line(s);
            } else if (s->target == H_CLEN && ch >= '0' && ch <= '9') {
                s->body_left = s->body_left * 10 + (ch - '0');
            } else if (s->target == H_TE && ch != ' ' && ch != '\r') {
                s->chunked = 1; /* any transfer coding: the length is not known from headers */
            }
        } else if (st == MS_HSKIP) {
            if (ch == '\n')
                new_line(s);
        } else if (st == MS_BODY) {
            if (s->body_left)
                s->body_left--;
            if (!s->body_left)
                s->st = MS_IDLE;
        }
    }
    if (!c->stop && base + WEFT_INJ_WINDOW < n && s->st != MS_OFF) {
        c->pos = base + WEFT_INJ_WINDOW;
        scanners.call(msg, 0);
        s->st = MS_OFF; /* out of tail calls: the rest of the message is not followed */
        weft_stat(IST_GAVE_UP);
        return SK_PASS;
    }
    u64 pid_tgid = c->pid_tgid;
    struct conn_key k;
    __builtin_memcpy(&k, &c->key, sizeof(k));
    u32 seen = s->seen;
    if (seen < size && s->st != MS_OFF) {
        u32 rest = size - seen;
        if (s->st == MS_BODY && s->body_left >= rest) {
            s->body_left -= rest;
            if (!s->body_left)
                s->st = MS_IDLE;
        } else {
            s->st = MS_OFF; /* lost the framing (header block or requests past the window) */
            weft_stat(IST_GAVE_UP);
        }
    }
    int at = s->at;
    if (at >= 0 && at < WEFT_INJ_SCAN)
        inject(msg, (u32)at, pid_tgid, k.ports);
    return SK_PASS;
}
