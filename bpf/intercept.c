/* Interception: sockops puts TCP connections of interest into a flow table; what samples their
 * bytes depends on the capture mode (itap_config.capture, fixed per flow at establishment):
 *
 *   skb     cgroup_skb/egress samples the first bytes of every skb's TCP payload, at the stream
 *           offset its sequence number gives. Sockets join the sockhash (and so run sk_msg) only
 *           when they need it: a verdict or acceleration. A socket in a sockhash pays for it on
 *           every send (measured: 0.45x bulk throughput), one outside it runs at native speed.
 *   sk_msg  every socket joins the sockhash at establishment; sk_msg samples every sendmsg.
 *
 * sk_msg, where it runs, enforces verdicts (SK_DROP gives the sender EACCES) and redirects for
 * acceleration.
 *
 * Rules of this file: the data path never waits on userspace and never fails because of
 * sampling. A missing flow record, a full ring or a failed pull is counted and the message passes.
 * Only an explicit verdict drops.
 *
 * Compiled by BCC at agent start (agent/kernel/sensor.py) with -I pointing at this folder.
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/if_ether.h>
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
#define ITAP_IPPROTO_TCP 6
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
/* Overload shedding level per ring (0..ITAP_SHED_FULL), set by userspace (agent/kernel/
 * shedding.py) from that ring's fill. */
BPF_ARRAY(itap_shed_level, u32, ITAP_MAX_RINGS);
/* Ring 0, and the template of every inspection worker's ring: the sensor creates rings
 * 1..n_rings-1 of the same size and puts all of them, this one at index 0, in itap_rings. A flow's
 * records all go to the ring its `ring` field names (one flow, one ring, one worker: per-flow
 * order is kept), so no reader is a funnel. */
BPF_RINGBUF_OUTPUT(itap_events, ITAP_RING_PAGES);
BPF_ARRAY_OF_MAPS(itap_rings, "itap_events", ITAP_MAX_RINGS);

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

/* The ring a flow's records go to; NULL (counted as a loss by the caller) only if userspace has
 * not filled that slot, which it does before anything is attached. */
static __always_inline void *ring_of(struct itap_flow *flow)
{
    u32 idx = flow->ring;
    return itap_rings.lookup(&idx);
}

/* Reserve `size` bytes in the flow's ring; NULL when the ring is full (or missing). */
static __always_inline void *ring_reserve(struct itap_flow *flow, u64 size)
{
    void *ring = ring_of(flow);
    if (!ring)
        return NULL;
    return bpf_ringbuf_reserve(ring, size, 0);
}

/* The same ring for both ends of a connection: each endpoint (ip, port) hashed on its own, then
 * summed, which is symmetric, so a same-node connection's client and server flows (and their TLS
 * plaintext) meet in one worker, which pairs requests with responses across them. Mirrored by
 * agent/kernel/rings.py ring_for. */
static __always_inline u32 endpoint_hash(const u32 ip[4], u16 port)
{
    u32 h = ip[0] ^ ip[1] ^ ip[2] ^ ip[3];
    h ^= (u32)port * 0x9e3779b1u;
    h ^= h >> 15;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    return h;
}

static __always_inline u8 ring_for(const struct itap_flow_key *k, u32 n_rings)
{
    if (n_rings <= 1)
        return 0;
    if (n_rings > ITAP_MAX_RINGS)
        n_rings = ITAP_MAX_RINGS;
    u32 h = endpoint_hash(k->local_ip, k->local_port) + endpoint_hash(k->remote_ip, k->remote_port);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    return h % n_rings;
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
    struct itap_flow_record *r = ring_reserve(flow, sizeof(struct itap_flow_record));
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
    bpf_ringbuf_submit(r, ITAP_SUBMIT_FLAGS);
}

static __always_inline int blocked(struct itap_flow *flow);

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
    flow.ring = ring_for(&key, cfg->n_rings);
    /* Nothing is queued yet at establishment, so snd_nxt == write_seq == stream offset 0. The
     * skb program measures offsets from here; sk_msg too when it can read write_seq. */
    flow.seq_last = skops->snd_nxt;
#ifdef ITAP_WRITE_SEQ_OFF
    flow.seq_ok = 1;
