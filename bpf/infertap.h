/* Structs and constants shared by the kernel programs and userspace.
 *
 * This header is the single definition. Python mirrors it once, in agent/kernel/structs.py, and
 * tests/test_structs.py compiles this file with the host compiler to check that every size and
 * offset matches. Keep fields naturally aligned so BPF and x86-64 agree without packing.
 */
#ifndef INFERTAP_H
#define INFERTAP_H

#include <linux/types.h>

/* Largest payload one sample can carry, and the size classes samples are reserved in. A sample is
 * reserved at the smallest class that fits, so small messages do not eat ring space. */
#define ITAP_SAMPLE_SMALL 512
#define ITAP_SAMPLE_MEDIUM 4096
#define ITAP_SAMPLE_MAX 16384

/* Ring buffers, one per inspection worker: the most `run --workers` takes. */
#define ITAP_MAX_RINGS 8

/* Which end of the connection a socket is: its sends are requests (client) or responses (server). */
#define ITAP_ROLE_CLIENT 1
#define ITAP_ROLE_SERVER 2

/* Where a flow's bytes are sampled (itap_config.capture, itap_flow.capture). */
#define ITAP_CAPTURE_SKB 1    /* cgroup_skb/egress: each skb's first bytes, offsets from TCP seq */
#define ITAP_CAPTURE_SK_MSG 2 /* sk_msg on the sockhash: each message's first bytes */

/* itap_flow.accel: same-node acceleration, decided once on a flow's first send. */
#define ITAP_ACCEL_UNDECIDED 0
#define ITAP_ACCEL_YES 1
#define ITAP_ACCEL_NO 2

/* itap_flow.h2: skb capture walks the HTTP/2 frames of a flow so that every frame header and
 * every non-DATA frame (HEADERS, CONTINUATION, SETTINGS, ...) is captured whole whatever the
 * sample size; only DATA payloads are cut (after their first ITAP_H2_DATA_HEAD bytes). Detected from the first bytes of the stream: the
 * client preface, or a server's opening SETTINGS frame. */
#define ITAP_H2_UNKNOWN 0 /* the stream's first bytes not seen yet */
#define ITAP_H2_WALK 1    /* HTTP/2: frames are walked */
#define ITAP_H2_NO 2      /* not HTTP/2, or the walk lost its place: sampled as any flow */
/* Frame headers walked per skb, and sample pieces one skb may produce beyond its first. */
#define ITAP_H2_MAX_FRAMES 128
#define ITAP_H2_MAX_PIECES 16
/* Payload bytes kept at the start of every DATA frame beyond the sample: where a gRPC message's
 * first fields are (ModelInfer's model name and version). */
#define ITAP_H2_DATA_HEAD 64

/* Why a socket is in the sockhash (itap_flow.sockhash). With skb capture a socket joins it only
 * when it needs sk_msg: a verdict (set at establishment by sockops, or later by userspace through
 * a descriptor of the socket) or acceleration. */
#define ITAP_SOCKHASH_NONE 0
#define ITAP_SOCKHASH_ALWAYS 1  /* sk_msg capture or acceleration: for the socket's life */
#define ITAP_SOCKHASH_VERDICT 2 /* a verdict applied at establishment */

/* Ring buffer record kinds. */
#define ITAP_REC_SAMPLE 1
#define ITAP_REC_FLOW_START 2
#define ITAP_REC_FLOW_END 3
#define ITAP_REC_FLOW_CGROUP 4 /* the flow's first send: now its cgroup id is known */
#define ITAP_REC_SHED 5        /* overload: the flow's bytes from `offset` on are not sampled until
                                * its next sample (or its end); flags: ITAP_SHED_CONNECTION */

/* Overload shedding. Userspace sets a level per ring (itap_shed_level[ring], 0 to
 * ITAP_SHED_FULL) when that ring fills; the kernel then leaves that share of NEW requests
 * unsampled, decided at message boundaries, and keeps sampling what it started, so every decoded
 * call is whole and no sampled HTTP/2 connection loses HPACK state:
 * - HTTP/1 (a client flow's first bytes are a method token, a server's "HTTP"): decided at each
 *   message start, an skb (or sendmsg) whose first bytes are a method token (client) or "HTTP"
 *   (server). A server flow follows its peer client flow's decision for the request being
 *   answered, so request/response pairs never slip (peer not intercepted: by the level).
 * - Anything else (HTTP/2, gRPC, ...): decided once for the connection at its first payload;
 *   the end that sends first decides, the other follows it through the peer flow.
 * Each shed request (or connection) writes one ITAP_REC_SHED record at the offset where shedding
 * starts, so userspace treats the gap up to the next sample as intentional. */
