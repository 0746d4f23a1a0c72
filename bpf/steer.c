/* Steering: weighted A/B routing of new TCP connections, decided at connect() time.
 *
 * itap_connect4/itap_connect6 (cgroup connect hooks) look the destination up in the route map; on
 * a hit they draw a backend by weight and rewrite the address the socket connects to, so the
 * packet leaves the pod already addressed to the backend: no NAT, no conntrack, no iptables.
 * The address the application asked for is kept in the socket's storage, and
 * itap_getsockopt answers getsockopt(SO_ORIGINAL_DST) with it, as transparent proxies expect
 * after an iptables REDIRECT.
 *
 * Request polyfill comes first: itap_polyfill, keyed by the connecting process's cgroup and the
 * service, sends the named client's connects to a rewriter on 127.0.0.1 in its network namespace
 * (agent/polyfill), only while the agent has marked that rewriter up. The original destination is
 * recorded the same way, so SO_ORIGINAL_DST answers the service.
 *
 * Rules of this file: the data path fails open. A miss, a malformed route or a failure to record
 * the original destination leaves the connect exactly as the application asked for it.
 *
 * Compiled by BCC (agent/kernel/steering.py) with -I pointing at this folder.
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include "infertap.h"

#ifndef ITAP_STEER_MAX_ROUTES
#define ITAP_STEER_MAX_ROUTES 256
#endif
#ifndef ITAP_POLYFILL_MAX
#define ITAP_POLYFILL_MAX 256
#endif
#ifndef ITAP_STEER_MAX_SLOTS
#define ITAP_STEER_MAX_SLOTS (2 * ITAP_STEER_MAX_ROUTES) /* see Steering.max_slots */
#endif

#define ITAP_AF_INET 2
#define ITAP_AF_INET6 10
#define ITAP_SOCK_STREAM 1
#define ITAP_IPPROTO_TCP 6
#define ITAP_SOL_IP 0
#define ITAP_SOL_IPV6 41
#define ITAP_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value */
#define ITAP_PAGE_SIZE 4096

BPF_HASH(itap_routes, struct itap_service_key, struct itap_steer_route, ITAP_STEER_MAX_ROUTES);
/* Connections per (route slot, backend): index slot * ITAP_STEER_MAX_BACKENDS + backend. */
BPF_PERCPU_ARRAY(itap_steer_counts, u64, ITAP_STEER_MAX_SLOTS * ITAP_STEER_MAX_BACKENDS);
BPF_PERCPU_ARRAY(itap_steer_stats, u64, ITAP_STEER_STAT_COUNT);
/* The original destination of a rewritten socket. Freed by the kernel with the socket. */
BPF_SK_STORAGE(itap_orig_dst, struct itap_service_key);
/* Request polyfill: (client cgroup, service) -> the rewriter in the client's network namespace. */
BPF_HASH(itap_polyfill, struct itap_polyfill_key, struct itap_polyfill_target, ITAP_POLYFILL_MAX);

static __always_inline void steer_stat(u32 idx)
{
    u64 *v = itap_steer_stats.lookup(&idx);
    if (v)
        *v += 1;
}

/* Pick a backend by weight. Returns its index, or -1 when the route is malformed. */
static __always_inline int pick_backend(struct itap_steer_route *r)
{
    u32 n = r->n_backends;
    u32 total = r->total_weight;
    if (n == 0 || n > ITAP_STEER_MAX_BACKENDS || total == 0)
        return -1;
    /* Modulo bias is total / 2^32: nothing at the weights a policy allows (sum <= 1e6). */
    u32 draw = bpf_get_prandom_u32() % total;
#pragma unroll
    for (int i = 0; i < ITAP_STEER_MAX_BACKENDS; i++) {
        if (i >= n)
            break;
        if (draw < r->backends[i].weight_end)
            return i;
    }
    return -1; /* weight_end of the last backend below total_weight: malformed */
}

/* Look the service up, choose a backend and record the original destination. Returns the
 * backend to connect to, or NULL to leave the connect alone. */
