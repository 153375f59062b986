/* Fixed-rate HTTP/1.1 load generator for Weft's latency benchmark (wrk2 is not packaged).
 *
 * Usage: paced_client HOST PORT RATE SECONDS [CONNS [PATH]]
 *
 * Request i of the run is due at T0 + i/RATE and is sent on keep-alive connection i % CONNS, by
 * that connection's own thread, which sleeps until the due time with clock_nanosleep(TIMER_ABSTIME)
 * (timer slack 1 ns, so the kernel does not batch the wake-ups). Each latency runs from the *due*
 * time to the end of the response, so a stall is charged to every request it delays (no coordinated
 * omission). The thread blocks while it waits (no spinning): the client takes little CPU from the
 * server it measures. If a response comes back after the connection's next request was due, that
 * request is sent late; "behind" counts the sends that left more than one connection interval
 * (CONNS/RATE) late: when that count is not small, use more connections.
 *
 * Responses must carry Content-Length (chunked or close-delimited bodies are refused) and a 2xx
 * status; any error ends the program with a message on stderr and exit status 1.
 * Prints one JSON line: p50_us, p99_us, p999_us, max_us (latency from the due time), send_lag_p99_us
 * (how late sends left: the client's own wake-up delay, plus any queueing behind a slow response),
 * wake_p99_us (how late this client's threads woke when their connection was idle at the due time:
 * the client's own share, which a busy machine inflates), sent_p99_us (from the actual send: the
 * server's part alone), n, conns, rate (requests completed per second of the run), behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE 65536

struct conn {
    int fd;
    int index;
    char buf[BUF_SIZE];
    size_t have;
    long n;           /* requests this connection sends */
    int64_t *lat_ns;  /* due -> response end */
    int64_t *lag_ns;  /* due -> send */
    int64_t *svc_ns;  /* send -> response end */
    int64_t *wake_ns; /* due -> send, for requests whose connection was idle when they were due */
    long n_wake;
    long behind;
    int64_t last_end_ns;
};

static const char *g_request;
static size_t g_request_len;
static int64_t g_t0_ns;
static int64_t g_period_ns; /* between two consecutive requests of the whole run */
static int g_conns;

static void die(const char *what) {
    fprintf(stderr, "paced_client: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static void fail(const char *msg) {
    fprintf(stderr, "paced_client: %s\n", msg);
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_until(int64_t t_ns) {
    struct timespec ts = {.tv_sec = t_ns / 1000000000, .tv_nsec = t_ns % 1000000000};
    int rc;
    while ((rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL)) == EINTR) {
    }
    if (rc != 0) {
        errno = rc;
        die("clock_nanosleep");
    }
}

static void send_all(int fd, const char *p, size_t len) {
    while (len > 0) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        p += w;
        len -= (size_t)w;
    }
}

/* Length of the complete response at the start of buf (headers + Content-Length body), 0 when more
 * bytes are needed. */
static size_t response_length(const char *buf, size_t have) {
    const char *end = memmem(buf, have, "\r\n\r\n", 4);
    if (end == NULL) {
        if (have == BUF_SIZE) fail("response headers larger than the buffer");
        return 0;
    }
    size_t head = (size_t)(end - buf) + 4;
    if (have < 12 || memcmp(buf, "HTTP/1.", 7) != 0) fail("not an HTTP/1.x response");
    if (buf[9] != '2') fail("non-2xx response status");
    long body = -1;
    /* header lines start after a CRLF; the status line is skipped */
    for (const char *line = memmem(buf, head, "\r\n", 2); line != NULL && line + 2 < end;
         line = memmem(line + 2, (size_t)(end - line - 2) + 2, "\r\n", 2)) {
        const char *h = line + 2;
        if (strncasecmp(h, "content-length:", 15) == 0) {
            const char *v = h + 15;
            while (*v == ' ' || *v == '\t') v++;
            if (*v < '0' || *v > '9') fail("bad Content-Length");
            char *stop;
            errno = 0;
            body = strtol(v, &stop, 10);
            if (errno != 0 || body < 0) fail("bad Content-Length");
        } else if (strncasecmp(h, "transfer-encoding:", 18) == 0) {
            fail("Transfer-Encoding responses are not supported (need Content-Length)");
        }
    }
    if (body < 0) fail("response without Content-Length");
    if (head + (size_t)body > BUF_SIZE) fail("response larger than the buffer");
    return have >= head + (size_t)body ? head + (size_t)body : 0;
}

static void read_response(struct conn *c) {
    size_t len;
    while ((len = response_length(c->buf, c->have)) == 0) {
        ssize_t r = recv(c->fd, c->buf + c->have, BUF_SIZE - c->have, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("recv");
        }
        if (r == 0) fail("server closed the connection");
        c->have += (size_t)r;
    }
    /* keep bytes past this response (none without pipelining, but never drop them) */
    memmove(c->buf, c->buf + len, c->have - len);
    c->have -= len;
}

static void *run_conn(void *arg) {
    struct conn *c = arg;
    if (prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL) != 0) die("prctl(PR_SET_TIMERSLACK)");
    int64_t slice_ns = g_period_ns * g_conns; /* between two requests of this connection */
    for (long k = 0; k < c->n; k++) {
        int64_t due = g_t0_ns + (c->index + k * g_conns) * g_period_ns;
        sleep_until(due);
        int64_t sent = now_ns();
        send_all(c->fd, g_request, g_request_len);
        read_response(c);
        int64_t end = now_ns();
        c->lat_ns[k] = end - due;
        c->lag_ns[k] = sent - due;
        c->svc_ns[k] = end - sent;
        if (c->last_end_ns <= due) c->wake_ns[c->n_wake++] = sent - due;
        if (sent - due > slice_ns) c->behind++;
        c->last_end_ns = end;
    }
    return NULL;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* nearest-rank percentile of a sorted array */