#endif
    flow.sampled = cfg->sample_one_in == 1 ||
                   (cfg->sample_one_in > 1 && bpf_get_prandom_u32() % cfg->sample_one_in == 0);
    flow.capture = cfg->capture == ITAP_CAPTURE_SKB ? ITAP_CAPTURE_SKB : ITAP_CAPTURE_SK_MSG;
    if (flow.capture == ITAP_CAPTURE_SK_MSG || cfg->accelerate)
        flow.sockhash = ITAP_SOCKHASH_ALWAYS;

    /* BPF_ANY: a reused 4-tuple (TIME_WAIT recycling) replaces the stale record. */
    if (itap_flows.update(&key, &flow) != 0) {
        stat_add(ITAP_STAT_FLOW_TABLE_FULL, 1);
        return;
    }
    /* The verdict check comes after the flow is in the table: userspace writes a verdict, then
     * lists the flows to give open sockets to the sockhash, so a socket is either listed there
     * or sees the verdict here. */
    if (flow.sockhash == ITAP_SOCKHASH_NONE && cfg->verdicts_active && blocked(&flow))
        flow.sockhash = ITAP_SOCKHASH_VERDICT;
    if (flow.sockhash != ITAP_SOCKHASH_NONE) {
        /* BCC rewrites this call only as a statement of its own, not inside an expression. */
        int err = itap_socks.sock_hash_update(skops, &key, BPF_ANY);
        if (err != 0) {
            stat_add(ITAP_STAT_SOCKHASH_FAILED, 1);
            if (flow.capture == ITAP_CAPTURE_SK_MSG) {
                itap_flows.delete(&key); /* nothing would ever sample or count it */
                return;
            }
            flow.sockhash = ITAP_SOCKHASH_NONE; /* sampled anyway; the verdict fails open */
        } else {
            stat_add(ITAP_STAT_SOCKHASH_JOINED, 1);
        }
        struct itap_flow *stored = itap_flows.lookup(&key);
        if (stored)
            stored->sockhash = flow.sockhash;
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

    /* Bytes sent after the last message sk_msg saw (a cached verdict), or queued but never
     * transmitted (skb capture), are only visible here. */
    u32 seq;
    if ((copy.seq_ok || copy.capture == ITAP_CAPTURE_SKB) && read_write_seq(skops->sk, &seq) == 0) {
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

/* A sample's record header; role is the flow's own, except for TLS plaintext (bpf/tls.c), whose
 * role is that of the process making the library call. */
static __always_inline void fill_sample(struct itap_record *rec, struct itap_flow *flow, u8 role,
                                        u64 offset, u32 size, u32 cap, u8 flags)
{
    rec->kind = ITAP_REC_SAMPLE;
    rec->cap_len = cap;
    rec->ts_ns = bpf_ktime_get_ns();
    rec->cookie = flow->cookie;
    rec->offset = offset;
    rec->msg_len = size;
    rec->role = role;
    rec->flags = flags;
    rec->pad = 0;
}

/* ---- Overload shedding (ITAP_SHED_* in infertap.h) -------------------------------------------
 *
 * Decided before a sample is taken, at message boundaries only: a message (or connection) that
 * started sampled stays sampled, one that started shed stays shed. Never waits on userspace: the
 * level is a map value; a lost ITAP_REC_SHED record is counted (events_lost) and userspace then
 * sees a plain gap. */

#define ITAP_TOKEN(a, b, c, d) ((u32)(a) | ((u32)(b) << 8) | ((u32)(c) << 16) | ((u32)(d) << 24))

static __always_inline u32 shed_level(struct itap_flow *flow)
{
    u32 idx = flow->ring;
    if (idx >= ITAP_MAX_RINGS)
        idx = 0;
    u32 *v = itap_shed_level.lookup(&idx);
    return v ? *v : 0;
}

/* Whether the first 4 bytes of a send can start an HTTP/1 message for this end. */
static __always_inline int http1_start(u8 role, u32 head)
{
    if (role == ITAP_ROLE_SERVER)
        return head == ITAP_TOKEN('H', 'T', 'T', 'P');
    switch (head) {
    case ITAP_TOKEN('G', 'E', 'T', ' '):
    case ITAP_TOKEN('P', 'O', 'S', 'T'):
    case ITAP_TOKEN('P', 'U', 'T', ' '):
    case ITAP_TOKEN('H', 'E', 'A', 'D'):
    case ITAP_TOKEN('D', 'E', 'L', 'E'):
    case ITAP_TOKEN('P', 'A', 'T', 'C'):
    case ITAP_TOKEN('O', 'P', 'T', 'I'):
    case ITAP_TOKEN('C', 'O', 'N', 'N'):
    case ITAP_TOKEN('T', 'R', 'A', 'C'):
        return 1;
    }
    return 0;
}

/* A whole connection's draw: from a hash of the connection, the same at both ends, so two ends
 * deciding at the same instant on two CPUs (a gRPC server's SETTINGS crossing the client's
 * preface) agree without seeing each other's decision. Mixed apart from ring_for's hash, so
 * which connections are shed does not depend on which worker they go to. */
static __always_inline int shed_draw_connection(const struct itap_flow_key *k, u32 level)
{
    if (level == 0)
        return 0;
    if (level >= ITAP_SHED_FULL)
        return 1;
    u32 h = endpoint_hash(k->local_ip, k->local_port) + endpoint_hash(k->remote_ip, k->remote_port);
    h *= 0x2545f491u;
    h ^= h >> 17;
    h *= 0x9e3779b1u;
    return (h >> 8) % ITAP_SHED_FULL < level;
}

/* A request's draw at the level: 1 = shed. Random per decision, so a few busy connections shed
 * the level's share of their requests (a flow hash would shed all or none of one connection's). */
static __always_inline int shed_draw(u32 level)
{
    if (level == 0)
        return 0;
    return level >= ITAP_SHED_FULL || bpf_get_prandom_u32() % ITAP_SHED_FULL < level;
}

static __always_inline void emit_shed(struct itap_flow *flow, u64 offset, u8 flags)
{
    flow->requests_shed++;
    stat_add(flags & ITAP_SHED_CONNECTION ? ITAP_STAT_CONNECTIONS_SHED : ITAP_STAT_REQUESTS_SHED, 1);
    struct itap_record *r = ring_reserve(flow, sizeof(struct itap_record));
    if (!r) {
        stat_add(ITAP_STAT_EVENTS_LOST, 1);
        return;
    }
    fill_sample(r, flow, flow->role, offset, 0, 0, flags);
    r->kind = ITAP_REC_SHED;
    bpf_ringbuf_submit(r, ITAP_SUBMIT_FLAGS);
}

/* Whether a send (or skb) of the flow is sampled. `head`: its first 4 bytes, valid when
 * `at_start` (it starts with bytes not seen before and has at least 4). */
static __always_inline int shed_admit(struct itap_flow *flow, u64 offset, u32 head, int at_start)
{
    u8 st = flow->shed;
    if (st == ITAP_SHED_KEEP)
        return 1;
    if (st == ITAP_SHED_DROP)
        return 0;
    int boundary = at_start && http1_start(flow->role, head);
    if (!boundary && st != ITAP_SHED_UNDECIDED)
        return st == ITAP_SHED_H1_SAMPLED; /* inside a message: as it started */
    struct itap_flow_key pk = {};
    peer_key(&flow->key, &pk);
    if (!boundary) {
        /* Not HTTP/1: one decision for the whole connection, the same at both ends. */
        struct itap_flow *peer = itap_flows.lookup(&pk);
        int drop;
        if (peer && peer->shed == ITAP_SHED_DROP)
            drop = 1;
        else if (peer && peer->shed == ITAP_SHED_KEEP)
            drop = 0;
        else
            drop = shed_draw_connection(&flow->key, shed_level(flow));
        flow->shed = drop ? ITAP_SHED_DROP : ITAP_SHED_KEEP;
        if (drop)
            emit_shed(flow, offset, ITAP_SHED_CONNECTION);
        return !drop;
    }
    int shed;
    if (flow->role == ITAP_ROLE_SERVER) {
        /* A response: shed exactly when the request it answers was (the client's state is its
         * latest request's, and a keep-alive client waits for the answer before the next). */
        struct itap_flow *peer = itap_flows.lookup(&pk);
        if (peer && (peer->shed == ITAP_SHED_H1_SAMPLED || peer->shed == ITAP_SHED_H1_SHED))
            shed = peer->shed == ITAP_SHED_H1_SHED;
        else
            shed = shed_draw(shed_level(flow));
    } else {
        shed = shed_draw(shed_level(flow));
    }
    flow->shed = shed ? ITAP_SHED_H1_SHED : ITAP_SHED_H1_SAMPLED;
    if (shed)
        emit_shed(flow, offset, 0);
    return !shed;
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
        struct itap_sample_small *s = ring_reserve(flow, sizeof(struct itap_sample_small));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_SMALL);
        fill_sample(&s->rec, flow, flow->role, offset, size, n, flags);
        bpf_probe_read_kernel(s->data, n, data);
        bpf_ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
        return 0;
    }
    if (cap <= ITAP_SAMPLE_MEDIUM) {
        struct itap_sample_medium *s = ring_reserve(flow, sizeof(struct itap_sample_medium));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_MEDIUM);
        fill_sample(&s->rec, flow, flow->role, offset, size, n, flags);
        bpf_probe_read_kernel(s->data, n, data);
        bpf_ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
        return 0;
    }
    struct itap_sample_max *s = ring_reserve(flow, sizeof(struct itap_sample_max));
    if (!s)
        return -1;
    itap_bound(n, ITAP_SAMPLE_MAX);
    fill_sample(&s->rec, flow, flow->role, offset, size, n, flags);
    bpf_probe_read_kernel(s->data, n, data);
    bpf_ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
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

