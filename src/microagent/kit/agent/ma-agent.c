/*
 * ma-agent: the microagent guest agent (protocol ma-agent/1, see docs/agent-protocol.md).
 *
 * The guest init starts it beside the entrypoint. It serves framed requests from the host
 * over one virtio-serial port (or, for tests, an inherited socket): it runs commands (EXEC)
 * in the workspace's root with pipes or a pseudo-terminal, streams their output under a
 * per-channel window, and relays guest connections to loopback ports (the "mediation" port
 * and up to MAX_SERVICES service ports) to the host (MED_OPEN / DATA); the MED_OPEN names the
 * port, and the host decides where it goes.
 *
 *   ma-agent (--port PATH | --fd N) [--root DIR] [--mediation-port N] [--listen N]...
 *            [--log PATH]
 *
 * Design:
 * - One thread, one poll() loop. Every fd is non-blocking and close-on-exec. SIGCHLD and
 *   SIGIO only write a byte to a self-pipe; children are reaped with waitpid(WNOHANG).
 * - Memory is bounded: a frame is at most 64 KiB; a channel buffers at most one window
 *   (256 KiB) of host data; command output is read only while the channel has window
 *   left and the link's send queue is below OUTQ_SOFT; the link is read only while that
 *   queue is below OUTQ_HARD. A slow host therefore stalls commands, never grows memory.
 * - The host is trusted, but every value from the wire is bounded and a bad request only
 *   fails that request. A malformed frame (too long, unknown type) cannot be skipped
 *   reliably, so the agent drops what it has and scans for the host's next HELLO header
 *   (the host sends HELLO whenever it (re)connects); nothing is killed.
 * - A virtio port with no host connected reports POLLHUP and refuses writes. The agent then
 *   waits (SIGIO, or a 200 ms check) for a host; when a connected host goes away, its
 *   channels are orphaned: their commands are killed and their state dropped. A host HELLO
 *   while channels are open means the same (a restored snapshot's port never went away).
 * - A guest connection is reset (not closed) when it is cut off: refused by the host, or
 *   dropped with its host. Its program sees ECONNRESET, and EOF only when the target ended.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "1"
#define HDR 9                        /* u32 length, u32 channel, u8 type */
#define MAX_PAYLOAD 65536u           /* one frame's payload */
#define WINDOW (256u * 1024)         /* unacknowledged data bytes per channel and direction */
#define MAX_CHANNELS 128             /* open exec + mediation channels */
#define MAX_SERVICES 10              /* --listen ports */
#define MAX_LISTENERS (MAX_SERVICES + 1) /* ... and the mediation port */
#define MAX_ARGV 4096
#define MAX_ENV 4096
#define MAX_DEPTH 8                  /* JSON nesting */
#define MAX_PING 64
#define MAX_GROUPS 64
#define OUTQ_SOFT (256u * 1024)      /* read command output only below this much queued */
#define OUTQ_HARD (1024u * 1024)     /* read the link only below this */
#define LOG_CAP (1L << 20)           /* diagnostics stop after this many bytes */
#define GUEST_BASE 0x80000000u       /* channels the guest opens */
#define RECHECK_MS 200               /* how often a port without a host is looked at */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum {
    T_HELLO = 0x01, T_PING = 0x02, T_PONG = 0x03,
    T_EXEC = 0x10, T_STARTED = 0x11, T_STDIN = 0x12, T_STDOUT = 0x13, T_STDERR = 0x14,
    T_RESIZE = 0x15, T_SIGNAL = 0x16, T_EXIT = 0x17, T_WINDOW = 0x18, T_CLOSE = 0x19,
    T_MED_OPEN = 0x20, T_MED_OPENED = 0x21, T_DATA = 0x22,
};

/* ---- small utilities --------------------------------------------------------------- */

static int log_fd = 2;
static long log_written;