static double pct_us(const int64_t *v, long n, double q) {
    long rank = (long)(q * (double)n + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return (double)v[rank - 1] / 1000.0;
}

int main(int argc, char **argv) {
    if (argc < 5 || argc > 7) {
        fprintf(stderr, "usage: %s HOST PORT RATE SECONDS [CONNS [PATH]]\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *port = argv[2];
    double rate = atof(argv[3]), seconds = atof(argv[4]);
    g_conns = argc > 5 ? atoi(argv[5]) : 1;
    const char *path = argc > 6 ? argv[6] : "/paced";
    if (rate <= 0 || seconds <= 0 || g_conns < 1) fail("RATE, SECONDS and CONNS must be positive");
    long total = (long)(rate * seconds);
    g_period_ns = (int64_t)(1e9 / rate);

    static char request[1024];
    int rl = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n", path, host, port);
    if (rl < 0 || (size_t)rl >= sizeof request) fail("request too long");
    g_request = request;
    g_request_len = (size_t)rl;

    if (prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL) != 0) die("prctl(PR_SET_TIMERSLACK)");
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai != 0) {
        fprintf(stderr, "paced_client: %s: %s\n", host, gai_strerror(gai));
        return 1;
    }
    struct conn *conns = calloc((size_t)g_conns, sizeof *conns);
    if (conns == NULL) die("calloc");
    for (int i = 0; i < g_conns; i++) {
        struct conn *c = &conns[i];
        c->index = i;
        c->n = total / g_conns + (i < total % g_conns ? 1 : 0);
        c->lat_ns = malloc(sizeof(int64_t) * (size_t)(c->n + 1));
        c->lag_ns = malloc(sizeof(int64_t) * (size_t)(c->n + 1));
        c->svc_ns = malloc(sizeof(int64_t) * (size_t)(c->n + 1));
        c->wake_ns = malloc(sizeof(int64_t) * (size_t)(c->n + 1));
        if (c->lat_ns == NULL || c->lag_ns == NULL || c->svc_ns == NULL || c->wake_ns == NULL)
            die("malloc");
        c->fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (c->fd < 0) die("socket");
        int one = 1;
        if (setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) die("TCP_NODELAY");
        if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) != 0) die("connect");
        /* one unmeasured request per connection: the server's first-request work is not sampled */
        send_all(c->fd, g_request, g_request_len);
        read_response(c);
    }
    freeaddrinfo(ai);

    g_t0_ns = now_ns() + 20 * 1000000; /* every thread is sleeping before the first request is due */
    pthread_t *threads = calloc((size_t)g_conns, sizeof *threads);
    if (threads == NULL) die("calloc");
    for (int i = 0; i < g_conns; i++) {
        int rc = pthread_create(&threads[i], NULL, run_conn, &conns[i]);
        if (rc != 0) {
            errno = rc;
            die("pthread_create");
        }
    }
    int64_t last_end = g_t0_ns;
    long n = 0, behind = 0;
    for (int i = 0; i < g_conns; i++) {
        pthread_join(threads[i], NULL);
        n += conns[i].n;
        behind += conns[i].behind;
        if (conns[i].last_end_ns > last_end) last_end = conns[i].last_end_ns;
    }
    if (n == 0) fail("no request measured (RATE * SECONDS < 1)");
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)n), *lag = malloc(sizeof(int64_t) * (size_t)n);
    int64_t *svc = malloc(sizeof(int64_t) * (size_t)n), *wake = malloc(sizeof(int64_t) * (size_t)n);
    if (lat == NULL || lag == NULL || svc == NULL || wake == NULL) die("malloc");
    long at = 0, n_wake = 0;
    for (int i = 0; i < g_conns; i++) {
        memcpy(lat + at, conns[i].lat_ns, sizeof(int64_t) * (size_t)conns[i].n);
        memcpy(lag + at, conns[i].lag_ns, sizeof(int64_t) * (size_t)conns[i].n);
        memcpy(svc + at, conns[i].svc_ns, sizeof(int64_t) * (size_t)conns[i].n);
        memcpy(wake + n_wake, conns[i].wake_ns, sizeof(int64_t) * (size_t)conns[i].n_wake);
        n_wake += conns[i].n_wake;
        at += conns[i].n;
        close(conns[i].fd);
    }
    qsort(lat, (size_t)n, sizeof *lat, cmp_i64);
    qsort(lag, (size_t)n, sizeof *lag, cmp_i64);
    qsort(svc, (size_t)n, sizeof *svc, cmp_i64);
    qsort(wake, (size_t)n_wake, sizeof *wake, cmp_i64);
    printf("{\"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, "
           "\"send_lag_p99_us\": %.1f, \"wake_p99_us\": %.1f, \"sent_p99_us\": %.1f, \"n\": %ld, "
           "\"conns\": %d, \"rate\": %.1f, \"behind\": %ld}\n",
           pct_us(lat, n, 0.50), pct_us(lat, n, 0.99), pct_us(lat, n, 0.999), pct_us(lat, n, 1.0),
           pct_us(lag, n, 0.99), n_wake ? pct_us(wake, n_wake, 0.99) : 0.0, pct_us(svc, n, 0.99), n,
           g_conns, (double)n * 1e9 / (double)(last_end - g_t0_ns), behind);
    return 0;
}
