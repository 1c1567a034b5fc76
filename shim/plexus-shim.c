/*
 * plexus: the CNI plugin binary the runtime execs, compiled and static (no Python on the node).
 *
 * It forwards the CNI_* environment and stdin to plexusd over its unix socket as one HTTP/1.0
 * request and prints the daemon's reply as is. VERSION is answered here; when the daemon
 * cannot be reached ADD/CHECK/GC answer CNI code 11, STATUS code 50, and DEL is written to a
 * durable spool (temp file, fsync, rename, fsync dir) that the daemon replays before serving
 * anything else. docs/shim-protocol.md is the contract; metaplugin/shim.py is the reference
 * implementation and tests/unit/test_shim_conformance.py holds both to the same bytes on stdout.
 *
 * Rules kept throughout: no shell and no exec, every read bounded (stdin 4 MiB, the reply
 * 16 MiB), every syscall's result checked (EINTR retried), and every failure becomes one line
 * of CNI error JSON on stdout with exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define DEFAULT_SOCKET "/run/plexus/plexus.sock"
#define DEFAULT_SPOOL "/var/lib/plexus/spool"
#define DEFAULT_TIMEOUT 120.0
#define MAX_TIMEOUT 86400.0
#define MAX_STDIN (4u * 1024 * 1024)   /* the daemon refuses far smaller bodies anyway */
#define MAX_REPLY (16u * 1024 * 1024)  /* a result JSON is a few KiB */
#define MAX_DEPTH 512                  /* = metaplugin/shim.py MAX_DEPTH */
#define DECODE_FAILURE 6
#define INVALID_CONFIG 7
#define TRY_AGAIN_LATER 11
#define NOT_AVAILABLE 50

static const char *const CNI_KEYS[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                       "CNI_IFNAME",  "CNI_ARGS",        "CNI_PATH"};
#define N_KEYS (sizeof CNI_KEYS / sizeof CNI_KEYS[0])
static const char SUPPORTED[] = "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]";

/* ---- growable byte buffers ---------------------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
};

/* Out of memory leaves nothing sensible to do: say so (without allocating) and stop. */
static void die_oom(void) {
    static const char msg[] = "{\"cniVersion\":\"1.0.0\",\"code\":11,"
                              "\"msg\":\"plexus shim: out of memory\",\"details\":\"\"}\n";
    ssize_t ignored = write(1, msg, sizeof msg - 1);
    (void)ignored;
    _exit(1);
}

static void reserve(struct buf *b, size_t extra) {
    if (extra > SIZE_MAX / 2 - b->len)
        die_oom();
    if (b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        die_oom();
    b->p = p;
    b->cap = cap;
}

static void put(struct buf *b, const void *data, size_t n) {
    reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0'; /* always a C string too, for paths and messages */
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void putf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(struct buf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp)
        die_oom(); /* only short numbers go through here */
    put(b, tmp, (size_t)n);
}

/* Code points: what a decoded JSON string is (it may hold lone surrogates, as Python's can). */
struct cps {
    uint32_t *p;
    size_t len, cap;
};

static void cp_push(struct cps *s, uint32_t c) {
    if (s->len == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        if (cap > SIZE_MAX / sizeof *s->p)
            die_oom();
        uint32_t *p = realloc(s->p, cap * sizeof *p);
        if (!p)
            die_oom();
        s->p = p;
        s->cap = cap;
    }
    s->p[s->len++] = c;
}

/* ---- system calls, EINTR-safe ------------------------------------------------------------- */

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static double now_monotonic(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0; /* cannot happen for CLOCK_MONOTONIC; a zero clock only shortens nothing */
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {0, ms * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* glibc's texts, which CPython (and so the Python shim) prints; musl words some differently. */
static const char *errtext(int e) {
    switch (e) {
    case ENOENT: return "No such file or directory";
    case ECONNREFUSED: return "Connection refused";
    case ENOTDIR: return "Not a directory";
    case EACCES: return "Permission denied";
    case EPERM: return "Operation not permitted";
    case ECONNRESET: return "Connection reset by peer";
    case EPIPE: return "Broken pipe";
    case ENAMETOOLONG: return "File name too long";
    case ELOOP: return "Too many levels of symbolic links";
    case EAGAIN: return "Resource temporarily unavailable";
    case ENOSPC: return "No space left on device";
    case EDQUOT: return "Disk quota exceeded";
    case EROFS: return "Read-only file system";
    case EEXIST: return "File exists";
    case EIO: return "Input/output error";
    case EISDIR: return "Is a directory";
    case ENOMEM: return "Cannot allocate memory";
    case EMFILE: return "Too many open files";
    case ENFILE: return "Too many open files in system";
    case EINVAL: return "Invalid argument";
    case EPROTOTYPE: return "Protocol wrong type for socket";
    case ENOTSOCK: return "Socket operation on non-socket";
    case ETIMEDOUT: return "Connection timed out";
    case EBADF: return "Bad file descriptor";
    case EFBIG: return "File too large";
    case ENXIO: return "No such device or address";
    case EOPNOTSUPP: return "Operation not supported";
    case EBUSY: return "Device or resource busy";
    case ETXTBSY: return "Text file busy";
    default: return strerror(e);
    }
}

/* ---- UTF-8 and JSON text out -------------------------------------------------------------- */

/* One UTF-8 sequence at s: its length (>0) and code point, or minus the length of the maximal
 * invalid subpart (what CPython replaces with one U+FFFD), following Unicode's table 3-7. */
static long utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    uint32_t v;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1, v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2, v = c & 0x0F;
        if (c == 0xE0)
            lo = 0xA0;
        if (c == 0xED)
            hi = 0x9F; /* no encoded surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3, v = c & 0x07;
        if (c == 0xF0)
            lo = 0x90;
        if (c == 0xF4)
            hi = 0x8F; /* nothing above U+10FFFF */
    } else {
        return -1;
    }
    for (size_t i = 1; i <= need; i++) {
        if (i >= n || s[i] < lo || s[i] > hi)
            return -(long)i;
        v = (v << 6) | (s[i] & 0x3F);
        lo = 0x80, hi = 0xBF;
    }
    *cp = v;
    return (long)need + 1;
}

/* Stdin as Python's bytes.decode("utf-8", "replace") leaves it: valid UTF-8. */
static void utf8_replace(const unsigned char *s, size_t n, struct buf *out) {
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        long k = utf8_next(s + i, n - i, &cp);
        if (k > 0) {
            put(out, s + i, (size_t)k);
            i += (size_t)k;
        } else {
            puts_(out, "\xEF\xBF\xBD");
            i += (size_t)-k;
        }
    }
}

