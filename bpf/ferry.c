// Ferry's in-pod redirection in eBPF (loaded by agent/redirect/ebpf_object.py through bcc).
//
// Outbound: cgroup connect4/connect6, attached once at the cgroup v2 root, act only on sockets
// whose network namespace is enrolled (netns cookie in `enrolled`): an app's TCP connect is
// rewritten to the proxy's in-pod outbound listener (loopback, `outbound_port`) and the
// destination the app asked for is kept under the socket's cookie.  When that connection is
// established, `sockops` moves it to a key the proxy can name: (netns, the app's address and
// port), which is the peer of the socket the proxy accepts.  `getsockopt` answers the proxy's
// SO_ORIGINAL_DST on that socket from the map, exactly like conntrack does after a REDIRECT.
//
// Inbound: `sk_lookup`, attached to each enrolled pod's netns (one copy per pod, see there), hands
// every new TCP connection to the pod's addresses (not loopback) to the proxy's inbound listener
// of that netns and family, held in `listeners` (the proxy puts it there); the proxy reads the
// original destination with getsockname().  The tunnel port, excluded ports, the node's own
// connections (from the probe source) and the proxy's own deliveries to the app (`deliveries`,
// by 4-tuple) are left alone.
//
// The proxy's own sockets carry `mark` (SO_MARK) and are never rewritten; its deliveries to the
// app are never steered, and get the connmark (see is_proxy) so the app's replies find their
// way back.  Everything else is left exactly as it was.
//
// Same-node fast path (`config.fastpath`): `sockops` puts the app sockets of proxied
// connections into `apps` (an app's connection to the outbound listener, and the app's end of
// the proxy's delivery), each with a byte count in `app_state`.  `fastpath`, the sk_msg verdict
// program of `apps`, runs on every send of such a socket.  Once the proxy offers a join in
// `joins` (agent/proxy/fastpath.py: under the app socket's key, the proxy socket that carries
// its bytes on, from the proxy's `legs`, and how many bytes the proxy has passed on so far),
// the first send that finds every earlier byte passed on (`relayed == passed`) switches the
// socket for good: from then on its sends are pushed straight into the proxy's other socket,
// in the sender's own system call, behind everything the proxy wrote there, so nothing can
// overtake.  The proxy's worker is out of the byte path; the app's FIN still travels the
// ordinary way and reaches the proxy after the last byte went through, so the proxy sees the
// close, and closing its sockets (revocation) ends the joined connection too.  While the proxy
// socket it pushes into holds more than TARGET_BACKLOG unacknowledged bytes (its reader is slow;
// `sockops` keeps each such socket's acknowledged count in `leg_acked`), a switched socket's
// sends go the ordinary way again, so the app waits on its own socket, which wakes it.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>

#define SO_ORIGINAL_DST 80
#define STREAM_SOCKET 1  // SOCK_STREAM
#define SOCKET_LEVEL 1   // SOL_SOCKET
#define SO_MARK_OPTION 36
#define SOL_IPV6_LEVEL 41
#define TCP_ESTABLISHED_STATE 1
#define TCP_CLOSE_STATE 7
#define DIRECTION_OUTBOUND 0
#define DIRECTION_INBOUND 1
#define NETNS_COOKIE 0xfe77c00c1e5e7b0bULL

