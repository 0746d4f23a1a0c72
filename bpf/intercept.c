/* Interception: sockops puts TCP connections of interest into a sockhash and a flow table;
 * sk_msg runs on every sendmsg of those sockets to count, sample into the ring buffer, and
 * enforce verdicts.
 *
 * Rules of this file: the data path never waits on userspace and never fails because of
 * sampling. A missing flow record, a full ring or a failed pull is counted and the message passes.
 * Only an explicit verdict drops.
 *
 * Compiled by BCC at agent start (agent/kernel/sensor.py) with -I pointing at this folder.
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include "infertap.h"

#ifndef ITAP_MAX_FLOWS
#define ITAP_MAX_FLOWS 65536
#endif
#ifndef ITAP_RING_PAGES
#define ITAP_RING_PAGES 4096 /* 16 MiB */
#endif
#ifndef ITAP_MAX_VERDICTS
#define ITAP_MAX_VERDICTS 4096
#endif

#define ITAP_AF_INET 2
#define ITAP_AF_INET6 10
/* enum BPF_TCP_* states */
#define ITAP_TCP_FIN_WAIT1 4
#define ITAP_TCP_FIN_WAIT2 5
#define ITAP_TCP_TIME_WAIT 6
#define ITAP_TCP_CLOSE 7
#define ITAP_TCP_LAST_ACK 9
#define ITAP_TCP_CLOSING 11