/* Bytes to code points as Python decodes the environment (surrogateescape: a byte that is not
 * part of valid UTF-8 becomes U+DC80..U+DCFF). */
static void decode_escaped(const char *str, size_t n, struct cps *out) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        long k = utf8_next(s + i, n - i, &cp);
        if (k > 0) {
            cp_push(out, cp);
            i += (size_t)k;
        } else {
            cp_push(out, 0xDC00 + s[i]);
            i += 1;
        }
    }
}

static void put_u16_escape(struct buf *b, uint32_t unit) { putf(b, "\\u%04x", (unsigned)unit); }

/* A JSON string literal in ASCII only, exactly as Python's json.encoder escapes it. */
static void put_json_cps(struct buf *b, const uint32_t *s, size_t n) {
    puts_(b, "\"");
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c == '"')
            puts_(b, "\\\"");
        else if (c == '\\')
            puts_(b, "\\\\");
        else if (c == '\n')
            puts_(b, "\\n");
        else if (c == '\r')
            puts_(b, "\\r");
        else if (c == '\t')
            puts_(b, "\\t");
        else if (c == '\b')
            puts_(b, "\\b");
        else if (c == '\f')
            puts_(b, "\\f");
        else if (c >= 0x20 && c <= 0x7E) {
            char ch = (char)c;
            put(b, &ch, 1);
        } else if (c < 0x10000) {
            put_u16_escape(b, c);
        } else {
            uint32_t v = c - 0x10000;
            put_u16_escape(b, 0xD800 | (v >> 10));
            put_u16_escape(b, 0xDC00 | (v & 0x3FF));
        }
    }
    puts_(b, "\"");
}

static void put_json_bytes(struct buf *b, const char *s, size_t n) {
    struct cps c = {0};
    decode_escaped(s, n, &c);
    put_json_cps(b, c.p, c.len);
    free(c.p);
}

static void put_json_str(struct buf *b, const char *s) { put_json_bytes(b, s, strlen(s)); }

/* ---- JSON in: just enough of a parser to validate stdin and read four top-level keys ------ */

enum jtype { J_NONE, J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };
enum jerr { JSON_OK, JSON_INVALID, JSON_TOO_DEEP };

struct jval { /* a top-level value the shim looks at */
    enum jtype type;
    double num;
    struct cps str;
};

struct parser {
    const char *s;
    size_t n, i;
    int depth;
    enum jerr err;
};

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static void skip_ws(struct parser *p) {
    while (p->i < p->n && is_ws(p->s[p->i]))
        p->i++;
}

static int fail_json(struct parser *p, enum jerr e) {
    if (p->err == JSON_OK)
        p->err = e;
    return -1;
}

static int hex4(struct parser *p, uint32_t *out) {
    if (p->n - p->i < 4)
        return fail_json(p, JSON_INVALID);
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p->s[p->i++];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (uint32_t)(c - 'A' + 10);
        else
            return fail_json(p, JSON_INVALID);
    }
    *out = v;
    return 0;
}

/* A string at p->i (its opening quote); its code points go to out when out is not NULL. A high
 * surrogate escape followed by a low one is one code point, as Python decodes it. */