/* shed_admit for a sendmsg: every message starts at bytes not seen before. */
static __always_inline int shed_admit_msg(struct sk_msg_md *msg, struct itap_flow *flow, u64 offset)
{
    if (flow->shed == ITAP_SHED_KEEP)
        return 1;
    u32 head = 0;
    int have = 0;
    void *data = msg->data;
    void *data_end = msg->data_end;
    if (data + 4 <= data_end) {
        head = *(u32 *)data;
        have = 1;
    } else if (msg->size >= 4 && bpf_msg_pull_data(msg, 0, 4, 0) == 0) {
        data = msg->data;
        data_end = msg->data_end;
        if (data + 4 <= data_end) {
            head = *(u32 *)data;
            have = 1;
        }
    }
    return shed_admit(flow, offset, head, have);
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

    /* Offsets and counters belong to whichever program samples the flow: the skb program
     * keeps them for skb capture, and sk_msg here only enforces (and redirects). */
    int own_counters = flow->capture == ITAP_CAPTURE_SK_MSG;

    /* Where this message starts in the stream. */
    u64 offset = flow->next_offset;
    u32 seq;
    if (own_counters && flow->seq_ok && read_write_seq(msg->sk, &seq) == 0) {
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
        if (own_counters)
            flow->next_offset = offset; /* nothing of a dropped message is queued */
        stat_add(ITAP_STAT_VERDICT_DROPS, 1);
        return SK_DROP;
    }

    struct itap_flow_key peer = {};
    if (!flow->announced && own_counters) {
        /* The cgroup is learnt on the first send, not at establishment: sock_ops runs in
         * softirq context where neither the socket's cgroup (bpf_sk_cgroup_id is not allowed
         * there) nor the current task's is meaningful. sendmsg runs in the sender's context. */
        flow->announced = 1;
        flow->cgroup_id = bpf_get_current_cgroup_id();
        emit_flow_record(ITAP_REC_FLOW_CGROUP, flow);
    }
    if (flow->accel == ITAP_ACCEL_UNDECIDED && cfg->accelerate &&
        flow->sockhash == ITAP_SOCKHASH_ALWAYS) {
        /* Same-node acceleration is decided once, on the first send: only when the peer
         * socket is ours before the first byte, so a direction's bytes never split between
         * the TCP queue and the peer's ingress queue (which would reorder them). Redirected
         * bytes never reach the skb path nor advance write_seq, so such a flow is sampled and
         * counted here, its offsets from our own count. */
        flow->accel = ITAP_ACCEL_NO;
        peer_key(&key, &peer);
        if (itap_flows.lookup(&peer)) {
            flow->accel = ITAP_ACCEL_YES;
            flow->seq_ok = 0;
            flow->capture = ITAP_CAPTURE_SK_MSG;
            own_counters = 1;
            if (!flow->announced) {
                flow->announced = 1;
                flow->cgroup_id = bpf_get_current_cgroup_id();
                emit_flow_record(ITAP_REC_FLOW_CGROUP, flow);
            }
        }
    }
    if (!own_counters)
        return SK_PASS;

    flow->next_offset = offset + size;
    flow->msgs++;
    flow->bytes += size;
    stat_add(ITAP_STAT_MSGS, 1);
    stat_add(ITAP_STAT_BYTES, size);

    if (flow->sampled && cfg->sample_bytes && shed_admit_msg(msg, flow, offset))
        take_sample(msg, flow, cfg, offset, size);

    if (flow->accel == ITAP_ACCEL_YES) {
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

/* ---- skb capture: cgroup_skb/egress ------------------------------------------------------------
 *
 * Runs for every skb a socket in an attached cgroup sends; skb->data starts at the IP header.
 * An skb is one piece of the stream (up to 64 KiB with GSO), not one send(): message framing is
 * the protocol decoders' job, as it already is for sk_msg messages (which are not send() calls
 * either). Always returns 1: a cgroup_skb drop makes send() succeed and the connection stall
 * silently, so this program never enforces anything. */

struct itap_skb_pos {
    u32 payload_off; /* TCP payload start in the skb */
    u32 len;         /* TCP payload bytes */
    u64 offset;      /* stream offset of the payload's first byte */
};

/* Copy the first bytes of the payload into the ring: the one place skb capture samples. */
static __always_inline int emit_skb_bytes(struct __sk_buff *skb, struct itap_flow *flow,
                                          u32 skb_off, u64 offset, u32 span, u32 cap, u8 flags)
{
    u64 n = cap; /* u64: a u32 gets zero-extended into a copy and the bound is lost */
    if (cap <= ITAP_SAMPLE_SMALL) {
        struct itap_sample_small *s = ring_reserve(flow, sizeof(struct itap_sample_small));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_SMALL);
        fill_sample(&s->rec, flow, flow->role, offset, span, n, flags);
        if (n == 0 || bpf_skb_load_bytes(skb, skb_off, s->data, n) != 0) {
            bpf_ringbuf_discard(s, 0);
            return -2;
        }
        bpf_ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
        return 0;
    }
    if (cap <= ITAP_SAMPLE_MEDIUM) {
        struct itap_sample_medium *s = ring_reserve(flow, sizeof(struct itap_sample_medium));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_MEDIUM);
        fill_sample(&s->rec, flow, flow->role, offset, span, n, flags);
        if (n == 0 || bpf_skb_load_bytes(skb, skb_off, s->data, n) != 0) {
            bpf_ringbuf_discard(s, 0);
            return -2;
        }
        bpf_ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
        return 0;
    }
    struct itap_sample_max *s = ring_reserve(flow, sizeof(struct itap_sample_max));
    if (!s)
        return -1;
    itap_bound(n, ITAP_SAMPLE_MAX);
    fill_sample(&s->rec, flow, flow->role, offset, span, n, flags);
    if (n == 0 || bpf_skb_load_bytes(skb, skb_off, s->data, n) != 0) {
        bpf_ringbuf_discard(s, 0);
        return -2;
    }
    bpf_ringbuf_submit(s, ITAP_SUBMIT_FLAGS);
    return 0;
}