#define ITAP_SHED_FULL 100     /* level: percent of new requests (or connections) shed */
#define ITAP_SHED_UNDECIDED 0  /* itap_flow.shed: the first payload not seen yet */
#define ITAP_SHED_H1_SAMPLED 1 /* HTTP/1: the message in progress is sampled */
#define ITAP_SHED_H1_SHED 2    /* HTTP/1: the message in progress is shed */
#define ITAP_SHED_KEEP 3       /* decided for the connection: sampled for its life */
#define ITAP_SHED_DROP 4       /* decided for the connection: shed for its life */
#define ITAP_SHED_CONNECTION 1 /* ITAP_REC_SHED flag: the whole connection is shed */

/* Sample flags. */
#define ITAP_SAMPLE_TRUNCATED 1   /* the message is longer than the bytes captured */
#define ITAP_SAMPLE_PULL_FAILED 2 /* bpf_msg_pull_data failed: fewer bytes than asked for */
#define ITAP_SAMPLE_TLS 4          /* plaintext from a TLS library call (bpf/tls.c), not TCP bytes */
#define ITAP_SAMPLE_TLS_RECEIVED 8 /* TLS: bytes the flow received (its peer's sends) */

/* Verdict values in the verdict maps. */
#define ITAP_VERDICT_BLOCK 1

/* Indexes into the per-CPU stats array. */
#define ITAP_STAT_MSGS 0
#define ITAP_STAT_BYTES 1
#define ITAP_STAT_SAMPLES 2
#define ITAP_STAT_SAMPLES_LOST 3     /* ring buffer full */
#define ITAP_STAT_PULL_FAILED 4
#define ITAP_STAT_VERDICT_DROPS 5
#define ITAP_STAT_FLOWS_OPENED 6
#define ITAP_STAT_FLOWS_CLOSED 7
#define ITAP_STAT_FLOW_TABLE_FULL 8
#define ITAP_STAT_EVENTS_LOST 9      /* flow start/end records lost to a full ring */
#define ITAP_STAT_UNTRACKED_MSGS 10  /* sk_msg ran for a socket with no flow record */
#define ITAP_STAT_SOCKHASH_FAILED 11
#define ITAP_STAT_BYTES_UNSEEN 12    /* bytes sent while sk_msg kept a cached verdict */
#define ITAP_STAT_REDIRECTED 13      /* messages sent straight to the peer socket */
#define ITAP_STAT_REDIRECT_MISSED 14 /* accelerated, but the peer was gone: sent over TCP */
#define ITAP_STAT_RETRANSMITS 15     /* skbs carrying only bytes already seen (skb capture) */
#define ITAP_STAT_SOCKHASH_JOINED 16 /* sockets sockops put in the sockhash */
#define ITAP_STAT_H2_FRAMES 17       /* HTTP/2 frame headers walked by the skb program */
#define ITAP_STAT_H2_PIECES 18       /* extra sample records for HTTP/2 header blocks */
#define ITAP_STAT_H2_WALK_LOST 19    /* HTTP/2 walks given up (too many frames, unseen bytes) */
#define ITAP_STAT_REQUESTS_SHED 20   /* HTTP/1 requests and responses not sampled (overload) */
#define ITAP_STAT_CONNECTIONS_SHED 21 /* connection ends not sampled at all (overload) */
#define ITAP_STAT_COUNT 22

/* Indexes into the TLS per-CPU stats array (bpf/tls.c). */
#define ITAP_TLS_STAT_CALLS 0        /* SSL read/write calls that moved bytes */
#define ITAP_TLS_STAT_BYTES 1        /* plaintext bytes they moved */
#define ITAP_TLS_STAT_SAMPLES 2
#define ITAP_TLS_STAT_SAMPLES_LOST 3 /* ring buffer full */
#define ITAP_TLS_STAT_NO_SOCKET 4    /* the SSL object's socket is not known yet */
#define ITAP_TLS_STAT_UNTRACKED 5    /* its socket is not an intercepted flow */
#define ITAP_TLS_STAT_COUNT 6

