/* TLS plaintext: uprobes on OpenSSL's SSL_write, SSL_write_ex, SSL_read, SSL_read_ex copy the
 * plaintext an application hands to (or gets from) its TLS library into the ring buffer of their flow, as
 * the cleartext samples, marked ITAP_SAMPLE_TLS, for the same decoders.
 *
 * Which TCP flow a call belongs to: while a thread is inside one of those calls, the library
 * writes or reads the socket in that same thread. The sock_send_length / sock_recv_length
 * tracepoints (raw tracepoints: kprobes and fentry are not available here) see the socket then;
 * its 4-tuple is the flow table's key. The SSL object -> socket pairing is remembered, so a read
 * served from the library's buffer (no syscall) still finds its flow. Only sockets in the flow
 * table (intercepted by sockops in a watched cgroup) produce records: calls on anything else are
 * counted and dropped.
 *
 * Same rules as intercept.c: nothing here waits on userspace; a full ring or a missing flow is
 * counted and the application's call goes on untouched (uprobes cannot change it anyway).
 */
/* Compiled after intercept.c as one BPF object (agent/kernel/sensor.py joins the two files), so
 * these programs use its flow table, config, ring buffer, sample structs and itap_bound directly.
 * Not a separate BCC module: BCC's cross-module "extern" tables are resolved by name in a
 * process-wide registry where the first exporter wins and a closed one leaves a stale entry.
 * Loading and attaching are the TLS unit's (agent/kernel/tls.py), only when it starts. */
#include <uapi/linux/ptrace.h>

#ifndef ITAP_SKC_FAMILY_OFF
#define ITAP_SKC_FAMILY_OFF 16
#endif

#define ITAP_TLS_OP_WRITE 1
#define ITAP_TLS_OP_READ 2

/* A TLS call in progress, per thread (pid_tgid). */
struct itap_tls_call {
    u64 ssl;
    u64 buf;
    u64 len_out; /* SSL_*_ex: where the library writes the byte count; 0 for SSL_read/SSL_write */
    struct itap_flow_key key; /* the socket the call touched, when it made a syscall */
    u8 op;
    u8 has_key;
    u8 pad[6];
};

struct itap_tls_ssl {
    u64 tgid;
    u64 ssl;
};

/* Plaintext stream offsets of one flow: what it sent, and what it received. */
struct itap_tls_stream {
    u64 sent;
    u64 received;
};

BPF_HASH(itap_tls_calls, u64, struct itap_tls_call, 16384);
BPF_TABLE("lru_hash", struct itap_tls_ssl, struct itap_flow_key, itap_tls_sockets, 65536);
BPF_TABLE("lru_hash", u64, struct itap_tls_stream, itap_tls_streams, ITAP_MAX_FLOWS);
BPF_PERCPU_ARRAY(itap_tls_stats, u64, ITAP_TLS_STAT_COUNT);

static __always_inline void tls_stat(u32 idx, u64 n)
{
    u64 *v = itap_tls_stats.lookup(&idx);
    if (v)
        *v += n;
}

/* ---- entry: remember the call -------------------------------------------------------------- */

static __always_inline int tls_enter(struct pt_regs *ctx, u8 op, int ex)
{
    struct itap_tls_call call = {};
    call.ssl = PT_REGS_PARM1(ctx);
    call.buf = PT_REGS_PARM2(ctx);
    call.len_out = ex ? PT_REGS_PARM4(ctx) : 0;
    call.op = op;
    u64 id = bpf_get_current_pid_tgid();
    itap_tls_calls.update(&id, &call);
    return 0;
}

int itap_tls_write_enter(struct pt_regs *ctx) { return tls_enter(ctx, ITAP_TLS_OP_WRITE, 0); }
int itap_tls_write_ex_enter(struct pt_regs *ctx) { return tls_enter(ctx, ITAP_TLS_OP_WRITE, 1); }
int itap_tls_read_enter(struct pt_regs *ctx) { return tls_enter(ctx, ITAP_TLS_OP_READ, 0); }
int itap_tls_read_ex_enter(struct pt_regs *ctx) { return tls_enter(ctx, ITAP_TLS_OP_READ, 1); }