static __always_inline struct itap_steer_backend *steer(struct bpf_sock_addr *ctx,
                                                        struct itap_service_key *svc)
{
    struct itap_steer_route *r = itap_routes.lookup(svc);
    if (!r) {
        /* A socket may connect again after a failed connect: do not keep a stale answer. */
        itap_orig_dst.sk_storage_delete(ctx->sk);
        return NULL;
    }
    int i = pick_backend(r);
    if (i < 0 || i >= ITAP_STEER_MAX_BACKENDS) {
        steer_stat(ITAP_STEER_STAT_BAD_ROUTE);
        return NULL;
    }
    /* Recorded before the rewrite: a connection whose original destination cannot be answered
     * would break a proxy behind it, so without storage we do not steer at all. */
    struct itap_service_key *orig =
        itap_orig_dst.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!orig) {
        steer_stat(ITAP_STEER_STAT_NO_STORAGE);
        return NULL;
    }
    *orig = *svc;
    u32 idx = r->slot * ITAP_STEER_MAX_BACKENDS + i;
    u64 *count = itap_steer_counts.lookup(&idx);
    if (count)
        *count += 1;
    steer_stat(ITAP_STEER_STAT_REWRITTEN);
    return &r->backends[i];
}

/* A polyfill rule for this client and service whose rewriter is up: record the original
 * destination (so SO_ORIGINAL_DST answers the service, as for a route) and return the rewriter
 * to connect to, or NULL to go on with the weighted routes. */
static __always_inline struct itap_polyfill_target *polyfill(struct bpf_sock_addr *ctx,
                                                             struct itap_service_key *svc)
{
    if (svc->family != ITAP_AF_INET)
        return NULL;
    struct itap_polyfill_key key = {};
    key.cgroup_id = bpf_get_current_cgroup_id();
    key.svc = *svc;
    struct itap_polyfill_target *t = itap_polyfill.lookup(&key);
    if (!t || t->up != 1)
        return NULL; /* no rule, or the rewriter is down: the kernel path, untouched */
    struct itap_service_key *orig =
        itap_orig_dst.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!orig) {
        steer_stat(ITAP_STEER_STAT_NO_STORAGE);
        return NULL;
    }
    *orig = *svc;
    __sync_fetch_and_add(&t->connects, 1);
    steer_stat(ITAP_STEER_STAT_POLYFILLED);
    return t;
}

static __always_inline int is_tcp(struct bpf_sock_addr *ctx)
{
    return ctx->type == ITAP_SOCK_STREAM && ctx->protocol == ITAP_IPPROTO_TCP;
}

int itap_connect4(struct bpf_sock_addr *ctx)
{
    if (!is_tcp(ctx))
        return 1;
    steer_stat(ITAP_STEER_STAT_CONNECTS);
    struct itap_service_key svc = {};
    svc.family = ITAP_AF_INET;
    svc.port = bpf_ntohs((u16)ctx->user_port);
    svc.ip[0] = ctx->user_ip4;
    struct itap_polyfill_target *p = polyfill(ctx, &svc);
    if (p) {
        ctx->user_ip4 = p->ip;
        ctx->user_port = bpf_htons(p->port);
        return 1;
    }
    struct itap_steer_backend *b = steer(ctx, &svc);
    if (b) {
        ctx->user_ip4 = b->ip[0];
        ctx->user_port = bpf_htons(b->port);
    }
    return 1; /* 1 = let the connect proceed (0 would fail it with EPERM) */
}

int itap_connect6(struct bpf_sock_addr *ctx)
{
    if (!is_tcp(ctx))
        return 1;
    steer_stat(ITAP_STEER_STAT_CONNECTS);
    struct itap_service_key svc = {};
    u32 ip0 = ctx->user_ip6[0], ip1 = ctx->user_ip6[1];
    u32 ip2 = ctx->user_ip6[2], ip3 = ctx->user_ip6[3];
    /* A dual-stack socket connecting to ::ffff:a.b.c.d reaches an IPv4 service: IPv4 routes
     * apply, and the backend is written back as an IPv4-mapped address. */
    int mapped = ip0 == 0 && ip1 == 0 && ip2 == bpf_htonl(0x0000ffff);
    svc.port = bpf_ntohs((u16)ctx->user_port);
    if (mapped) {
        svc.family = ITAP_AF_INET;
        svc.ip[0] = ip3;
    } else {
        svc.family = ITAP_AF_INET6;
        svc.ip[0] = ip0;
        svc.ip[1] = ip1;
        svc.ip[2] = ip2;
        svc.ip[3] = ip3;
    }
    if (mapped) {
        /* The rewriter listens on IPv4 loopback: reached as ::ffff:127.0.0.1. */
        struct itap_polyfill_target *p = polyfill(ctx, &svc);
        if (p) {
            ctx->user_ip6[3] = p->ip;
            ctx->user_port = bpf_htons(p->port);
            return 1;
        }
    }
    struct itap_steer_backend *b = steer(ctx, &svc);
    if (!b)
        return 1;
    if (mapped) {
        ctx->user_ip6[3] = b->ip[0];
    } else {
        ctx->user_ip6[0] = b->ip[0];
        ctx->user_ip6[1] = b->ip[1];
        ctx->user_ip6[2] = b->ip[2];
        ctx->user_ip6[3] = b->ip[3];
    }
    ctx->user_port = bpf_htons(b->port);
    return 1;
}