/* BCC declares bpf_get_socket_cookie as returning u32; the kernel returns u64. */
static u64 (*itap_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

BPF_SOCKHASH(itap_socks, struct itap_flow_key, ITAP_MAX_FLOWS);
BPF_HASH(itap_flows, struct itap_flow_key, struct itap_flow, ITAP_MAX_FLOWS);
BPF_HASH(itap_watch_ports, u16, u8, 1024);
BPF_HASH(itap_flow_verdicts, u64, u32, ITAP_MAX_VERDICTS);
BPF_HASH(itap_svc_verdicts, struct itap_service_key, u32, ITAP_MAX_VERDICTS);
BPF_ARRAY(itap_config, struct itap_config, 1);
BPF_PERCPU_ARRAY(itap_stats, u64, ITAP_STAT_COUNT);
BPF_RINGBUF_OUTPUT(itap_events, ITAP_RING_PAGES);
/* Exported to bpf/tls.c (loaded after this module, in the same process). */
__attribute__((section("maps/export"))) struct itap_flows_table_t __itap_flows;
__attribute__((section("maps/export"))) struct itap_config_table_t __itap_config;
__attribute__((section("maps/export"))) struct itap_events_table_t __itap_events;

struct itap_sample_small {
    struct itap_record rec;
    u8 data[ITAP_SAMPLE_SMALL];
};
struct itap_sample_medium {
    struct itap_record rec;
    u8 data[ITAP_SAMPLE_MEDIUM];
};
struct itap_sample_max {
    struct itap_record rec;
    u8 data[ITAP_SAMPLE_MAX];
};
struct itap_flow_record {
    struct itap_record rec;
    struct itap_flow flow;
};

static __always_inline void stat_add(u32 idx, u64 n)
{
    u64 *v = itap_stats.lookup(&idx);
    if (v)
        *v += n;
}

/* sock_ops and sk_msg both give the remote port as a network-order u16 shifted into the upper
 * half of a u32 (merbridge issue #100): ntohl recovers the host-order port. */
static __always_inline u16 remote_port_host(u32 raw)
{
    return (u16)bpf_ntohl(raw);
}

static __always_inline int is_v4_mapped(const u32 ip6[4])
{
    return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

/* Fold an AF_INET6 key whose two addresses are IPv4-mapped into an AF_INET key. */
static __always_inline void fold_v4_mapped(struct itap_flow_key *k)
{
    if (k->family != ITAP_AF_INET6 || !is_v4_mapped(k->local_ip) || !is_v4_mapped(k->remote_ip))
        return;
    k->family = ITAP_AF_INET;
    k->local_ip[0] = k->local_ip[3];
    k->remote_ip[0] = k->remote_ip[3];
    k->local_ip[1] = k->local_ip[2] = k->local_ip[3] = 0;
    k->remote_ip[1] = k->remote_ip[2] = k->remote_ip[3] = 0;
}

static __always_inline int key_from_sockops(struct bpf_sock_ops *skops, struct itap_flow_key *k)
{
    u32 family = skops->family;
    k->family = family;
    k->local_port = skops->local_port;
    k->remote_port = remote_port_host(skops->remote_port);
    if (family == ITAP_AF_INET) {
        k->local_ip[0] = skops->local_ip4;
        k->remote_ip[0] = skops->remote_ip4;
        return 0;
    }
    if (family == ITAP_AF_INET6) {
        k->local_ip[0] = skops->local_ip6[0];
        k->local_ip[1] = skops->local_ip6[1];
        k->local_ip[2] = skops->local_ip6[2];
        k->local_ip[3] = skops->local_ip6[3];
        k->remote_ip[0] = skops->remote_ip6[0];
        k->remote_ip[1] = skops->remote_ip6[1];
        k->remote_ip[2] = skops->remote_ip6[2];
        k->remote_ip[3] = skops->remote_ip6[3];
        fold_v4_mapped(k);
        return 0;
    }
    return -1;
}

static __always_inline int key_from_msg(struct sk_msg_md *msg, struct itap_flow_key *k)
{
    u32 family = msg->family;
    k->family = family;
    k->local_port = msg->local_port;
    k->remote_port = remote_port_host(msg->remote_port);
    if (family == ITAP_AF_INET) {
        k->local_ip[0] = msg->local_ip4;
        k->remote_ip[0] = msg->remote_ip4;
        return 0;
    }
    if (family == ITAP_AF_INET6) {
        k->local_ip[0] = msg->local_ip6[0];
        k->local_ip[1] = msg->local_ip6[1];
        k->local_ip[2] = msg->local_ip6[2];
        k->local_ip[3] = msg->local_ip6[3];
        k->remote_ip[0] = msg->remote_ip6[0];
        k->remote_ip[1] = msg->remote_ip6[1];
        k->remote_ip[2] = msg->remote_ip6[2];
        k->remote_ip[3] = msg->remote_ip6[3];
        fold_v4_mapped(k);
        return 0;
    }
    return -1;
}

/* The socket's tcp write_seq: the sequence number its next queued byte will get. The offset of
 * the field comes from the running kernel's BTF (agent/kernel/btf.py), not from our headers. */
static __always_inline int read_write_seq(struct bpf_sock *sk, u32 *seq)
{
#ifdef ITAP_WRITE_SEQ_OFF
    if (!sk)
        return -1;
    struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
    if (!tp)
        return -1;
    return bpf_probe_read_kernel(seq, sizeof(*seq), (char *)tp + ITAP_WRITE_SEQ_OFF);
#else
    return -1;
#endif
}

/* Never wake the reader: a wakeup per message puts a context switch on the sender's path
 * (measured: p50 latency 1.16x of no agent with per-message wakeups). The reader polls every 20 ms
 * instead (agent/runtime.py READ_INTERVAL_S); at the highest rate measured here a 16 MiB ring
 * takes far longer than that to fill, and a busy reader is not helped by wakeups anyway. */
#define ITAP_SUBMIT_FLAGS BPF_RB_NO_WAKEUP

static __always_inline void emit_flow_record(u32 kind, struct itap_flow *flow)
{
    struct itap_flow_record *r = itap_events.ringbuf_reserve(sizeof(struct itap_flow_record));
    if (!r) {
        stat_add(ITAP_STAT_EVENTS_LOST, 1);
        return;
    }
    r->rec.kind = kind;
    r->rec.cap_len = 0;
    r->rec.ts_ns = bpf_ktime_get_ns();
    r->rec.cookie = flow->cookie;
    r->rec.offset = flow->bytes;
    r->rec.msg_len = 0;
    r->rec.role = flow->role;
    r->rec.flags = 0;
    r->rec.pad = 0;
    __builtin_memcpy(&r->flow, flow, sizeof(*flow));
    itap_events.ringbuf_submit(r, ITAP_SUBMIT_FLAGS);
}

static __always_inline void on_established(struct bpf_sock_ops *skops, u8 role)
{
    struct itap_flow_key key = {};
    if (key_from_sockops(skops, &key) < 0)
        return;

    u32 zero = 0;
    struct itap_config *cfg = itap_config.lookup(&zero);
    if (!cfg)
        return;
    if (cfg->port_filter) {
        u16 lp = key.local_port, rp = key.remote_port;
        if (!itap_watch_ports.lookup(&lp) && !itap_watch_ports.lookup(&rp))
            return;
    }

    struct itap_flow flow = {};
    flow.cookie = itap_socket_cookie(skops);
    flow.start_ns = bpf_ktime_get_ns();
    flow.key = key;
    flow.role = role;
#ifdef ITAP_WRITE_SEQ_OFF
    /* Nothing is queued yet at establishment, so snd_nxt == write_seq == stream offset 0. */
    flow.seq_last = skops->snd_nxt;
    flow.seq_ok = 1;
#endif
    flow.sampled = cfg->sample_one_in == 1 ||
                   (cfg->sample_one_in > 1 && bpf_get_prandom_u32() % cfg->sample_one_in == 0);

    /* BPF_ANY: a reused 4-tuple (TIME_WAIT recycling) replaces the stale record. */
    if (itap_flows.update(&key, &flow) != 0) {
        stat_add(ITAP_STAT_FLOW_TABLE_FULL, 1);
        return;
    }
    /* BCC rewrites this call only as a statement of its own, not inside an expression. */
    int err = itap_socks.sock_hash_update(skops, &key, BPF_ANY);
    if (err != 0) {
        itap_flows.delete(&key);
        stat_add(ITAP_STAT_SOCKHASH_FAILED, 1);
        return;
    }
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    stat_add(ITAP_STAT_FLOWS_OPENED, 1);
    /* Announced now, so userspace knows both ends of a connection before its first request
     * is complete; the cgroup id follows with the first send (FLOW_CGROUP). */
    emit_flow_record(ITAP_REC_FLOW_START, &flow);
}

static __always_inline void on_close(struct bpf_sock_ops *skops)
{
    struct itap_flow_key key = {};
    if (key_from_sockops(skops, &key) < 0)
        return;
    struct itap_flow *flow = itap_flows.lookup(&key);
    if (!flow)
        return;
    struct itap_flow copy = *flow;

    /* Bytes sent after the last message sk_msg saw (a cached verdict) are only visible here. */
    u32 seq;
    if (copy.seq_ok && read_write_seq(skops->sk, &seq) == 0) {
        u32 old_state = skops->args[0];
        /* A FIN takes a sequence number but carries no byte. States after our FIN went out: */
        if (old_state == ITAP_TCP_FIN_WAIT1 || old_state == ITAP_TCP_FIN_WAIT2 ||
            old_state == ITAP_TCP_TIME_WAIT || old_state == ITAP_TCP_CLOSING ||
            old_state == ITAP_TCP_LAST_ACK)
            seq -= 1;
        u64 end = copy.seq_pos + (u32)(seq - copy.seq_last);
        if (end > copy.next_offset && end - copy.next_offset < (1ULL << 31)) {
            copy.unseen_bytes += end - copy.next_offset;
            stat_add(ITAP_STAT_BYTES_UNSEEN, end - copy.next_offset);
            copy.next_offset = end;
        }
    }
    itap_flows.delete(&key);
    itap_flow_verdicts.delete(&copy.cookie);
    stat_add(ITAP_STAT_FLOWS_CLOSED, 1);
    emit_flow_record(ITAP_REC_FLOW_END, &copy);
}

int itap_sockops(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        on_established(skops, ITAP_ROLE_CLIENT);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        on_established(skops, ITAP_ROLE_SERVER);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[1] == ITAP_TCP_CLOSE)
            on_close(skops);
        break;
    }
    return 1;
}

