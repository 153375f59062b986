/* Weft header injection: the structs shared by inject.bpf.c (which owns the maps, exported with
 * BPF_TABLE_PUBLIC), http_tracer.bpf.c and lineage.bpf.c (which declare them "extern" when
 * compiled with -DWEFT_INJECT=1). Maps themselves are declared in each .c file: BCC rewrites map
 * calls only in the main source. Trace and span ids are kept as lower-case hex text, the form
 * they take on the wire, so the injector copies them without converting.
 */
#ifndef WEFT_INJECT_H
#define WEFT_INJECT_H

#define WEFT_CTX_NONE 0
#define WEFT_CTX_ASSIGNED 1 /* server request: the context Weft gave it */
#define WEFT_CTX_INJECTED 2 /* client request: the traceparent Weft put on the wire */
/* weft_ctx only: the thread serves more than one request at once (an event loop), so which one a
 * send belongs to is unknown; nothing is injected until all of them are answered */
#define WEFT_CTX_AMBIGUOUS 3

/* weft_tpctx.parent: whether the server request came with a traceparent (whose trace it took),
 * and that traceparent's sampled flag, which a parent-based sampler passes on */
#define WEFT_PARENT_NONE 0
#define WEFT_PARENT_SAMPLED 1
#define WEFT_PARENT_UNSAMPLED 2

/* A trace context. In weft_ctx (tid -> context of the server request that thread serves; kind
 * NONE: it serves none now, the slot is kept for its next request) and per request in the http
 * tracer (copied into its record). */
struct weft_tpctx {
    u64 serial;     /* bpf_ktime_get_ns() when the request started: tells requests of a tid apart */
    char trace[32]; /* hex */
    char span[16];  /* hex */
    u8 kind;        /* WEFT_CTX_* */
    u8 open;        /* weft_ctx only: server requests of this thread still unanswered */
    u8 unsampled;   /* INJECTED: the flags on the wire were 00 (the sampler left the trace out) */
    u8 parent;      /* ASSIGNED: WEFT_PARENT_*, the sampled flag of the incoming traceparent */
    u8 pad[4];
}; /* 64 bytes */

/* A thread created while its parent served a request: valid while weft_ctx[tid].serial == serial. */
struct weft_ctx_ref {
    u64 serial;
    u32 tid;
    u32 pad;
};

/* What the injector put on the wire during the current send of a thread; the http tracer reads it
 * inside the same syscall (sock_send_length: seq correction; parser: the client record). */
struct weft_inj_out {
    char trace[32];
    char span[16];
    u32 ports;      /* local port << 16 | remote port of the connection written to */
    u32 pushed;     /* bytes inserted; 0: the tracer took this record into its client request */
    u8 seq_taken;   /* the tracer already corrected this call's sequence number */
    u8 unsampled;   /* trace flags 00 on the wire, else 01 */
    u8 pad[6];
};

/* Eight lower-case hex characters for the eight nibbles of r, nibble k in byte k (the order a
 * little-endian store writes them in): each nibble spread into its own byte, then '0' added, and
 * 'a' - '0' - 10 more where the nibble is 10 or above, all bytes at once. */
static __always_inline u64 weft_hex8(u32 r)
{
    u64 x = r;
    x = (x | (x << 16)) & 0x0000ffff0000ffffULL;
    x = (x | (x << 8)) & 0x00ff00ff00ff00ffULL;
    x = (x | (x << 4)) & 0x0f0f0f0f0f0f0f0fULL;
    u64 letters = ((x + 0x0606060606060606ULL) >> 4) & 0x0101010101010101ULL;
    return x + 0x3030303030303030ULL + letters * ('a' - '0' - 10);
}

/* n hex characters (a multiple of 8) from bpf_get_prandom_u32. */
static __always_inline void weft_random_hex(char *out, u32 n)
{
#pragma unroll
    for (u32 i = 0; i < 32; i += 8) {
        if (i >= n)
            break;
        u64 h = weft_hex8(bpf_get_prandom_u32());
        __builtin_memcpy(out + i, &h, 8);
    }
}

static __always_inline int weft_is_hex(char ch)
{
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
}

/* The sampled flag of a traceparent weft_trace_of accepted (WEFT_PARENT_SAMPLED or _UNSAMPLED), or
 * WEFT_PARENT_NONE when its flags are not two hex digits: the flags' lowest bit is a digit's own
 * lowest bit, and the opposite one for a-f (a is 10, 0x61). */
static __always_inline u8 weft_parent_of(const char *tp)
{
    char hi = tp[53], lo = tp[54];
    if (!weft_is_hex(hi) || !weft_is_hex(lo))
        return WEFT_PARENT_NONE;
    return ((lo & 1) ^ (lo > '9')) ? WEFT_PARENT_SAMPLED : WEFT_PARENT_UNSAMPLED;
}

/* "00-<32 hex>-<16 hex>-<2 hex>" with a non-zero trace id: copy the trace id, return 1. */
static __always_inline int weft_trace_of(const char *tp, u32 len, char *trace)
{
    if (len != 55 || tp[0] != '0' || tp[1] != '0' || tp[2] != '-' || tp[35] != '-' || tp[52] != '-')
        return 0;
    int nonzero = 0;
#pragma unroll
    for (int i = 0; i < 32; i++) {
        char ch = tp[3 + i];
        if (!weft_is_hex(ch))
            return 0;
        nonzero |= ch != '0';
    }
    if (!nonzero)
        return 0;
#pragma unroll
    for (int i = 0; i < 32; i++)
        trace[i] = tp[3 + i];
    return 1;
}

#endif /* WEFT_INJECT_H */