static __always_inline void count_sample(struct itap_flow *flow, int err)
{
    if (err == 0) {
        flow->samples++;
        stat_add(ITAP_STAT_SAMPLES, 1);
    } else {
        flow->samples_lost++;
        stat_add(ITAP_STAT_SAMPLES_LOST, 1);
    }
}

/* ---- HTTP/2 frame walk --------------------------------------------------------------------------
 *
 * HPACK state needs every header block from the connection's first byte, and one skb can carry
 * many frames (gRPC packs the frames of concurrent calls into one write), so a sample cut at
 * sample_bytes would lose header blocks and leave the connection dark. On an HTTP/2 flow each skb
 * is therefore sampled as a few pieces, in stream order: its first sample_bytes (or more, when a
 * header block runs on from the previous skb), then every frame header and every non-DATA frame
 * beyond them, and the first ITAP_H2_DATA_HEAD bytes of every DATA payload (a gRPC message's
 * first fields: the model name). Only DATA payloads are cut, and each piece's span reaches to the next piece, so
 * userspace sees the cut bytes as a truncation of exact length inside a DATA payload whose
 * header it has. */

/* A piece of an skb: payload bytes [rel, rel + cap) captured, [rel, rel + span) covered. */
struct itap_piece {
    u32 rel;
    u32 cap;
    u32 span;
    u32 pad;
};