/* struct sockaddr_in / sockaddr_in6, spelled out: the kernel headers BCC sees vary. */
struct itap_sockaddr_in {
    u16 family;
    u16 port; /* network order */
    u32 addr;
    u8 zero[8];
};
struct itap_sockaddr_in6 {
    u16 family;
    u16 port;
    u32 flowinfo;
    u32 addr[4];
    u32 scope_id;
};

/* Runs after the kernel's own getsockopt handler, on every getsockopt of the cgroup's sockets:
 * everything but SO_ORIGINAL_DST of a rewritten socket passes through unchanged. For
 * SO_ORIGINAL_DST the kernel has answered ENOPROTOOPT/ENOENT (no conntrack entry) or, with
 * conntrack on, the backend address; either way the application asked for the VIP, so we
 * answer with it: write the sockaddr, set optlen and clear the error. */
int itap_getsockopt(struct bpf_sockopt *ctx)
{
    int level = ctx->level;
    if (ctx->optname != ITAP_SO_ORIGINAL_DST || (level != ITAP_SOL_IP && level != ITAP_SOL_IPV6))
        goto pass;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        goto pass;
    struct itap_service_key *orig = itap_orig_dst.sk_storage_get(sk, 0, 0);
    if (!orig)
        goto pass;
    void *optval = ctx->optval;
    void *optval_end = ctx->optval_end;

    if (level == ITAP_SOL_IP) {
        /* Only an IPv4 destination has an IPv4 answer. */
        if (orig->family != ITAP_AF_INET)
            goto pass;
        struct itap_sockaddr_in *sin = optval;
        if ((void *)(sin + 1) > optval_end)
            goto pass; /* the caller's buffer is too small: keep the kernel's answer */
        sin->family = ITAP_AF_INET;
        sin->port = bpf_htons(orig->port);
        sin->addr = orig->ip[0];
        __builtin_memset(sin->zero, 0, sizeof(sin->zero));
        ctx->optlen = sizeof(*sin);
    } else {
        /* IP6T_SO_ORIGINAL_DST: asked of IPv6 sockets only (an IPv4 one has no SOL_IPV6). */
        if (sk->family != ITAP_AF_INET6)
            goto pass;
        struct itap_sockaddr_in6 *sin6 = optval;
        if ((void *)(sin6 + 1) > optval_end)
            goto pass;
        sin6->family = ITAP_AF_INET6;
        sin6->port = bpf_htons(orig->port);
        sin6->flowinfo = 0;
        if (orig->family == ITAP_AF_INET) {
            sin6->addr[0] = 0;
            sin6->addr[1] = 0;
            sin6->addr[2] = bpf_htonl(0x0000ffff);
            sin6->addr[3] = orig->ip[0];
        } else {
            sin6->addr[0] = orig->ip[0];
            sin6->addr[1] = orig->ip[1];
            sin6->addr[2] = orig->ip[2];
            sin6->addr[3] = orig->ip[3];
        }
        sin6->scope_id = 0;
        ctx->optlen = sizeof(*sin6);
    }
    ctx->retval = 0;
    steer_stat(ITAP_STEER_STAT_ORIG_DST);
    return 1;

pass:
    /* An option value larger than a page is not in our buffer: optlen 0 tells the kernel to
     * keep its own answer (Documentation/bpf/prog_cgroup_sockopt.rst). */
    if (ctx->optlen > ITAP_PAGE_SIZE)
        ctx->optlen = 0;
    return 1;
}
