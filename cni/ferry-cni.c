/*
 * ferry-cni: Ferry's chained CNI plugin (CNI spec 0.3.0, 0.3.1, 0.4.0 and 1.0.0).
 *
 * The container runtime runs it after the primary plugin (bridge, flannel, calico, ...) for
 * every pod sandbox, in the host's mount namespace, where no Python may exist: so it is a small
 * static C program that decides nothing itself.  It forwards the invocation verbatim to the
 * node agent over `<state_dir>/cni.sock` (a root-only unix socket) and relays the answer:
 *
 *   request  "CNI_COMMAND=ADD\nCNI_CONTAINERID=...\nCNI_NETNS=...\nCNI_IFNAME=...\n"
 *            "CNI_ARGS=...\nCNI_PATH=...\n\n" then the config from stdin, then EOF (SHUT_WR)
 *   reply    "<exit code>\n" then the bytes to print on stdout, then EOF
 *
 * The agent (agent/cni_service.py, agent/cni_protocol.py) parses the config, decides whether
 * the pod must be enrolled, enrolls it (redirection inside its netns) before it answers, and
 * writes the result: prevResult unchanged, or a CNI error.  VERSION is answered here.
 *
 * When the agent cannot be asked (nothing listens on the socket, or it does not answer within
 * `timeout` seconds) the plugin fails closed: an ADD or CHECK fails with CNI error 11 ("try
 * again later"; kubelet retries the sandbox), so no app container of a pod that must be enrolled
 * starts unprotected.  A down agent cannot tell which pods must be protected, so the only pods
 * that start then are those of namespaces listed in `exclude_namespaces` (default: kube-system
 * and ferry-system, as the pod's K8S_POD_NAMESPACE from CNI_ARGS names them): their ADD prints
 * prevResult unchanged.  A DEL always succeeds (the agent forgets a workload whose netns is
 * gone when it runs again).  The agent applies the same exclusion, so a pod is treated alike
 * whether the agent is up or down.
 *
 * Plugin config keys (top level of this plugin's entry in the conflist, all optional):
 *   "state_dir": "/run/ferry"                the agent's state dir (its cni.sock)
 *   "timeout": 30                            seconds to wait for the agent's answer
 *   "exclude_namespaces": ["kube-system", "ferry-system"]
 * Reading them takes a minimal JSON scanner (top-level members of one object, values skipped
 * with their nesting checked); the agent parses the whole config properly.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONFIG (4 << 20)
#define MAX_REPLY (4 << 20)
#define MAX_DEPTH 256
#define SOCKET_NAME "cni.sock"
#define DEFAULT_STATE_DIR "/run/ferry"
#define DEFAULT_TIMEOUT 30.0
#define VERSIONS "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\"]"

static const char *ENV_NAMES[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                  "CNI_IFNAME",  "CNI_ARGS",        "CNI_PATH"};
static const char *DEFAULT_EXCLUDED[] = {"kube-system", "ferry-system"};

struct span {
	const char *p;
	size_t n;
};

struct config {
	struct span version;   /* string content, without quotes */
	struct span state_dir; /* string content */
	struct span excluded;  /* the whole array value, brackets included */
	struct span prev;      /* the whole prevResult value */
	double timeout;
	int has_excluded;
};

/* ---------------------------------------------------------------- output */

static void put_escaped(FILE *out, const char *s)
{
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(out, "\\%c", c);
		else if (c < 0x20)
			fprintf(out, "\\u%04x", c);
		else if (c >= 0x7f)
			fputc('?', out); /* the message stays valid JSON whatever the input was */
		else
			fputc(c, out);
	}
}