static int parse_string(struct parser *p, struct cps *out) {
    p->i++;
    while (p->i < p->n) {
        unsigned char c = (unsigned char)p->s[p->i];
        uint32_t cp;
        if (c == '"') {
            p->i++;
            return 0;
        }
        if (c < 0x20) /* strict: a raw control character is an error */
            return fail_json(p, JSON_INVALID);
        if (c != '\\') {
            long k = utf8_next((const unsigned char *)p->s + p->i, p->n - p->i, &cp);
            if (k <= 0) /* cannot happen: stdin was made valid UTF-8 */
                return fail_json(p, JSON_INVALID);
            p->i += (size_t)k;
        } else {
            if (++p->i >= p->n)
                return fail_json(p, JSON_INVALID);
            char e = p->s[p->i++];
            switch (e) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            case 'u':
                if (hex4(p, &cp) != 0)
                    return -1;
                if (cp >= 0xD800 && cp <= 0xDBFF && p->n - p->i >= 6 && p->s[p->i] == '\\' &&
                    p->s[p->i + 1] == 'u') {
                    size_t back = p->i;
                    uint32_t low;
                    p->i += 2;
                    if (hex4(p, &low) != 0)
                        return -1;
                    if (low >= 0xDC00 && low <= 0xDFFF)
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    else
                        p->i = back; /* a lone high surrogate; the next escape stands alone */
                }
                break;
            default: return fail_json(p, JSON_INVALID);
            }
        }
        if (out)
            cp_push(out, cp);
    }
    return fail_json(p, JSON_INVALID); /* unterminated */
}

static int digits(struct parser *p) {
    size_t start = p->i;
    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
        p->i++;
    return p->i > start;
}

static int literal(struct parser *p, const char *word) {
    size_t k = strlen(word);
    if (p->n - p->i < k || memcmp(p->s + p->i, word, k) != 0)
        return 0;
    p->i += k;
    return 1;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?, or NaN, Infinity, -Infinity (Python takes
 * them); its value goes to *num. */
static int parse_number(struct parser *p, double *num) {
    size_t start = p->i;
    double ignored;
    if (!num)
        num = &ignored; /* a value nobody reads (below the top level) */
    if (literal(p, "NaN")) {
        *num = NAN;
        return 0;
    }
    if (literal(p, "Infinity") || literal(p, "-Infinity")) {
        *num = p->s[start] == '-' ? -INFINITY : INFINITY;
        return 0;
    }
    if (p->i < p->n && p->s[p->i] == '-')
        p->i++;
    if (p->i < p->n && p->s[p->i] == '0')
        p->i++;
    else if (!digits(p))
        return fail_json(p, JSON_INVALID);
    if (p->n - p->i >= 2 && p->s[p->i] == '.' && p->s[p->i + 1] >= '0' && p->s[p->i + 1] <= '9') {
        p->i++;
        digits(p);
    }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        size_t mark = p->i++;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-'))
            p->i++;
        if (!digits(p))
            p->i = mark; /* "1e" is the number 1 followed by junk, as Python reads it */
    }
    if (num != &ignored) {
        char *copy = strndup(p->s + start, p->i - start);
        if (!copy)
            die_oom();
        *num = strtod(copy, NULL); /* the C locale: a static binary never changes it */
        free(copy);
    }
    return 0;
}

static int parse_value(struct parser *p, struct jval *out);

/* An array or object at p->i. For the top-level object, `names` lists the keys the shim reads
 * and `keys` receives their values, the last of duplicates winning as in a Python dict. */
static int parse_container(struct parser *p, char close, struct jval *keys[], const char **names,
                           size_t n_names) {
    if (++p->depth > MAX_DEPTH)
        return fail_json(p, JSON_TOO_DEEP);
    p->i++;
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == close) {
        p->i++;
        p->depth--;
        return 0;
    }
    for (;;) {
        struct jval *slot = NULL;
        skip_ws(p);
        if (close == '}') {
            struct cps key = {0};
            if (p->i >= p->n || p->s[p->i] != '"')
                return fail_json(p, JSON_INVALID);
            if (parse_string(p, names ? &key : NULL) != 0) {
                free(key.p);
                return -1;
            }
            for (size_t k = 0; names && k < n_names; k++) {
                size_t len = strlen(names[k]);
                size_t j = 0;
                while (j < len && j < key.len && key.p[j] == (unsigned char)names[k][j])
                    j++;
                if (j == len && key.len == len)
                    slot = keys[k];
            }
            free(key.p);
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':')
                return fail_json(p, JSON_INVALID);
            p->i++;
            skip_ws(p);
        }
        if (slot) {
            free(slot->str.p);
            memset(slot, 0, sizeof *slot);
        }
        if (parse_value(p, slot) != 0)
            return -1;
        skip_ws(p);
        if (p->i < p->n && p->s[p->i] == ',') {
            p->i++;
            continue;
        }
        if (p->i < p->n && p->s[p->i] == close) {
            p->i++;
            p->depth--;
            return 0;
        }
        return fail_json(p, JSON_INVALID);
    }
}

static int parse_value(struct parser *p, struct jval *out) {
    struct jval ignored = {0};
    if (!out)
        out = &ignored;
    if (p->i >= p->n)
        return fail_json(p, JSON_INVALID);
    char c = p->s[p->i];
    if (c == '"') {
        out->type = J_STR;
        return parse_string(p, out == &ignored ? NULL : &out->str);
    }
    if (c == '{') {
        out->type = J_OBJ;
        return parse_container(p, '}', NULL, NULL, 0);
    }
    if (c == '[') {
        out->type = J_ARR;
        return parse_container(p, ']', NULL, NULL, 0);
    }
    if (literal(p, "null")) {
        out->type = J_NULL;
        return 0;
    }
    if (literal(p, "true") || literal(p, "false")) {
        out->type = J_BOOL;
        return 0;
    }
    out->type = J_NUM;
    return parse_number(p, out == &ignored ? NULL : &out->num);
}