/* Diagnostics only (never the protocol); capped so a flood of bad frames cannot fill RAM. */
static void logmsg(const char *fmt, ...)
{
    char line[600];
    va_list ap;
    int n = snprintf(line, sizeof line, "ma-agent: ");
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (log_written + n > LOG_CAP)
        return;
    log_written += n;
    if (write(log_fd, line, (size_t)n) < 0) { /* nowhere left to say it */ }
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* A byte buffer: data[off .. off+len) is pending. */
struct buf {
    unsigned char *data;
    size_t off, len, cap;
};

static int buf_reserve(struct buf *b, size_t extra)
{
    if (b->off + b->len + extra <= b->cap)
        return 0;
    if (b->off) {
        memmove(b->data, b->data + b->off, b->len);
        b->off = 0;
    }
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    unsigned char *d = realloc(b->data, cap);
    if (!d)
        return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

static unsigned char *buf_head(struct buf *b) { return b->data + b->off; }
static unsigned char *buf_tail(struct buf *b) { return b->data + b->off + b->len; }

static void buf_free(struct buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* Drop n handed-on bytes; an emptied large buffer is given back (idle channels cost ~0). */
static void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    b->len -= n;
    if (b->len == 0) {
        b->off = 0;
        if (b->cap > 65536)
            buf_free(b);
    }
}

/* ---- JSON output -------------------------------------------------------------------- */

/* A fixed-size JSON writer; strings are cut at 1000 bytes so the result always fits. */
struct jw {
    char s[8192];
    size_t n;
};

static void jw_raw(struct jw *w, const char *text)
{
    size_t k = strlen(text);
    if (w->n + k < sizeof w->s) {
        memcpy(w->s + w->n, text, k);
        w->n += k;
    }
    w->s[w->n] = 0;
}

static void jw_str(struct jw *w, const char *text)
{
    char esc[8];
    jw_raw(w, "\"");
    for (size_t i = 0; text[i] && i < 1000; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '"' || c == '\\') {
            esc[0] = '\\'; esc[1] = (char)c; esc[2] = 0;
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
        } else {
            esc[0] = (char)c; esc[1] = 0;
        }
        jw_raw(w, esc);
    }
    jw_raw(w, "\"");
}

/* ---- JSON input --------------------------------------------------------------------- */

/*
 * A small strict parser for the control payloads. Decoded strings go to an arena as large
 * as the payload: an escape never decodes to more bytes than it is written with, and the
 * closing quote leaves room for the NUL. NUL inside strings and lone surrogates are refused
 * (they cannot become C strings / UTF-8).
 */
struct jp {
    const char *p, *end;
    char *arena;
    size_t used;
    const char *err;
};

static int jp_fail(struct jp *j, const char *msg)
{
    if (!j->err)
        j->err = msg;
    return -1;
}

static void jp_ws(struct jp *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int jp_peek(struct jp *j)
{
    jp_ws(j);
    return j->p < j->end ? (unsigned char)*j->p : -1;
}

static int jp_expect(struct jp *j, char c)
{
    if (jp_peek(j) != (unsigned char)c)
        return jp_fail(j, "malformed JSON");
    j->p++;
    return 0;
}

static int jp_hex4(struct jp *j, unsigned *out)
{
    unsigned v = 0;
    if (j->end - j->p < 4)
        return jp_fail(j, "short \\u escape");
    for (int i = 0; i < 4; i++) {
        char c = *j->p++;
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return jp_fail(j, "bad \\u escape");
    }
    *out = v;
    return 0;
}

static char *utf8_put(char *o, unsigned cp)
{
    if (cp < 0x80) {
        *o++ = (char)cp;
    } else if (cp < 0x800) {
        *o++ = (char)(0xc0 | cp >> 6);
        *o++ = (char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        *o++ = (char)(0xe0 | cp >> 12);
        *o++ = (char)(0x80 | (cp >> 6 & 0x3f));
        *o++ = (char)(0x80 | (cp & 0x3f));
    } else {
        *o++ = (char)(0xf0 | cp >> 18);
        *o++ = (char)(0x80 | (cp >> 12 & 0x3f));
        *o++ = (char)(0x80 | (cp >> 6 & 0x3f));
        *o++ = (char)(0x80 | (cp & 0x3f));
    }
    return o;
}

static int jp_unicode(struct jp *j, char **o)
{
    unsigned cp, lo;
    if (jp_hex4(j, &cp))
        return -1;
    if (cp >= 0xdc00 && cp <= 0xdfff)
        return jp_fail(j, "lone surrogate in a string");
    if (cp >= 0xd800 && cp <= 0xdbff) {
        if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u')
            return jp_fail(j, "lone surrogate in a string");
        j->p += 2;
        if (jp_hex4(j, &lo) || lo < 0xdc00 || lo > 0xdfff)
            return jp_fail(j, "lone surrogate in a string");
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
    }
    if (cp == 0)
        return jp_fail(j, "NUL in a string");
    *o = utf8_put(*o, cp);
    return 0;
}

static int jp_string(struct jp *j, char **out)
{
    if (jp_expect(j, '"'))
        return jp_fail(j, "expected a string");
    char *start = j->arena + j->used, *o = start;
    for (;;) {
        if (j->p >= j->end)
            return jp_fail(j, "unterminated string");
        unsigned char c = (unsigned char)*j->p++;
        if (c == '"')
            break;
        if (c < 0x20)
            return jp_fail(j, "control character in a string");
        if (c != '\\') {
            *o++ = (char)c;
            continue;
        }
        if (j->p >= j->end)
            return jp_fail(j, "unterminated string");
        c = (unsigned char)*j->p++;
        switch (c) {
        case '"': case '\\': case '/': *o++ = (char)c; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': if (jp_unicode(j, &o)) return -1; break;
        default: return jp_fail(j, "bad escape in a string");
        }
    }
    *o++ = 0;
    j->used = (size_t)(o - j->arena);
    if (out)
        *out = start;
    return 0;
}

/* An integer (no fraction or exponent) of at most 15 digits. */
static int jp_int(struct jp *j, long long *out)
{
    int neg = 0, digits = 0;
    long long v = 0;
    jp_ws(j);
    if (j->p < j->end && *j->p == '-') {
        neg = 1;
        j->p++;
    }
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        if (++digits > 15)
            return jp_fail(j, "number out of range");
        v = v * 10 + (*j->p++ - '0');
    }
    if (!digits || (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E')))
        return jp_fail(j, "expected an integer");
    *out = neg ? -v : v;
    return 0;
}

static int jp_literal(struct jp *j, const char *word)
{
    size_t k = strlen(word);
    jp_ws(j);
    if ((size_t)(j->end - j->p) < k || memcmp(j->p, word, k) != 0)
        return jp_fail(j, "malformed JSON");
    j->p += k;
    return 0;
}

/* true/false; *out = 0/1. */
static int jp_bool(struct jp *j, int *out)
{
    if (jp_peek(j) == 't') {
        *out = 1;
        return jp_literal(j, "true");
    }
    *out = 0;
    return jp_literal(j, "false") ? jp_fail(j, "expected true or false") : 0;
}

/* 1 and consumes it when the next value is null. */
static int jp_null(struct jp *j)
{
    return jp_peek(j) == 'n' && jp_literal(j, "null") == 0;
}

/* Object members: returns 1 with *key set (positioned at the value), 0 at the end. */
static int jp_member(struct jp *j, int *first, char **key)
{
    if (jp_peek(j) == '}') {
        j->p++;
        return 0;
    }
    if (!*first && jp_expect(j, ','))
        return -1;
    *first = 0;
    if (jp_string(j, key) || jp_expect(j, ':'))
        return -1;
    return 1;
}

/* Array elements: returns 1 when one follows, 0 at the end. */
static int jp_element(struct jp *j, int *first)
{
    if (jp_peek(j) == ']') {
        j->p++;
        return 0;
    }
    if (!*first && jp_expect(j, ','))
        return -1;
    *first = 0;
    return 1;
}

/* Any JSON number (skipped: only integers are ever used). */
static int jp_number(struct jp *j)
{
    const char *start;
    if (j->p < j->end && *j->p == '-')
        j->p++;
    start = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
        j->p++;
    if (j->p == start)
        return jp_fail(j, "malformed JSON");
    if (j->p < j->end && *j->p == '.') {
        start = ++j->p;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
        if (j->p == start)
            return jp_fail(j, "malformed number");
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        start = j->p;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
        if (j->p == start)
            return jp_fail(j, "malformed number");
    }
    return 0;
}

static int jp_skip(struct jp *j, int depth)
{
    int c = jp_peek(j), first = 1, r;
    char *key;
    if (depth > MAX_DEPTH)
        return jp_fail(j, "JSON nested too deeply");
    if (c == '"')
        return jp_string(j, NULL);
    if (c == '{') {
        j->p++;
        while ((r = jp_member(j, &first, &key)) == 1)
            if (jp_skip(j, depth + 1))
                return -1;
        return r;
    }
    if (c == '[') {
        j->p++;
        while ((r = jp_element(j, &first)) == 1)
            if (jp_skip(j, depth + 1))
                return -1;
        return r;
    }
    if (c == 't' || c == 'f')
        return jp_bool(j, &first);
    if (jp_null(j))
        return 0;
    return jp_number(j);
}

static int jp_begin(struct jp *j, const unsigned char *payload, size_t len, char *arena)
{
    memset(j, 0, sizeof *j);
    j->p = (const char *)payload;
    j->end = j->p + len;
    j->arena = arena;
    if (jp_peek(j) != '{')
        return jp_fail(j, "a control payload must be a JSON object");
    j->p++;
    return 0;
}

static int jp_finish(struct jp *j)
{
    jp_ws(j);
    return j->p == j->end ? 0 : jp_fail(j, "trailing bytes after the JSON object");
}

/* ---- the EXEC request ---------------------------------------------------------------- */

struct exec_req {
    char **argv;                /* NULL-terminated, pointing into arena */
    size_t argc;
    char **env_keys, **env_vals;
    size_t envc;
    char *cwd, *user;           /* NULL when null */
    int tty, want_stdin, rows, cols;
    long long timeout_ms;       /* -1: none */
    char *arena;
};

static void req_free(struct exec_req *rq)
{
    free(rq->argv);
    free(rq->env_keys);
    free(rq->env_vals);
    free(rq->arena);
    memset(rq, 0, sizeof *rq);
}

static int parse_argv(struct jp *j, struct exec_req *rq)
{
    int first = 1, r;
    size_t cap = 16;
    free(rq->argv);
    rq->argc = 0;
    rq->argv = malloc(cap * sizeof *rq->argv);
    if (!rq->argv)
        return jp_fail(j, "out of memory");
    if (jp_peek(j) != '[')
        return jp_fail(j, "argv must be an array of strings");
    j->p++;
    while ((r = jp_element(j, &first)) == 1) {
        if (rq->argc == MAX_ARGV)
            return jp_fail(j, "argv has too many entries");
        if (rq->argc + 2 > cap) {
            char **grown = realloc(rq->argv, (cap *= 2) * sizeof *rq->argv);
            if (!grown)
                return jp_fail(j, "out of memory");
            rq->argv = grown;
        }
        if (jp_peek(j) != '"')
            return jp_fail(j, "argv must be an array of strings");
        if (jp_string(j, &rq->argv[rq->argc++]))
            return -1;
    }
    rq->argv[rq->argc] = NULL;
    return r;
}

static int parse_env(struct jp *j, struct exec_req *rq)
{
    int first = 1, r;
    char *key, *val;
    free(rq->env_keys);
    free(rq->env_vals);
    rq->envc = 0;
    rq->env_keys = malloc(MAX_ENV * sizeof(char *));
    rq->env_vals = malloc(MAX_ENV * sizeof(char *));
    if (!rq->env_keys || !rq->env_vals)
        return jp_fail(j, "out of memory");
    if (jp_null(j))
        return 0;
    if (jp_peek(j) != '{')
        return jp_fail(j, "env must be an object of strings");
    j->p++;
    while ((r = jp_member(j, &first, &key)) == 1) {
        if (jp_peek(j) != '"')
            return jp_fail(j, "env values must be strings");
        if (jp_string(j, &val))
            return -1;
        if (!*key || strchr(key, '='))
            return jp_fail(j, "env names must be non-empty and without '='");
        if (rq->envc >= MAX_ENV)
            return jp_fail(j, "env has too many entries");
        rq->env_keys[rq->envc] = key;
        rq->env_vals[rq->envc++] = val;
    }
    return r;
}

static int parse_opt_string(struct jp *j, char **out)
{
    *out = NULL;
    if (jp_null(j))
        return 0;
    if (jp_peek(j) != '"')
        return jp_fail(j, "cwd and user must be strings or null");
    return jp_string(j, out);
}

static int parse_size(struct jp *j, int *out)
{
    long long v;
    if (jp_null(j))
        return 0;
    if (jp_int(j, &v) || v < 1 || v > 65535)
        return jp_fail(j, "rows and cols must be integers in 1..65535");
    *out = (int)v;
    return 0;
}

static int parse_exec_member(struct jp *j, const char *key, struct exec_req *rq)
{
    if (strcmp(key, "argv") == 0) return parse_argv(j, rq);
    if (strcmp(key, "env") == 0) return parse_env(j, rq);
    if (strcmp(key, "cwd") == 0) return parse_opt_string(j, &rq->cwd);
    if (strcmp(key, "user") == 0) return parse_opt_string(j, &rq->user);
    if (strcmp(key, "tty") == 0) return jp_bool(j, &rq->tty);
    if (strcmp(key, "stdin") == 0) return jp_bool(j, &rq->want_stdin);
    if (strcmp(key, "rows") == 0) return parse_size(j, &rq->rows);
    if (strcmp(key, "cols") == 0) return parse_size(j, &rq->cols);
    if (strcmp(key, "timeoutMs") == 0) {
        rq->timeout_ms = -1;
        if (jp_null(j))
            return 0;
        if (jp_int(j, &rq->timeout_ms) || rq->timeout_ms < 0)
            return jp_fail(j, "timeoutMs must be a non-negative integer or null");
        return 0;
    }
    return jp_skip(j, 2);
}

/* Parse an EXEC payload into rq; NULL or the reason it was refused. */
static const char *parse_exec(const unsigned char *payload, size_t len, struct exec_req *rq)
{
    struct jp j;
    int first = 1, r;
    char *key;
    memset(rq, 0, sizeof *rq);
    rq->rows = 24;
    rq->cols = 80;
    rq->timeout_ms = -1;
    rq->arena = malloc(len + 1);
    if (!rq->arena)
        return "out of memory";
    if (jp_begin(&j, payload, len, rq->arena))
        return j.err;
    while ((r = jp_member(&j, &first, &key)) == 1)
        if (parse_exec_member(&j, key, rq))
            return j.err ? j.err : "malformed JSON";
    if (r < 0 || jp_finish(&j))
        return j.err ? j.err : "malformed JSON";
    if (!rq->argv || rq->argc == 0 || !rq->argv[0][0])
        return "argv must name a program";
    if (rq->user && !rq->user[0])
        rq->user = NULL;
    return NULL;
}

/* One integer member of a small object ({"rows":R,"cols":C}, {"signal":N}); -1 if absent. */
static long long json_int_member(const unsigned char *payload, size_t len, const char *name)
{
    static char arena[MAX_PAYLOAD + 1];
    struct jp j;
    int first = 1;
    char *key;
    long long v, found = -1;
    if (jp_begin(&j, payload, len, arena))
        return -1;
    while (jp_member(&j, &first, &key) == 1) {
        if (strcmp(key, name) == 0) {
            if (jp_int(&j, &v))
                return -1;
            found = v;
        } else if (jp_skip(&j, 2)) {
            return -1;
        }
    }
    return j.err || jp_finish(&j) ? -1 : found;
}

/* ---- the link and its send queue ----------------------------------------------------- */

static int link_fd = -1;
static int link_is_port;         /* a virtio port (reconnects) rather than a socket (--fd) */
static int link_up;              /* a host is connected */
static struct buf outq;          /* frames waiting for the link */
static unsigned char linbuf[2 * (HDR + MAX_PAYLOAD)];
static size_t linlen;
static int resyncing;            /* after a malformed frame or a reconnect: wait for HELLO */

static void queue_frame(uint32_t ch, int type, const void *payload, size_t len)
{
    if (buf_reserve(&outq, HDR + len) < 0) {
        logmsg("out of memory queueing a frame");
        return;
    }
    unsigned char *p = buf_tail(&outq);
    put_be32(p, (uint32_t)len);
    put_be32(p + 4, ch);
    p[8] = (unsigned char)type;
    if (len)
        memcpy(p + HDR, payload, len);
    outq.len += HDR + len;
}

static void queue_json(uint32_t ch, int type, const struct jw *w)
{
    queue_frame(ch, type, w->s, w->n);
}

static void queue_window(uint32_t ch, size_t n)
{
    unsigned char b[4];
    if (!n)
        return;
    put_be32(b, (uint32_t)n);
    queue_frame(ch, T_WINDOW, b, 4);
}

static void queue_close(uint32_t ch, const char *error)
{
    struct jw w = {.n = 0};
    if (!error) {
        queue_frame(ch, T_CLOSE, NULL, 0);
        return;
    }
    jw_raw(&w, "{\"error\":");
    jw_str(&w, error);
    jw_raw(&w, "}");
    queue_json(ch, T_CLOSE, &w);
}

static void queue_hello(void)
{
    static const char hello[] =
        "{\"protocol\":1,\"agent\":\"ma-agent\",\"version\":\"" AGENT_VERSION "\"}";
    queue_frame(0, T_HELLO, hello, sizeof hello - 1);
}

/* ---- channels ------------------------------------------------------------------------ */

enum kind { CH_FREE, CH_EXEC, CH_MED };

struct channel {
    enum kind kind;
    uint32_t id;
    unsigned gen;              /* bumped on alloc/free: stale poll results are ignored */
    uint32_t credit;           /* data bytes we may still send to the host */
    struct buf in;             /* host data (STDIN / DATA) not yet handed on, <= WINDOW */
    int in_eof;                /* the host ended its data */
    int in_done;               /* ... and that end was handed on */
    /* exec */
    pid_t pid;                 /* also the process group (the child calls setsid) */
    int status_fd;             /* CLOEXEC pipe: EOF = exec happened; "CODE message" = failed */
    int out_fd, err_fd, in_fd; /* -1 when closed; with a terminal out_fd is the master */
    int tty, reaped, wstatus, timed_out, fail_code;
    int64_t deadline;          /* monotonic ms; 0 = none */
    char fail_msg[1024];
    /* mediation */
    int sock, opened, sock_eof;
};

static struct channel chans[MAX_CHANNELS];
static uint32_t next_med_id = GUEST_BASE;

static struct channel *chan_find(uint32_t id)
{
    for (int i = 0; i < MAX_CHANNELS; i++)
        if (chans[i].kind != CH_FREE && chans[i].id == id)
            return &chans[i];
    return NULL;
}

static struct channel *chan_alloc(uint32_t id, enum kind kind)
{
    for (int i = 0; i < MAX_CHANNELS; i++) {
        struct channel *c = &chans[i];
        if (c->kind != CH_FREE)
            continue;
        unsigned gen = c->gen + 1;
        memset(c, 0, sizeof *c);
        c->gen = gen;
        c->kind = kind;
        c->id = id;
        c->credit = WINDOW;
        c->status_fd = c->out_fd = c->err_fd = c->in_fd = c->sock = -1;
        return c;
    }
    return NULL;
}

static void chan_free(struct channel *c)
{
    close_fd(&c->status_fd);
    close_fd(&c->out_fd);
    close_fd(&c->err_fd);
    close_fd(&c->in_fd);
    close_fd(&c->sock);
    buf_free(&c->in);
    c->kind = CH_FREE;
    c->gen++;
}

/* Kill an exec's process group (and the child itself, in case it has not called setsid). */
static void exec_kill(struct channel *c, int sig)
{
    if (c->pid <= 0)
        return;
    kill(-c->pid, sig);
    if (!c->reaped)
        kill(c->pid, sig);
}

/* A guest connection that is cut off rather than ended (its target unreachable, the host
 * gone or replaced): closed with a reset, so the program sees ECONNRESET, which it can tell
 * from the clean end of stream (EOF) of a target that finished. */
static void reset_on_close(int fd)
{
    struct linger hard = {.l_onoff = 1, .l_linger = 0};
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
}

static void drop_all_channels(void)
{
    for (int i = 0; i < MAX_CHANNELS; i++) {
        if (chans[i].kind == CH_EXEC)
            exec_kill(&chans[i], SIGKILL);
        if (chans[i].kind == CH_MED && !chans[i].in_eof)
            reset_on_close(chans[i].sock);
        if (chans[i].kind != CH_FREE)
            chan_free(&chans[i]);
    }
}

static int open_channels(void)
{
    int n = 0;
    for (int i = 0; i < MAX_CHANNELS; i++)
        n += chans[i].kind != CH_FREE;
    return n;
}

/* ---- running a command: the child side ----------------------------------------------- */

extern char **environ;

/* Report why the command could not run (through the status pipe) and exit with code. */
static void child_fail(int status_fd, int code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    int n = snprintf(msg, sizeof msg, "%d ", code);
    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    if (write(status_fd, msg, strlen(msg)) < 0) { /* the parent is gone */ }
    _exit(code);
}

struct ident {
    uid_t uid;
    gid_t gid;
    char name[256];
    char home[1024];
    int known;                 /* found in /etc/passwd */
};

/* A decimal id (at most 10 digits, below 2^32-1); -1 if text is not one. */
static long long parse_id(const char *text, size_t len)
{
    long long v = 0;
    if (len == 0 || len > 10)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (text[i] < '0' || text[i] > '9')
            return -1;
        v = v * 10 + (text[i] - '0');
    }
    return v < 0xffffffffLL ? v : -1;
}

/* Split a passwd/group line into at most max ':' fields (in place); the field count. */
static int split_fields(char *line, char **fields, int max)
{
    int n = 0;
    line[strcspn(line, "\n")] = 0;
    while (n < max) {
        fields[n++] = line;
        char *colon = strchr(line, ':');
        if (!colon)
            break;
        *colon = 0;
        line = colon + 1;
    }
    return n;
}

/* Find a passwd entry by name (name != NULL) or uid, parsing <root>/etc/passwd ourselves
 * (a static binary has no NSS, and the guest's files are the truth anyway). */
static int passwd_lookup(const char *name, uid_t uid, struct ident *out)
{
    char line[4096], *f[7];
    FILE *fp = fopen("/etc/passwd", "re");
    int found = 0;
    if (!fp)
        return 0;
    while (!found && fgets(line, sizeof line, fp)) {
        if (split_fields(line, f, 7) < 7)
            continue;
        long long u = parse_id(f[2], strlen(f[2])), g = parse_id(f[3], strlen(f[3]));
        if (u < 0 || g < 0 || (name ? strcmp(f[0], name) != 0 : (uid_t)u != uid))
            continue;
        out->uid = (uid_t)u;
        out->gid = (gid_t)g;
        snprintf(out->name, sizeof out->name, "%s", f[0]);
        snprintf(out->home, sizeof out->home, "%s", f[5][0] ? f[5] : "/");
        out->known = found = 1;
    }
    fclose(fp);
    return found;
}

/* A group's gid by name or number; -1 when unknown. */
static long long group_lookup(const char *name)
{
    char line[4096], *f[4];
    long long gid = parse_id(name, strlen(name));
    FILE *fp;
    if (gid >= 0 || !(fp = fopen("/etc/group", "re")))
        return gid;
    while (gid < 0 && fgets(line, sizeof line, fp))
        if (split_fields(line, f, 4) >= 3 && strcmp(f[0], name) == 0)
            gid = parse_id(f[2], strlen(f[2]));
    fclose(fp);
    return gid;
}

/* The supplementary groups of a named user (members lists in /etc/group), plus gid. */
static int user_groups(const struct ident *id, gid_t *groups)
{
    char line[65536], *f[4];
    int n = 0;
    groups[n++] = id->gid;
    FILE *fp = id->known ? fopen("/etc/group", "re") : NULL;
    if (!fp)
        return n;
    while (n < MAX_GROUPS && fgets(line, sizeof line, fp)) {
        if (split_fields(line, f, 4) < 4)
            continue;
        long long g = parse_id(f[2], strlen(f[2]));
        for (char *m = strtok(f[3], ","); m && g >= 0; m = strtok(NULL, ","))
            if (strcmp(m, id->name) == 0 && (gid_t)g != id->gid) {
                groups[n++] = (gid_t)g;
                break;
            }
    }
    fclose(fp);
    return n;
}

/* Resolve "name", "uid", "name:group" or "uid:gid" (inside the new root). */
static void resolve_user(int status_fd, const char *spec, struct ident *id)
{
    char who[256];
    const char *colon = strchr(spec, ':');
    size_t len = colon ? (size_t)(colon - spec) : strlen(spec);
    if (len == 0 || len >= sizeof who)
        child_fail(status_fd, 126, "invalid user '%s'", spec);
    memcpy(who, spec, len);
    who[len] = 0;
    memset(id, 0, sizeof *id);
    long long uid = parse_id(who, len);
    if (uid >= 0) {
        if (!passwd_lookup(NULL, (uid_t)uid, id)) {
            id->uid = (uid_t)uid;
            id->gid = (gid_t)uid;   /* no entry: a private group, never root's */
            snprintf(id->home, sizeof id->home, "/");
        }
    } else if (!passwd_lookup(who, 0, id)) {
        child_fail(status_fd, 126, "unable to find user %s: no matching entry in /etc/passwd", who);
    }
    if (colon) {
        long long gid = group_lookup(colon + 1);
        if (gid < 0)
            child_fail(status_fd, 126, "unable to find group %s", colon + 1);
        id->gid = (gid_t)gid;
    }
}

/* Become the requested user; a terminal (tty_fd >= 0) is given to them first, as login does. */
static void switch_user(int status_fd, const char *spec, int tty_fd, struct ident *id)
{
    gid_t groups[MAX_GROUPS];
    resolve_user(status_fd, spec, id);
    if (geteuid() != 0 && id->uid == geteuid() && id->gid == getegid())
        return;   /* already that user (an unprivileged agent, as in tests) */
    if (tty_fd >= 0 && fchown(tty_fd, id->uid, (gid_t)-1) != 0) { /* it stays root's */ }
    int n = user_groups(id, groups);
    if (setgroups((size_t)n, groups) || setgid(id->gid) || setuid(id->uid))
        child_fail(status_fd, 126, "cannot switch to user %s: %s", spec, strerror(errno));
}

static void enter_cwd(int status_fd, const char *cwd)
{
    struct stat st;
    if (cwd) {
        if (chdir(cwd) != 0)
            child_fail(status_fd, 126, "cannot change to directory %s: %s", cwd, strerror(errno));
        return;
    }
    if (!(stat("/workspace", &st) == 0 && S_ISDIR(st.st_mode) && chdir("/workspace") == 0))
        if (chdir("/") != 0)
            child_fail(status_fd, 126, "cannot change to /: %s", strerror(errno));
}

static int env_overridden(const char *entry, const struct exec_req *rq, int set_home)
{
    size_t k = strcspn(entry, "=");
    if (set_home && k == 4 && strncmp(entry, "HOME", 4) == 0)
        return 1;
    for (size_t i = 0; i < rq->envc; i++)
        if (strlen(rq->env_keys[i]) == k && strncmp(entry, rq->env_keys[i], k) == 0)
            return 1;
    return 0;
}

/* The agent's own environment (the workspace's runtime env), HOME of a requested user,
 * then the request's env on top. */
static char **build_env(const struct exec_req *rq, const char *home)
{
    size_t n = 0, k = 0;
    while (environ[n])
        n++;
    char **env = calloc(n + rq->envc + 2, sizeof *env);
    if (!env)
        return NULL;
    for (size_t i = 0; i < n; i++)
        if (!env_overridden(environ[i], rq, home != NULL))
            env[k++] = environ[i];
    if (home && !env_overridden("HOME=", rq, 0) && asprintf(&env[k], "HOME=%s", home) > 0)
        k++;
    for (size_t i = 0; i < rq->envc; i++)
        if (asprintf(&env[k], "%s=%s", rq->env_keys[i], rq->env_vals[i]) > 0)
            k++;
    env[k] = NULL;
    return env;
}

static const char *env_get(char **env, const char *name)
{
    size_t k = strlen(name);
    for (; *env; env++)
        if (strncmp(*env, name, k) == 0 && (*env)[k] == '=')
            return *env + k + 1;
    return NULL;
}

/* execve, and like execvp a file without a #! line or ELF header runs under /bin/sh. */
static void try_exec(const char *path, char **argv, char **env)
{
    execve(path, argv, env);
    if (errno == ENOEXEC) {
        size_t n = 0;
        while (argv[n])
            n++;
        char **sh = calloc(n + 2, sizeof *sh);
        if (!sh)
            return;
        sh[0] = "sh";
        sh[1] = (char *)path;
        for (size_t i = 1; i < n; i++)
            sh[i + 1] = argv[i];
        execve("/bin/sh", sh, env);
        errno = ENOEXEC;
    }
}

/* Find argv[0] on the environment's PATH (or take it as a path) and exec it. */
static void exec_program(int status_fd, char **argv, char **env)
{
    const char *name = argv[0], *path = env_get(env, "PATH");
    char full[4096];
    int denied = 0;
    struct stat st;
    if (strchr(name, '/')) {
        try_exec(name, argv, env);
        child_fail(status_fd, errno == ENOENT ? 127 : 126, "%s: %s", name, strerror(errno));
    }
    for (const char *dir = path ? path : DEFAULT_PATH;; dir++) {
        size_t k = strcspn(dir, ":");
        int n = snprintf(full, sizeof full, "%.*s/%s", (int)k, k ? dir : ".", name);
        if (n > 0 && (size_t)n < sizeof full && stat(full, &st) == 0 && S_ISREG(st.st_mode)) {
            try_exec(full, argv, env);
            if (errno != EACCES)
                child_fail(status_fd, 126, "%s: %s", full, strerror(errno));
            denied = 1;
        }
        dir += k;
        if (!*dir)
            break;
    }
    if (denied)
        child_fail(status_fd, 126, "%s: permission denied", name);
    child_fail(status_fd, 127, "%s: command not found", name);
}

/* The forked child: session, stdio, root, user, directory, environment, exec. */
static void child_main(const struct exec_req *rq, const char *root, int status_fd,
                       int fd0, int fd1, int fd2)
{
    struct ident id;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Ignored dispositions survive exec: the agent's own (SIGPIPE ...) and any it inherited
     * (started as a background job or under nohup it ignores SIGINT, SIGQUIT or SIGHUP, and
     * ^C on a terminal would then interrupt nothing). Every command starts from the defaults. */
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    if (setsid() < 0)
        child_fail(status_fd, 126, "setsid: %s", strerror(errno));
    if (rq->tty && ioctl(fd0, TIOCSCTTY, 0) < 0)
        child_fail(status_fd, 126, "cannot make the terminal controlling: %s", strerror(errno));
    if (dup2(fd0, 0) < 0 || dup2(fd1, 1) < 0 || dup2(fd2, 2) < 0)
        child_fail(status_fd, 126, "dup2: %s", strerror(errno));
    if (strcmp(root, "/") != 0 && (chroot(root) != 0 || chdir("/") != 0))
        child_fail(status_fd, 126, "cannot enter %s: %s", root, strerror(errno));
    if (rq->user)
        switch_user(status_fd, rq->user, rq->tty ? 0 : -1, &id);
    enter_cwd(status_fd, rq->cwd);
    char **env = build_env(rq, rq->user ? id.home : NULL);
    if (!env)
        child_fail(status_fd, 126, "out of memory");
    exec_program(status_fd, rq->argv, env);
}

/* ---- running a command: the agent side ------------------------------------------------ */

static const char *root_dir = "/";

/* A new pseudo-terminal of rows x cols. The master comes from the command root's devpts
 * (a /dev/ptmx outside it would name a devpts instance the chroot cannot see); the slave
 * is opened through the master (TIOCGPTPEER), so no path inside the root is needed. */
static int open_pty(int rows, int cols, int *master, int *slave)
{
    char path[4200];
    int m = -1, s, unlock = 0;
    if (strcmp(root_dir, "/") != 0) {
        snprintf(path, sizeof path, "%s/dev/pts/ptmx", root_dir);
        m = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
    }
    if (m < 0)
        m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0)
        return -1;
    /* grantpt() is not needed on Linux: devpts gives the slave its owner and mode. */
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0)
        goto fail;
    s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (s < 0) {   /* kernels before 4.13: open the slave by name */
        char name[64];
        if (ptsname_r(m, name, sizeof name) != 0)
            goto fail;
        snprintf(path, sizeof path, "%s%s", strcmp(root_dir, "/") ? root_dir : "", name);
        s = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (s < 0)
            goto fail;
    }
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    ioctl(m, TIOCSWINSZ, &ws);
    set_nonblock(m);
    *master = m;
    *slave = s;
    return 0;
fail:
    close(m);
    return -1;
}

/* The command's end of each stdio fd (fds[0..2]) and ours (ours[0..2]: in, out, err). */
static int make_stdio(const struct exec_req *rq, int fds[3], int ours[3])
{
    int p[2];
    if (rq->tty) {
        if (open_pty(rq->rows, rq->cols, &ours[1], &fds[0]) < 0)
            return -1;
        fds[1] = fds[2] = fds[0];
        return 0;
    }
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    fds[1] = p[1], ours[1] = p[0];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    fds[2] = p[1], ours[2] = p[0];
    if (rq->want_stdin) {
        if (pipe2(p, O_CLOEXEC) < 0)
            return -1;
        fds[0] = p[0], ours[0] = p[1];
    } else {
        fds[0] = open("/dev/null", O_RDWR | O_CLOEXEC);
    }
    return fds[0] < 0 ? -1 : 0;
}

static void close_child_ends(int fds[3])
{
    int tty = fds[0] >= 0 && fds[1] == fds[0];   /* one terminal fd for all three */
    close_fd(&fds[0]);
    if (tty)
        fds[1] = fds[2] = -1;
    close_fd(&fds[1]);
    close_fd(&fds[2]);
}

/* Fork the command for channel c; -1 (with errno) when no process could be made. */
static int spawn(struct channel *c, const struct exec_req *rq)
{
    int fds[3] = {-1, -1, -1}, ours[3] = {-1, -1, -1}, st[2] = {-1, -1};
    int saved;
    if (pipe2(st, O_CLOEXEC) < 0 || make_stdio(rq, fds, ours) < 0)
        goto fail;
    pid_t pid = fork();
    if (pid < 0)
        goto fail;
    if (pid == 0)
        child_main(rq, root_dir, st[1], fds[0], fds[1], fds[2]);
    close_child_ends(fds);
    close(st[1]);
    c->pid = pid;
    c->tty = rq->tty;
    c->status_fd = st[0];
    c->out_fd = ours[1];
    c->err_fd = ours[2];
    c->in_fd = ours[0];
    for (int i = 0; i < 3; i++)
        if (ours[i] >= 0)
            set_nonblock(ours[i]);
    set_nonblock(st[0]);
    if (!rq->tty && !rq->want_stdin)
        c->in_done = c->in_eof = 1;
    if (rq->timeout_ms >= 0)
        c->deadline = mono_ms() + rq->timeout_ms;
    return 0;
fail:
    saved = errno;
    close_child_ends(fds);
    for (int i = 0; i < 3; i++)
        close_fd(&ours[i]);
    close_fd(&st[0]);
    close_fd(&st[1]);
    errno = saved;
    return -1;
}

static void exec_start(uint32_t id, const unsigned char *payload, uint32_t len)
{
    struct exec_req rq;
    char why[300];
    if (id == 0 || id >= GUEST_BASE) {
        logmsg("EXEC on channel %u refused: exec channels are 1..2^31-1", id);
        if (id)
            queue_close(id, "exec channel ids are 1..2^31-1");
        return;
    }
    if (chan_find(id)) {
        logmsg("EXEC on channel %u refused: the channel is open", id);
        return;
    }
    const char *err = parse_exec(payload, len, &rq);
    struct channel *c = err ? NULL : chan_alloc(id, CH_EXEC);
    if (!err && !c)
        err = "too many open channels";
    if (c && spawn(c, &rq) < 0) {
        snprintf(why, sizeof why, "cannot start the command: %s", strerror(errno));
        err = why;
        chan_free(c);
    }
    if (err) {
        logmsg("EXEC on channel %u refused: %s", id, err);
        queue_close(id, err);
    }
    req_free(&rq);
}

/* The status pipe: EOF means exec happened (STARTED); "CODE message" means it did not. */
static void exec_status(struct channel *c)
{
    char msg[sizeof c->fail_msg];
    ssize_t n = read(c->status_fd, msg, sizeof msg - 1);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    close_fd(&c->status_fd);
    if (n > 0) {
        msg[n] = 0;
        char *rest;
        long code = strtol(msg, &rest, 10);
        c->fail_code = code >= 1 && code <= 255 ? (int)code : 126;
        snprintf(c->fail_msg, sizeof c->fail_msg, "%s", *rest == ' ' ? rest + 1 : rest);
        return;
    }
    struct jw w = {.n = 0};
    char pid[32];
    snprintf(pid, sizeof pid, "{\"pid\":%d}", (int)c->pid);
    jw_raw(&w, pid);
    queue_json(c->id, T_STARTED, &w);
}

/* Move up to a frame of output from *fd to the link (as STDOUT/STDERR), within the window. */
static void exec_output(struct channel *c, int *fd, int type)
{
    size_t want = c->credit < MAX_PAYLOAD ? c->credit : MAX_PAYLOAD;
    if (!want || buf_reserve(&outq, HDR + want) < 0)
        return;
    unsigned char *p = buf_tail(&outq);
    ssize_t n = read(*fd, p + HDR, want);
    if (n > 0) {
        put_be32(p, (uint32_t)n);
        put_be32(p + 4, c->id);
        p[8] = (unsigned char)type;
        outq.len += HDR + (size_t)n;
        c->credit -= (uint32_t)n;
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    /* EOF; or EIO: a terminal whose every slave fd is closed */
    close_fd(fd);
}

/* The fd the command's input goes to, or -1 when it no longer takes any. */
static int exec_input_fd(struct channel *c)
{
    return c->tty ? c->out_fd : c->in_fd;
}

/* The host ended the input: close the pipe; with a terminal, type the EOF character
 * (normally ^D) if the terminal is in canonical mode, which is what a shell or cat reads
 * as end of input. A raw-mode program gets nothing: it reads keys, not end of file. */
static void exec_end_input(struct channel *c)
{
    struct termios t;
    c->in_done = 1;
    if (!c->tty) {
        close_fd(&c->in_fd);
        return;
    }
    if (c->out_fd >= 0 && tcgetattr(c->out_fd, &t) == 0 && (t.c_lflag & ICANON))
        if (write(c->out_fd, &t.c_cc[VEOF], 1) < 0) { /* the terminal is gone */ }
}

/* Hand buffered host data on to fd; acknowledge it with WINDOW. Data that cannot be
 * delivered any more (the reader is gone) is dropped but still acknowledged. */
static void pump_input(struct channel *c, int fd)
{
    ssize_t n = fd >= 0 ? write(fd, buf_head(&c->in), c->in.len) : -1;
    if (n < 0 && fd >= 0 && (errno == EAGAIN || errno == EINTR))
        return;
    size_t done = n > 0 ? (size_t)n : c->in.len;
    buf_consume(&c->in, done);
    queue_window(c->id, done);
    if (n < 0 && c->kind == CH_EXEC && !c->tty)
        close_fd(&c->in_fd);
}

/* Host data for a channel: buffered (at most one window), an empty payload ends it. */
static void host_data(struct channel *c, const unsigned char *data, uint32_t len)
{
    if (len == 0) {
        c->in_eof = 1;
        return;
    }
    if (c->in_eof || c->in.len + len > WINDOW || buf_reserve(&c->in, len) < 0) {
        if (!c->in_eof)
            logmsg("channel %u: host data beyond its window dropped", c->id);
        queue_window(c->id, len);   /* dropped, but do not stall the sender */
        return;
    }
    memcpy(buf_tail(&c->in), data, len);
    c->in.len += len;
}

static void exec_resize(struct channel *c, const unsigned char *payload, uint32_t len)
{
    long long rows = json_int_member(payload, len, "rows");
    long long cols = json_int_member(payload, len, "cols");
    if (!c->tty || c->out_fd < 0 || rows < 1 || rows > 65535 || cols < 1 || cols > 65535)
        return;
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    ioctl(c->out_fd, TIOCSWINSZ, &ws);   /* the kernel sends SIGWINCH */
}

static void exec_signal(struct channel *c, const unsigned char *payload, uint32_t len)
{
    long long sig = json_int_member(payload, len, "signal");
    if (sig >= 1 && sig < NSIG)
        exec_kill(c, (int)sig);
    else
        logmsg("channel %u: SIGNAL without a valid signal number", c->id);
}

/* EXIT once the command is reaped, its status is known and all of its output is sent. */
static void exec_maybe_finish(struct channel *c)
{
    if (c->status_fd >= 0 || !c->reaped || c->out_fd >= 0 || c->err_fd >= 0)
        return;
    int code, sig = 0;
    if (c->timed_out) {
        code = 124;
    } else if (c->fail_code) {
        code = c->fail_code;
    } else if (WIFSIGNALED(c->wstatus)) {
        sig = WTERMSIG(c->wstatus);
        code = 128 + sig;
    } else {
        code = WEXITSTATUS(c->wstatus);
    }
    struct jw w = {.n = 0};
    char head[96];
    snprintf(head, sizeof head, "{\"exitCode\":%d,\"signal\":", code & 255);
    jw_raw(&w, head);
    snprintf(head, sizeof head, "%d", sig);
    jw_raw(&w, sig ? head : "null");
    jw_raw(&w, c->timed_out ? ",\"timedOut\":true,\"error\":" : ",\"timedOut\":false,\"error\":");
    if (c->fail_code)
        jw_str(&w, c->fail_msg);   /* why nothing ran */
    else
        jw_raw(&w, "null");
    jw_raw(&w, "}");
    queue_json(c->id, T_EXIT, &w);
    chan_free(c);
}

static void reap_children(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_CHANNELS; i++) {
            struct channel *c = &chans[i];
            if (c->kind == CH_EXEC && c->pid == pid && !c->reaped) {
                c->reaped = 1;
                c->wstatus = status;
            }
        }
    }
}