// bcc's helpers.h declares some helpers with narrower types; these are the kernel's.
static __u64 (*ferry_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static __u64 (*ferry_netns_cookie)(void *ctx) = (void *)BPF_FUNC_get_netns_cookie;
static long (*ferry_sk_assign)(void *ctx, void *sk, __u64 flags) = (void *)BPF_FUNC_sk_assign;
static long (*ferry_sk_release)(void *sk) = (void *)BPF_FUNC_sk_release;

struct config {
    __u32 mark;
    __u32 mark_mask;
    __u32 connmark;
    __u16 outbound_port;
    __u16 inbound_port;
    __u16 tunnel_port;
    __u16 ipv6;
    __u32 fastpath;  // 1: track app sockets for the same-node fast path
};

struct port_key {
    __u16 port;
    __u16 direction;
};

struct cidr4_key {
    __u32 prefixlen;
    __u32 addr;
};

struct cidr6_key {
    __u32 prefixlen;
    __u32 addr[4];
};

// An address of either family: IPv4 in addr[0] (network order), the rest zero.
struct origdst {
    __u32 addr[4];
    __u16 port;    // network order
    __u16 family;  // AF_INET or AF_INET6
};

struct tuple_key {
    __u64 netns;
    __u32 addr[4];
    __u16 port;    // host order
    __u16 family;
};

// A connection by its 4-tuple, from the connecting side's point of view.
struct flow_key {
    __u64 netns;
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;  // host order
    __u16 dport;  // host order
    __u32 family;
};

// Fill a flow key's addresses from a context with `<side>_ip4` / `<side>_ip6[4]` fields (sockops,
// sk_lookup and sk_msg all have them): `src` from the FROM side, `dst` from the TO side.
#define FLOW_ADDRS(key, ctx, FROM, TO)                  \
    do {                                                \
        if ((ctx)->family == AF_INET) {                 \
            (key)->src[0] = (ctx)->FROM##_ip4;          \
            (key)->dst[0] = (ctx)->TO##_ip4;            \
        } else {                                        \
            (key)->src[0] = (ctx)->FROM##_ip6[0];       \
            (key)->src[1] = (ctx)->FROM##_ip6[1];       \
            (key)->src[2] = (ctx)->FROM##_ip6[2];       \
            (key)->src[3] = (ctx)->FROM##_ip6[3];       \
            (key)->dst[0] = (ctx)->TO##_ip6[0];         \
            (key)->dst[1] = (ctx)->TO##_ip6[1];         \
            (key)->dst[2] = (ctx)->TO##_ip6[2];         \
            (key)->dst[3] = (ctx)->TO##_ip6[3];         \
        }                                               \
    } while (0)

struct listener_key {
    __u64 netns;
    __u32 family;
    __u32 pad;
};

BPF_ARRAY(config, struct config, 1);
BPF_HASH(enrolled, __u64, __u32, 65536);
BPF_HASH(excluded_ports, struct port_key, __u8, 1024);
BPF_F_TABLE("lpm_trie", struct cidr4_key, __u8, excluded_cidr4, 1024, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct cidr6_key, __u8, excluded_cidr6, 1024, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", __u64, struct origdst, origdst_cookie, 65536);
BPF_TABLE("lru_hash", struct tuple_key, struct origdst, origdst_tuple, 65536);
BPF_TABLE("lru_hash", struct flow_key, __u8, deliveries, 65536);

// A SOCKHASH with a lookup that returns the socket (bcc's own BPF_SOCKHASH has none).
struct listeners_table_t {
    struct listener_key key;
    __u64 leaf;
    void *(*lookup)(struct listener_key *);
    __u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct listeners_table_t listeners = {.max_entries = 65536};
BPF_ANNOTATE_KV_PAIR(listeners, struct listener_key, __u64);

// The same-node fast path (see the top): the proxy's sockets by cookie, the app sockets by
// 4-tuple with what each has sent the ordinary way, and the proxy's offers.
struct app_state {
    __u64 passed;  // bytes sent the ordinary way (through the proxy's worker)
    __u64 target;  // the proxy socket (cookie, in `legs`) its sends go to while switched; 0: not
    __u64 pushed;  // bytes pushed straight into the target
};

struct join {
    __u64 relayed;  // bytes of this app socket the proxy has written on (proxy's count)
    __u64 target;   // the proxy socket (cookie) that carries them on
};

BPF_SOCKHASH(legs, __u64, 65536);
// What each of the proxy's sockets that a switched app may push into has had acknowledged by its
// peer (tcp_sock.bytes_acked), by cookie: `sockops` keeps it current on every ACK.
BPF_TABLE("lru_hash", __u64, __u64, leg_acked, 65536);
BPF_SOCKHASH(apps, struct flow_key, 65536);
BPF_TABLE("lru_hash", struct flow_key, struct app_state, app_state, 65536);
BPF_TABLE("lru_hash", struct flow_key, struct join, joins, 65536);
BPF_ARRAY(switches, __u64, 1);  // app sockets switched to the fast path since the map was made

static __always_inline struct config *enrolled_config(void *ctx) {
    __u64 netns = ferry_netns_cookie(ctx);
    if (!enrolled.lookup(&netns))
        return 0;
    int zero = 0;
    return config.lookup(&zero);
}

// The proxy's own sockets carry its mark and are left alone.  One kind is marked again: a
// delivery to the app (bound to the client's address with IP_TRANSPARENT before connect, which
// the proxy's other sockets never are) gets the connmark, so its SYN reaches the app marked, the
// app's socket inherits the mark (net.ipv4.tcp_fwmark_accept, set in the pod) and the policy
// route for the connmark (agent.redirect.routing) brings the app's replies back to the proxy.
static __always_inline int is_proxy(void *ctx, struct bpf_sock *sk, struct config *cfg,
                                    int bound) {
    __u32 mark = sk->mark;
    if ((mark & cfg->mark_mask) != (cfg->mark & cfg->mark_mask))
        return 0;
    if (bound) {
        int delivery = (mark & ~cfg->mark_mask) | (cfg->connmark & cfg->mark_mask);
        bpf_setsockopt(ctx, SOCKET_LEVEL, SO_MARK_OPTION, &delivery, sizeof(delivery));
    }
    return 1;
}

static __always_inline int port_excluded(__u16 port, __u16 direction) {
    struct port_key key = {.port = port, .direction = direction};
    return excluded_ports.lookup(&key) != 0;
}

// Outbound to an IPv4 destination (also an IPv4-mapped one from connect6): whether to capture.
static __always_inline int capture4(__u32 addr, __u16 port) {
    if ((bpf_ntohl(addr) >> 24) == 127)
        return 0;
    if (port_excluded(port, DIRECTION_OUTBOUND))
        return 0;
    struct cidr4_key key = {.prefixlen = 32, .addr = addr};
    return excluded_cidr4.lookup(&key) == 0;
}

static __always_inline void remember(void *ctx, __u32 a0, __u32 a1, __u32 a2, __u32 a3,
                                     __u32 user_port, __u16 family) {
    struct origdst dst = {.addr = {a0, a1, a2, a3}, .port = (__u16)user_port, .family = family};
    __u64 cookie = ferry_socket_cookie(ctx);
    origdst_cookie.update(&cookie, &dst);
}

int connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type != STREAM_SOCKET)
        return 1;
    struct config *cfg = enrolled_config(ctx);
    if (!cfg)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || is_proxy(ctx, sk, cfg, sk->src_ip4 != 0))
        return 1;
    __u32 addr = ctx->user_ip4;
    __u32 user_port = ctx->user_port;
    if (!capture4(addr, bpf_ntohs((__u16)user_port)))
        return 1;
    remember(ctx, addr, 0, 0, 0, user_port, AF_INET);
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(cfg->outbound_port);
    return 1;
}