/* The config on stdin. Returns NULL when it is a JSON object (the keys filled in), else the
 * reason it is not, as the Python shim words it. */
static const char *parse_config(const struct buf *text, struct jval *keys[], const char **names,
                                size_t n_names) {
    struct parser p = {text->p, text->len, 0, 0, JSON_OK};
    struct jval top = {0};
    skip_ws(&p);
    int rc;
    if (p.i < p.n && p.s[p.i] == '{') {
        top.type = J_OBJ;
        rc = parse_container(&p, '}', keys, names, n_names);
    } else {
        rc = parse_value(&p, &top);
    }
    if (rc == 0) {
        skip_ws(&p);
        if (p.i < p.n)
            rc = fail_json(&p, JSON_INVALID); /* extra data after the value */
    }
    if (rc != 0)
        return p.err == JSON_TOO_DEEP ? "it nests deeper than 512 levels" : "it is not valid JSON";
    switch (top.type) {
    case J_OBJ: return NULL;
    case J_ARR: return "it is an array";
    case J_STR: return "it is a string";
    case J_NUM: return "it is a number";
    case J_BOOL: return "it is a boolean";
    default: return "it is null";
    }
}

/* ---- the shim's own answers --------------------------------------------------------------- */

static struct cps version; /* the config's cniVersion, or 1.0.0 */

static void set_version(const char *ascii) {
    version.len = 0;
    for (const char *c = ascii; *c; c++)
        cp_push(&version, (unsigned char)*c);
}

/* One line of CNI error JSON on stdout; exit status 1. msg and details are UTF-8. */
static int fail(int code, const char *msg, const char *details) {
    struct buf b = {0};
    puts_(&b, "{\"cniVersion\":");
    put_json_cps(&b, version.p, version.len);
    putf(&b, ",\"code\":%d,\"msg\":", code);
    put_json_str(&b, msg);
    puts_(&b, ",\"details\":");
    put_json_str(&b, details);
    puts_(&b, "}\n");
    write_all(1, b.p, b.len);
    free(b.p);
    return 1;
}

/* What a config value is, for a message: ascii() of a string, as Python writes it, else its
 * JSON type. */
static void describe(struct buf *b, const struct jval *v) {
    static const char *kinds[] = {"null", "null", "a boolean", "a number", "",
                                  "an array", "an object"};
    if (v->type != J_STR) {
        puts_(b, kinds[v->type]);
        return;
    }
    char quote = '\'';
    int single = 0, dbl = 0;
    for (size_t i = 0; i < v->str.len; i++) {
        single |= v->str.p[i] == '\'';
        dbl |= v->str.p[i] == '"';
    }
    if (single && !dbl)
        quote = '"';
    put(b, &quote, 1);
    for (size_t i = 0; i < v->str.len; i++) {
        uint32_t c = v->str.p[i];
        if (c == (uint32_t)quote || c == '\\')
            putf(b, "\\%c", (char)c);
        else if (c == '\t')
            puts_(b, "\\t");
        else if (c == '\n')
            puts_(b, "\\n");
        else if (c == '\r')
            puts_(b, "\\r");
        else if (c < 0x20 || c == 0x7F)
            putf(b, "\\x%02x", (unsigned)c);
        else if (c < 0x7F) {
            char ch = (char)c;
            put(b, &ch, 1);
        } else if (c < 0x100)
            putf(b, "\\x%02x", (unsigned)c);
        else if (c < 0x10000)
            putf(b, "\\u%04x", (unsigned)c);
        else
            putf(b, "\\U%08x", (unsigned)c);
    }
    put(b, &quote, 1);
}

/* A non-empty string the kernel can take as a path (no NUL, no lone surrogate), as UTF-8. */
static int as_path(const struct jval *v, struct buf *out) {
    if (v->type != J_STR || v->str.len == 0)
        return 0;
    for (size_t i = 0; i < v->str.len; i++) {
        uint32_t c = v->str.p[i];
        unsigned char u[4];
        size_t k;
        if (c == 0 || (c >= 0xD800 && c <= 0xDFFF))
            return 0;
        if (c < 0x80)
            u[0] = (unsigned char)c, k = 1;
        else if (c < 0x800)
            u[0] = (unsigned char)(0xC0 | (c >> 6)), u[1] = (unsigned char)(0x80 | (c & 0x3F)),
            k = 2;
        else if (c < 0x10000)
            u[0] = (unsigned char)(0xE0 | (c >> 12)),
            u[1] = (unsigned char)(0x80 | ((c >> 6) & 0x3F)),
            u[2] = (unsigned char)(0x80 | (c & 0x3F)), k = 3;
        else
            u[0] = (unsigned char)(0xF0 | (c >> 18)),
            u[1] = (unsigned char)(0x80 | ((c >> 12) & 0x3F)),
            u[2] = (unsigned char)(0x80 | ((c >> 6) & 0x3F)),
            u[3] = (unsigned char)(0x80 | (c & 0x3F)), k = 4;
        put(out, u, k);
    }
    return 1;
}