/* Kill commands whose timeoutMs passed; the ms until the next deadline (or -1). */
static int check_deadlines(int64_t now)
{
    int64_t next = -1;
    for (int i = 0; i < MAX_CHANNELS; i++) {
        struct channel *c = &chans[i];
        if (c->kind != CH_EXEC || !c->deadline || c->timed_out)
            continue;
        if (now >= c->deadline) {
            c->timed_out = 1;
            exec_kill(c, SIGKILL);
        } else if (next < 0 || c->deadline - now < next) {
            next = c->deadline - now;
        }
    }
    return next < 0 ? -1 : next > 60000 ? 60000 : (int)next;
}

/* ---- mediation ------------------------------------------------------------------------- */

/* The loopback ports guest programs connect to: the mediation port and the --listen ports.
 * All are alike here; the MED_OPEN carries the port, so the host tells them apart. */
struct listener {
    int fd;                    /* -1 when listening failed */
    int port;
};

static struct listener listeners[MAX_LISTENERS];
static int nlisteners;
static int64_t listen_paused_until;   /* out of fds or memory: accept nothing for a while */

static void med_listen(struct listener *l)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)l->port)};
    int one = 1;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    l->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (l->fd < 0 || setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(l->fd, (struct sockaddr *)&sa, sizeof sa) || listen(l->fd, 64)) {
        logmsg("cannot listen on 127.0.0.1:%d: %s", l->port, strerror(errno));
        close_fd(&l->fd);
    }
}

