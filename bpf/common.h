/* Weft: the kernel/user boundary shared by every program in bpf/.
 *
 * Every ring-buffer record starts with struct weft_hdr. Layouts are naturally aligned, widest
 * fields first, so C and Python agree without packing pragmas. WEFT_ABI_VERSION goes in every
 * header: a decoder refuses versions it does not know. tests/unit/test_bpf_abi.py checks that
 * the kinds and sizes here and in the Python decoders (probe_agent/probes) agree.
 *
 * Compile-time constants come from the loader as -D flags (probe_agent/probes/base.py):
 *   WEFT_SELF_PID        the agent's own pid, never traced
 *   WEFT_FILTER_CGROUPS  1 when only the cgroup subtrees in `cgroup_scope` are traced
 *   WEFT_CGROUP_SCOPES   how many entries `cgroup_scope` has (the agent's --cgroup paths)
 *   WEFT_RING_PAGES, WEFT_MAX_CONNS, WEFT_MAX_TASKS   map and ring bounds
 */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#define WEFT_ABI_VERSION 1

enum weft_kind {
    WEFT_KIND_THREAD_SPAWN = 1,
    WEFT_KIND_TASK_EXIT = 2,
    WEFT_KIND_EXEC = 3,
    WEFT_KIND_CONN_OPEN = 4,
    WEFT_KIND_CONN_CLOSE = 5,
    WEFT_KIND_HTTP = 6,
    WEFT_KIND_GO_SPAWN = 7, /* bpf/go_runtime.bpf.c */
    WEFT_KIND_HTTP_LOST = 8, /* an HTTP record the ring had no room for: its thread and times */
};

struct weft_hdr {
    u64 ts_ns;     /* bpf_ktime_get_ns() */
    u64 cgroup_id; /* bpf_get_current_cgroup_id() */
    u32 pid;       /* tgid */
    u32 tid;
    u16 kind;      /* enum weft_kind */
    u16 version;   /* WEFT_ABI_VERSION */
    u32 reserved;
}; /* 32 bytes */

static __always_inline void weft_fill_hdr(struct weft_hdr *h, u16 kind, u64 pid_tgid, u64 ts)
{
    h->ts_ns = ts;
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->pid = pid_tgid >> 32;
    h->tid = (u32)pid_tgid;
    h->kind = kind;
    h->version = WEFT_ABI_VERSION;
    h->reserved = 0;
}

/* A --cgroup root: everything in its subtree is traced, cgroups created later included (a
 * container runtime makes one per pod or container, under a parent such as kubepods.slice, long
 * after the agent started). A task is in it when its cgroup's ancestor at the root's level is
 * the root (bpf_get_current_ancestor_cgroup_id). */
struct weft_cgroup_scope {
    u64 id;    /* cgroup v2 id (the directory's inode number) */
    u32 level; /* depth below the cgroup v2 root (the root itself is 0) */
    u32 pad;
};
#ifndef WEFT_CGROUP_SCOPES
#define WEFT_CGROUP_SCOPES 1
#endif
#define WEFT_CGROUP_VERDICTS 16384 /* cgroups whose verdict is cached (LRU) */
enum weft_cgroup_verdict { WEFT_CG_OUT = 1, WEFT_CG_IN = 2 };

/* Every program also declares, in its own file (BCC rewrites map calls only in the main source,
 * never in an included header), the same maps and helpers:
 *   BPF_ARRAY(cgroup_scope, struct weft_cgroup_scope, WEFT_CGROUP_SCOPES)   the --cgroup roots
 *   BPF_TABLE("lru_hash", u64, u8, cgroup_verdict, WEFT_CGROUP_VERDICTS)   cgroup id -> in/out,
 *       decided once per cgroup (ids are never reused), so a task costs one lookup; nothing is
 *       decided before the loader has filled the roots (entry 0 is written last)
 *   BPF_PERCPU_ARRAY(stats, u64, WEFT_MAX_STATS)  counters named by the loader's stat_names
 *   weft_skip_task(pid_tgid), weft_stat(idx)
 */
#define WEFT_MAX_STATS 16
#define WEFT_MAX_GO_PROCS 4096 /* Go processes traced at goroutine level (pid -> offsets) */

#endif /* WEFT_COMMON_H */