int connect6(struct bpf_sock_addr *ctx) {
    if (ctx->type != STREAM_SOCKET)
        return 1;
    struct config *cfg = enrolled_config(ctx);
    if (!cfg)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    int bound = (sk->src_ip6[0] | sk->src_ip6[1] | sk->src_ip6[2] | sk->src_ip6[3]) != 0;
    if (is_proxy(ctx, sk, cfg, bound))
        return 1;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2];
    __u32 a3 = ctx->user_ip6[3];
    __u32 user_port = ctx->user_port;
    __u16 port = bpf_ntohs((__u16)user_port);
    if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
        // IPv4-mapped: the IPv4 rules apply, and the IPv4 listener takes it.
        if (!capture4(a3, port))
            return 1;
        remember(ctx, a3, 0, 0, 0, user_port, AF_INET);
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);
        ctx->user_port = bpf_htons(cfg->outbound_port);
        return 1;
    }
    if (!cfg->ipv6)
        return 1;
    if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1))
        return 1;
    if (port_excluded(port, DIRECTION_OUTBOUND))
        return 1;
    struct cidr6_key key = {.prefixlen = 128, .addr = {a0, a1, a2, a3}};
    if (excluded_cidr6.lookup(&key))
        return 1;
    remember(ctx, a0, a1, a2, a3, user_port, AF_INET6);
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    ctx->user_port = bpf_htons(cfg->outbound_port);
    return 1;
}