/* The other end's key of the same connection, as its own socket sees it. */
static __always_inline void peer_key(const struct itap_flow_key *k, struct itap_flow_key *p)
{
    p->family = k->family;
    p->local_port = k->remote_port;
    p->remote_port = k->local_port;
    __builtin_memcpy(p->local_ip, k->remote_ip, sizeof(p->local_ip));
    __builtin_memcpy(p->remote_ip, k->local_ip, sizeof(p->remote_ip));
}

/* The server end of the flow: where a service verdict applies. */
static __always_inline void service_of(struct itap_flow *flow, struct itap_service_key *svc)
{
    struct itap_flow_key *k = &flow->key;
    svc->family = k->family;
    if (flow->role == ITAP_ROLE_SERVER) {
        svc->port = k->local_port;
        __builtin_memcpy(svc->ip, k->local_ip, sizeof(svc->ip));
    } else {
        svc->port = k->remote_port;
        __builtin_memcpy(svc->ip, k->remote_ip, sizeof(svc->ip));
    }
}

static __always_inline int blocked(struct itap_flow *flow)
{
    u32 *v = itap_flow_verdicts.lookup(&flow->cookie);
    if (v && *v == ITAP_VERDICT_BLOCK)
        return 1;
    struct itap_service_key svc = {};
    service_of(flow, &svc);
    v = itap_svc_verdicts.lookup(&svc);
    return v && *v == ITAP_VERDICT_BLOCK;
}