static int listening(void)
{
    int n = 0;
    for (int i = 0; i < nlisteners; i++)
        n += listeners[i].fd >= 0;
    return n;
}

static uint32_t new_med_id(void)
{
    while (chan_find(next_med_id) || next_med_id < GUEST_BASE)
        next_med_id = next_med_id + 1 < GUEST_BASE ? GUEST_BASE : next_med_id + 1;
    return next_med_id++;
}

/* A guest program connected: announce it (MED_OPEN) and wait for MED_OPENED or CLOSE. */
static void med_accept(const struct listener *l)
{
    int s = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (s < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS) {
            logmsg("accept: %s", strerror(errno));
            listen_paused_until = mono_ms() + 100;
        }
        return;
    }
    struct channel *c = link_up ? chan_alloc(new_med_id(), CH_MED) : NULL;
    if (!c) {
        logmsg("connection to port %d refused: %s", l->port,
               link_up ? "too many channels" : "no host");
        reset_on_close(s);
        close(s);
        return;
    }
    c->sock = s;
    struct jw w = {.n = 0};
    char text[32];
    snprintf(text, sizeof text, "{\"port\":%d}", l->port);
    jw_raw(&w, text);
    queue_json(c->id, T_MED_OPEN, &w);
}

static void med_fail(struct channel *c, const char *what)
{
    char msg[200];
    snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
    queue_close(c->id, msg);
    chan_free(c);
}