// The proxy's delivery connections, by 4-tuple, while they are being set up: sk_lookup leaves
// them to the app.  Recorded before the SYN is sent (TCP_CONNECT_CB), forgotten once the
// connection is established (from then on the kernel finds the app's socket first) or closed.
static __always_inline void delivery_key(struct bpf_sock_ops *skops, struct flow_key *key) {
    key->netns = ferry_netns_cookie(skops);
    key->family = skops->family;
    key->sport = skops->local_port;
    key->dport = bpf_ntohl(skops->remote_port);
    FLOW_ADDRS(key, skops, local, remote);
}

static __always_inline int track_delivery(struct bpf_sock_ops *skops) {
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    struct config *cfg = enrolled_config(skops);
    if (!cfg || (sk->mark & cfg->mark_mask) != (cfg->connmark & cfg->mark_mask))
        return 1;
    struct flow_key key = {};
    delivery_key(skops, &key);
    __u8 one = 1;
    deliveries.update(&key, &one);
    bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
    return 1;
}

static __always_inline int forget_delivery(struct bpf_sock_ops *skops) {
    __u32 state = skops->args[1];
    if (state != TCP_ESTABLISHED_STATE && state != TCP_CLOSE_STATE)
        return 1;
    struct flow_key key = {};
    delivery_key(skops, &key);
    deliveries.delete(&key);
    bpf_sock_ops_cb_flags_set(skops, 0);
    return 1;
}

// The app's connection to the outbound listener is established: its original destination moves
// from the socket cookie to the app's address and port, which getsockopt can name.
static __always_inline int key_original_dst(struct bpf_sock_ops *skops) {
    __u64 cookie = ferry_socket_cookie(skops);
    struct origdst *dst = origdst_cookie.lookup(&cookie);
    if (!dst)
        return 1;
    struct tuple_key key = {};
    key.netns = ferry_netns_cookie(skops);
    key.port = skops->local_port;
    if (skops->family == AF_INET) {
        key.family = AF_INET;
        key.addr[0] = skops->local_ip4;
    } else {
        key.family = AF_INET6;
        key.addr[0] = skops->local_ip6[0];
        key.addr[1] = skops->local_ip6[1];
        key.addr[2] = skops->local_ip6[2];
        key.addr[3] = skops->local_ip6[3];
    }
    struct origdst copy = *dst;
    origdst_tuple.update(&key, &copy);
    origdst_cookie.delete(&cookie);
    return 1;
}

// An IPv4 connection of a dual-stack (IPv6) socket, keyed as IPv4: the proxy's socket at the
// other end is an IPv4 one, and names it that way.
static __always_inline void unmap_ipv4(struct flow_key *key) {
    if (key->family != AF_INET6 || key->src[0] || key->src[1] ||
        key->src[2] != bpf_htonl(0xffff))
        return;
    key->family = AF_INET;
    key->src[0] = key->src[3];
    key->dst[0] = key->dst[3];
    key->src[2] = key->src[3] = key->dst[1] = key->dst[2] = key->dst[3] = 0;
}

// An app socket the proxy carries (see the top): counted from its first byte, joinable.  A join
// left under the same 4-tuple by a connection the proxy never closed (its worker died) is
// dropped: it names a socket that is gone, and the new socket's first send would match it.
static __always_inline int track_app(struct bpf_sock_ops *skops) {
    struct flow_key key = {};
    delivery_key(skops, &key);
    unmap_ipv4(&key);
    joins.delete(&key);
    struct app_state fresh = {};
    app_state.update(&key, &fresh);
    long err = apps.sock_hash_update(skops, &key, BPF_ANY);
    if (err)
        app_state.delete(&key);
    return 1;
}

// One of the proxy's sockets an app may push into (see `fastpath`): what its peer acknowledged,
// now and on every ACK from now on (BPF_SOCK_OPS_RTT_CB).
static __always_inline int track_leg(struct bpf_sock_ops *skops) {
    __u64 cookie = ferry_socket_cookie(skops);
    __u64 acked = skops->bytes_acked;
    leg_acked.update(&cookie, &acked);
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
    return 1;
}

static __always_inline int leg_acked_now(struct bpf_sock_ops *skops) {
    __u64 cookie = ferry_socket_cookie(skops);
    __u64 acked = skops->bytes_acked;
    leg_acked.update(&cookie, &acked);
    return 1;
}