/* ---- the request -------------------------------------------------------------------------- */

struct answer {
    int status;
    struct buf body;
};

/* Why the daemon counts as unreachable, for the message; written into a static buffer. */
static char why_buf[256];

static int unreachable_because(const char *reason) {
    snprintf(why_buf, sizeof why_buf, "%s", reason);
    return -1;
}

static int timed_out(double timeout) {
    snprintf(why_buf, sizeof why_buf, "no answer within %g s", timeout);
    return -1;
}

/* Wait for fd to be ready for `events` until the deadline: 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, double deadline) {
    for (;;) {
        double left = deadline - now_monotonic();
        int ms = left <= 0.001 ? 1 : left > 86400.0 * 2 ? 86400 * 2000 : (int)(left * 1000) + 1;
        struct pollfd pfd = {fd, events, 0};
        int r = poll(&pfd, 1, ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r > 0)
            return 1;
        if (now_monotonic() >= deadline)
            return 0;
    }
}

/* Connect before the deadline. A full listen backlog (EAGAIN, a burst of pods) is a busy
 * daemon, not a dead one: retry every 5 ms. Anything else is "unreachable". */
static int connect_daemon(int fd, const char *path, size_t path_len, double deadline,
                          double timeout) {
    struct sockaddr_un addr;
    if (path_len > sizeof addr.sun_path)
        return unreachable_because("AF_UNIX path too long");
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, path_len);
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len);
    for (;;) {
        if (connect(fd, (struct sockaddr *)&addr, len) == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            if (now_monotonic() >= deadline)
                return unreachable_because("its listen queue stayed full until the deadline");
            sleep_ms(5);
            continue;
        }
        if (errno != EINPROGRESS)
            return unreachable_because(errtext(errno));
        int ready = wait_fd(fd, POLLOUT, deadline);
        int err = 0;
        socklen_t elen = sizeof err;
        if (ready == 0)
            return timed_out(timeout);
        if (ready < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0)
            return unreachable_because(errtext(errno));
        if (err != 0)
            return unreachable_because(errtext(err));
        return 0;
    }
}

static int send_all(int fd, const char *p, size_t n, double deadline, double timeout) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            int ready = wait_fd(fd, POLLOUT, deadline);
            if (ready == 0)
                return timed_out(timeout);
            if (ready < 0)
                return unreachable_because(errtext(errno));
            continue;
        }
        if (w < 0)
            return unreachable_because(errtext(errno));
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read until the daemon closes the connection (HTTP/1.0), at most MAX_REPLY bytes. */
static int recv_all(int fd, struct buf *reply, double deadline, double timeout) {
    for (;;) {
        int ready = wait_fd(fd, POLLIN, deadline);
        if (ready == 0)
            return timed_out(timeout);
        if (ready < 0)
            return unreachable_because(errtext(errno));
        reserve(reply, 65536);
        ssize_t r = recv(fd, reply->p + reply->len, 65536, 0);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r < 0)
            return unreachable_because(errtext(errno));
        if (r == 0)
            return 0;
        reply->len += (size_t)r;
        reply->p[reply->len] = '\0';
        if (reply->len > MAX_REPLY)
            return unreachable_because("its answer was larger than 16777216 bytes");
    }
}

static int is_digits(const char *s, size_t n) {
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* Decimal digits to a number, saturating: anything past 2^62 is "too long" for every use. */
static uint64_t number_of(const char *s, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        v = v * 10 + (uint64_t)(s[i] - '0');
        if (v > ((uint64_t)1 << 62))
            return (uint64_t)1 << 62;
    }
    return v;
}