/* Per-CPU scratch of the walk. Counts and lengths go through it (map values are not tracked by
 * the verifier), which keeps the walk's loop from multiplying verifier states. */
struct itap_h2_scratch {
    u32 n; /* pieces recorded */
    u32 pad;
    struct itap_piece p[ITAP_H2_MAX_PIECES + 1];
};
BPF_PERCPU_ARRAY(itap_h2_scratch, struct itap_h2_scratch, 1);

#define ITAP_H2_DATA 0x0
#define ITAP_H2_SETTINGS 0x4
/* The client connection preface, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", as three little-endian u64s. */
#define ITAP_H2_PREFACE_0 0x5448202a20495250ULL
#define ITAP_H2_PREFACE_1 0x0a0d302e322f5054ULL
#define ITAP_H2_PREFACE_2 0x0a0d0a0d4d530a0dULL
#define ITAP_H2_PREFACE_LEN 24

/* Decide from a flow's first skb whether it is HTTP/2: the client's preface, or the server's
 * opening SETTINGS frame (type 4, no flags, stream 0, a length that is a multiple of 6). */
static __always_inline void h2_detect(struct __sk_buff *skb, struct itap_flow *flow,
                                      struct itap_skb_pos *p)
{
    flow->h2 = ITAP_H2_NO;
    if (p->offset != 0)
        return; /* the stream's start was not seen */
    if (flow->role == ITAP_ROLE_CLIENT) {
        u64 w[3];
        if (p->len < ITAP_H2_PREFACE_LEN ||
            bpf_skb_load_bytes(skb, p->payload_off, w, sizeof(w)) != 0)
            return;
        if (w[0] != ITAP_H2_PREFACE_0 || w[1] != ITAP_H2_PREFACE_1 || w[2] != ITAP_H2_PREFACE_2)
            return;
        flow->h2 = ITAP_H2_WALK;
        flow->h2_next = ITAP_H2_PREFACE_LEN;
        return;
    }
    u8 h[9];
    if (p->len < sizeof(h) || bpf_skb_load_bytes(skb, p->payload_off, h, sizeof(h)) != 0)
        return;
    u32 flen = ((u32)h[0] << 16) | ((u32)h[1] << 8) | h[2];
    if (h[3] != ITAP_H2_SETTINGS || h[4] != 0 || (h[5] | h[6] | h[7] | h[8]) != 0 ||
        flen % 6 != 0 || flen > 6 * 64)
        return;
    flow->h2 = ITAP_H2_WALK;
    flow->h2_next = 0;
}