/* A TCP connection as one socket sees it. Addresses in network order (IPv4 in ip[0]), ports in
 * host order. IPv4-mapped IPv6 addresses are folded to IPv4 so both ends of a dual-stack
 * connection produce comparable keys. Also the sockhash key. */
struct itap_flow_key {
    __u16 family;
    __u16 pad;
    __u16 local_port;
    __u16 remote_port;
    __u32 local_ip[4];
    __u32 remote_ip[4];
};

/* A service is the server end of a connection: ip:port. Key of the service verdict map. */
struct itap_service_key {
    __u16 family;
    __u16 port;
    __u32 ip[4];
};

/* One intercepted socket. Counters are written by sk_msg (sk_msg capture) or the cgroup_skb
 * egress program (skb capture); both run under the socket lock, so they need no atomics and are
 * exact. With skb capture, msgs counts skbs that carried new bytes and bytes counts new bytes.
 *
 * Stream offsets. sk_msg does not see every byte a socket sends: when a non-blocking send cannot
 * push a whole message, the kernel keeps the last verdict and the retried bytes go out without the
 * program running. So when the kernel's BTF gives us the offset of tcp_sock.write_seq, sk_msg reads
 * the socket's real sequence number and derives the true stream offset of each message from it;
 * bytes that went by unseen become an exact, counted gap (unseen_bytes) instead of a silent
 * misalignment. Without BTF, offsets count the bytes sk_msg saw.
 *
 * With skb capture the offset of each skb is its TCP sequence number relative to the one at
 * establishment: seq_last/seq_pos are advanced by every skb that carries new bytes (a signed
 * 32-bit step from the last one, so streams past 4 GiB keep counting). */
struct itap_flow {
    __u64 cookie;       /* socket cookie: the flow id users see */
    __u64 cgroup_id;    /* cgroup v2 id of the process that first sent on the socket */
    __u64 start_ns;     /* bpf_ktime_get_ns() at establishment */
    __u64 msgs;         /* messages passed */
    __u64 bytes;        /* bytes passed */
    __u64 drops;        /* messages dropped by a verdict */
    __u64 samples;      /* samples written to the ring */
    __u64 samples_lost;
    __u64 unseen_bytes; /* bytes sent without sk_msg running on them */
    __u64 next_offset;  /* stream offset where the next message starts if none goes unseen */
    __u64 seq_pos;      /* stream offset that seq_last corresponds to */
    struct itap_flow_key key;
    __u32 seq_last;     /* tcp write_seq at the last message start (or at establishment) */
    __u8 role;          /* ITAP_ROLE_* */
    __u8 sampled;       /* 1 if this flow's messages are sampled */
    __u8 announced;     /* 1 once the FLOW_CGROUP record went out (on the first send) */
    __u8 seq_ok;        /* 1 if seq_last is valid (write_seq tracking on) */
    __u8 accel;         /* ITAP_ACCEL_*: sends go straight to the peer socket (first send decides) */
    __u8 capture;       /* ITAP_CAPTURE_*: which program samples this flow */
    __u8 sockhash;      /* ITAP_SOCKHASH_*: why sockops put the socket in the sockhash */
    __u8 h2;            /* ITAP_H2_*: HTTP/2 frame walk state (skb capture) */
    __u8 h2_head_len;   /* bytes of a frame header the previous skb ended in (0-8) */
    __u8 ring;          /* ring buffer (inspection worker) this flow's records go to: set at
                         * establishment from a hash of the connection, the same for both ends */
    __u8 shed;          /* ITAP_SHED_*: overload shedding state (whole requests not sampled) */
    __u8 pad2;
    __u64 h2_next;      /* stream offset of the next HTTP/2 frame header (ITAP_H2_WALK) */
    __u64 h2_keep;      /* stream bytes before this offset must be captured (a header block) */
    __u32 h2_head;      /* the first (up to 4) of those bytes: length and type */
    __u32 requests_shed; /* requests (or responses) not sampled because of overload */
};

