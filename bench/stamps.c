/*
 * Where a proxy's user time goes on the message path, without a profiler:
 * an LD_PRELOAD shim that stamps the TSC around the proxy's epoll_wait,
 * recv and send calls. bench/stamps.py reads the dumps and gives, per turn
 * of the event loop, the time from epoll_wait's return to the recv call
 * (the event loop's dispatch) and from recv's return to the send call
 * (parsing, routing and framing the message): the user-space part of a hop.
 * It works the same on tabmux and nginx (single process: master_process
 * off), so the two are compared like for like. See BENCHMARKS.md, "Fifth
 * pass".
 *
 *   gcc -O2 -shared -fPIC -o /tmp/stamps.so bench/stamps.c -ldl
 *   STAMPS_DIR=/tmp/stamps LD_PRELOAD=/tmp/stamps.so taskset -c 1 PROXY ...
 *
 * One event loop thread is assumed (tabmux with worker_threads = 1, one
 * nginx worker). The dump (one "event tsc" line per call) is written when
 * the process exits normally, to STAMPS_DIR or /tmp (nginx clears its
 * environment unless its configuration says `env STAMPS_DIR;`).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <x86intrin.h>

#define N (1 << 21)
static uint64_t stamps[N];
static unsigned long used;

enum { WAIT_IN = 20, WAIT_OUT, RECV_IN, RECV_OUT, SEND_IN, SEND_OUT };

static inline void stamp(uint64_t event) {
    if (used < N)
        stamps[used++] = (event << 56) | (__rdtsc() & ((1ULL << 56) - 1));
}

/* Defines `name` to call the real one between two stamps. */
#define STAMPED(ret, name, in, out, params, args)       \
    ret name params {                                   \
        static ret(*real) params;                       \
        if (!real)                                      \
            real = dlsym(RTLD_NEXT, #name);             \
        stamp(in);                                      \
        ret r = real args;                              \
        stamp(out);                                     \
        return r;                                       \
    }

STAMPED(int, epoll_wait, WAIT_IN, WAIT_OUT,
        (int epfd, struct epoll_event *events, int max, int timeout),
        (epfd, events, max, timeout))
STAMPED(ssize_t, recv, RECV_IN, RECV_OUT,
        (int fd, void *buf, size_t len, int flags), (fd, buf, len, flags))
STAMPED(ssize_t, send, SEND_IN, SEND_OUT,
        (int fd, const void *buf, size_t len, int flags), (fd, buf, len, flags))

__attribute__((destructor)) static void dump(void) {
    const char *dir = getenv("STAMPS_DIR");
    char path[512];
    if (used < 100)
        return;
    snprintf(path, sizeof path, "%s/stamps.%d.txt", dir ? dir : "/tmp", (int)getpid());
    FILE *f = fopen(path, "w");
    if (!f)
        return;
    for (unsigned long i = 0; i < used; i++)
        fprintf(f, "%lu %lu\n", (unsigned long)(stamps[i] >> 56),
                (unsigned long)(stamps[i] & ((1ULL << 56) - 1)));
    fclose(f);
}