/* Walk the frames of one skb of an HTTP/2 flow and sample it as pieces. */
static __always_inline void sample_h2(struct __sk_buff *skb, struct itap_flow *flow, u32 want,
                                      struct itap_skb_pos *p)
{
    u32 zero = 0;
    struct itap_h2_scratch *sc = itap_h2_scratch.lookup(&zero);
    if (!sc)
        return;
    u64 start = p->offset;
    u32 len = p->len;
    u64 end = start + len;
    u64 pos = flow->h2_next;
    u32 cap0 = len < want ? len : want;
    if (flow->h2_keep > start) {
        /* A header block (or frame header) began in an earlier skb and runs into this one. */
        u64 keep = flow->h2_keep - start;
        if (keep > len)
            keep = len;
        if (keep > cap0)
            cap0 = keep;
    }
    u32 frames = 0;
    if (flow->h2_head_len) {
        /* A frame header began h2_head_len bytes before this skb: finish reading it. */
        u32 have = flow->h2_head_len;
        u32 head = flow->h2_head;
        if (have < 4) {
            u8 b[4] = {};
            if (len < 4 || bpf_skb_load_bytes(skb, p->payload_off, b, 4) != 0)
                goto lost;
            /* head holds byte i of the frame header at bits 8i, for i < have */
            if (have == 1)
                head |= ((u32)b[0] << 8) | ((u32)b[1] << 16) | ((u32)b[2] << 24);
            else if (have == 2)
                head |= ((u32)b[0] << 16) | ((u32)b[1] << 24);
            else
                head |= (u32)b[0] << 24;
        }
        u32 flen = ((head & 0xff) << 16) | (head & 0xff00) | ((head >> 16) & 0xff);
        u32 ftype = head >> 24;
        u64 need = pos + 9 + flen;
        if (ftype == ITAP_H2_DATA && flen > ITAP_H2_DATA_HEAD)
            need = pos + 9 + ITAP_H2_DATA_HEAD;
        if (need > start && need - start > cap0)
            cap0 = need - start > len ? len : need - start;
        if (need > end)
            flow->h2_keep = need;
        pos += 9 + flen;
        flow->h2_head_len = 0;
        frames++;
    } else if (pos < start) {
        goto lost; /* bytes went by that this program never saw: its place in the frames too */
    }
    if (cap0 > ITAP_SAMPLE_MAX)
        cap0 = ITAP_SAMPLE_MAX; /* a header block longer than a sample: HPACK will say so */