/* Set by userspace in slot 0 of the config array. */
struct itap_config {
    __u32 sample_bytes;    /* bytes to copy from each message; capped at ITAP_SAMPLE_MAX */
    __u32 sample_one_in;   /* sample 1 in N flows; 0 = none, 1 = every flow */
    __u32 port_filter;     /* 1: only flows on a watched port; 0: every TCP flow */
    __u32 verdicts_active; /* number of verdict entries; 0 lets sk_msg skip the lookups */
    __u32 accelerate;      /* 1: same-node acceleration (redirect to the peer socket) */
    __u32 capture;         /* ITAP_CAPTURE_* for flows established from now on */
    __u32 h2_walk;         /* 1: skb capture walks HTTP/2 frames (header blocks kept whole) */
    __u32 n_rings;         /* ring buffers (inspection workers) in use, 1..ITAP_MAX_RINGS */
};

/* Header of every ring buffer record. A sample's payload (cap_len bytes) follows it; a flow
 * record is followed by a struct itap_flow. */
struct itap_record {
    __u32 kind;      /* ITAP_REC_* */
    __u32 cap_len;   /* payload bytes that follow (samples) */
    __u64 ts_ns;     /* bpf_ktime_get_ns() */
    __u64 cookie;
    __u64 offset;    /* stream offset of the message's first byte (samples) */
    __u32 msg_len;   /* the message's true length (samples) */
    __u8 role;
    __u8 flags;      /* ITAP_SAMPLE_* */
    __u16 pad;
};

/* ---- Steering (bpf/steer.c): weighted routing of new connections at connect() ---------------
 *
 * A route maps a service (struct itap_service_key: a VIP or pod ip:port, IPv4-mapped IPv6 folded to
 * IPv4) to up to ITAP_STEER_MAX_BACKENDS weighted backends of the same family. The original
 * destination of every rewritten socket is kept in its socket storage as a struct itap_service_key. */
#define ITAP_STEER_MAX_BACKENDS 8

/* Indexes into the steering per-CPU stats array. */
#define ITAP_STEER_STAT_CONNECTS 0     /* TCP connects seen by the connect programs */
#define ITAP_STEER_STAT_REWRITTEN 1    /* connects sent to a backend */
#define ITAP_STEER_STAT_NO_STORAGE 2   /* route matched, original dst not storable: left alone */
#define ITAP_STEER_STAT_BAD_ROUTE 3    /* route matched but malformed: left alone */
#define ITAP_STEER_STAT_ORIG_DST 4     /* SO_ORIGINAL_DST answered from socket storage */
#define ITAP_STEER_STAT_POLYFILLED 5   /* connects sent to a request-polyfill rewriter */
#define ITAP_STEER_STAT_COUNT 6

struct itap_steer_backend {
    __u32 ip[4];      /* network order, IPv4 in ip[0] */
    __u16 port;       /* host order */
    __u16 pad;
    __u32 weight_end; /* cumulative weight: picked when previous weight_end <= draw < weight_end */
};

/* Value of the route map. Written whole by userspace (a hash map update swaps the element, so
 * the connect program never sees half of an old route and half of a new one). */
struct itap_steer_route {
    __u32 slot;         /* this route's counters start at slot * ITAP_STEER_MAX_BACKENDS */
    __u32 n_backends;   /* 1..ITAP_STEER_MAX_BACKENDS */
    __u32 total_weight; /* backends[n_backends - 1].weight_end */
    __u32 pad;
    struct itap_steer_backend backends[ITAP_STEER_MAX_BACKENDS];
};

/* ---- Request polyfill (bpf/steer.c): a client's connections to a service go to a rewriter ------
 *
 * Keyed by the connecting process's cgroup (bpf_get_current_cgroup_id()) and the service, so only
 * the clients a rule names are steered, and the rewriter (in the agent's cgroup) is never steered
 * by its own rule. Checked before the weighted routes. IPv4 services only (the rewriter listens
 * on 127.0.0.1 in the client's network namespace). */
struct itap_polyfill_key {
    __u64 cgroup_id;
    struct itap_service_key svc;
    __u32 pad;
};

struct itap_polyfill_target {
    __u32 ip;       /* network order: 127.0.0.1 */
    __u16 port;     /* host order */
    __u16 up;       /* 1 while the rewriter listens; 0 = leave connects alone (fail open) */
    __u64 connects; /* connects steered to the rewriter by this entry */
};

#endif /* INFERTAP_H */