/* Guest connection -> host, within the window; EOF becomes an empty DATA. */
static void med_read(struct channel *c)
{
    size_t want = c->credit < MAX_PAYLOAD ? c->credit : MAX_PAYLOAD;
    if (!want || buf_reserve(&outq, HDR + want) < 0)
        return;
    unsigned char *p = buf_tail(&outq);
    ssize_t n = read(c->sock, p + HDR, want);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            med_fail(c, "reading the guest connection");
        return;
    }
    put_be32(p, (uint32_t)n);
    put_be32(p + 4, c->id);
    p[8] = T_DATA;
    outq.len += HDR + (size_t)n;
    c->credit -= (uint32_t)n;
    if (n == 0)
        c->sock_eof = 1;
}

/* Host -> guest connection; after the host's empty DATA and the buffer: SHUT_WR. */
static void med_write(struct channel *c)
{
    if (c->in.len) {
        ssize_t n = write(c->sock, buf_head(&c->in), c->in.len);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR)
                med_fail(c, "writing the guest connection");
            return;
        }
        buf_consume(&c->in, (size_t)n);
        queue_window(c->id, (size_t)n);
    }
}

/* Ends a mediation channel whose two directions are both over. */
static void med_maybe_finish(struct channel *c)
{
    if (c->in_eof && !c->in.len && !c->in_done) {
        shutdown(c->sock, SHUT_WR);
        c->in_done = 1;
    }
    if (c->sock_eof && c->in_done)
        chan_free(c);
}