    sc->n = 0;        /* pieces recorded before the pending one */
    u32 pend_rel = 0; /* the pending piece: captured payload bytes [pend_rel, pend_end) */
    u32 pend_end = cap0;
    int i;
#pragma clang loop unroll(disable)
    for (i = 0; i < ITAP_H2_MAX_FRAMES; i++) {
        if (pos + 9 > end)
            break; /* no frame header left, or one that runs into the next skb */
        u32 rel = pos - start;
        u8 h[4];
        if (bpf_skb_load_bytes(skb, p->payload_off + rel, h, 4) != 0)
            goto lost;
        u32 flen = ((u32)h[0] << 16) | ((u32)h[1] << 8) | h[2];
        u64 fend = pos + 9 + flen;
        u64 need = fend;
        if (h[3] == ITAP_H2_DATA && flen > ITAP_H2_DATA_HEAD)
            need = pos + 9 + ITAP_H2_DATA_HEAD;
        if (need > end)
            flow->h2_keep = need;
        u32 need_end = need > end ? len : need - start; /* capture payload up to here */
        frames++;
        if (rel > pend_end && sc->n < ITAP_H2_MAX_PIECES) {
            u32 k = sc->n;
            if (k >= ITAP_H2_MAX_PIECES)
                goto lost;
            sc->p[k].rel = pend_rel;
            sc->p[k].cap = pend_end - pend_rel;
            sc->p[k].span = rel - pend_rel;
            sc->n = k + 1;
            pend_rel = rel;
        }
        /* Adjacent or overlapping needs make one piece; out of pieces, the last one grows
         * over the DATA between. */
        if (need_end > pend_end)
            pend_end = need_end;
        pos = fend;
    }
    stat_add(ITAP_STAT_H2_FRAMES, frames);
    if (pos < end && pos + 9 > end) {
        /* The frame header runs into the next skb: keep its first bytes (the length and
         * type are all the walk needs) and capture what is here. */
        u32 rel = pos - start;
        u32 left = end - pos;
        u32 head = 0;
        u8 b;
        if (bpf_skb_load_bytes(skb, p->payload_off + rel, &b, 1) != 0)
            goto lost;
        head = b;
        if (left > 1) {
            if (bpf_skb_load_bytes(skb, p->payload_off + rel + 1, &b, 1) != 0)
                goto lost;
            head |= (u32)b << 8;
        }
        if (left > 2) {
            if (bpf_skb_load_bytes(skb, p->payload_off + rel + 2, &b, 1) != 0)
                goto lost;
            head |= (u32)b << 16;
        }
        if (left > 3) {
            if (bpf_skb_load_bytes(skb, p->payload_off + rel + 3, &b, 1) != 0)
                goto lost;
            head |= (u32)b << 24;
        }
        flow->h2_head = head;
        flow->h2_head_len = left;
        if (rel > pend_end && sc->n < ITAP_H2_MAX_PIECES) {
            u32 k = sc->n;
            if (k >= ITAP_H2_MAX_PIECES)
                goto lost;
            sc->p[k].rel = pend_rel;
            sc->p[k].cap = pend_end - pend_rel;
            sc->p[k].span = rel - pend_rel;
            sc->n = k + 1;
            pend_rel = rel;
        }
        pend_end = len;
    } else if (pos < end) {
        goto lost; /* more frames than one walk takes */
    }
    flow->h2_next = pos;
    {
        u32 k = sc->n;
        if (k > ITAP_H2_MAX_PIECES)
            goto lost;
        sc->p[k].rel = pend_rel;
        sc->p[k].cap = pend_end - pend_rel;
        sc->p[k].span = len - pend_rel;
        sc->n = k + 1;
    }

#pragma clang loop unroll(disable)
    for (i = 0; i < ITAP_H2_MAX_PIECES + 1; i++) {
        if (i >= sc->n)
            break;
        struct itap_piece *pc = &sc->p[i];
        u32 cap = pc->cap > ITAP_SAMPLE_MAX ? ITAP_SAMPLE_MAX : pc->cap;
        if (cap == 0)
            continue;
        u8 flags = cap < pc->span ? ITAP_SAMPLE_TRUNCATED : 0;
        count_sample(flow, emit_skb_bytes(skb, flow, p->payload_off + pc->rel, start + pc->rel,
                                          pc->span, cap, flags));
        if (i > 0)
            stat_add(ITAP_STAT_H2_PIECES, 1);
    }
    return;

lost:
    /* The walk lost its place: from here the flow is sampled like any other (userspace sees
     * the gap in framing and says so). This skb gets its plain sample. */
    flow->h2 = ITAP_H2_NO;
    stat_add(ITAP_STAT_H2_WALK_LOST, 1);
    if (cap0 > ITAP_SAMPLE_MAX)
        cap0 = ITAP_SAMPLE_MAX;
    if (cap0)
        count_sample(flow, emit_skb_bytes(skb, flow, p->payload_off, start, len, cap0,
                                          cap0 < len ? ITAP_SAMPLE_TRUNCATED : 0));
}

/* Sample one skb of a sampled flow: the one place skb capture decides what goes to the ring.
 * Its first sample_bytes of payload; on HTTP/2 flows, header blocks whole (sample_h2). */
static __always_inline void sample_skb(struct __sk_buff *skb, struct itap_flow *flow,
                                       struct itap_config *cfg, struct itap_skb_pos *p)
{
    u32 want = cfg->sample_bytes;
    if (want > ITAP_SAMPLE_MAX)
        want = ITAP_SAMPLE_MAX;
    if (cfg->h2_walk && flow->h2 == ITAP_H2_UNKNOWN)
        h2_detect(skb, flow, p);
    if (cfg->h2_walk && flow->h2 == ITAP_H2_WALK) {
        sample_h2(skb, flow, want, p);
        return;
    }
    u32 cap = p->len < want ? p->len : want;
    if (cap == 0)
        return;
    u8 flags = cap < p->len ? ITAP_SAMPLE_TRUNCATED : 0;
    count_sample(flow, emit_skb_bytes(skb, flow, p->payload_off, p->offset, p->len, cap, flags));
}

/* The flow key (as the sending socket sees it) and payload position of a TCP skb. Headers of
 * locally sent TCP are in the skb's linear part, read directly (no helper call per header). */