/* A CNI error result on stdout (what the runtime shows), a log line on stderr, exit 1. */
static int fail(const struct config *cfg, int code, const char *msg, const char *fmt, ...)
{
	char details[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(details, sizeof details, fmt, ap);
	va_end(ap);
	char version[32] = "1.0.0";
	if (cfg && cfg->version.p && cfg->version.n < sizeof version) {
		memcpy(version, cfg->version.p, cfg->version.n);
		version[cfg->version.n] = 0;
	}
	fputs("{\"cniVersion\":\"", stdout);
	put_escaped(stdout, version);
	fprintf(stdout, "\",\"code\":%d,\"msg\":\"", code);
	put_escaped(stdout, msg);
	fputs("\",\"details\":\"", stdout);
	put_escaped(stdout, details);
	fputs("\"}\n", stdout);
	fprintf(stderr, "ferry-cni: %s: %s\n", msg, details);
	return 1;
}

/* --------------------------------------------------------- JSON scanning */

static const char *skip_ws(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* p at the opening quote; returns past the closing quote, or NULL.  *plain: no escapes. */
static const char *skip_string(const char *p, const char *end, int *plain)
{
	if (plain)
		*plain = 1;
	for (p++; p < end; p++) {
		if (*p == '"')
			return p + 1;
		if ((unsigned char)*p < 0x20)
			return NULL;
		if (*p == '\\') {
			if (plain)
				*plain = 0;
			if (++p >= end)
				return NULL;
		}
	}
	return NULL;
}

static const char *skip_value(const char *p, const char *end, int depth)
{
	p = skip_ws(p, end);
	if (p >= end || depth > MAX_DEPTH)
		return NULL;
	if (*p == '"')
		return skip_string(p, end, NULL);
	if (*p == '{' || *p == '[') {
		char close = *p == '{' ? '}' : ']';
		p = skip_ws(p + 1, end);
		if (p < end && *p == close)
			return p + 1;
		for (;;) {
			if (close == '}') {
				if (p >= end || *p != '"' || !(p = skip_string(p, end, NULL)))
					return NULL;
				p = skip_ws(p, end);
				if (p >= end || *p++ != ':')
					return NULL;
			}
			if (!(p = skip_value(p, end, depth + 1)))
				return NULL;
			p = skip_ws(p, end);
			if (p < end && *p == close)
				return p + 1;
			if (p >= end || *p != ',')
				return NULL;
			p = skip_ws(p + 1, end);
		}
	}
	const char *start = p;
	while (p < end && strchr("+-.0123456789eEtruefalsn", *p))
		p++;
	return p > start ? p : NULL;
}

static int key_is(struct span key, const char *name)
{
	return key.n == strlen(name) && memcmp(key.p, name, key.n) == 0;
}

/* The members this plugin reads; 0 when the input is not one JSON object. */
static int scan_config(const char *p, const char *end, struct config *cfg)
{
	memset(cfg, 0, sizeof *cfg);
	cfg->timeout = DEFAULT_TIMEOUT;
	p = skip_ws(p, end);
	if (p >= end || *p != '{')
		return 0;
	p = skip_ws(p + 1, end);
	if (p < end && *p == '}')
		return skip_ws(p + 1, end) == end;
	for (;;) {
		int plain;
		if (p >= end || *p != '"')
			return 0;
		const char *after = skip_string(p, end, &plain);
		if (!after)
			return 0;
		struct span key = {p + 1, (size_t)(after - p - 2)};
		p = skip_ws(after, end);
		if (p >= end || *p++ != ':')
			return 0;
		const char *value = skip_ws(p, end);
		if (!(p = skip_value(value, end, 1)))
			return 0;
		struct span v = {value, (size_t)(p - value)};
		int string = *value == '"';
		int plain_value = 0;
		if (string)
			skip_string(value, end, &plain_value);
		if (plain && key_is(key, "cniVersion") && string && plain_value) {
			cfg->version = (struct span){v.p + 1, v.n - 2};
		} else if (plain && key_is(key, "state_dir") && string && plain_value) {
			cfg->state_dir = (struct span){v.p + 1, v.n - 2};
		} else if (plain && key_is(key, "prevResult")) {
			cfg->prev = v;
		} else if (plain && key_is(key, "exclude_namespaces") && *value == '[') {
			cfg->excluded = v;
			cfg->has_excluded = 1;
		} else if (plain && key_is(key, "timeout") && !string) {
			char number[64];
			if (v.n < sizeof number) {
				memcpy(number, v.p, v.n);
				number[v.n] = 0;
				double t = strtod(number, NULL);
				if (t > 0 && t < 3600)
					cfg->timeout = t;
			}
		}
		p = skip_ws(p, end);
		if (p < end && *p == '}')
			return skip_ws(p + 1, end) == end;
		if (p >= end || *p != ',')
			return 0;
		p = skip_ws(p + 1, end);
	}
}

/* Whether `ns` is listed in the exclude_namespaces array (escaped entries never match). */
static int excluded(const struct config *cfg, const char *ns)
{
	if (!*ns)
		return 0;
	if (!cfg->has_excluded) {
		for (size_t i = 0; i < sizeof DEFAULT_EXCLUDED / sizeof *DEFAULT_EXCLUDED; i++)
			if (strcmp(ns, DEFAULT_EXCLUDED[i]) == 0)
				return 1;
		return 0;
	}
	const char *p = cfg->excluded.p + 1, *end = cfg->excluded.p + cfg->excluded.n - 1;
	for (;;) {
		p = skip_ws(p, end);
		if (p >= end)
			return 0;
		if (*p == ',') {
			p++;
			continue;
		}
		const char *after;
		int plain = 0;
		if (*p == '"')
			after = skip_string(p, end, &plain);
		else
			after = skip_value(p, end, 1);
		if (!after)
			return 0;
		if (*p == '"' && plain && (size_t)(after - p - 2) == strlen(ns) &&
		    memcmp(p + 1, ns, strlen(ns)) == 0)
			return 1;
		p = after;
	}
}

/* K8S_POD_NAMESPACE from CNI_ARGS ("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;..."), or "". */
static void pod_namespace(char *out, size_t size)
{
	const char *args = getenv("CNI_ARGS");
	out[0] = 0;
	for (const char *p = args; p && *p;) {
		const char *end = strchr(p, ';');
		size_t n = end ? (size_t)(end - p) : strlen(p);
		const char *key = "K8S_POD_NAMESPACE=";
		if (n > strlen(key) && strncmp(p, key, strlen(key)) == 0 && n - strlen(key) < size) {
			memcpy(out, p + strlen(key), n - strlen(key));
			out[n - strlen(key)] = 0;
		}
		p = end ? end + 1 : NULL;
	}
}

/* ------------------------------------------------------------------- I/O */

static char *read_all(int fd, size_t max, size_t *len, int timeout_ms)
{
	size_t cap = 65536, n = 0;
	char *buf = malloc(cap + 1);
	struct timespec start;
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (buf) {
		if (timeout_ms >= 0) {
			struct timespec now;
			clock_gettime(CLOCK_MONOTONIC, &now);
			long spent = (now.tv_sec - start.tv_sec) * 1000 +
				     (now.tv_nsec - start.tv_nsec) / 1000000;
			struct pollfd pfd = {fd, POLLIN, 0};
			int left = spent >= timeout_ms ? 0 : (int)(timeout_ms - spent);
			int ready = poll(&pfd, 1, left);
			if (ready < 0 && errno == EINTR)
				continue;
			if (ready <= 0) {
				errno = ready == 0 ? ETIMEDOUT : errno;
				break;
			}
		}
		if (n == cap) {
			if (cap >= max) {
				errno = EFBIG;
				break;
			}
			char *bigger = realloc(buf, cap * 2 + 1);
			if (!bigger)
				break;
			buf = bigger;
			cap *= 2;
		}
		ssize_t got = read(fd, buf + n, cap - n);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			break;
		if (got == 0) {
			buf[n] = 0;
			*len = n;
			return buf;
		}
		n += (size_t)got;
	}
	free(buf);
	return NULL;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t put = write(fd, p, n);
		if (put < 0 && errno == EINTR)
			continue;
		if (put <= 0)
			return -1;
		p += put;
		n -= (size_t)put;
	}
	return 0;
}

/* The agent's reply on stdout and its exit code; -1 (errno set) when there is no answer. */
static int ask_agent(const char *path, const char *config, size_t len, double timeout,
		     int *refused)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	*refused = 0;
	if (strlen(path) >= sizeof addr.sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(addr.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		*refused = errno == ENOENT || errno == ECONNREFUSED;
		close(fd);
		return -1;
	}
	char header[16384];
	size_t used = 0;
	for (size_t i = 0; i < sizeof ENV_NAMES / sizeof *ENV_NAMES; i++) {
		const char *value = getenv(ENV_NAMES[i]);
		value = value ? value : "";
		if (strchr(value, '\n')) {
			close(fd);
			errno = EINVAL;
			return -1;
		}
		int n = snprintf(header + used, sizeof header - used, "%s=%s\n", ENV_NAMES[i],
				 value);
		if (n < 0 || (size_t)n >= sizeof header - used) {
			close(fd);
			errno = E2BIG;
			return -1;
		}
		used += (size_t)n;
	}
	header[used++] = '\n';
	if (write_all(fd, header, used) < 0 || write_all(fd, config, len) < 0 ||
	    shutdown(fd, SHUT_WR) < 0) {
		close(fd);
		return -1;
	}
	size_t got;
	char *reply = read_all(fd, MAX_REPLY, &got, (int)(timeout * 1000));
	int saved = errno;
	close(fd);
	if (!reply) {
		errno = saved;
		return -1;
	}
	char *nl = memchr(reply, '\n', got);
	char *end;
	long code = strtol(reply, &end, 10);
	if (!nl || end != nl || code < 0 || code > 255) {
		free(reply);
		errno = EPROTO;
		return -1;
	}
	size_t body = got - (size_t)(nl + 1 - reply);
	if (write_all(STDOUT_FILENO, nl + 1, body) < 0) {
		free(reply);
		return -1;
	}
	free(reply);
	return (int)code;
}

int main(void)
{
	const char *command = getenv("CNI_COMMAND");
	if (!command || !*command)
		return fail(NULL, 4, "CNI_COMMAND is not set",
			    "ferry-cni is a CNI plugin: a container runtime runs it with "
			    "CNI_COMMAND=ADD|DEL|CHECK|VERSION and a config on stdin");
	if (strcmp(command, "VERSION") == 0) {
		printf("{\"cniVersion\":\"1.0.0\",\"supportedVersions\":" VERSIONS "}\n");
		return 0;
	}
	int add = strcmp(command, "ADD") == 0, del = strcmp(command, "DEL") == 0;
	int check = strcmp(command, "CHECK") == 0;
	if (!add && !del && !check)
		return fail(NULL, 4, "unknown CNI_COMMAND", "CNI_COMMAND=%s: expected ADD, DEL, "
			    "CHECK or VERSION", command);
	size_t len;
	char *config = read_all(STDIN_FILENO, MAX_CONFIG, &len, -1);
	if (!config)
		return fail(NULL, 5, "cannot read the network config from stdin", "%s",
			    strerror(errno));
	struct config cfg;
	if (!scan_config(config, config + len, &cfg))
		return fail(NULL, 6, "the network config on stdin is not a JSON object",
			    "%zu bytes starting %.40s", len, config);
	char path[4096];
	if (cfg.state_dir.p)
		snprintf(path, sizeof path, "%.*s/" SOCKET_NAME, (int)cfg.state_dir.n,
			 cfg.state_dir.p);
	else
		snprintf(path, sizeof path, DEFAULT_STATE_DIR "/" SOCKET_NAME);
	int refused;
	int code = ask_agent(path, config, len, cfg.timeout, &refused);
	if (code >= 0)
		return code;
	const char *why = refused ? "the Ferry agent is not running" : "the Ferry agent did not answer";
	char reason[512];
	snprintf(reason, sizeof reason, "%s (%s: %s)", why, path, strerror(errno));
	if (del) {
		fprintf(stderr, "ferry-cni: DEL: %s; the agent forgets the pod when it runs again\n",
			reason);
		return 0;
	}
	char ns[256];
	pod_namespace(ns, sizeof ns);
	if (excluded(&cfg, ns)) {
		fprintf(stderr, "ferry-cni: %s: %s; namespace %s is excluded, pod not enrolled\n",
			command, reason, ns);
		if (add) {
			if (cfg.prev.p)
				write_all(STDOUT_FILENO, cfg.prev.p, cfg.prev.n);
			else if (cfg.version.p)
				printf("{\"cniVersion\":\"%.*s\"}\n", (int)cfg.version.n,
				       cfg.version.p);
			else
				printf("{\"cniVersion\":\"1.0.0\"}\n");
			fflush(stdout);
		}
		return 0;
	}
	return fail(&cfg, 11, "pod not started: the Ferry agent cannot enroll it",
		    "%s; a pod of namespace '%s' may need protection, so it must not start "
		    "unprotected (start the agent, or list the namespace in exclude_namespaces)",
		    reason, *ns ? ns : "(unknown: no K8S_POD_NAMESPACE in CNI_ARGS)");
}