/* ---- frames from the host ---------------------------------------------------------- */

static void on_close(struct channel *c)
{
    if (c->kind == CH_EXEC)
        exec_kill(c, SIGKILL);
    if (c->kind == CH_MED && !c->in_eof)   /* refused or cut off: the host never ended its data */
        reset_on_close(c->sock);
    chan_free(c);
}

static void on_window(struct channel *c, const unsigned char *payload, uint32_t len)
{
    if (len != 4)
        return;
    uint64_t credit = (uint64_t)c->credit + get_be32(payload);
    c->credit = credit > WINDOW ? WINDOW : (uint32_t)credit;
}

/* Frames on channel 0 and EXEC, which need no open channel. */
static int dispatch_link(uint32_t ch, int type, const unsigned char *payload, uint32_t len)
{
    if (type == T_EXEC) {
        exec_start(ch, payload, len);
        return 1;
    }
    if (ch != 0)
        return 0;
    if (type == T_HELLO) {
        /* The host says HELLO once per connection, so channels still open belong to an
         * earlier host that went away unseen: a VM restored from a snapshot keeps the port
         * connected across the swap. Its commands are killed and its connections reset. */
        if (open_channels()) {
            logmsg("a new host said HELLO: dropping %d channels of the previous one",
                   open_channels());
            drop_all_channels();
        }
        queue_hello();
    } else if (type == T_PING)
        queue_frame(0, T_PONG, payload, len > MAX_PING ? MAX_PING : len);
    else
        logmsg("frame type 0x%02x on channel 0 ignored", type);
    return 1;
}