static __always_inline void fill_sample(struct itap_record *rec, struct itap_flow *flow,
                                        u64 offset, u32 size, u32 cap, u8 flags)
{
    rec->kind = ITAP_REC_SAMPLE;
    rec->cap_len = cap;
    rec->ts_ns = bpf_ktime_get_ns();
    rec->cookie = flow->cookie;
    rec->offset = offset;
    rec->msg_len = size;
    rec->role = flow->role;
    rec->flags = flags;
    rec->pad = 0;
}

/* Clamp `n` to `max` in a way clang cannot optimise out: without the empty asm it proves the
 * clamp redundant and drops it, and the verifier then rejects the variable-size copy. */
#define itap_bound(n, max)                  \
    do {                                    \
        asm volatile("" : "+r"(n));         \
        if ((n) > (max))                    \
            (n) = (max);                    \
    } while (0)

/* Reserve the smallest size class that fits `cap`, copy the bytes, submit. Returns 0, or -1 when
 * the ring is full. Written out per class (BCC cannot rewrite map calls inside a macro); `n` is
 * re-bounded in each branch so the verifier sees a constant upper bound for the copy. */
static __always_inline int emit_sample(struct itap_flow *flow, void *data, u64 offset, u32 size,
                                       u32 cap, u8 flags)
{
    u64 n = cap; /* u64: a u32 gets zero-extended into a copy and the bound is lost */
    if (cap <= ITAP_SAMPLE_SMALL) {
        struct itap_sample_small *s = itap_events.ringbuf_reserve(sizeof(struct itap_sample_small));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_SMALL);
        fill_sample(&s->rec, flow, offset, size, n, flags);
        bpf_probe_read_kernel(s->data, n, data);
        itap_events.ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
        return 0;
    }
    if (cap <= ITAP_SAMPLE_MEDIUM) {
        struct itap_sample_medium *s = itap_events.ringbuf_reserve(sizeof(struct itap_sample_medium));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_MEDIUM);
        fill_sample(&s->rec, flow, offset, size, n, flags);
        bpf_probe_read_kernel(s->data, n, data);
        itap_events.ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
        return 0;
    }
    struct itap_sample_max *s = itap_events.ringbuf_reserve(sizeof(struct itap_sample_max));
    if (!s)
        return -1;
    itap_bound(n, ITAP_SAMPLE_MAX);
    fill_sample(&s->rec, flow, offset, size, n, flags);
    bpf_probe_read_kernel(s->data, n, data);
    itap_events.ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
    return 0;
}

static __always_inline void take_sample(struct sk_msg_md *msg, struct itap_flow *flow,
                                        struct itap_config *cfg, u64 offset, u32 size)
{
    u32 want = cfg->sample_bytes;
    if (want > ITAP_SAMPLE_MAX)
        want = ITAP_SAMPLE_MAX;
    u32 cap = size < want ? size : want;
    u8 flags = 0;