static __always_inline int parse_skb(struct __sk_buff *skb, struct itap_flow_key *k,
                                     struct itap_skb_pos *p, u32 *seq)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    u8 *tcp;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        u8 *ip = data;
        if ((void *)(ip + 20) > data_end || ip[9] != ITAP_IPPROTO_TCP)
            return -1;
        u32 ihl = (ip[0] & 0x0f) * 4;
        k->family = ITAP_AF_INET;
        __builtin_memcpy(&k->local_ip[0], &ip[12], 4);
        __builtin_memcpy(&k->remote_ip[0], &ip[16], 4);
        tcp = ip + ihl;
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        u8 *ip6 = data;
        /* extension headers: not from a TCP socket here */
        if ((void *)(ip6 + 40) > data_end || ip6[6] != ITAP_IPPROTO_TCP)
            return -1;
        k->family = ITAP_AF_INET6;
        __builtin_memcpy(k->local_ip, &ip6[8], 16);
        __builtin_memcpy(k->remote_ip, &ip6[24], 16);
        fold_v4_mapped(k);
        tcp = ip6 + 40;
    } else {
        return -1;
    }
    if ((void *)(tcp + 16) > data_end) /* ports, seq, ack, data offset */
        return -1;
    k->local_port = ((u16)tcp[0] << 8) | tcp[1];
    k->remote_port = ((u16)tcp[2] << 8) | tcp[3];
    *seq = ((u32)tcp[4] << 24) | ((u32)tcp[5] << 16) | ((u32)tcp[6] << 8) | tcp[7];
    u32 off = (u32)(tcp - (u8 *)data) + (tcp[12] >> 4) * 4;
    if (skb->len <= off)
        return -1;
    p->payload_off = off;
    p->len = skb->len - off;
    return 0;
}

/* shed_admit for an skb: a message boundary needs the skb to start at new bytes. */
static __always_inline int shed_admit_skb(struct __sk_buff *skb, struct itap_flow *flow,
                                          struct itap_skb_pos *p, int at_start)
{
    if (flow->shed == ITAP_SHED_KEEP)
        return 1;
    u32 head = 0;
    if (at_start && (p->len < 4 || bpf_skb_load_bytes(skb, p->payload_off, &head, 4) != 0))
        at_start = 0;
    return shed_admit(flow, p->offset, head, at_start);
}

int itap_skb_egress(struct __sk_buff *skb)
{
    struct itap_flow_key key = {};
    struct itap_skb_pos pos = {};
    u32 seq;
    if (parse_skb(skb, &key, &pos, &seq) < 0)
        return 1; /* not TCP, or no payload (most ACKs) */
    struct itap_flow *flow = itap_flows.lookup(&key);
    if (!flow || flow->capture != ITAP_CAPTURE_SKB)
        return 1;
    u32 zero = 0;
    struct itap_config *cfg = itap_config.lookup(&zero);
    if (!cfg)
        return 1;

    /* Stream offset from the sequence number: a signed step from the last skb that carried new
     * bytes (retransmits step back). */
    s32 step = (s32)(seq - flow->seq_last);
    if (step < 0 && (u64)(-(s64)step) > flow->seq_pos)
        return 1; /* before the stream's start: not ours to place */
    pos.offset = flow->seq_pos + (s64)step;
    u64 end = pos.offset + pos.len;
    if (end <= flow->next_offset) {
        stat_add(ITAP_STAT_RETRANSMITS, 1);
        return 1; /* every byte already seen: a retransmit */
    }
    int at_start = pos.offset >= flow->next_offset; /* its first byte is new */
    u64 fresh = at_start ? pos.len : end - flow->next_offset;
    if (pos.offset > flow->next_offset) {
        /* Bytes this program never saw leave (dropped before the egress hook, e.g. by
         * netfilter, then retransmitted behind newer ones): an exact, counted gap. */
        flow->unseen_bytes += pos.offset - flow->next_offset;
        stat_add(ITAP_STAT_BYTES_UNSEEN, pos.offset - flow->next_offset);
    }
    flow->next_offset = end;
    flow->seq_last = seq + pos.len;
    flow->seq_pos = end;
    flow->msgs++;
    flow->bytes += fresh;
    stat_add(ITAP_STAT_MSGS, 1);
    stat_add(ITAP_STAT_BYTES, fresh);

    if (!flow->announced) {
        /* The socket's own cgroup: this may run in softirq, where the current task is not
         * the sender. */
        flow->announced = 1;
        flow->cgroup_id = bpf_skb_cgroup_id(skb);
        emit_flow_record(ITAP_REC_FLOW_CGROUP, flow);
    }
    if (flow->sampled && cfg->sample_bytes && shed_admit_skb(skb, flow, &pos, at_start))
        sample_skb(skb, flow, cfg, &pos);
    return 1;
}