static void dispatch(uint32_t ch, int type, const unsigned char *payload, uint32_t len)
{
    if (dispatch_link(ch, type, payload, len))
        return;
    struct channel *c = chan_find(ch);
    if (!c)
        return;   /* a channel that just ended (EXIT and a host frame crossed) */
    int exec = c->kind == CH_EXEC, med = c->kind == CH_MED;
    switch (type) {
    case T_WINDOW: on_window(c, payload, len); break;
    case T_CLOSE: on_close(c); break;
    case T_STDIN: if (exec) host_data(c, payload, len); break;
    case T_RESIZE: if (exec) exec_resize(c, payload, len); break;
    case T_SIGNAL: if (exec) exec_signal(c, payload, len); break;
    case T_MED_OPENED: if (med) c->opened = 1; break;
    case T_DATA: if (med) host_data(c, payload, len); break;
    default: logmsg("frame type 0x%02x from the host ignored", type);
    }
}

static int known_type(int t)
{
    return (t >= T_HELLO && t <= T_PONG) || (t >= T_EXEC && t <= T_CLOSE) ||
           (t >= T_MED_OPEN && t <= T_DATA);
}

/* 1 if a host HELLO header starts at p (n bytes available), 0 if not, -1 if undecided. */
static int looks_like_hello(const unsigned char *p, size_t n)
{
    if (n < HDR)
        return -1;
    uint32_t len = get_be32(p);
    if (len > 4096 || get_be32(p + 4) != 0 || p[8] != T_HELLO)
        return 0;
    if (len == 0)
        return 1;
    return n == HDR ? -1 : p[HDR] == '{';
}

/* Skip garbage up to the next HELLO header; returns the offset parsing resumes at. */
static size_t resync(size_t pos)
{
    for (; pos < linlen; pos++) {
        int m = looks_like_hello(linbuf + pos, linlen - pos);
        if (m < 0)
            return pos;
        if (m == 1) {
            logmsg("resynchronised on a HELLO from the host");
            resyncing = 0;
            return pos;
        }
    }
    return pos;
}

static void parse_frames(void)
{
    size_t pos = 0;
    while (pos < linlen) {
        if (resyncing && (pos = resync(pos), resyncing))
            break;
        if (linlen - pos < HDR)
            break;
        uint32_t len = get_be32(linbuf + pos), ch = get_be32(linbuf + pos + 4);
        int type = linbuf[pos + 8];
        if (len > MAX_PAYLOAD || !known_type(type)) {
            logmsg("malformed frame (type 0x%02x, %u bytes): input dropped until the next "
                   "HELLO", type, len);
            resyncing = 1;
            pos++;
            continue;
        }
        if (linlen - pos < HDR + len)
            break;
        dispatch(ch, type, linbuf + pos + HDR, len);
        pos += HDR + len;
    }
    memmove(linbuf, linbuf + pos, linlen - pos);
    linlen -= pos;
}

/* ---- link state ------------------------------------------------------------------------ */

/* The host went away: with a socket the agent's job is over; with a port, its channels
 * are orphaned (their commands killed), and the agent waits for the next host. What the old
 * host left is dropped and input is skipped until a HELLO (the next host sends one first), so
 * a frame cut in half by the disconnect cannot swallow the new host's. Nothing is drained from
 * the port here: the next host may already be connected (a restored VM's port reports the old
 * host gone and the new one there at once), and its HELLO may already be waiting in it. */
static void link_lost(void)
{
    if (!link_is_port) {
        logmsg("the host closed the link; exiting");
        drop_all_channels();
        exit(0);
    }
    if (link_up) {
        logmsg("the host disconnected; dropping its channels");
        drop_all_channels();
        outq.off = outq.len = 0;
        linlen = 0;
        resyncing = 1;
    }
    link_up = 0;
    fcntl(link_fd, F_SETFL, fcntl(link_fd, F_GETFL) | O_ASYNC);   /* SIGIO on connect */
}

/* A port without a host polls POLLHUP; once that clears a host is there, and is told HELLO
 * (what was queued for the previous host went with it). A restored VM's port can report its
 * host gone and back after the agent already answered the new host's HELLO (the answer was
 * dropped with the old host's queue): this HELLO is then the one the host waits for. */
static void link_check(void)
{
    struct pollfd p = {.fd = link_fd, .events = POLLIN};
    if (link_up || poll(&p, 1, 0) < 0 || (p.revents & POLLHUP))
        return;
    link_up = 1;
    fcntl(link_fd, F_SETFL, fcntl(link_fd, F_GETFL) & ~O_ASYNC);
    logmsg("a host connected");
    queue_hello();
}

static void link_read(void)
{
    while (outq.len < OUTQ_HARD) {
        ssize_t n = read(link_fd, linbuf + linlen, sizeof linbuf - linlen);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            link_lost();
            return;
        }
        if (n < 0)
            return;
        linlen += (size_t)n;
        parse_frames();
    }
}

static void link_flush(void)
{
    while (link_up && outq.len) {
        ssize_t n = write(link_fd, buf_head(&outq), outq.len);
        if (n > 0)
            buf_consume(&outq, (size_t)n);
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && errno == EAGAIN)
            return;
        else
            link_lost();
    }
}

/* ---- the event loop -------------------------------------------------------------------- */

enum role { R_SIG, R_LINK, R_LISTEN, R_STATUS, R_OUT, R_ERR, R_IN, R_SOCK_IN, R_SOCK_OUT };

struct slot {
    enum role role;
    struct channel *c;
    unsigned gen;
    int listener;              /* R_LISTEN: index into listeners */
};

static int sig_r = -1, sig_w = -1;
static struct pollfd pfds[2 + MAX_LISTENERS + 4 * MAX_CHANNELS];
static struct slot slots[2 + MAX_LISTENERS + 4 * MAX_CHANNELS];
static int npfd;

static void watch(int fd, short events, enum role role, struct channel *c)
{
    if (fd < 0)
        return;
    pfds[npfd] = (struct pollfd){.fd = fd, .events = events};
    slots[npfd] = (struct slot){.role = role, .c = c, .gen = c ? c->gen : 0};
    npfd++;
}

/* Which fds of a channel to wait on: output only with window left and room in the queue;
 * input only while there is host data buffered for it. */