    void *data = msg->data;
    void *data_end = msg->data_end;
    u32 avail = data_end - data;
    if (avail < cap) {
        /* msg->data covers only the first scatterlist element: linearise what we want. */
        if (bpf_msg_pull_data(msg, 0, cap, 0) == 0) {
            data = msg->data;
            data_end = msg->data_end;
            avail = data_end - data;
        } else {
            flags |= ITAP_SAMPLE_PULL_FAILED;
            stat_add(ITAP_STAT_PULL_FAILED, 1);
        }
        if (avail < cap)
            cap = avail;
    }
    if (cap < size)
        flags |= ITAP_SAMPLE_TRUNCATED;

    if (emit_sample(flow, data, offset, size, cap, flags) == 0) {
        flow->samples++;
        stat_add(ITAP_STAT_SAMPLES, 1);
    } else {
        flow->samples_lost++;
        stat_add(ITAP_STAT_SAMPLES_LOST, 1);
    }
}

int itap_msg(struct sk_msg_md *msg)
{
    struct itap_flow_key key = {};
    if (key_from_msg(msg, &key) < 0)
        return SK_PASS;
    struct itap_flow *flow = itap_flows.lookup(&key);
    if (!flow) {
        stat_add(ITAP_STAT_UNTRACKED_MSGS, 1);
        return SK_PASS;
    }
    u32 zero = 0;
    struct itap_config *cfg = itap_config.lookup(&zero);
    if (!cfg)
        return SK_PASS;

    /* Where this message starts in the stream. */
    u64 offset = flow->next_offset;
    u32 seq;
    if (flow->seq_ok && read_write_seq(msg->sk, &seq) == 0) {
        u64 pos = flow->seq_pos + (u32)(seq - flow->seq_last);
        flow->seq_pos = pos;
        flow->seq_last = seq;
        if (pos > offset) {
            flow->unseen_bytes += pos - offset;
            stat_add(ITAP_STAT_BYTES_UNSEEN, pos - offset);
        }
        offset = pos;
    }

    u32 size = msg->size;
    if (cfg->verdicts_active && blocked(flow)) {
        flow->drops++;
        flow->next_offset = offset; /* nothing of a dropped message is queued */
        stat_add(ITAP_STAT_VERDICT_DROPS, 1);
        return SK_DROP;
    }

    struct itap_flow_key peer = {};
    if (!flow->announced) {
        /* The cgroup is learnt on the first send, not at establishment: sock_ops runs in
         * softirq context where neither the socket's cgroup (bpf_sk_cgroup_id is not allowed
         * there) nor the current task's is meaningful. sendmsg runs in the sender's context. */
        flow->announced = 1;
        flow->cgroup_id = bpf_get_current_cgroup_id();
        /* Same-node acceleration is decided once, here: only when the peer socket is ours
         * before the first byte, so a direction's bytes never split between the TCP queue and
         * the peer's ingress queue (which would reorder them). Redirected bytes never advance
         * write_seq, so such a flow's offsets come from our own count. */
        if (cfg->accelerate) {
            peer_key(&key, &peer);
            if (itap_flows.lookup(&peer)) {
                flow->accel = 1;
                flow->seq_ok = 0;
            }
        }
        emit_flow_record(ITAP_REC_FLOW_CGROUP, flow);
    }

    flow->next_offset = offset + size;
    flow->msgs++;
    flow->bytes += size;
    stat_add(ITAP_STAT_MSGS, 1);
    stat_add(ITAP_STAT_BYTES, size);

    if (flow->sampled && cfg->sample_bytes)
        take_sample(msg, flow, cfg, offset, size);

    if (flow->accel) {
        if (peer.family == 0)
            peer_key(&key, &peer);
        /* SK_PASS with a redirect set on success; on a miss (the peer closed) the helper says
         * SK_DROP, and we send over TCP instead: the data path never fails for acceleration. */
        int verdict = itap_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
        if (verdict == SK_PASS) {
            stat_add(ITAP_STAT_REDIRECTED, 1);
            return SK_PASS;
        }
        stat_add(ITAP_STAT_REDIRECT_MISSED, 1);
    }
    return SK_PASS;
}
