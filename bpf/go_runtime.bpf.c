/* Weft Go runtime: goroutine lineage, and which goroutine a net/http client request is for.
 *
 * Hooks (uprobes only, attached per Go executable by probe_agent/probes/goroutines.py; never
 * uretprobes: they rewrite return addresses on the stack, and Go moves and grows its stacks).
 * Each sits on an instruction the kernel emulates (CALL, Jcc): ~1 us per hit here, where an
 * instruction single-stepped out of line (RET, MOV, CMP) costs ~20 us (probe_agent/gobinary.py).
 *   runtime.newproc.func1 at CALL runqput   newproc's closure, on the M's g0 (systemstack):
 *                                 `newg := newproc1(fn, callergp, callerpc); runqput(pp, newg)`.
 *                                 R14 is g0 and g0.m.curg is still the goroutine running the `go`
 *                                 statement: the parent. BX = the new g, whose goid newproc1 has
 *                                 just assigned: one GoroutineSpawn record, one hit per `go`.
 *   runtime.newproc1 each RET     the same with the new g in AX, for binaries where gobinary.py
 *                                 does not find that CALL (a RET is single-stepped: slow).
 *   Not reported: goroutines started by net/http.(*connReader).startBackgroundRead (one per
 *   server request on a keep-alive connection; it only reads the next request's first byte,
 *   whose request the http tracer gives to the response writer's goroutine anyway), told by
 *   g.gopc in [skip_lo, skip_hi): a record per request less through the ring and the agent.
 *   No probe on goroutine exit: goids are never reused, so an entry of a goroutine that ended
 *   is never looked up again; the LRU maps drop it (a goexit1 probe would cost one hit per
 *   goroutine for nothing else).
 *   net/http.(*persistConn).roundTrip entry (at its prologue's JBE)   runs on the caller's goroutine (R14); BX is the
 *                                 *transportRequest whose first word is the *Request: request
 *                                 pointer -> caller goid.
 *   net/http.(*Request).write entry (at its prologue's JBE)   runs on the connection's writeLoop goroutine (R14),
 *                                 AX = the *Request: writer goid -> caller goid in weft_go_caller,
 *                                 which the http tracer reads when that goroutine's write starts a
 *                                 client request. Without it the request would carry the
 *                                 writeLoop's goid, whose lineage leads to whoever dialed the
 *                                 pooled connection first: a wrong parent.
 * The goid is *(u64 *)(g + goid_off); goid_off comes from the binary's DWARF, per process, in
 * weft_go_procs (pid -> offsets), which also says which processes are Go and traced: a process
 * not in it costs one lookup per hook.
 *
 * Kernel needs: uprobes, ring buffer, bpf_probe_read_user. The maps weft_go_procs and
 * weft_go_caller belong to bpf/http_tracer.bpf.c (BPF_TABLE_PUBLIC), which must be loaded first
 * in the same process (the runner's probe order does that).
 */
#include <uapi/linux/ptrace.h>
#include "common.h"

enum go_stat { GST_RING_FULL = 0, GST_NO_PARENT = 1, GST_CALLER_FOUND = 2, GST_CALLER_MISSED = 3,
               GST_SPAWN_SKIPPED = 4, GST_N };

struct go_spawn_rec {
    struct weft_hdr hdr; /* the thread running newproc1 */
    u64 parent_goid;
    u64 child_goid;
};

/* Shared with bpf/http_tracer.bpf.c: keep the two declarations identical. */
struct weft_go_proc {
    u64 goid_off;  /* offsetof(runtime.g, goid) in this process's executable */
    u64 stack_off; /* offsetof(runtime.g, stack) (used by the http tracer) */
    u64 m_off;     /* offsetof(runtime.g, m) */
    u64 curg_off;  /* offsetof(runtime.m, curg) */
    u64 gopc_off;  /* offsetof(runtime.g, gopc): pc of the `go` statement that made the g */
    u64 skip_lo;   /* [skip_lo, skip_hi): code whose `go` statements are not reported */
    u64 skip_hi;
};
struct weft_go_key {
    u64 id; /* a goid, or a *Request */
    u32 pid;
    u32 pad;
};