static void watch_channel(struct channel *c)
{
    int may_send = link_up && c->credit > 0 && outq.len < OUTQ_SOFT;
    if (c->kind == CH_EXEC) {
        watch(c->status_fd, POLLIN, R_STATUS, c);
        if (c->status_fd < 0 && may_send) {
            watch(c->out_fd, POLLIN, R_OUT, c);
            watch(c->err_fd, POLLIN, R_ERR, c);
        }
        if (c->in.len)
            watch(exec_input_fd(c), POLLOUT, R_IN, c);
    } else if (c->kind == CH_MED) {
        if (c->opened && !c->sock_eof && may_send)
            watch(c->sock, POLLIN, R_SOCK_IN, c);
        if (c->in.len)
            watch(c->sock, POLLOUT, R_SOCK_OUT, c);
    }
}

static void build_pollset(int64_t now)
{
    static int rr;
    npfd = 0;
    watch(sig_r, POLLIN, R_SIG, NULL);
    if (link_up)
        watch(link_fd, (short)((outq.len < OUTQ_HARD ? POLLIN : 0) | (outq.len ? POLLOUT : 0)),
              R_LINK, NULL);
    for (int i = 0; i < nlisteners; i++) {
        if (listeners[i].fd < 0 || now < listen_paused_until)
            continue;
        watch(listeners[i].fd, POLLIN, R_LISTEN, NULL);
        slots[npfd - 1].listener = i;
    }
    rr = (rr + 1) % MAX_CHANNELS;   /* rotate, so no channel starves the others */
    for (int i = 0; i < MAX_CHANNELS; i++)
        if (chans[(rr + i) % MAX_CHANNELS].kind != CH_FREE)
            watch_channel(&chans[(rr + i) % MAX_CHANNELS]);
}

static void drain_signals(void)
{
    char junk[64];
    while (read(sig_r, junk, sizeof junk) > 0)
        ;
    reap_children();
    link_check();
}

static void handle(int i)
{
    struct slot *s = &slots[i];
    short ev = pfds[i].revents;
    if (!ev || (s->c && (s->c->kind == CH_FREE || s->c->gen != s->gen)))
        return;   /* nothing, or the channel ended earlier in this round */
    switch (s->role) {
    case R_SIG: drain_signals(); break;
    case R_LINK:
        if (ev & POLLOUT)
            link_flush();
        if (link_up && (ev & (POLLIN | POLLHUP | POLLERR)))
            link_read();
        /* a port without a host, or a closed socket (read to the end above if room) */
        if (link_up && (ev & (POLLHUP | POLLERR)))
            link_lost();
        break;
    case R_LISTEN: med_accept(&listeners[s->listener]); break;
    case R_STATUS: exec_status(s->c); break;
    case R_OUT: exec_output(s->c, &s->c->out_fd, T_STDOUT); break;
    case R_ERR: exec_output(s->c, &s->c->err_fd, T_STDERR); break;
    case R_IN: pump_input(s->c, exec_input_fd(s->c)); break;
    case R_SOCK_IN: med_read(s->c); break;
    case R_SOCK_OUT: med_write(s->c); break;
    }
}

/* After each round: hand on ended input, finish what is over, send what is queued. */
static void settle(void)
{
    for (int i = 0; i < MAX_CHANNELS; i++) {
        struct channel *c = &chans[i];
        if (c->kind == CH_EXEC) {
            if (c->in.len && exec_input_fd(c) < 0)
                pump_input(c, -1);
            if (c->in_eof && !c->in.len && !c->in_done)
                exec_end_input(c);
            exec_maybe_finish(c);
        } else if (c->kind == CH_MED) {
            med_maybe_finish(c);
        }
    }
    link_flush();
}

static void loop(void)
{
    for (;;) {
        int64_t now = mono_ms();
        int timeout = check_deadlines(now);
        if (!link_up && link_is_port && (timeout < 0 || timeout > RECHECK_MS))
            timeout = RECHECK_MS;
        if (now < listen_paused_until && (timeout < 0 || timeout > 100))
            timeout = 100;
        build_pollset(now);
        int n = poll(pfds, (nfds_t)npfd, timeout);
        if (n < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            sleep(1);
        }
        for (int i = 0; n > 0 && i < npfd; i++)
            handle(i);
        if (!link_up && link_is_port)
            link_check();
        settle();
    }
}

/* ---- start-up ------------------------------------------------------------------------ */

static void on_signal(int sig)
{
    int saved = errno;
    char b = (char)sig;
    if (write(sig_w, &b, 1) < 0) { /* the pipe is full: a wake-up is pending anyway */ }
    errno = saved;
}

static void setup_signals(void)
{
    int p[2];
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) {
        logmsg("pipe: %s", strerror(errno));
        exit(1);
    }
    sig_r = p[0];
    sig_w = p[1];
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    sigaction(SIGIO, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* Stdio always open (so our pipes are never fds 0-2); fds inherited from the init (its
 * control port, say) closed, except the link; more fds for many channels. */
static void setup_fds(int keep)
{
    struct rlimit rl;
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            exit(1);
    if (close_range(3, keep > 3 ? (unsigned)keep - 1 : 2, 0) < 0 && errno == ENOSYS) {
        for (int fd = 3; fd < 1024; fd++)   /* kernels before 5.9 */
            if (fd != keep)
                close(fd);
    }
    close_range(keep >= 3 ? (unsigned)keep + 1 : 3, ~0U, 0);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 4096 && rl.rlim_max > rl.rlim_cur) {
        rl.rlim_cur = rl.rlim_max < 4096 ? rl.rlim_max : 4096;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: ma-agent (--port PATH | --fd N) [--root DIR] [--mediation-port N]\n"
            "                [--listen N]... [--log PATH]\n"
            "  --mediation-port N, --listen N: listen on 127.0.0.1:N (at most %d --listen,\n"
            "  ports 1-65535, none twice); a connection there becomes MED_OPEN {\"port\":N}\n",
            MAX_SERVICES);
    exit(2);
}

static __attribute__((format(printf, 1, 2))) void bad_arg(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "ma-agent: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    usage();
}

static long number_arg(const char *text, long max)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (!*text || *end || v < 0 || v > max)
        usage();
    return v;
}

/* One more port to listen on: the mediation port or a --listen port. */
static void add_listener(const char *opt, int port)
{
    if (port == 0)
        bad_arg("%s 0: ports are 1-65535", opt);
    for (int i = 0; i < nlisteners; i++)
        if (listeners[i].port == port)
            bad_arg("%s %d: the port is given twice", opt, port);
    listeners[nlisteners++] = (struct listener){.fd = -1, .port = port};
}

static void listen_arg(const char *val)
{
    if (nlisteners == MAX_SERVICES)   /* only --listen ports so far; the mediation port last */
        bad_arg("more than %d --listen ports", MAX_SERVICES);
    add_listener("--listen", (int)number_arg(val, 65535));
}

int main(int argc, char **argv)
{
    const char *port = NULL, *log_path = NULL;
    int fd = -1, med_port = 0;
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!val)
            usage();
        i++;
        if (strcmp(opt, "--port") == 0) port = val;
        else if (strcmp(opt, "--fd") == 0) fd = (int)number_arg(val, 65535);
        else if (strcmp(opt, "--root") == 0) root_dir = val;
        else if (strcmp(opt, "--mediation-port") == 0) med_port = (int)number_arg(val, 65535);
        else if (strcmp(opt, "--listen") == 0) listen_arg(val);
        else if (strcmp(opt, "--log") == 0) log_path = val;
        else usage();
    }
    if ((port == NULL) == (fd < 0) || !*root_dir)
        usage();
    if (med_port)   /* 0: none */
        add_listener("--mediation-port", med_port);
    setup_fds(fd);
    if (log_path && (log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600)) < 0)
        log_fd = 2;
    setup_signals();
    if (port) {
        link_is_port = 1;
        link_fd = open(port, O_RDWR | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (link_fd < 0) {
            logmsg("cannot open %s: %s", port, strerror(errno));
            return 1;
        }
        fcntl(link_fd, F_SETOWN, getpid());
        link_lost();
        link_check();
    } else {
        link_fd = fd;
        link_up = 1;
        set_nonblock(fd);
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    for (int i = 0; i < nlisteners; i++)
        med_listen(&listeners[i]);
    logmsg("version %s serving %s (root %s, listening on %d of %d ports)", AGENT_VERSION,
           port ? port : "an inherited fd", root_dir, listening(), nlisteners);
    if (!link_is_port)
        queue_hello();   /* a port's HELLO is queued when its host is there (link_check) */
    loop();
}