/* ---- the socket a call touches ------------------------------------------------------------- */

/* struct sock starts with struct sock_common, whose first 16 bytes have been the address pair
 * (daddr, rcv_saddr), the hash, and the port pair (dport network order, num host order) since
 * 2.6 (INET_MATCH relies on it). The family's and the IPv6 addresses' offsets come from BTF. */
static __always_inline int key_from_sock(void *sk, struct itap_flow_key *k)
{
    u16 family = 0;
    if (bpf_probe_read_kernel(&family, sizeof(family), (char *)sk + ITAP_SKC_FAMILY_OFF))
        return -1;
    u16 dport = 0, num = 0;
    bpf_probe_read_kernel(&dport, sizeof(dport), (char *)sk + 12);
    bpf_probe_read_kernel(&num, sizeof(num), (char *)sk + 14);
    k->family = family;
    k->local_port = num;
    k->remote_port = bpf_ntohs(dport);
    if (family == ITAP_AF_INET) {
        bpf_probe_read_kernel(&k->remote_ip[0], 4, sk);
        bpf_probe_read_kernel(&k->local_ip[0], 4, (char *)sk + 4);
        return 0;
    }
#if defined(ITAP_SKC_V6_DADDR_OFF) && defined(ITAP_SKC_V6_RCV_SADDR_OFF)
    if (family == ITAP_AF_INET6) {
        bpf_probe_read_kernel(k->remote_ip, 16, (char *)sk + ITAP_SKC_V6_DADDR_OFF);
        bpf_probe_read_kernel(k->local_ip, 16, (char *)sk + ITAP_SKC_V6_RCV_SADDR_OFF);
        /* IPv4-mapped on both ends: the flow table holds it as IPv4 (intercept.c). */
        if (k->local_ip[0] == 0 && k->local_ip[1] == 0 && k->local_ip[2] == bpf_htonl(0xffff) &&
            k->remote_ip[0] == 0 && k->remote_ip[1] == 0 && k->remote_ip[2] == bpf_htonl(0xffff)) {
            k->family = ITAP_AF_INET;
            k->local_ip[0] = k->local_ip[3];
            k->remote_ip[0] = k->remote_ip[3];
            k->local_ip[1] = k->local_ip[2] = k->local_ip[3] = 0;
            k->remote_ip[1] = k->remote_ip[2] = k->remote_ip[3] = 0;
        }
        return 0;
    }
#endif
    return -1;
}

static __always_inline int on_socket_io(void *sk)
{
    u64 id = bpf_get_current_pid_tgid();
    struct itap_tls_call *call = itap_tls_calls.lookup(&id);
    if (!call || call->has_key) /* not inside a TLS call: the common case, one lookup */
        return 0;
    struct itap_flow_key key = {};
    if (key_from_sock(sk, &key) < 0)
        return 0;
    call->key = key;
    call->has_key = 1;
    struct itap_tls_ssl ssl = {.tgid = id >> 32, .ssl = call->ssl};
    itap_tls_sockets.update(&ssl, &key);
    return 0;
}

/* Raw tracepoints sock_send_length / sock_recv_length: args[0] is the struct sock. Not named
 * raw_tracepoint__*, which BCC would attach as soon as the object loads. */
int itap_tls_sock_send(struct bpf_raw_tracepoint_args *ctx) { return on_socket_io((void *)ctx->args[0]); }
int itap_tls_sock_recv(struct bpf_raw_tracepoint_args *ctx) { return on_socket_io((void *)ctx->args[0]); }

/* ---- return: copy the plaintext ------------------------------------------------------------ */

