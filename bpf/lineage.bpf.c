/* Weft lineage: who created which thread or process, exec and exit.
 *
 * Hooks:
 *   raw_tracepoint/sched_process_fork  (parent, child task_struct *): every clone(); the child's
 *                                      tgid (read at the BTF offset of task_struct.tgid) tells a
 *                                      new thread (same tgid as the parent) from a new process.
 *   tracepoint/sched/sched_process_exit  every exiting thread (tid == pid: the leader).
 *   tracepoint/sched/sched_process_exec  new program image: pid, ppid, start time, filename.
 * Kernel needs: tracepoints, raw tracepoints, bpf_probe_read_kernel, BTF for the offsets below.
 * No kprobes, no fentry. Fallback if raw tracepoints are refused: none here (the loader fails
 * with a plain message); lineage is then unavailable and HTTP tracing still works.
 *
 * -D constants: WEFT_TASK_TGID_OFF, WEFT_TASK_PID_OFF, WEFT_TASK_REAL_PARENT_OFF,
 *               WEFT_TASK_START_TIME_OFF (all from BTF, probe_agent/btf.py).
 */
#include "common.h"
#include "inject.h" /* WEFT-INJECT */

#define WEFT_FILENAME_MAX 128

enum lineage_stat { LST_RING_FULL = 0, LST_N };

struct spawn_rec {
    struct weft_hdr hdr; /* the parent thread (the one calling clone) */
    u32 child_pid;       /* child tgid */
    u32 child_tid;
};

struct exit_rec {
    struct weft_hdr hdr; /* the exiting thread */
};

struct exec_rec {
    struct weft_hdr hdr;
    u64 start_ns; /* task start, CLOCK_MONOTONIC like bpf_ktime_get_ns */
    u32 ppid;
    u32 filename_len;
    char filename[WEFT_FILENAME_MAX];
};

BPF_ARRAY(cgroup_scope, struct weft_cgroup_scope, WEFT_CGROUP_SCOPES);
BPF_TABLE("lru_hash", u64, u8, cgroup_verdict, WEFT_CGROUP_VERDICTS);
BPF_PERCPU_ARRAY(stats, u64, WEFT_MAX_STATS);
BPF_RINGBUF_OUTPUT(lineage_events, WEFT_RING_PAGES);
BPF_PERCPU_ARRAY(exec_scratch, struct exec_rec, 1);
#if WEFT_INJECT
/* WEFT-INJECT: owned by inject.bpf.c (loaded first). A new thread refers to the request its
 * creator serves now (tid + serial): valid only while the creator still serves that request. */
BPF_TABLE("extern", u32, struct weft_tpctx, weft_ctx, WEFT_MAX_TASKS);
BPF_TABLE("extern", u32, struct weft_ctx_ref, weft_ctx_ref, WEFT_MAX_TASKS);

static __always_inline void inherit_context(u32 parent_tid, u32 child_tid)
{
    struct weft_ctx_ref ref = {};
    struct weft_tpctx *live = weft_ctx.lookup(&parent_tid);
    if (live && live->kind != WEFT_CTX_NONE) { /* NONE: the slot of a finished request */
        ref.tid = parent_tid;
        ref.serial = live->serial;
        weft_ctx_ref.update(&child_tid, &ref);
        return;
    }
    struct weft_ctx_ref *up = weft_ctx_ref.lookup(&parent_tid);
    if (up) {
        __builtin_memcpy(&ref, up, sizeof(ref));
        weft_ctx_ref.update(&child_tid, &ref);
    } else {
        weft_ctx_ref.delete(&child_tid); /* a reused tid must not keep an old reference */
    }
}
#endif

/* The agent itself and tasks outside the --cgroup subtrees are not traced. */
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

static __always_inline void weft_stat(u32 idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)++;
}
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (weft_skip_task(pid_tgid))
        return 0;
    char *child = (char *)ctx->args[1];
    struct spawn_rec r = {};
    bpf_probe_read_kernel(&r.child_pid, 4, child + WEFT_TASK_TGID_OFF);
    bpf_probe_read_kernel(&r.child_tid, 4, child + WEFT_TASK_PID_OFF);
    weft_fill_hdr(&r.hdr, WEFT_KIND_THREAD_SPAWN, pid_tgid, bpf_ktime_get_ns());
#if WEFT_INJECT
    if (r.child_pid == (u32)(pid_tgid >> 32))
        inherit_context((u32)pid_tgid, r.child_tid); /* WEFT-INJECT: threads only */
#endif
    if (lineage_events.ringbuf_output(&r, sizeof(r), 0))
        weft_stat(LST_RING_FULL);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (weft_skip_task(pid_tgid))
        return 0;
    struct exit_rec r = {};
    weft_fill_hdr(&r.hdr, WEFT_KIND_TASK_EXIT, pid_tgid, bpf_ktime_get_ns());
    if (lineage_events.ringbuf_output(&r, sizeof(r), 0))
        weft_stat(LST_RING_FULL);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (weft_skip_task(pid_tgid))
        return 0;
    u32 zero = 0;
    struct exec_rec *r = exec_scratch.lookup(&zero);
    if (!r)
        return 0;
    weft_fill_hdr(&r->hdr, WEFT_KIND_EXEC, pid_tgid, bpf_ktime_get_ns());
    char *task = (char *)bpf_get_current_task();
    char *parent = 0;
    r->ppid = 0;
    r->start_ns = 0;
    bpf_probe_read_kernel(&parent, sizeof(parent), task + WEFT_TASK_REAL_PARENT_OFF);
    if (parent)
        bpf_probe_read_kernel(&r->ppid, 4, parent + WEFT_TASK_TGID_OFF);
    bpf_probe_read_kernel(&r->start_ns, 8, task + WEFT_TASK_START_TIME_OFF);
    u32 loc = args->data_loc_filename;
    int n = bpf_probe_read_kernel_str(r->filename, WEFT_FILENAME_MAX, (char *)args + (loc & 0xFFFF));
    r->filename_len = n > 0 ? n - 1 : 0;
    if (lineage_events.ringbuf_output(r, sizeof(*r), 0))
        weft_stat(LST_RING_FULL);
    return 0;
}

_Static_assert(sizeof(struct spawn_rec) == 40, "spawn_rec layout changed: update probe_agent/probes/lineage.py");
_Static_assert(sizeof(struct exit_rec) == 32, "exit_rec layout changed: update probe_agent/probes/lineage.py");
_Static_assert(sizeof(struct exec_rec) == 176, "exec_rec layout changed: update probe_agent/probes/lineage.py");