// Established from the app's side: its connection to the outbound listener (it has an
// original destination) is tracked for the fast path.
static __always_inline int active_established(struct bpf_sock_ops *skops) {
    struct config *cfg = enrolled_config(skops);
    __u64 cookie = ferry_socket_cookie(skops);
    int captured = origdst_cookie.lookup(&cookie) != 0;
    key_original_dst(skops);
    if (!cfg || !cfg->fastpath)
        return 1;
    if (captured)
        return track_app(skops);
    // The proxy's delivery to an app (it carries the connmark, see is_proxy): a leg.
    struct bpf_sock *sk = skops->sk;
    if (sk && (sk->mark & cfg->mark_mask) == (cfg->connmark & cfg->mark_mask))
        return track_leg(skops);
    return 1;
}

// Established to the app: the app's end of a proxy delivery (it took the delivery's connmark,
// see is_proxy) is tracked for the fast path.
static __always_inline int passive_established(struct bpf_sock_ops *skops) {
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    struct config *cfg = enrolled_config(skops);
    if (!cfg || !cfg->fastpath)
        return 1;
    if ((sk->mark & cfg->mark_mask) == (cfg->connmark & cfg->mark_mask))
        return track_app(skops);
    // The proxy's end of an app's connection to the outbound listener: a leg.
    if ((sk->mark & cfg->mark_mask) == (cfg->mark & cfg->mark_mask) &&
        skops->local_port == cfg->outbound_port)
        return track_leg(skops);
    return 1;
}

int sockops(struct bpf_sock_ops *skops) {
    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        return track_delivery(skops);
    case BPF_SOCK_OPS_STATE_CB:
        return forget_delivery(skops);
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        return active_established(skops);
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        return passive_established(skops);
    case BPF_SOCK_OPS_RTT_CB:
        return leg_acked_now(skops);
    }
    return 1;
}

int getsockopt(struct bpf_sockopt *ctx) {
    if (ctx->optname != SO_ORIGINAL_DST)
        return 1;
    if (ctx->level != SOL_IP && ctx->level != SOL_IPV6_LEVEL)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct config *cfg = enrolled_config(ctx);
    if (!cfg || sk->src_port != cfg->outbound_port)
        return 1;
    struct tuple_key key = {};
    key.netns = ferry_netns_cookie(ctx);
    key.port = bpf_ntohs((__u16)sk->dst_port);
    if (sk->family == AF_INET) {
        key.family = AF_INET;
        key.addr[0] = sk->dst_ip4;
    } else {
        key.family = AF_INET6;
        key.addr[0] = sk->dst_ip6[0];
        key.addr[1] = sk->dst_ip6[1];
        key.addr[2] = sk->dst_ip6[2];
        key.addr[3] = sk->dst_ip6[3];
    }
    struct origdst *dst = origdst_tuple.lookup(&key);
    if (!dst)
        return 1;
    void *end = ctx->optval_end;
    if (dst->family == AF_INET) {
        struct sockaddr_in *sa = ctx->optval;
        if ((void *)(sa + 1) > end)
            return 1;
        sa->sin_family = AF_INET;
        sa->sin_port = dst->port;
        sa->sin_addr.s_addr = dst->addr[0];
        __builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
        ctx->optlen = sizeof(*sa);
    } else {
        struct sockaddr_in6 *sa = ctx->optval;
        if ((void *)(sa + 1) > end)
            return 1;
        sa->sin6_family = AF_INET6;
        sa->sin6_port = dst->port;
        sa->sin6_flowinfo = 0;
        sa->sin6_addr.in6_u.u6_addr32[0] = dst->addr[0];
        sa->sin6_addr.in6_u.u6_addr32[1] = dst->addr[1];
        sa->sin6_addr.in6_u.u6_addr32[2] = dst->addr[2];
        sa->sin6_addr.in6_u.u6_addr32[3] = dst->addr[3];
        sa->sin6_scope_id = 0;
        ctx->optlen = sizeof(*sa);
    }
    ctx->retval = 0;
    return 1;
}

// The node's own connections to the pod (kubelet probes) arrive SNATed to this source
// (agent/redirect/probes.py; agent.redirect.rules.PROBE_SOURCE) and reach the app directly.
static __always_inline int from_probe_source(struct bpf_sk_lookup *ctx) {
    if (ctx->family == AF_INET)
        return ctx->remote_ip4 == bpf_htonl(0xa9fe077f);  // 169.254.7.127
    return ctx->remote_ip6[0] == bpf_htonl(0xfd169254) &&  // fd16:9254:7127:1337:ffff:ffff:ffff:ffff
           ctx->remote_ip6[1] == bpf_htonl(0x71271337) && ctx->remote_ip6[2] == 0xffffffff &&
           ctx->remote_ip6[3] == 0xffffffff;
}