BPF_PERCPU_ARRAY(stats, u64, WEFT_MAX_STATS);
BPF_RINGBUF_OUTPUT(go_events, WEFT_RING_PAGES);
BPF_TABLE("extern", u32, struct weft_go_proc, weft_go_procs, WEFT_MAX_GO_PROCS);
BPF_TABLE("extern", struct weft_go_key, u64, weft_go_caller, WEFT_MAX_TASKS);
BPF_TABLE("lru_hash", struct weft_go_key, u64, request_caller, WEFT_MAX_TASKS); /* *Request -> goid */

static __always_inline void weft_stat(u32 idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline u64 goid_of(u64 g, struct weft_go_proc *proc)
{
    u64 goid = 0;
    if (g)
        bpf_probe_read_user(&goid, sizeof(goid), (void *)(g + proc->goid_off));
    return goid;
}

static __always_inline int go_spawned(struct pt_regs *ctx, u64 child_g)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    struct weft_go_proc *proc = weft_go_procs.lookup(&pid);
    if (!proc)
        return 0;
    /* the go statement first: net/http starts a background reader per request, skipped
     * before anything else is read */
    u64 gopc = 0;
    if (child_g)
        bpf_probe_read_user(&gopc, sizeof(gopc), (void *)(child_g + proc->gopc_off));
    if (gopc >= proc->skip_lo && gopc < proc->skip_hi) {
        weft_stat(GST_SPAWN_SKIPPED);
        return 0;
    }
    u64 m = 0, curg = 0;
    bpf_probe_read_user(&m, sizeof(m), (void *)(ctx->r14 + proc->m_off));
    if (m)
        bpf_probe_read_user(&curg, sizeof(curg), (void *)(m + proc->curg_off));
    struct go_spawn_rec r = {};
    r.parent_goid = goid_of(curg, proc);
    r.child_goid = goid_of(child_g, proc);
    if (!r.child_goid || !r.parent_goid) {
        weft_stat(GST_NO_PARENT);
        return 0;
    }
    weft_fill_hdr(&r.hdr, WEFT_KIND_GO_SPAWN, pid_tgid, bpf_ktime_get_ns());
    if (go_events.ringbuf_output(&r, sizeof(r), 0))
        weft_stat(GST_RING_FULL);
    return 0;
}

int go_newproc_runqput(struct pt_regs *ctx) { return go_spawned(ctx, ctx->bx); }
int go_newproc1_ret(struct pt_regs *ctx) { return go_spawned(ctx, ctx->ax); }

int go_pconn_roundtrip(struct pt_regs *ctx)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct weft_go_proc *proc = weft_go_procs.lookup(&pid);
    if (!proc)
        return 0;
    u64 request = 0;
    bpf_probe_read_user(&request, sizeof(request), (void *)ctx->bx); /* transportRequest.Request */
    if (!request)
        return 0;
    struct weft_go_key key = {.id = request, .pid = pid};
    u64 caller = goid_of(ctx->r14, proc);
    request_caller.update(&key, &caller);
    return 0;
}

int go_request_write(struct pt_regs *ctx)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    struct weft_go_proc *proc = weft_go_procs.lookup(&pid);
    if (!proc)
        return 0;
    struct weft_go_key req = {.id = ctx->ax, .pid = pid};
    struct weft_go_key writer = {.id = goid_of(ctx->r14, proc), .pid = pid};
    u64 *caller = request_caller.lookup(&req);
    if (caller) {
        u64 goid = *caller;
        weft_go_caller.update(&writer, &goid);
        request_caller.delete(&req);
        weft_stat(GST_CALLER_FOUND);
    } else {
        /* Request.write called directly (req.Write): this goroutine writes for itself */
        weft_go_caller.delete(&writer);
        weft_stat(GST_CALLER_MISSED);
    }
    return 0;
}

_Static_assert(sizeof(struct go_spawn_rec) == 48, "go_spawn_rec layout changed: update probe_agent/probes/goroutines.py");