static int is_space_byte(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* The reply: status line, headers up to the first blank line, the body cut to Content-Length.
 * Anything incomplete is the daemon dying mid-answer, i.e. unreachable. */
static int parse_reply(const struct buf *reply, struct answer *out) {
    static const char incomplete[] = "the connection closed before a complete answer";
    const char *end = memmem(reply->p, reply->len, "\r\n\r\n", 4);
    if (!end)
        return unreachable_because(incomplete);
    const char *payload = end + 4;
    size_t payload_len = reply->len - (size_t)(payload - reply->p);
    const char *line_end = memmem(reply->p, (size_t)(end - reply->p) + 2, "\r\n", 2);
    /* the status line: "<version> <code>[ <reason>]", split on the first two spaces */
    size_t first_len = (size_t)(line_end - reply->p);
    const char *sp1 = memchr(reply->p, ' ', first_len);
    if (!sp1 || first_len < 5 || memcmp(reply->p, "HTTP/", 5) != 0 || sp1 - reply->p < 5)
        return unreachable_because(incomplete);
    const char *code = sp1 + 1;
    const char *sp2 = memchr(code, ' ', (size_t)(line_end - code));
    size_t code_len = (size_t)((sp2 ? sp2 : line_end) - code);
    if (!is_digits(code, code_len))
        return unreachable_because(incomplete);
    uint64_t status = number_of(code, code_len);
    for (const char *line = line_end + 2; line < end + 2;) {
        const char *next = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        const char *colon = memchr(line, ':', (size_t)(next - line));
        if (colon) {
            const char *n0 = line, *n1 = colon, *v0 = colon + 1, *v1 = next;
            while (n0 < n1 && is_space_byte(*n0))
                n0++;
            while (n1 > n0 && is_space_byte(n1[-1]))
                n1--;
            while (v0 < v1 && is_space_byte(*v0))
                v0++;
            while (v1 > v0 && is_space_byte(v1[-1]))
                v1--;
            if (n1 - n0 == 14 && strncasecmp(n0, "content-length", 14) == 0 &&
                is_digits(v0, (size_t)(v1 - v0))) {
                uint64_t length = number_of(v0, (size_t)(v1 - v0));
                if (payload_len < length) /* the daemon died while it answered */
                    return unreachable_because(incomplete);
                payload_len = (size_t)length;
            }
        }
        line = next + 2;
    }
    out->status = status > 999999 ? -1 : (int)status;
    put(&out->body, payload, payload_len);
    return 0;
}

/* POST /cni over the unix socket. 0 and the answer, or -1 with why_buf saying why not. */
static int request(const char *path, size_t path_len, const struct buf *body, double timeout,
                   struct answer *out) {
    double deadline = now_monotonic() + timeout;
    struct buf msg = {0}, reply = {0};
    putf(&msg, "POST /cni HTTP/1.0\r\nHost: plexusd\r\nContent-Type: application/json\r\n"
               "Content-Length: %zu\r\n\r\n", body->len);
    put(&msg, body->p, body->len);
    int rc = -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        unreachable_because(errtext(errno));
    else if (connect_daemon(fd, path, path_len, deadline, timeout) == 0 &&
             send_all(fd, msg.p, msg.len, deadline, timeout) == 0 &&
             recv_all(fd, &reply, deadline, timeout) == 0)
        rc = parse_reply(&reply, out);
    if (fd >= 0)
        close(fd); /* nothing to do about a failed close of a socket we are done with */
    free(msg.p);
    free(reply.p);
    return rc;
}

/* ---- the spool ---------------------------------------------------------------------------- */

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* os.makedirs(path, 0o700, exist_ok=True), step for step: parents first (with the default
 * mode), the leaf with 0700, "exists already as a directory" is fine. Sets errno on failure. */
static int makedirs(const char *path) {
    size_t n = strlen(path);
    char *head = strdup(path);
    if (!head)
        die_oom();
    size_t cut = n;
    while (cut > 0 && head[cut - 1] != '/')
        cut--;
    const char *tail = path + cut;
    if (*tail == '\0') { /* "a/b/": split once more, as os.path.split does */
        size_t h = cut;
        while (h > 0 && head[h - 1] == '/')
            h--;
        while (h > 0 && head[h - 1] != '/')
            h--;
        tail = path + h;
        cut = h;
    }
    head[cut] = '\0';
    size_t hl = cut; /* strip the head's trailing slashes, unless it is all slashes */
    while (hl > 0 && head[hl - 1] == '/')
        hl--;
    if (hl > 0)
        head[hl] = '\0';
    struct stat st;
    if (head[0] && *tail && stat(head, &st) != 0) {
        if (makedirs(head) != 0 && errno != EEXIST) {
            int e = errno;
            free(head);
            errno = e;
            return -1;
        }
        if (strcmp(tail, ".") == 0 || strncmp(tail, "./", 2) == 0) {
            free(head);
            return 0;
        }
    }
    free(head);
    if (mkdir(path, 0700) == 0)
        return 0;
    int e = errno;
    if (is_dir(path))
        return 0;
    errno = e;
    return -1;
}

static int fsync_retry(int fd) {
    while (fsync(fd) != 0) {
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

/* ASCII letters, digits, '-', '_' and '.' only, cut to limit characters: nothing else reaches
 * a file name. A character is a code point of the value as Python decodes the environment. */
static void put_safe(struct buf *b, const char *value, size_t limit) {
    struct cps c = {0};
    decode_escaped(value, strlen(value), &c);
    for (size_t i = 0; i < c.len && i < limit; i++) {
        uint32_t x = c.p[i];
        int keep = (x >= 'a' && x <= 'z') || (x >= 'A' && x <= 'Z') || (x >= '0' && x <= '9') ||
                   x == '-' || x == '_' || x == '.';
        char ch = keep ? (char)x : '_';
        put(b, &ch, 1);
    }
    free(c.p);
}

/* Python's repr() of a float (the shortest text that reads back the same). */
static void put_float_repr(struct buf *b, double v) {
    char tmp[64];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, v);
        if (strtod(tmp, NULL) == v)
            break;
    }
    char digits_[32];
    size_t nd = 0;
    const char *c = tmp;
    if (*c == '-')
        puts_(b, "-"), c++;
    for (; *c && *c != 'e'; c++)
        if (*c != '.')
            digits_[nd++] = *c;
    int exp = atoi(c + 1);
    while (nd > 1 && digits_[nd - 1] == '0')
        nd--;
    if (exp < -4 || exp >= 16) {
        put(b, digits_, 1);
        if (nd > 1) {
            puts_(b, ".");
            put(b, digits_ + 1, nd - 1);
        }
        putf(b, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    } else if (exp < 0) {
        puts_(b, "0.");
        for (int i = -1; i > exp; i--)
            puts_(b, "0");
        put(b, digits_, nd);
    } else {
        for (int i = 0; i <= exp; i++)
            put(b, i < (int)nd ? &digits_[i] : "0", 1);
        puts_(b, ".");
        if ((int)nd > exp + 1)
            put(b, digits_ + exp + 1, nd - (size_t)exp - 1);
        else
            puts_(b, "0");
    }
}

/* Write tmp, fsync it, rename it to final; on failure remove tmp (a half-written entry must
 * not linger; the daemon reads only *.json) and return -1 with errno set. */
static int write_entry(const char *tmp, const char *final, const struct buf *entry) {
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    int e = 0;
    errno = 0; /* write_all fails without errno only on a zero-length write */
    if (write_all(fd, entry->p, entry->len) != 0 || fsync_retry(fd) != 0)
        e = errno ? errno : EIO;
    if (close(fd) != 0 && e == 0)
        e = errno;
    if (e == 0 && rename(tmp, final) != 0)
        e = errno;
    if (e == 0)
        return 0;
    unlink(tmp);
    errno = e;
    return -1;
}

/* Durably record a DEL for the daemon to replay: write .<name>.tmp, fsync, rename to <name>,
 * fsync the directory. Returns 0, or -1 with errno set. */
static int spool(const char *dir, const struct buf *entry_env, const struct buf *config) {
    if (makedirs(dir) != 0)
        return -1;
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return -1;
    const char *cid = getenv("CNI_CONTAINERID"), *ifname = getenv("CNI_IFNAME");
    struct buf name = {0}, tmp = {0}, final = {0}, entry = {0};
    putf(&name, "%lld%09ld-", (long long)now.tv_sec, now.tv_nsec);
    put_safe(&name, cid ? cid : "", 80);
    puts_(&name, "-");
    put_safe(&name, ifname ? ifname : "", 15);
    puts_(&name, ".json");
    const char *sep = dir[strlen(dir) - 1] == '/' ? "" : "/";
    puts_(&tmp, dir), puts_(&tmp, sep), puts_(&tmp, "."), put(&tmp, name.p, name.len);
    puts_(&tmp, ".tmp");
    puts_(&final, dir), puts_(&final, sep), put(&final, name.p, name.len);
    puts_(&entry, "{\"env\":");
    put(&entry, entry_env->p, entry_env->len);
    puts_(&entry, ",\"config\":");
    put_json_bytes(&entry, config->p, config->len);
    puts_(&entry, ",\"spooledAt\":");
    put_float_repr(&entry, (double)now.tv_sec + (double)now.tv_nsec / 1e9);
    puts_(&entry, "}");

    int rc = write_entry(tmp.p, final.p, &entry);
    int e = errno;
    if (rc == 0) { /* the rename is durable only once the directory is */
        int dfd = open(dir, O_RDONLY | O_CLOEXEC);
        if (dfd < 0 || fsync_retry(dfd) != 0)
            rc = -1, e = errno;
        if (dfd >= 0)
            close(dfd);
    }
    free(name.p), free(tmp.p), free(final.p), free(entry.p);
    errno = e;
    return rc;
}

/* ---- main --------------------------------------------------------------------------------- */

/* The daemon is down: spool a DEL (success), refuse everything else with a clear code. */
static int unreachable(const char *command, const struct jval *spool_dir, const char *why,
                       const struct buf *env_json, const struct buf *config) {
    struct buf msg = {0};
    int rc;
    puts_(&msg, why);
    if (strcmp(command, "DEL") == 0) {
        struct buf dir = {0};
        int usable = spool_dir->type == J_NONE || spool_dir->type == J_NULL ||
                     (spool_dir->type == J_STR && spool_dir->str.len == 0);
        if (usable)
            puts_(&dir, DEFAULT_SPOOL);
        else if (!as_path(spool_dir, &dir) || dir.p[0] != '/') {
            /* A relative or non-string path would spool where the daemon never looks. */
            puts_(&msg, "; spoolDir must be an absolute path, not ");
            describe(&msg, spool_dir);
            free(dir.p);
            rc = fail(INVALID_CONFIG, msg.p, "");
            free(msg.p);
            return rc;
        }
        rc = 0;
        if (spool(dir.p, env_json, config) != 0) {
            puts_(&msg, "; spooling the DEL failed too: ");
            puts_(&msg, errtext(errno));
            rc = fail(TRY_AGAIN_LATER, msg.p, "");
        }
        free(dir.p);
    } else if (strcmp(command, "STATUS") == 0) {
        rc = fail(NOT_AVAILABLE, msg.p, "");
    } else {
        puts_(&msg, "; retry once the plexusd pod is running");
        rc = fail(TRY_AGAIN_LATER, msg.p, "check the plexusd DaemonSet pod on this node and its logs");
    }
    free(msg.p);
    return rc;
}

/* Stdin to the end, at most MAX_STDIN bytes: 0, 1 when there is more, -1 on a read error. */
static int read_stdin(struct buf *raw) {
    for (;;) {
        reserve(raw, 65536);
        ssize_t r = read(0, raw->p + raw->len, 65536);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN) { /* a non-blocking pipe from the runtime: wait for it */
            struct pollfd pfd = {0, POLLIN, 0};
            if (poll(&pfd, 1, -1) >= 0 || errno == EINTR)
                continue;
            return -1;
        }
        if (r < 0)
            return -1;
        if (r == 0)
            return 0;
        raw->len += (size_t)r;
        if (raw->len > MAX_STDIN)
            return 1;
    }
}

/* {"CNI_COMMAND":...,...}: the variables of CNI_KEYS that are set, in that order. */
static void env_json(struct buf *b) {
    puts_(b, "{");
    int first = 1;
    for (size_t k = 0; k < N_KEYS; k++) {
        const char *value = getenv(CNI_KEYS[k]);
        if (!value)
            continue;
        if (!first)
            puts_(b, ",");
        first = 0;
        put_json_str(b, CNI_KEYS[k]);
        puts_(b, ":");
        put_json_str(b, value);
    }
    puts_(b, "}");
}

int main(void) {
    /* A runtime that stops reading our stdout must not kill us mid-spool. */
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
        return fail(TRY_AGAIN_LATER, "plexus shim: cannot ignore SIGPIPE", "");
    set_version("1.0.0");
    const char *command = getenv("CNI_COMMAND");
    if (!command)
        command = "";
    struct buf raw = {0}, config = {0};
    int got = read_stdin(&raw);
    if (got < 0) {
        struct buf msg = {0};
        puts_(&msg, "network configuration on stdin cannot be read: ");
        puts_(&msg, errtext(errno));
        return fail(DECODE_FAILURE, msg.p, "");
    }
    if (got > 0)
        return fail(DECODE_FAILURE, "network configuration on stdin is larger than 4194304 bytes",
                    "");
    utf8_replace((const unsigned char *)raw.p, raw.len, &config);
    free(raw.p);
    reserve(&config, 0);

    struct jval sock = {0}, timeout_v = {0}, spool_dir = {0}, cni_version = {0};
    struct jval *keys[] = {&sock, &timeout_v, &spool_dir, &cni_version};
    const char *names[] = {"socketPath", "shimTimeout", "spoolDir", "cniVersion"};
    struct buf empty = {0};
    puts_(&empty, "{}");
    const char *not_object = parse_config(config.len ? &config : &empty, keys, names, 4);
    if (not_object) {
        struct buf msg = {0};
        puts_(&msg, "network configuration on stdin is not a JSON object: ");
        puts_(&msg, not_object);
        return fail(DECODE_FAILURE, msg.p, "");
    }
    if (cni_version.type == J_STR) {
        version.len = 0;
        for (size_t i = 0; i < cni_version.str.len; i++)
            cp_push(&version, cni_version.str.p[i]);
    }
    if (strcmp(command, "VERSION") == 0) {
        struct buf out = {0};
        puts_(&out, "{\"cniVersion\":");
        put_json_cps(&out, version.p, version.len);
        puts_(&out, ",\"supportedVersions\":");
        puts_(&out, SUPPORTED);
        puts_(&out, "}\n");
        return write_all(1, out.p, out.len) == 0 ? 0 : 1;
    }

    struct buf path = {0};
    if (sock.type == J_NONE || sock.type == J_NULL || (sock.type == J_STR && sock.str.len == 0)) {
        puts_(&path, DEFAULT_SOCKET);
    } else if (!as_path(&sock, &path)) {
        struct buf msg = {0};
        puts_(&msg, "socketPath must be a path string, not ");
        describe(&msg, &sock);
        return fail(INVALID_CONFIG, msg.p, "");
    }
    double timeout = DEFAULT_TIMEOUT;
    /* A deadline is always in force: one the shim cannot use falls back to 120 s. */
    if (timeout_v.type == J_NUM && timeout_v.num > 0 && timeout_v.num <= MAX_TIMEOUT)
        timeout = timeout_v.num;

    struct buf env = {0}, body = {0};
    env_json(&env);
    puts_(&body, "{\"env\":");
    put(&body, env.p, env.len);
    puts_(&body, ",\"config\":");
    put_json_bytes(&body, config.p, config.len);
    puts_(&body, "}");

    struct answer answer = {0, {0}};
    if (request(path.p, path.len, &body, timeout, &answer) != 0) {
        struct buf why = {0};
        puts_(&why, "plexusd is not reachable at ");
        put(&why, path.p, path.len);
        puts_(&why, " (");
        puts_(&why, why_buf);
        puts_(&why, ")");
        return unreachable(command, &spool_dir, why.p, &env, &config);
    }
    if (answer.body.len) {
        if (answer.body.p[answer.body.len - 1] != '\n')
            put(&answer.body, "\n", 1);
        if (write_all(1, answer.body.p, answer.body.len) != 0)
            return 1;
    }
    return answer.status == 200 ? 0 : 1;
}