static __always_inline int is_loopback(struct bpf_sk_lookup *ctx) {
    if (ctx->family == AF_INET)
        return (bpf_ntohl(ctx->local_ip4) >> 24) == 127;
    return ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 && ctx->local_ip6[2] == 0 &&
           ctx->local_ip6[3] == bpf_htonl(1);
}

int sk_lookup(struct bpf_sk_lookup *ctx) {
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    int zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg)
        return SK_PASS;
    __u16 port = ctx->local_port;
    if (port == cfg->tunnel_port || port_excluded(port, DIRECTION_INBOUND))
        return SK_PASS;
    if (ctx->family == AF_INET6 && !cfg->ipv6)
        return SK_PASS;
    if (is_loopback(ctx))
        return SK_PASS;  // inside the pod, the outbound listener included
    if (from_probe_source(ctx))
        return SK_PASS;
    // sk_lookup programs cannot ask for their netns cookie: each pod gets its own copy of this
    // program, loaded with the cookie in place of NETNS_COOKIE (ebpf_object.NETNS_PLACEHOLDER).
    struct flow_key flow = {.netns = NETNS_COOKIE, .family = ctx->family};
    flow.sport = bpf_ntohs((__u16)ctx->remote_port);
    flow.dport = port;
    FLOW_ADDRS(&flow, ctx, remote, local);
    if (deliveries.lookup(&flow))
        return SK_PASS;  // the proxy delivering to the app
    struct listener_key key = {.netns = NETNS_COOKIE, .family = ctx->family};
    void *sk = listeners.lookup(&key);
    if (!sk)
        return SK_DROP;  // fail closed: the proxy is not serving this pod
    long err = ferry_sk_assign(ctx, sk, 0);
    ferry_sk_release(sk);
    return err ? SK_DROP : SK_PASS;
}

// At most this many bytes wait in the proxy socket a switched app pushes into (written, not yet
// acknowledged by the other app).  The proxy gives that socket a send buffer well above it, so a
// push never finds it full: a full socket would fail the app's nonblocking send with EAGAIN and
// no wakeup would ever follow on the app's own socket.
#define TARGET_BACKLOG (8 << 20)

// Whether the proxy socket `target` can take more: what was written into it (by the proxy,
// `relayed`, and pushed by the app) minus what its peer acknowledged (`leg_acked`), under
// TARGET_BACKLOG.
static __always_inline int room_in(__u64 *target, __u64 written) {
    __u64 *acked = leg_acked.lookup(target);
    return acked && written < *acked + TARGET_BACKLOG;
}

// Every send of an app socket in `apps` (see the top).  It runs under the socket's lock, so
// the counts are the socket's own.  A switched socket whose target is backed up (its reader is
// slow) goes back to the ordinary way, where the app's own socket fills and wakes the app as it
// drains; it switches again once the proxy has caught up and the target has room.
int fastpath(struct sk_msg_md *msg) {
    struct flow_key key = {};
    key.netns = ferry_netns_cookie(msg);
    key.family = msg->family;
    key.sport = msg->local_port;
    key.dport = bpf_ntohl(msg->remote_port);
    FLOW_ADDRS(&key, msg, local, remote);
    unmap_ipv4(&key);
    struct app_state *app = app_state.lookup(&key);
    if (!app)
        return SK_PASS;
    struct join *join = joins.lookup(&key);
    __u64 target = join ? join->target : 0;
    // Not switched: only once the proxy has written on every earlier byte (nothing can overtake).
    if (!target || (!app->target && join->relayed != app->passed) ||
        !room_in(&target, join->relayed + app->pushed)) {
        app->target = 0;
        app->passed += msg->size;
        return SK_PASS;
    }
    if (!app->target) {
        int zero = 0;
        __u64 *count = switches.lookup(&zero);
        if (count)
            __sync_fetch_and_add(count, 1);
    }
    app->target = target;
    app->pushed += msg->size;
    return legs.msg_redirect_hash(msg, &target, 0);  // into the proxy's other socket
}