/* As intercept.c's emit_sample, but from user memory. */
static __always_inline int emit_plain(struct itap_flow *flow, u8 role, u64 buf, u64 offset,
                                      u32 size, u32 cap, u8 flags)
{
    u64 n = cap;
    if (cap <= ITAP_SAMPLE_SMALL) {
        struct itap_sample_small *s = ring_reserve(flow, sizeof(struct itap_sample_small));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_SMALL);
        fill_sample(&s->rec, flow, role, offset, size, n, flags);
        bpf_probe_read_user(s->data, n, (void *)buf);
        bpf_ringbuf_submit(s, BPF_RB_NO_WAKEUP);
        return 0;
    }
    if (cap <= ITAP_SAMPLE_MEDIUM) {
        struct itap_sample_medium *s = ring_reserve(flow, sizeof(struct itap_sample_medium));
        if (!s)
            return -1;
        itap_bound(n, ITAP_SAMPLE_MEDIUM);
        fill_sample(&s->rec, flow, role, offset, size, n, flags);
        bpf_probe_read_user(s->data, n, (void *)buf);
        bpf_ringbuf_submit(s, BPF_RB_NO_WAKEUP);
        return 0;
    }
    struct itap_sample_max *s = ring_reserve(flow, sizeof(struct itap_sample_max));
    if (!s)
        return -1;
    itap_bound(n, ITAP_SAMPLE_MAX);
    fill_sample(&s->rec, flow, role, offset, size, n, flags);
    bpf_probe_read_user(s->data, n, (void *)buf);
    bpf_ringbuf_submit(s, BPF_RB_NO_WAKEUP);
    return 0;
}

static __always_inline int tls_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct itap_tls_call *found = itap_tls_calls.lookup(&id);
    if (!found)
        return 0;
    struct itap_tls_call call = *found;
    itap_tls_calls.delete(&id);

    long ret = PT_REGS_RC(ctx);
    u64 done = 0;
    if (call.len_out) {
        if (ret != 1) /* SSL_*_ex: 1 is success */
            return 0;
        if (bpf_probe_read_user(&done, sizeof(done), (void *)call.len_out))
            return 0;
    } else {
        if (ret <= 0)
            return 0;
        done = ret;
    }
    if (done == 0)
        return 0;
    tls_stat(ITAP_TLS_STAT_CALLS, 1);
    tls_stat(ITAP_TLS_STAT_BYTES, done);

    if (!call.has_key) {
        struct itap_tls_ssl ssl = {.tgid = id >> 32, .ssl = call.ssl};
        struct itap_flow_key *known = itap_tls_sockets.lookup(&ssl);
        if (!known) {
            tls_stat(ITAP_TLS_STAT_NO_SOCKET, 1);
            return 0;
        }
        call.key = *known;
    }
    struct itap_flow *flow = itap_flows.lookup(&call.key);
    if (!flow) {
        tls_stat(ITAP_TLS_STAT_UNTRACKED, 1);
        return 0;
    }
    u32 zero = 0;
    struct itap_config *cfg = itap_config.lookup(&zero);
    if (!cfg)
        return 0;

    u64 cookie = flow->cookie;
    struct itap_tls_stream fresh = {};
    struct itap_tls_stream *stream = itap_tls_streams.lookup_or_try_init(&cookie, &fresh);
    if (!stream)
        return 0;
    u8 received = call.op == ITAP_TLS_OP_READ;
    u64 offset = received ? stream->received : stream->sent;
    if (received)
        stream->received += done;
    else
        stream->sent += done;

    if (!flow->sampled || !cfg->sample_bytes)
        return 0;
    u32 want = cfg->sample_bytes;
    if (want > ITAP_SAMPLE_MAX)
        want = ITAP_SAMPLE_MAX;
    u32 size = done > 0xffffffffULL ? 0xffffffff : (u32)done;
    u32 cap = size < want ? size : want;
    u8 flags = ITAP_SAMPLE_TLS | (received ? ITAP_SAMPLE_TLS_RECEIVED : 0);
    if (cap < size)
        flags |= ITAP_SAMPLE_TRUNCATED;
    /* Received bytes are the peer's sends: they carry the peer's role. */
    u8 role = flow->role;
    if (received)
        role = role == ITAP_ROLE_CLIENT ? ITAP_ROLE_SERVER : ITAP_ROLE_CLIENT;
    if (emit_plain(flow, role, call.buf, offset, size, cap, flags) == 0)
        tls_stat(ITAP_TLS_STAT_SAMPLES, 1);
    else
        tls_stat(ITAP_TLS_STAT_SAMPLES_LOST, 1);
    return 0;
}

int itap_tls_return(struct pt_regs *ctx) { return tls_return(ctx); }
